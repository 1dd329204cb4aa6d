"""`r4b` — the command line: r4b_core's stage commands (r4b_core/cli.py) plus the two that need
the KFP pipeline, which r4b_core must not import.

    r4b run --config configs/tiny.yaml --set bpo.steps=5     the whole pipeline here (kfp.local)
    r4b pipeline compile --config configs/r4b-4b.yaml --out r4b.yaml
    r4b anneal --config configs/tiny.yaml                     one stage (r4b_core.cli)
"""

from __future__ import annotations

import os
import sys

from r4b_core import cli as core
from r4b_core.errors import R4BError


def _cmd_run(args) -> int:
    from r4b_kfp.pipelines.local_run import run_pipeline_locally

    from r4b_core.config import load_config

    # --set travels as the pipeline's `overrides` parameter, as a run started in the KFP UI
    cfg = core.apply_service_flags(args, load_config(args.config))
    run_pipeline_locally(cfg, with_grpo_control=args.grpo_control, verbose=args.verbose, overrides=args.set)
    return 0


def _cmd_pipeline_compile(args) -> int:
    from r4b_core.config import DEFAULT_PLATFORM_IMAGE
    from r4b_kfp.pipelines.r4b_pipeline import compile_pipeline

    cfg = core.load_args_config(args)
    compile_pipeline(cfg, args.out, with_grpo_control=args.grpo_control)
    image = cfg.launcher.image or DEFAULT_PLATFORM_IMAGE
    print(f"wrote {args.out} (pipeline r4b-{cfg.name}, image {image}); upload it in the KFP UI "
          "or run `r4b pipeline submit`")
    return 0


def _cmd_pipeline_submit(args) -> int:
    import json
    import tempfile

    import kfp

    from r4b_core.config import load_config
    from r4b_kfp.pipelines.r4b_pipeline import compile_pipeline

    host = args.host or os.environ.get("KFP_HOST")
    if not host:
        raise R4BError("no KFP endpoint: pass --host URL or set KFP_HOST (e.g. http://ml-pipeline-ui.kubeflow)")
    cfg = core.load_args_config(args)          # every --set problem at once, before submitting
    with tempfile.TemporaryDirectory() as tmp:
        path = compile_pipeline(cfg, f"{tmp}/r4b.yaml", with_grpo_control=args.grpo_control)
        client = kfp.Client(host=host, namespace=args.namespace)
        arguments = {"config_yaml": json.dumps(load_config(args.config).model_dump(mode="json")),
                     "overrides": list(args.set)}
        if args.config_uri:
            arguments["config_uri"] = args.config_uri
        run = client.create_run_from_pipeline_package(
            path, arguments=arguments,
            run_name=args.run_name or f"r4b-{cfg.name}", experiment_name=args.experiment or f"r4b-{cfg.name}",
            namespace=args.namespace)
    print(f"submitted run {run.run_id} to {host}")
    return 0


def add_pipeline_commands(sub) -> None:
    p = sub.add_parser("run", help="run the whole pipeline on this machine (kfp.local): what `make run` does")
    core.config_args(p)
    p.add_argument("--s3-endpoint", help="write artifacts to this S3 endpoint (storage.root must be s3://...)")
    p.add_argument("--mlflow-uri", help="log to this MLflow server instead of the SQLite file in the run dir")
    p.add_argument("--grpo-control", action="store_true", help="also train the plain-GRPO control and evaluate it")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print kfp.local's full output (executor inputs, task outputs) here too; it always goes to "
                        "<run dir>/logs/run-<time>.log")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("pipeline", help="compile or submit the Kubeflow pipeline")
    s = p.add_subparsers(dest="action", required=True)
    c = s.add_parser("compile", help="write KFP IR YAML (upload it in the KFP UI)")
    core.config_args(c)
    c.add_argument("--out", required=True, help="output YAML file")
    c.add_argument("--grpo-control", action="store_true")
    c.set_defaults(func=_cmd_pipeline_compile)
    c = s.add_parser("submit", help="compile and submit a run to a KFP endpoint")
    core.config_args(c)
    c.add_argument("--host", help="KFP API endpoint (default: $KFP_HOST)")
    c.add_argument("--namespace", default=None)
    c.add_argument("--experiment", default=None)
    c.add_argument("--run-name", default=None)
    c.add_argument("--config-uri", default=None,
                   help="the run reads its config from this YAML in object storage (the KFP parameter "
                        "config_uri) instead of --config's content; --set still applies")
    c.add_argument("--grpo-control", action="store_true")
    c.set_defaults(func=_cmd_pipeline_submit)


def main(argv: list[str] | None = None) -> int:
    return core.main(argv, core.build_parser(add_pipeline_commands))


if __name__ == "__main__":
    sys.exit(main())
