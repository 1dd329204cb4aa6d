"""The pipeline, end to end: compile to KFP IR, run it with kfp.local against a real SeaweedFS and a
real `mlflow server`, rerun it (every stage skips), and survive an S3 outage during an upload.

The run uses a micro version of configs/tiny.yaml (tens of items, a few steps, the in-process
engine) so it takes minutes on 2 cores; `make run` is the full tiny run.
"""

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from r4b_core import layout
from r4b_core.config import load_config

REPO = Path(__file__).resolve().parents[2]

MICRO = [
    "data.synthetic.train_size=48", "data.synthetic.rl_size=8", "data.synthetic.eval_size=12",
    "curate.annotator=base", "curate.num_samples=2", "curate.annotator_train_steps=2", "curate.max_new_tokens=8",
    "anneal.steps=4", "anneal.optim.warmup_steps=1",
    "anneal.compliance_samples=2", "anneal.checkpoint_every=2", "anneal.log_every=2",
    "bpo.steps=1", "bpo.prompts_per_step=2", "bpo.group_size=2", "bpo.micro_batch_size=8", "bpo.engine=hf",
    "bpo.max_new_tokens_think=12", "bpo.max_new_tokens_no_think=4", "bpo.probe_size=2",
    "eval.max_new_tokens=12", "eval.limit=6", "model.pretrain.steps=2", "model.pretrain.arithmetic_items=16",
]


def test_compiled_pipeline_loads_back_with_the_kfp_sdk(tmp_path):
    from kfp import components

    out = tmp_path / "r4b.yaml"
    subprocess.run([sys.executable, "-m", "r4b_kfp.cli", "pipeline", "compile", "--config",
                    str(REPO / "configs/r4b-4b.yaml"), "--out", str(out), "--grpo-control"], check=True, cwd=REPO)
    pipeline = components.load_component_from_file(str(out))
    assert pipeline.name == "r4b-r4b-4b"
    spec, platform = list(yaml.safe_load_all(out.read_text()))
    tasks = spec["root"]["dag"]["tasks"]
    assert {"prepare", "curate", "anneal", "bpo", "bpo-2", "evaluate", "evaluate-2", "evaluate-3",
            "register", "deploy"} <= set(tasks)
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"ghcr.io/r4b-project/r4b-platform:0.1.0"}
    # No runtime pip installs: the image carries r4b and kfp.
    commands = json.dumps(spec["deploymentSpec"]["executors"])
    assert "pip install" not in commands
    # Credentials come from the Secret, never from parameters.
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name, executor in executors.items():
        assert executor["secretAsEnv"][0]["secretName"] == "r4b-credentials", name
    params = spec["root"]["inputDefinitions"]["parameters"]
    default = params["config_yaml"]["defaultValue"]
    assert json.loads(default)["name"] == "r4b-4b"
    assert "aws_secret" not in default.lower()
    # what a person fills in the KFP UI: where the config is, and what to change in it
    assert params["config_uri"] == {"defaultValue": "", "isOptional": True, "parameterType": "STRING"}
    assert params["overrides"] == {"defaultValue": [], "isOptional": True, "parameterType": "LIST"}


def test_ui_parameters_are_resolved_in_the_first_task_with_every_problem_at_once(tmp_path, capfd):
    """A run started with `config_uri` (a YAML in storage) and `overrides`: prepare reads that YAML,
    applies the overrides and, when they are wrong, fails before anything runs, listing each one."""
    from kfp import local

    from r4b_kfp.pipelines.r4b_pipeline import build_pipeline

    cfg = load_config(REPO / "configs/tiny.yaml", [f"storage.root={tmp_path / 'runs'}"])
    stored = tmp_path / "store" / "run.yaml"
    stored.parent.mkdir()
    raw = cfg.model_dump(mode="json")
    raw["anneal"]["steps"] = 0                       # the stored YAML has a problem of its own
    stored.write_text(yaml.safe_dump({**raw, "name": "from-uri"}))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"),
               raise_on_error=True)
    pipeline = build_pipeline(cfg, with_secrets=False)
    bad = ["bpo.steps=many", "anneal.colour=red", "eval.limit"]
    with pytest.raises(RuntimeError, match=r"Inner task failed: \S*'prepare'"):
        pipeline(config_uri=str(stored), overrides=bad)
    out = capfd.readouterr()
    text = out.out + out.err
    for line in ("--set bpo.steps=many: bpo.steps: Input should be a valid integer",
                 "--set anneal.colour=red: anneal.colour: unknown key",
                 "--set eval.limit: expected KEY.PATH=VALUE"):
        assert line in text, text[-3000:]
    assert re.search(rf"{re.escape(str(stored))}:\d+: anneal\.steps: Input should be greater than or equal to 1",
                     text), text[-3000:]
    assert not (tmp_path / "runs" / "from-uri").exists() and not (tmp_path / "runs" / "tiny").exists()


def _run(args, env, cwd):
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "r4b_kfp.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=1500)
    return proc, time.time() - started


@pytest.mark.timeout(1800)
def test_local_pipeline_on_s3_and_mlflow_server(seaweedfs, s3_env, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    root = f"s3://{seaweedfs.bucket}/pipeline-{int(time.time())}"
    sets = [*MICRO, f"storage.root={root}", f"tracking.uri={mlflow_server.uri}",
            "tracking.experiment=r4b-pipeline-test", "tracking.registered_model=r4b-pipeline-test"]
    env = {**os.environ, **seaweedfs.env(), "R4B_CACHE_DIR": str(tmp_path / "cache")}
    args = ["run", "--config", str(REPO / "configs/tiny.yaml"), "--s3-endpoint", seaweedfs.endpoint_url]
    for s in sets:
        args += ["--set", s]
    proc, first_s = _run(args, env, tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "r4b run finished" in proc.stdout
    # A quiet console: a line per task start/end, the stages' own lines, the table; the rest in the log.
    console = proc.stdout.splitlines()
    for label in ("prepare data + base model", "curate", "anneal", "eval annealed", "bpo", "eval BPO",
                  "register + promotion gate", "deploy champion"):
        assert sum(line.startswith(f"✓ {label}  ") for line in console) == 1, (label, proc.stdout[-3000:])
    assert len(console) < 120, proc.stdout
    assert "executor_input" not in proc.stdout and "schemaTitle" not in proc.stdout
    log = Path(re.search(r"full log: (\S+\.log)", proc.stdout).group(1))
    log = log if log.is_absolute() else tmp_path / log
    assert "Got executor_input" in log.read_text() and log.read_text().count("\n") > 3 * len(console)

    cfg = load_config(REPO / "configs/tiny.yaml", sets)
    from r4b_core.storage import Store

    store = Store(s3_endpoint_url=seaweedfs.endpoint_url)
    report = json.loads(store.read_text(layout.eval_dir(cfg, "bpo") + "/report.json"))
    assert set(report["modes"]) == {"auto", "think", "no_think"}
    # the --set values reached the tasks as the pipeline's `overrides` parameter, applied by prepare
    resolved = yaml.safe_load(store.read_text(layout.config_uri(cfg)))
    assert resolved["anneal"]["steps"] == 4 and resolved["bpo"]["engine"] == "hf"
    for stage_prefix in (layout.curated_uri(cfg).rsplit("/", 1)[0], layout.model_dir(cfg, "anneal"),
                         layout.model_dir(cfg, "bpo"), layout.eval_dir(cfg, "anneal")):
        assert store.read_manifest(stage_prefix) is not None, stage_prefix
    assert store.exists(layout.model_dir(cfg, "bpo") + "/model.safetensors")

    client = MlflowClient(mlflow_server.uri)
    champion = client.get_model_version_by_alias("r4b-pipeline-test", "champion")
    assert champion.source == layout.model_dir(cfg, "bpo")
    assert champion.tags["r4b.gate"] == "passed"
    exp = client.get_experiment_by_name("r4b-pipeline-test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("r4b.kind") == "pipeline"]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    stages = {r.data.tags.get("r4b.stage") for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert {"curate", "anneal", "bpo"} <= stages, stages

    # Rerun: every stage finds its manifest and skips; nothing is retrained or re-registered.
    committed = {p: store.read_manifest(p)["committed_at"] for p in (layout.model_dir(cfg, "anneal"),
                                                                     layout.model_dir(cfg, "bpo"))}
    proc, second_s = _run(args, env, tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for prefix, at in committed.items():
        assert store.read_manifest(prefix)["committed_at"] == at, prefix
    assert len(client.search_model_versions("name='r4b-pipeline-test'")) == 1
    print(f"pipeline: first run {first_s:.0f} s, rerun {second_s:.0f} s (all stages skipped)")


def test_failed_task_is_one_clear_block_and_verbose_shows_kfp(tmp_path):
    """A task that fails: its output, a ✗ line, the error naming the full log; --verbose adds KFP's view."""
    env = {**os.environ, "R4B_CACHE_DIR": str(tmp_path / "cache")}
    args = ["run", "--config", str(REPO / "configs/tiny.yaml"), "--set", f"storage.root={tmp_path / 'runs'}",
            "--set", f"data.train_uri={tmp_path / 'missing.jsonl'}"]
    proc, _ = _run(args, env, tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("r4b run tiny: 8 tasks") and lines[1] == "▶ prepare data + base model"
    assert any(line.startswith("✗ prepare data + base model  failure after") for line in lines), proc.stdout
    assert f"{tmp_path / 'missing.jsonl'}: read: no such file" in proc.stdout
    assert "executor_input" not in proc.stdout
    [error] = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    log = Path(re.search(r"all of it in (\S+\.log)", error).group(1))
    assert "Inner task failed: 'prepare'" in error and "Got executor_input" in log.read_text()

    proc, _ = _run([*args, "--verbose"], env, tmp_path)
    assert proc.returncode == 2 and "Got executor_input" in proc.stdout and "Its output is above" in proc.stderr


def test_prepare_survives_an_s3_outage_during_upload(seaweedfs, s3_env, s3_root):
    """SeaweedFS stopped for 10 s while the data stage uploads: retries carry it; nothing lost."""
    from r4b_core.prepare import prepare_data
    from r4b_core.storage import Store

    cfg = load_config(REPO / "configs/tiny.yaml", [f"storage.root={s3_root}", "data.synthetic.train_size=400",
                                                   "data.synthetic.rl_size=50", "data.synthetic.eval_size=50"])
    store = Store.from_config(cfg.storage, s3_endpoint_url=seaweedfs.endpoint_url)
    outage = threading.Event()

    def take_s3_down():
        # Wait until the upload has started (the first images are in the bucket).
        deadline = time.time() + 60
        while time.time() < deadline and not store.list(layout.data_dir(cfg)):
            time.sleep(0.05)
        seaweedfs.stop(grace_s=0.5)
        outage.set()
        time.sleep(10)
        seaweedfs.start()

    t = threading.Thread(target=take_s3_down)
    t.start()
    try:
        splits = prepare_data(cfg, store)
    finally:
        t.join()
    assert outage.is_set()
    assert store.retries > 0
    manifest = store.read_manifest(layout.data_dir(cfg))
    assert manifest["counts"] == {"train": 400, "rl": 50, "eval": 50}
    for split, n in manifest["counts"].items():
        lines = store.read_text(splits[split]).splitlines()
        assert len(lines) == n
        record = json.loads(lines[-1])
        assert store.exists(layout.data_dir(cfg) + "/" + record["images"][0])
