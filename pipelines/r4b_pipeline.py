"""The R-4B pipeline: prepare -> curate -> anneal -> eval -> BPO -> eval -> register/promote -> deploy.

    r4b pipeline compile --config configs/r4b-4b.yaml --out r4b.yaml   # upload in the KFP UI
    r4b run --config configs/tiny.yaml                                 # same pipeline, kfp.local

The run config stays the one source of every knob (r4b_core/config.py): a KFP parameter per knob
would be a second name for it. The pipeline's parameters say where the config comes from and what
to change in it, as a person fills them in the KFP UI:

    config_yaml   the whole config as one line of JSON (default: the compiled config)
    config_uri    a YAML in object storage (s3://bucket/configs/run.yaml); when set, used instead
    overrides     a list of KEY=VALUE in `--set` syntax, e.g. ["bpo.steps=80", "anneal.optim.lr=2e-5"]

The first task (prepare) resolves them and reports every problem at once, one line each, before
anything runs; `r4b run --set` and `r4b pipeline submit --set` fill `overrides`. The image comes
from `launcher.image` at compile time (null: DEFAULT_PLATFORM_IMAGE; the chart's ConfigMap is not
known then). Credentials reach the tasks from the Kubernetes Secret `launcher.secret_name` (null:
DEFAULT_CREDENTIALS_SECRET) through kfp-kubernetes, never as parameters.
"""

import json

from kfp import dsl

from r4b_core.config import DEFAULT_CREDENTIALS_SECRET, DEFAULT_PLATFORM_IMAGE, RunConfig
from r4b_core.launch import CLIENT_LABELS
from r4b_kfp.components.curate import curate
from r4b_kfp.components.evaluate import evaluate
from r4b_kfp.components.prepare import prepare
from r4b_kfp.components.registry import deploy, register
from r4b_kfp.components.train import anneal, bpo

# Environment variables the platform Secret provides (S3 + MLflow credentials).
SECRET_ENV = {
    "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
    "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
}


def build_pipeline(cfg: RunConfig, with_grpo_control: bool = False, with_secrets: bool = True):
    """The pipeline function for this config (its defaults are the config's YAML and image)."""
    image = cfg.launcher.image or DEFAULT_PLATFORM_IMAGE

    def op(func):
        return dsl.component(func, base_image=image, install_kfp_package=False)

    prepare_op, curate_op, anneal_op, bpo_op = op(prepare), op(curate), op(anneal), op(bpo)
    eval_op, register_op, deploy_op = op(evaluate), op(register), op(deploy)
    # One line of JSON (valid YAML): KFP copies defaults into a header comment of the compiled
    # file, and a multi-line default would break that file's YAML.
    default_yaml = json.dumps(cfg.model_dump(mode="json"), separators=(",", ":"))

    def secure(task, side_effects: bool = False):
        if with_secrets:
            from kfp import kubernetes

            kubernetes.use_secret_as_env(task, secret_name=cfg.launcher.secret_name or DEFAULT_CREDENTIALS_SECRET,
                                         secret_key_to_env=SECRET_ENV, optional=True)
            for key, value in CLIENT_LABELS.items():   # admitted by the chart's NetworkPolicies
                kubernetes.add_pod_label(task, key, value)
        if side_effects:
            task.set_caching_options(False)
        return task

    @dsl.pipeline(name=f"r4b-{cfg.name}", description="R-4B: bi-mode annealing + Bi-mode Policy Optimization")
    def r4b_pipeline(config_yaml: str = default_yaml, config_uri: str = "", overrides: list = []):
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        prep = secure(prepare_op(config_yaml=config_yaml, config_uri=config_uri, overrides=overrides,
                                 pipeline_run_id=run_id))
        prep.set_display_name("prepare data + base model")
        cfg_uri = prep.outputs["Output"]
        cur = secure(curate_op(config_uri=cfg_uri, pipeline_run_id=run_id, raw=prep.outputs["train"], base_model=prep.outputs["base_model"]))
        ann = secure(anneal_op(config_uri=cfg_uri, pipeline_run_id=run_id, sft=cur.outputs["sft"],
                               base_model=prep.outputs["base_model"]), side_effects=True)
        ev_ann = secure(eval_op(config_uri=cfg_uri, pipeline_run_id=run_id, tag="anneal", compare_tag="", model=ann.outputs["model"],
                                eval_data=prep.outputs["eval_data"]))
        ev_ann.set_display_name("eval annealed")
        rl = secure(bpo_op(config_uri=cfg_uri, pipeline_run_id=run_id, algorithm="bpo",
                           init_model=ann.outputs["model"], prompts=prep.outputs["rl"]), side_effects=True)
        ev_bpo = secure(eval_op(config_uri=cfg_uri, pipeline_run_id=run_id, tag="bpo", compare_tag="anneal", model=rl.outputs["model"],
                                eval_data=prep.outputs["eval_data"]))
        ev_bpo.set_display_name("eval BPO").after(ev_ann)
        if with_grpo_control:
            ctl = secure(bpo_op(config_uri=cfg_uri, pipeline_run_id=run_id, algorithm="grpo",
                                init_model=ann.outputs["model"], prompts=prep.outputs["rl"]), side_effects=True)
            ctl.set_display_name("GRPO control").after(rl)
            secure(eval_op(config_uri=cfg_uri, pipeline_run_id=run_id, tag="grpo", compare_tag="anneal", model=ctl.outputs["model"],
                           eval_data=prep.outputs["eval_data"])).set_display_name("eval GRPO").after(ev_bpo)
        reg = secure(register_op(config_uri=cfg_uri, pipeline_run_id=run_id, report_uri=ev_bpo.outputs["Output"],
                                 model=rl.outputs["model"]), side_effects=True)
        reg.set_display_name("register + promotion gate")
        secure(deploy_op(config_uri=cfg_uri, decision=reg.output), side_effects=True).set_display_name("deploy champion")

    return r4b_pipeline


def compile_pipeline(cfg: RunConfig, out_path: str, with_grpo_control: bool = False) -> str:
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(cfg, with_grpo_control), package_path=out_path)
    return out_path
