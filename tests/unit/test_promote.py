import json

import pytest

from r4b_core import layout
from r4b_core.config import load_config
from r4b_core.promote import PromotionError, gate, promote_manually, register_and_gate
from r4b_core.storage import Store
from r4b_core.tracking import Tracker

RULES = {"auto/math/accuracy": 0.0, "no_think/accuracy": 0.02}


def test_gate_rules():
    ok, lines = gate({"auto/math/accuracy": 0.5, "no_think/accuracy": 0.40}, None, RULES)
    assert ok and "first version" in lines[0]
    champ = {"auto/math/accuracy": 0.5, "no_think/accuracy": 0.41}
    assert gate({"auto/math/accuracy": 0.5, "no_think/accuracy": 0.39}, champ, RULES)[0]
    ok, lines = gate({"auto/math/accuracy": 0.49, "no_think/accuracy": 0.41}, champ, RULES)
    assert not ok and any("auto/math/accuracy" in line and "fail" in line for line in lines)
    ok, lines = gate({"auto/math/accuracy": 0.6, "no_think/accuracy": 0.38}, champ, RULES)
    assert not ok
    ok, lines = gate({"no_think/accuracy": 0.5}, champ, RULES)
    assert not ok and "missing" in lines[0]


def _report(auto_math: float, no_think: float) -> dict:
    return {"modes": {"auto": {"accuracy": 0.5, "mean_tokens": 10.0, "think_rate": 0.5},
                      "no_think": {"accuracy": no_think, "mean_tokens": 3.0, "think_rate": 0.0}},
            "by_category": {"math": {"modes": {"auto": {"accuracy": auto_math, "think_rate": 0.9}}}},
            "by_difficulty": {}, "hybrid_accuracy": 0.9}


def _model(store, cfg, tag, auto_math, no_think):
    model_uri = layout.model_dir(cfg, tag)
    store.write_text(model_uri + "/config.json", "{}")
    store.commit(model_uri, {"config_hash": tag})
    report_uri = layout.eval_dir(cfg, tag) + "/report.json"
    store.write_text(report_uri, json.dumps(_report(auto_math, no_think)))
    return model_uri, report_uri


def test_register_gate_and_manual_promotion(tmp_path):
    cfg = load_config(None, [f"storage.root={tmp_path}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                             "tracking.registered_model=r4b-test"])
    store = Store.from_config(cfg.storage)
    first = register_and_gate(cfg, *_model(store, cfg, "bpo", 0.60, 0.40), pipeline_run_id="p1")
    assert first["version"] == 1 and first["promoted"]
    # Same model again (a retry): nothing new registered.
    assert register_and_gate(cfg, *_model(store, cfg, "bpo", 0.60, 0.40))["version"] == 1
    worse = register_and_gate(cfg, *_model(store, cfg, "grpo", 0.55, 0.45))
    assert worse["version"] == 2 and not worse["promoted"]
    better = register_and_gate(cfg, *_model(store, cfg, "v3", 0.70, 0.39))
    assert better["version"] == 3 and better["promoted"] and better["champion_before"] == 1

    with Tracker(cfg) as tracker:
        champ = tracker.get_version("r4b-test", "champion")
        assert champ.version == 3
        assert champ.tags["r4b.gate"] == "passed" and champ.tags["r4b.gate_against"] == "v1"
        assert champ.tags["r4b.pipeline_run"] == ""
        v2 = tracker.get_version("r4b-test", "challenger")
        assert v2.version == 3
    promote_manually(cfg, "r4b-test", 2, "rollback test")
    with Tracker(cfg) as tracker:
        champ = tracker.get_version("r4b-test", "champion")
        assert champ.version == 2 and champ.tags["r4b.promotion_reason"] == "rollback test"
    with pytest.raises(PromotionError, match="--reason"):
        promote_manually(cfg, "r4b-test", 1, "  ")


def test_unfinished_model_refused(tmp_path):
    cfg = load_config(None, [f"storage.root={tmp_path}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    with pytest.raises(PromotionError, match="did not finish"):
        register_and_gate(cfg, str(tmp_path / "nothing"), str(tmp_path / "r.json"))


def test_registered_source_is_an_absolute_uri(tmp_path, monkeypatch):
    """A version registered from a relative run folder points at it from any directory or machine."""
    from r4b_core.serve import resolve_model

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["storage.root=./runs", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                             "tracking.registered_model=r4b-abs"])
    store = Store.from_config(cfg.storage)
    model_uri, report_uri = _model(store, cfg, "bpo", 0.6, 0.4)
    assert model_uri.startswith("./runs/")
    decision = register_and_gate(cfg, model_uri, report_uri)
    expected = (tmp_path / "runs" / "tiny" / "bpo" / "model").as_uri()
    assert decision["model_uri"] == expected
    monkeypatch.chdir(tmp_path.parent)                  # elsewhere: the registry still finds the weights
    resolved = resolve_model(cfg, "models:/r4b-abs@champion")
    assert resolved.uri == expected and store.exists(resolved.uri + "/config.json")
    with Tracker(cfg) as tracker:
        assert tracker.get_version("r4b-abs", "champion").tags["r4b.eval_report"].startswith("file:///")
