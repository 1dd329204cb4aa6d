"""Where each stage reads and writes inside a run's storage prefix.

    <root>/<name>/
      config.yaml                 the resolved run config (what PyTorchJob pods read)
      data/{train,rl,eval}.jsonl  raw records + images/   (synthetic generator or user data)
      base_model/                 the starting model (tiny: built here; else a copy/reference)
      curate/sft.jsonl            bi-mode SFT dataset + manifest.json, rejects.jsonl
      anneal/model/               annealed model (HF save_pretrained) + manifest.json
      anneal/checkpoints/step-N/  resumable training state
      bpo/model/, bpo/checkpoints/
      eval/<tag>/report.json      three-mode evaluation of a model

Stages take explicit URIs; the CLI and the pipeline fill them from here, so a user who brings
their own orchestration can put things anywhere.
"""

from __future__ import annotations

from r4b_core.config import RunConfig


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
    """The tiny model as built: tokenizer and random weights."""
    return _join(run_root(cfg), "base_model")


def base_model_dir(cfg: RunConfig) -> str:
    """The base every stage starts from: the pretrained tiny model when model.pretrain.steps > 0."""
    if cfg.model.base == "tiny" and cfg.model.pretrain.steps > 0:
        return model_dir(cfg, "pretrain")
    return init_model_dir(cfg)


def stage_dir(cfg: RunConfig, stage: str) -> str:
    return _join(run_root(cfg), stage)


def curated_uri(cfg: RunConfig) -> str:
    return _join(stage_dir(cfg, "curate"), "sft.jsonl")


def model_dir(cfg: RunConfig, stage: str) -> str:
    """The model a training stage ("anneal", "bpo", "grpo") produces."""
    return _join(stage_dir(cfg, stage), "model")


def checkpoints_dir(cfg: RunConfig, stage: str) -> str:
    return _join(stage_dir(cfg, stage), "checkpoints")


def eval_dir(cfg: RunConfig, tag: str) -> str:
    return _join(stage_dir(cfg, "eval"), tag)
