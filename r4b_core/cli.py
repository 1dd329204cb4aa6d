"""`r4b` — the command line. Each stage command loads the run config, then calls the stage's
`run_<stage>()` function; heavy imports (torch, transformers, mlflow) happen inside commands so
`r4b --help` is instant.

    r4b run --config configs/tiny.yaml          the whole pipeline (kfp.local)
    r4b anneal --config configs/tiny.yaml       one stage
    r4b config check configs/r4b-4b.yaml        validate a config, print the resolved values
"""

from __future__ import annotations

import argparse
import os
import sys

from r4b_core.errors import R4BError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _load(args):
    from r4b_core.config import load_config

    return load_config(args.config, args.set)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default="configs/tiny.yaml", help="run config YAML (default: %(default)s)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override a config value, e.g. --set anneal.steps=20 (repeatable)")


# --- config ---------------------------------------------------------------------------------
def _cmd_config_check(args) -> int:
    from r4b_core.config import dump_config, load_config

    cfg = load_config(args.path, args.set)
    print(dump_config(cfg) if args.show else f"{args.path}: ok ({cfg.name})")
    return 0


def _add_config(sub) -> None:
    p = sub.add_parser("config", help="validate and show run configs")
    s = p.add_subparsers(dest="action", required=True)
    c = s.add_parser("check", help="validate a config file; print every problem with file:line")
    c.add_argument("path")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("--show", action="store_true", help="print the resolved config")
    c.set_defaults(func=_cmd_config_check)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="r4b",
        description="Train auto-thinking multimodal models (R-4B recipe): "
                    "curate -> anneal -> bpo -> eval -> register -> serve.",
    )
    parser.add_argument("--version", action="version", version=f"r4b {__import__('r4b_core').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_config(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except R4BError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished work is kept (stages resume from their last checkpoint)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
