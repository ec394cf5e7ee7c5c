"""The model registry `models/<env>/<version>/`: new and newest versions, write and load (verified),
the model card, and where an environment's verdicts are (found by labelling and scoring alike)."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from esxi_anomaly import registry
from esxi_anomaly.bundle import BundleError, save_bundle
from esxi_anomaly.training import TrainConfig
from esxi_anomaly.training.config import RECORDED


def test_a_new_version_is_timestamped_and_never_taken(tmp_path):
    now = datetime(2026, 11, 27, 22, 15, 0, tzinfo=timezone.utc)
    first = registry.new_version_dir(tmp_path, "prod", now=now)
    assert first == tmp_path / "prod" / "20261127T221500Z"
    save_bundle(first, {"x": 1}, {})
    assert registry.new_version_dir(tmp_path, "prod", now=now).name == "20261127T221500Z-2"
    with pytest.raises(ValueError, match="environment name '../etc' is not allowed"):
        registry.new_version_dir(tmp_path, "../etc", now=now)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prod"]


def test_the_newest_version_is_the_latest_complete_bundle(tmp_path):
    for name in ["20261127T221500Z", "20261128T080000Z", "20261128T080000Z-2", "20261128T080000Z-10",
                 "20261126T000000Z"]:
        save_bundle(tmp_path / "prod" / name, {"x": 1}, {})
    (tmp_path / "prod" / "20991231T000000Z").mkdir()  # no manifest: not a bundle
    (tmp_path / "prod" / "notes").mkdir()
    (tmp_path / "prod" / "feedback.csv").write_text("event_id,verdict\n")
    assert registry.newest_version(tmp_path, "prod").name == "20261128T080000Z-10"
    with pytest.raises(BundleError, match=r"train one with `esxi-anomaly train --env staging"):
        registry.newest_version(tmp_path, "staging")


def test_verdicts_stored_for_an_environment_are_the_ones_its_versions_find(tmp_path):
    """`label` writes through (models_dir, env), scoring reads next to the bundle it loaded: one file."""
    version = registry.new_version_dir(tmp_path / "models", "lab")
    save_bundle(version, {"x": 1}, {})
    store = registry.feedback_store(tmp_path / "models", "lab")
    store.add("E1", "benign", "backup", {"src_ip": "10.0.0.5", "query": "backup.corp", "dst_port": "9443"})
    assert store.path == registry.feedback_path(tmp_path / "models", "lab")
    assert store.path == tmp_path / "models" / "lab" / "feedback.csv"
    assert registry.bundle_feedback(version).path == store.path
    found = registry.bundle_feedback(version).suppressions()
    assert found.to_dict("records") == [{"src_ip": "10.0.0.5", "query": "backup.corp", "dst_port": "9443"}]
    # a bundle outside the registry has no environment folder: no verdicts, and nothing is created
    assert len(registry.bundle_feedback(tmp_path / "elsewhere" / "b").suppressions()) == 0
    assert not (tmp_path / "elsewhere").exists()


def test_a_written_model_loads_back_with_its_card_and_the_config_as_recorded(tmp_path, small_day):
    model = small_day[0]
    cfg = TrainConfig(env="lab", seed=5, model={"n_estimators": 50})
    path = registry.write_model(model, cfg, tmp_path / "models", {"average_precision": 0.9}, {"trials": 0})
    assert path.parent == tmp_path / "models" / "lab" and registry.newest_version(tmp_path / "models", "lab") == path
    loaded, manifest = registry.load_model(path)
    assert type(loaded) is type(model) and loaded.threshold_ == model.threshold_
    # the manifest records the config with the keys it always had (no `tuning` for the default space)
    assert manifest["config"] == cfg.record() and sorted(manifest["config"]) == sorted(RECORDED)
    assert manifest["config_hash"] == cfg.digest() and manifest["metrics"] == {"average_precision": 0.9}
    card = (path / "model_card.md").read_text()
    assert card == registry.model_card(model, cfg, {"average_precision": 0.9})
    assert card.startswith("# esxi-anomaly model: lab\n") and f"config hash: {cfg.digest()}" in card
    assert TrainConfig.from_manifest(manifest) == cfg


def test_loading_refuses_a_bundle_of_another_transform_library_or_without_a_model(tmp_path, small_day):
    path = registry.write_model(small_day[0], TrainConfig(env="lab"), tmp_path / "models")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["transform_library_version"] = "0"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="fitted with transform library 0, this installation has"):
        registry.load_model(path)
    other = save_bundle(tmp_path / "models" / "lab" / "20200101T000000Z", {"thresholds": {"alert": 1}}, {})
    with pytest.raises(BundleError, match="holds no DnsCalcDetector"):
        registry.load_model(other)


def test_loading_refuses_a_model_fitted_before_alerts_needed_evidence(tmp_path, small_day):
    import copy

    old = copy.deepcopy(small_day[0])
    del old.detector_.evidence_kinds_   # as pickled by earlier versions: every alert was forest-only
    path = registry.write_model(old, TrainConfig(env="lab"), tmp_path / "models")
    with pytest.raises(BundleError, match="fitted before alerts needed evidence.*retrain with `esxi-anomaly train`"):
        registry.load_model(path)
