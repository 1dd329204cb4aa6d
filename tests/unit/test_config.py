import re
from pathlib import Path

import pytest

from r4b_core.config import ConfigError, RunConfig, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", ["tiny.yaml", "tiny-qwen2_5_vl.yaml", "r4b-4b.yaml", "qwen2.5-vl-3b.yaml", "qwen2.5-vl-7b.yaml",
                                  "qwen3-vl-4b.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, RunConfig)


def test_every_error_reported_with_line_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\nanneal:\n  steps: 0\n  optim:\n    lr: -1\n  colour: blue\nbpo:\n  algorithm: ppo\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    lines = str(info.value).splitlines()
    assert f"{bad}:3: anneal.steps: Input should be greater than or equal to 1 (got 0)" in lines
    assert f"{bad}:5: anneal.optim.lr: Input should be greater than 0 (got -1)" in lines
    assert any(line.startswith(f"{bad}:6: anneal.colour: unknown key; allowed here: steps,") for line in lines)
    assert any(line.startswith(f"{bad}:8: bpo.algorithm: Input should be 'bpo' or 'grpo'") for line in lines)
    assert len(lines) == 4


def test_not_yaml_and_missing_file(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("anneal: [1, 2\n")
    with pytest.raises(ConfigError, match=r"x.yaml:2: not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_apply_and_validate():
    cfg = load_config(None, ["anneal.steps=7", "bpo.algorithm=grpo"])
    assert cfg.anneal.steps == 7 and cfg.bpo.algorithm == "grpo"
    with pytest.raises(ConfigError, match="anneal.steps"):
        load_config(None, ["anneal.steps=-3"])
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        load_config(None, ["anneal.steps"])


def test_model_shape_checks():
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        load_config(None, ["model.tiny.image_size=60"])


def test_stage_identity_counts_what_is_produced_never_how_it_runs():
    from r4b_core.config import AnnealConfig, BPOConfig, CurateConfig, EvalConfig, RunConfig
    from r4b_core.identity import identity_hash, stage_identity

    def h(*sets, section="bpo", inputs=None):
        return identity_hash(stage_identity(load_config(None, list(sets)), section, inputs or {"prompts": "p"}))

    base = h()
    assert h("anneal.steps=11") == base != h("anneal.steps=11", section="anneal")
    for knob in ("bpo.checkpoint_every=3", "bpo.probe_every=1", "bpo.cpu_threads=2", "bpo.engine=vllm",
                 "bpo.keep_checkpoints=5", "bpo.resume=force", "vllm.kv_cache_gib=4", "launcher.memory=64Gi"):
        assert h(knob) == base, knob
    for knob in ("bpo.clip_eps=0.3", "bpo.steps=41", "seed=1", "model.dtype=bfloat16"):
        assert h(knob) != base, knob
    assert h(inputs={"prompts": "other"}) != base
    assert h(inputs={"prompts": None}) is None                  # an unknown input: never skipped
    assert h("bpo.engine=vllm", section="bpo", inputs={"prompts": "p"}) == base
    assert stage_identity(RunConfig(), "bpo", {}, ignore=("clip_eps",))["bpo"].keys() == (
        BPOConfig.model_fields.keys() - BPOConfig.OPERATIONAL - {"clip_eps"})
    # every operational knob is a real field of its section (a renamed field cannot linger)
    for section in (AnnealConfig, BPOConfig, CurateConfig, EvalConfig):
        assert section.OPERATIONAL <= section.model_fields.keys(), section


def test_set_errors_name_the_override_not_a_yaml_line():
    tiny = CONFIGS / "tiny.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(tiny, ["anneal.optim.lr=-1"])
    assert str(info.value) == "--set anneal.optim.lr=-1: anneal.optim.lr: Input should be greater than 0 (got -1)"
    with pytest.raises(ConfigError, match=r"^--set anneal\.colour=1: anneal\.colour: unknown key"):
        load_config(tiny, ["anneal.colour=1"])
    # A check over a whole section names the file line and the --set inside that section.
    with pytest.raises(ConfigError, match=r"tiny\.yaml:\d+ \(with --set bpo\.micro_batch_size=1000\): bpo: "):
        load_config(tiny, ["bpo.micro_batch_size=1000"])


@pytest.mark.parametrize("sets, expect", [
    (["anneal=5", "anneal.steps=3"], r"^--set anneal\.steps=3: overlaps --set anneal=5 .*keep one of them$"),
    (["anneal.steps=3", "anneal=5"], r"^--set anneal=5: overlaps --set anneal\.steps=3 "),
    (["anneal.steps=["], r"^--set anneal\.steps=\[: the value is not valid YAML \("),
    (["anneal..steps=3"], r"^--set anneal\.\.steps=3: empty part in the key"),
    (["anneal.steps"], r"^--set anneal\.steps: expected KEY\.PATH=VALUE"),
])
def test_bad_set_is_one_line(sets, expect):
    with pytest.raises(ConfigError) as info:
        load_config(None, sets)
    lines = str(info.value).splitlines()
    assert re.search(expect, lines[0]), lines
    # one line per problem, each naming its --set (overlapping: the other one may be invalid too)
    assert all(line.startswith("--set ") for line in lines) and len(lines) <= len(sets)


def test_every_problem_at_once_yaml_sets_and_values(tmp_path):
    """What KFP's first task reports for a run's `config_uri` + `overrides`: all of it, one line each."""
    path = tmp_path / "run.yaml"
    path.write_text("name: t\nanneal:\n  steps: 5\n  steps: 6\nbpo:\n  clip_eps: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["eval.limit=-1", "anneal.steps", "curate.colour=red"])
    lines = str(info.value).splitlines()
    assert len(lines) == 5, lines
    assert lines[0].startswith(f"{path}:4: anneal.steps: duplicate key (first on line 3)")
    assert lines[1].startswith("--set anneal.steps: expected KEY.PATH=VALUE")
    assert any(x.startswith(f"{path}:6: bpo.clip_eps: Input should be less than 1") for x in lines)
    assert any(x.startswith("--set eval.limit=-1: eval.limit:") for x in lines)
    assert any(x.startswith("--set curate.colour=red: curate.colour: unknown key") for x in lines)


def test_same_set_twice_last_wins():
    assert load_config(None, ["anneal.steps=3", "anneal.steps=4"]).anneal.steps == 4


def test_config_path_folder_or_not_utf8(tmp_path):
    with pytest.raises(ConfigError, match=rf"^{tmp_path}: is a folder; pass a config file"):
        load_config(tmp_path)
    p = tmp_path / "latin1.yaml"
    p.write_bytes("name: t\nanneal:\n  steps: 3 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert str(info.value).startswith(f"{p}:3: not UTF-8 at byte 32 (0xe9, column 17)")


def test_duplicate_yaml_keys_rejected_with_both_lines(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("name: a\nanneal:\n  steps: 3\n  optim: {lr: 1.0e-4}\n  steps: 5\nname: b\n")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert str(info.value).splitlines() == [
        f"{p}:5: anneal.steps: duplicate key (first on line 3); keep one of them",
        f"{p}:6: name: duplicate key (first on line 1); keep one of them",
    ]


def test_long_bad_value_is_shortened_in_the_message():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["name=" + "x" * 100_000])
    assert len(str(info.value)) < 400 and "(100002 characters)" in str(info.value)
