"""The stage commands of `r4b`. Each loads the run config, then calls the stage's `run_<stage>()`
function; heavy imports (torch, transformers, mlflow) happen inside commands so `r4b --help` is
instant. The `r4b` entry point (r4b_kfp/cli.py) adds the commands that need the KFP pipeline,
`r4b run` and `r4b pipeline`; this module knows nothing of them.

    python -m r4b_core.cli anneal --config configs/tiny.yaml       one stage (what launchers run)
    r4b config check configs/r4b-4b.yaml                           validate a config, print the resolved values
"""

from __future__ import annotations

import argparse
import os
import sys

from r4b_core.errors import R4BError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load_args_config(args):
    from r4b_core.config import load_config

    return load_config(args.config, args.set)


def config_args(p: argparse.ArgumentParser) -> None:
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


# --- data -----------------------------------------------------------------------------------
def _cmd_data_generate(args) -> int:
    import time
    from collections import Counter

    from r4b_core import layout
    from r4b_core.data.schema import read_jsonl
    from r4b_core.data.synthetic import generate_all

    cfg = load_args_config(args)
    out = args.out or layout.data_dir(cfg)
    if out.startswith("file://"):
        out = out[len("file://"):]
    if "://" in out:
        raise R4BError(f"data generate writes local files, got --out {out}; pass a local --out DIR and "
                       "upload the folder (JSONL + images/) to object storage")
    t0 = time.time()
    tiny = cfg.model.tiny
    paths = generate_all(cfg.data.synthetic, out, image_size=tiny.image_size, patch_size=tiny.patch_size)
    print(f"{'split':<6} {'category':<11} {'difficulty':>10} {'count':>6}")
    for split, path in paths.items():
        counts = Counter((r.category, r.difficulty) for r in read_jsonl(path).records)
        for (category, level), n in sorted(counts.items()):
            print(f"{split:<6} {category:<11} {level:>10} {n:>6}")
        print(f"{split:<6} {'total':<11} {'':>10} {sum(counts.values()):>6}   {path}")
    print(f"synthetic data ({tiny.image_size}x{tiny.image_size} images) written to {out} in {time.time() - t0:.1f} s")
    return 0


def _cmd_data_check(args) -> int:
    from r4b_core.config import load_config
    from r4b_core.data.images import check_images
    from r4b_core.data.schema import DataError, parse_jsonl
    from r4b_core.storage import Store, StorageNotFoundError

    cfg = load_config(args.config, args.set)
    store = Store.from_config(cfg.storage)
    try:
        data = store.read_bytes(args.path)
    except StorageNotFoundError:
        raise DataError(f"{args.path}: file not found") from None
    result = parse_jsonl(data, args.path, on_error="collect", max_question_chars=cfg.data.max_question_chars)
    bad, checked, note = list(result.bad), 0, None
    if not args.no_images:
        image_bad, checked, note = check_images(result.records, result.rows, args.path, store)
        bad = sorted(bad + image_bad, key=lambda b: b.line)
    for line in bad[: args.max_errors]:
        print(f"{line}", file=sys.stderr)
    if len(bad) > args.max_errors:
        print(f"... and {len(bad) - args.max_errors} more problems", file=sys.stderr)
    if note:
        print(note, file=sys.stderr)
    lines_bad = len({b.line for b in bad})
    images = "images not checked (--no-images)" if args.no_images else f"{checked} images checked"
    print(f"{args.path}: {len(result.records) + len(result.bad) - lines_bad} valid records, {lines_bad} bad lines; "
          f"{images}")
    return 2 if bad or note else 0


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="generate the synthetic splits, or check a JSONL file")
    s = p.add_subparsers(dest="action", required=True)
    c = s.add_parser("check", help="validate a JSONL of records and their images; print every problem as "
                                   "file:line: field: problem")
    c.add_argument("path", help="JSONL file: a local path or a storage URI (s3://...)")
    c.add_argument("--config", "-c", default=None,
                   help="run config for storage.* and data.max_question_chars (default: built-in defaults)")
    c.add_argument("--set", action="append", metavar="KEY=VALUE", default=[], help="override a config value")
    c.add_argument("--no-images", action="store_true",
                   help="skip the image checks (each image must stay inside the data folder, exist and decode)")
    c.add_argument("--max-errors", type=int, default=20)
    c.set_defaults(func=_cmd_data_check)
    c = s.add_parser("generate", help="write train/rl/eval JSONL + PNGs (sizes from data.synthetic)")
    config_args(c)
    c.add_argument("--out", help="output folder (default: <run>/data)")
    c.set_defaults(func=_cmd_data_generate)


# --- model ----------------------------------------------------------------------------------
def _cmd_model_init(args) -> int:
    import time
    from pathlib import Path

    cfg = load_args_config(args)
    t0 = time.time()
    if cfg.model.base == "tiny":
        from r4b_core.data.synthetic import draw_split, tokenizer_corpus
        from r4b_core.models.tiny import build_tiny_vlm

        if args.corpus:
            from r4b_core.data.schema import read_jsonl

            records = [r for path in args.corpus for r in read_jsonl(path).records]
        else:   # the synthetic train split's texts (no images needed for a tokenizer)
            records = draw_split("train", cfg.data.synthetic.train_size, cfg.data.synthetic)
            records = [{"question": i.question, "answer": i.answer, "reasoning": i.reasoning} for i in records]
        out = build_tiny_vlm(cfg.model.tiny, tokenizer_corpus(records), Path(args.out), seed=cfg.seed)
    else:   # a HF id / folder, or the paper-scale vision tower + LM pair: load (or compose) and save
        from r4b_core.models.loading import load_model, save_model

        model, processor = load_model(cfg.model.base, cfg.model)
        out = save_model(model, processor, Path(args.out))
    print(f"model ({cfg.model.base}) written to {out} in {time.time() - t0:.1f} s")
    return 0


def _add_model(sub) -> None:
    p = sub.add_parser("model", help="build or fetch the base model folder (tiny VLM, or a composed pair)")
    s = p.add_subparsers(dest="action", required=True)
    c = s.add_parser("init", help="write model.base as a save_pretrained folder that transformers and vLLM load")
    config_args(c)
    c.add_argument("--out", required=True, help="output folder (written atomically)")
    c.add_argument("--corpus", action="append", metavar="JSONL", default=[],
                   help="records whose texts train the tiny tokenizer (default: the synthetic train split)")
    c.set_defaults(func=_cmd_model_init)


# --- curate / eval ----------------------------------------------------------------------------
def _stage_tracker(cfg):
    from r4b_core.tracking import pipeline_tracker

    return pipeline_tracker(cfg)


def _cmd_curate(args) -> int:
    from r4b_core import layout
    from r4b_core.curate import run_curate

    cfg = load_args_config(args)
    run_curate(cfg, args.input or layout.split_uri(cfg, "train"), args.out or layout.curated_uri(cfg),
               tracker=_stage_tracker(cfg), base_model_uri=args.base_model)
    return 0


def _add_curate(sub) -> None:
    p = sub.add_parser("curate", help="label raw records reasoning/direct with an annotator model -> bi-mode SFT data")
    config_args(p)
    p.add_argument("--input", help="raw JSONL URI (default: the run's train split)")
    p.add_argument("--base-model", help="the run's base model URI, the annotator of curate.annotator: base "
                                        "(default: what r4b prepare publishes)")
    p.add_argument("--out", help="curated JSONL URI (default: <run>/curate/sft.jsonl)")
    p.set_defaults(func=_cmd_curate)


def _budget_list(text: str) -> str:
    """--thinking-budget 0,16,64 -> the `--set eval.thinking_budgets=[0,16,64]` it stands for."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: give numbers of reasoning tokens >= 0 separated by commas, "
                                         "e.g. --thinking-budget 0,16,64")
    return f"eval.thinking_budgets=[{','.join(parts)}]"


def _cmd_eval(args) -> int:
    from r4b_core import layout
    from r4b_core.evaluate import run_eval

    if args.thinking_budget:
        args.set.append(args.thinking_budget)
    cfg = load_args_config(args)
    tag = args.tag
    model = args.model or (layout.base_model_dir(cfg) if tag == "base" else layout.model_dir(cfg, tag))
    run_eval(cfg, model, args.data or layout.split_uri(cfg, "eval"), args.out or layout.eval_dir(cfg, tag), tag,
             tracker=_stage_tracker(cfg), compare=args.compare)
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model in auto / think / no-think mode -> report.json + report.md")
    config_args(p)
    p.add_argument("--tag", default="bpo",
                   help="name of this evaluation; without --model also the stage whose model is evaluated "
                        "(base, anneal, bpo, grpo; default: %(default)s)")
    p.add_argument("--model", help="model folder / URI (default: <run>/<tag>/model)")
    p.add_argument("--data", help="eval JSONL URI (default: the run's eval split)")
    p.add_argument("--out", help="output folder URI (default: <run>/eval/<tag>)")
    p.add_argument("--compare", metavar="OTHER_REPORT_URI",
                   help="another model's report.json (or its eval folder) to show side by side")
    p.add_argument("--thinking-budget", metavar="N,N,...", type=_budget_list,
                   help="sweep these thinking budgets in auto and think mode (eval.thinking_budgets), e.g. 0,16,64: "
                        "accuracy vs budget in the report")
    p.set_defaults(func=_cmd_eval)


# --- anneal ------------------------------------------------------------------------------------
def _cmd_anneal(args) -> int:
    from r4b_core import layout
    from r4b_core.anneal import run_anneal

    cfg = load_args_config(args)
    out = args.out or layout.model_dir(cfg, "anneal")
    manifest = run_anneal(cfg, args.train or layout.curated_uri(cfg), args.base_model or layout.base_model_dir(cfg),
                          out, tracker=_stage_tracker(cfg))
    if int(os.environ.get("RANK", "0")) == 0:
        if manifest.get("skipped"):
            print(f"anneal: {out} is complete for this config (hash {manifest['config_hash']}); skipped")
        else:
            m = manifest["metrics"]
            print(f"anneal: wrote {out} ({manifest['steps']} steps, loss {m['loss']}, "
                  f"compliance think {m['compliance_think']} / no-think {m['compliance_no_think']}, "
                  f"{manifest['wall_time_s']} s)")
    return 0


def _add_anneal(sub) -> None:
    p = sub.add_parser("anneal", help="bi-mode annealing (SFT on thinking + direct targets); under torchrun: DDP "
                                      "or DeepSpeed (anneal.distributed.deepspeed)")
    config_args(p)
    p.add_argument("--train", help="curated bi-mode JSONL URI (default: <run>/curate/sft.jsonl)")
    p.add_argument("--base-model", help="starting model URI (default: what r4b prepare publishes)")
    p.add_argument("--out", help="output model URI (default: <run>/anneal/model)")
    p.set_defaults(func=_cmd_anneal)


# --- bpo ---------------------------------------------------------------------------------------
def _cmd_bpo(args) -> int:
    from r4b_core import layout
    from r4b_core.bpo import run_bpo

    cfg = load_args_config(args)
    out = args.out or layout.model_dir(cfg, cfg.bpo.algorithm)       # bpo/model or grpo/model
    manifest = run_bpo(cfg, args.prompts or layout.split_uri(cfg, "rl"),
                       args.init_model or layout.model_dir(cfg, "anneal"), out, tracker=_stage_tracker(cfg))
    print(f"{manifest['stage']}: wrote {out} ({manifest['counts']['steps']} steps, "
          f"{manifest.get('wall_time_s', 0)} s)")
    return 0


def _add_bpo(sub) -> None:
    p = sub.add_parser("bpo", help="Bi-mode Policy Optimization (or the GRPO control: --set bpo.algorithm=grpo)")
    config_args(p)
    p.add_argument("--prompts", help="RL prompts JSONL URI (default: the run's rl split)")
    p.add_argument("--init-model", help="starting model URI (default: <run>/anneal/model)")
    p.add_argument("--out", help="output model URI (default: <run>/bpo/model, or <run>/grpo/model for grpo)")
    p.set_defaults(func=_cmd_bpo)


# --- prepare --------------------------------------------------------------------------------
def apply_service_flags(args, cfg):
    """`--s3-endpoint` / `--mlflow-uri`: the services this machine reaches, over the config's."""
    if getattr(args, "s3_endpoint", None):
        cfg.storage.s3_endpoint_url = args.s3_endpoint
    if getattr(args, "mlflow_uri", None):
        cfg.tracking.uri = args.mlflow_uri
    return cfg


def _cmd_prepare(args) -> int:
    from r4b_core.prepare import run_prepare

    out = run_prepare(apply_service_flags(args, load_args_config(args)))
    for key, value in out.items():
        print(f"{key}: {value}")
    return 0


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="publish the run config, data splits and base model")
    config_args(p)
    p.add_argument("--s3-endpoint")
    p.set_defaults(func=_cmd_prepare)


# --- registry ---------------------------------------------------------------------------------
def _cmd_register(args) -> int:
    from r4b_core import layout
    from r4b_core.promote import register_and_gate

    cfg = load_args_config(args)
    model_uri = args.model or layout.model_dir(cfg, "bpo")
    report_uri = args.report or layout.eval_dir(cfg, "bpo") + "/report.json"
    register_and_gate(cfg, model_uri, report_uri, pipeline_run_id=os.environ.get("R4B_PIPELINE_RUN_ID", ""))
    return 0


def _cmd_promote(args) -> int:
    from r4b_core.promote import promote_manually

    promote_manually(load_args_config(args), args.name, args.version, args.reason)
    return 0


def _add_registry(sub) -> None:
    p = sub.add_parser("register", help="register a model in MLflow and run the promotion gate")
    config_args(p)
    p.add_argument("--model", help="model storage URI (default: the run's bpo/model)")
    p.add_argument("--report", help="its eval report.json URI (default: the run's eval/bpo/report.json)")
    p.set_defaults(func=_cmd_register)
    p = sub.add_parser("promote", help="move the champion alias to a version by hand")
    config_args(p)
    p.add_argument("name", help="registered model name, e.g. r4b-tiny")
    p.add_argument("version", type=int)
    p.add_argument("--reason", required=True, help="why (recorded as a version tag)")
    p.set_defaults(func=_cmd_promote)


# --- serve ------------------------------------------------------------------------------------
def _cmd_serve(args) -> int:
    from r4b_core import serve

    cfg = load_args_config(args)
    if args.fetch_only:
        if not args.out:
            raise R4BError("--fetch-only needs --out DIR: the folder the server will load the model from")
        resolved = serve.resolve_model(cfg, args.model)
        path = serve.fetch_model(cfg, resolved, out=args.out)
        print(f"fetched {resolved.describe()} into {path}")
        return 0
    if args.out:
        raise R4BError("--out is only used with --fetch-only; without it the model is served from where it is")
    serve.serve(cfg, args.model, host=args.host, port=args.port, log_path=args.log)
    return 0


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve a model on vLLM's OpenAI API with auto / long / short thinking "
                                     "(docs/serving.md)")
    p.add_argument("--config", "-c", default=None,
                   help="run config YAML / URI: tracking URI, storage, serve.* (default: built-in defaults; "
                        "MLFLOW_TRACKING_URI and AWS_* from the environment)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override a config value, e.g. --set serve.max_model_len=4096 (repeatable)")
    p.add_argument("--model", required=True,
                   help="models:/NAME@ALIAS or models:/NAME/VERSION (MLflow registry), a storage URI "
                        "(s3://..., file://...) or a local model folder")
    p.add_argument("--host", default=None, help="bind address (default: serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: serve.port; 0 = a free port)")
    p.add_argument("--log", default=None, help="vLLM log file (default: <run dir>/serving/vllm.log)")
    p.add_argument("--fetch-only", action="store_true",
                   help="resolve and copy the model to --out, then exit (the serving pod's init container)")
    p.add_argument("--out", default=None, help="with --fetch-only: the folder to write (atomically)")
    p.set_defaults(func=_cmd_serve)


# --- repro ------------------------------------------------------------------------------------
def _parse_seeds(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise R4BError(f"--seeds {text!r}: expected comma-separated integers, e.g. --seeds 0,1") from None


def _cmd_repro(args) -> int:
    from r4b_core.repro import mechanism_report, run_repro, run_seed

    cfg = load_args_config(args)
    seeds = _parse_seeds(args.seeds)
    tracker = _stage_tracker(cfg) if args.mlflow else None
    if args.mechanism:
        mechanism_report(cfg, (seeds or cfg.repro.seeds)[0], tracker=tracker)
        return 0
    if args.seed_only:   # a child of a parallel repro: its seeds' stages, no combined report
        for seed in seeds if seeds is not None else cfg.repro.seeds:
            run_seed(cfg, seed, tracker=tracker)
        return 0
    report = run_repro(cfg, seeds, tracker=tracker)
    return 0 if all(c.get("pass", True) for c in report["claims"].values()) or not args.strict else 1


def _add_repro(sub) -> None:
    p = sub.add_parser("repro", help="reproduce the paper's claims at toy scale (atrophy, BPO recovery, GRPO "
                                     "collapse) -> runs/<name>/repro/report.{json,md}")
    config_args(p)
    p.add_argument("--seeds", help="comma-separated seeds (default: repro.seeds), e.g. 0,1")
    p.add_argument("--mlflow", action="store_true", help="log every stage to MLflow (tracking.uri)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a claim does not reproduce")
    p.add_argument("--mechanism", action="store_true",
                   help="the mechanism figure instead: BPO vs GRPO per annotator strength (repro.mechanism) on the "
                        "first seed -> runs/<name>/repro/mechanism/")
    p.add_argument("--seed-only", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_repro)


def build_parser(*extra_commands) -> argparse.ArgumentParser:
    """The `r4b` parser; each of `extra_commands` adds its subcommands (listed first)."""
    parser = argparse.ArgumentParser(
        prog="r4b",
        description="Train auto-thinking multimodal models (R-4B recipe): "
                    "curate -> anneal -> bpo -> eval -> register -> serve.",
    )
    parser.add_argument("--version", action="version", version=f"r4b {__import__('r4b_core').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in extra_commands:
        add(sub)
    _add_prepare(sub)
    _add_config(sub)
    _add_registry(sub)
    _add_data(sub)
    _add_model(sub)
    _add_curate(sub)
    _add_eval(sub)
    _add_anneal(sub)
    _add_bpo(sub)
    _add_serve(sub)
    _add_repro(sub)
    return parser


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    args = (parser or build_parser()).parse_args(argv)
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
