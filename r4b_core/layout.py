"""Where each stage reads and writes inside a run's storage prefix.

    <root>/<name>/
      config.yaml                 the resolved run config (what PyTorchJob pods read)
      data/{train,rl,eval}.jsonl  raw records + images/   (synthetic generator or user data)
      base_model/                 the starting model: the tiny model as built, or a composed vision
                                  tower + LM pair saved once (a Hugging Face id / folder is read where it is)
      curate/sft.jsonl            bi-mode SFT dataset + manifest.json, rejects.jsonl
      anneal/model/               annealed model (HF save_pretrained) + manifest.json
      anneal/checkpoints/step-N/  resumable training state
      bpo/model/, bpo/checkpoints/
      eval/<tag>/report.json      three-mode evaluation of a model

Stages take explicit URIs. The pipeline passes each stage the URIs of its input artifacts; these
functions only give the defaults of a stage run alone (`r4b anneal` without --train), so a user
who brings their own orchestration can put things anywhere.
"""

from __future__ import annotations

from r4b_core.config import COMPOSED_BASES, RunConfig


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def run_root(cfg: RunConfig) -> str:
    return cfg.run_uri()


def config_uri(cfg: RunConfig) -> str:
    return _join(run_root(cfg), "config.yaml")


def data_dir(cfg: RunConfig) -> str:
    return _join(run_root(cfg), "data")


def split_uri(cfg: RunConfig, split: str) -> str:
    """A data split: the user's URI when configured, else the generated one."""
    user = {"train": cfg.data.train_uri, "rl": cfg.data.rl_uri, "eval": cfg.data.eval_uri}.get(split)
    return user or _join(data_dir(cfg), f"{split}.jsonl")


def init_model_dir(cfg: RunConfig) -> str:
    """The base model prepare builds: the tiny model (tokenizer, random weights) or a composed pair."""
    return _join(run_root(cfg), "base_model")


def base_model_dir(cfg: RunConfig) -> str:
    """The base every stage starts from, as prepare publishes it: the pretrained tiny model when
    model.pretrain.steps > 0, the built or composed model, else model.base itself (a Hugging
    Face id, a folder or a storage URI, read where it is)."""
    if cfg.model.base == "tiny" and cfg.model.pretrain.steps > 0:
        return model_dir(cfg, "pretrain")
    if cfg.model.base == "tiny" or cfg.model.base in COMPOSED_BASES:
        return init_model_dir(cfg)
    return cfg.model.base


def stage_dir(cfg: RunConfig, stage: str) -> str:
    return _join(run_root(cfg), stage)


def curated_uri(cfg: RunConfig) -> str:
    return _join(stage_dir(cfg, "curate"), "sft.jsonl")


def model_dir(cfg: RunConfig, stage: str) -> str:
    """The model a training stage ("anneal", "bpo", "grpo") produces."""
    return _join(stage_dir(cfg, stage), "model")


def checkpoints_dir(model_uri: str) -> str:
    """A training stage's checkpoints: `<stage>/checkpoints` next to its `<stage>/model`."""
    base = model_uri.rstrip("/")
    return _join(base.rsplit("/", 1)[0] if "/" in base else ".", "checkpoints")


def eval_dir(cfg: RunConfig, tag: str) -> str:
    return _join(stage_dir(cfg, "eval"), tag)
