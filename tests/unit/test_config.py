from pathlib import Path

import pytest

from r4b_core.config import ConfigError, RunConfig, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", ["tiny.yaml", "r4b-4b.yaml"])
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


def test_stage_hash_changes_with_section():
    a = load_config(None)
    b = load_config(None, ["anneal.steps=11"])
    assert a.stage_hash("anneal") != b.stage_hash("anneal")
    assert a.stage_hash("bpo") == b.stage_hash("bpo")
