"""Models: the tiny VLM factory, its tokenizer/chat template, and loading/saving of any policy.

    from r4b_core.models import build_tiny_vlm, load_model, save_model, train_tokenizer, chat_template

Heavy libraries (torch, transformers) are imported inside the functions.
"""

from r4b_core.models.loading import load_model, save_model, saved_state_dict
from r4b_core.models.tiny import build_tiny_vlm
from r4b_core.models.tokenizer import chat_template, train_tokenizer

__all__ = ["build_tiny_vlm", "chat_template", "load_model", "save_model", "saved_state_dict", "train_tokenizer"]
