"""Model bundles: round trip, and refusal of every kind of damaged, altered or incompatible bundle."""
from __future__ import annotations

import json

import numpy as np
import pytest
import sklearn
from sklearn.ensemble import IsolationForest

from esxi_anomaly import bundle
from esxi_anomaly.bundle import (
    BUNDLE_FORMAT_VERSION,
    BundleError,
    load_bundle,
    save_bundle,
    verify_bundle,
)

CARD = "# Model card\n\nTrained on prod-east, 14 days.\r\nLine with CRLF kept as-is.\n"


@pytest.fixture(scope="module")
def forest() -> IsolationForest:
    rows = np.random.default_rng(7).normal(size=(40, 3))
    return IsolationForest(n_estimators=5, random_state=0).fit(rows)


@pytest.fixture
def saved(tmp_path, forest):
    target = tmp_path / "models" / "prod" / "20261127T221500Z"
    artifacts = {"forest": forest, "thresholds": {"alert": 0.83}, "model_card.md": CARD}
    manifest = {"env": "prod", "features": ["port_rarity", "dns_match_significance"], "metric": np.float64(0.5)}
    return save_bundle(target, artifacts, manifest)


def _probe():
    return np.array([[0.0, 0.0, 0.0], [9.0, -9.0, 9.0]])


def test_round_trip_restores_artifacts_and_writes_manifest(saved, forest):
    artifacts, manifest = load_bundle(saved)
    assert sorted(artifacts) == ["forest", "model_card.md", "thresholds"]
    np.testing.assert_array_equal(artifacts["forest"].score_samples(_probe()), forest.score_samples(_probe()))
    assert artifacts["thresholds"] == {"alert": 0.83}
    assert artifacts["model_card.md"] == CARD
    assert (saved / "model_card.md").read_bytes() == CARD.encode()
    assert manifest["env"] == "prod"
    assert manifest["metric"] == 0.5
    assert manifest["format_version"] == BUNDLE_FORMAT_VERSION
    assert manifest["created"].endswith("Z")
    assert set(manifest["library_versions"]) == {"python", "numpy", "pandas", "scikit-learn", "joblib",
                                                 "esxi_anomaly"}
    assert manifest["library_versions"]["scikit-learn"] == sklearn.__version__
    assert sorted(manifest["files"]) == ["forest.joblib", "model_card.md", "thresholds.joblib"]
    assert manifest["files"]["model_card.md"]["size"] == len(CARD.encode())
    assert verify_bundle(saved) == manifest
    # No staging folder is left behind next to the bundle.
    assert [p.name for p in saved.parent.iterdir()] == ["20261127T221500Z"]


def test_refuses_to_overwrite_existing_bundle(saved):
    with pytest.raises(FileExistsError, match="never overwritten"):
        save_bundle(saved, {"x": 1}, {})
    assert load_bundle(saved)[0]["thresholds"] == {"alert": 0.83}


def test_reserved_manifest_key_rejected_and_nothing_written(tmp_path):
    target = tmp_path / "b"
    with pytest.raises(ValueError, match="files"):
        save_bundle(target, {"x": 1}, {"files": {}})
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_no_folder(tmp_path):
    target = tmp_path / "b"
    with pytest.raises(TypeError):
        save_bundle(target, {"x": 1}, {"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_byte_flipped_artifact_refused(saved):
    path = saved / "forest.joblib"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"forest\.joblib .*sha256.*esxi-anomaly train --env prod"):
        load_bundle(saved)
    with pytest.raises(BundleError, match=r"forest\.joblib"):
        verify_bundle(saved)


def test_truncated_artifact_refused(saved):
    path = saved / "thresholds.joblib"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(BundleError, match=r"thresholds\.joblib has \d+ bytes.*truncated"):
        load_bundle(saved)


def test_missing_artifact_refused(saved):
    (saved / "model_card.md").unlink()
    with pytest.raises(BundleError, match=r"model_card\.md is missing"):
        load_bundle(saved)


def test_manifest_hash_edited_refused(saved):
    manifest_path = saved / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["forest.joblib"]["sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"forest\.joblib does not match its sha256"):
        load_bundle(saved)


def test_missing_manifest_refused(saved):
    (saved / "manifest.json").unlink()
    with pytest.raises(BundleError, match=r"manifest\.json is missing.*esxi-anomaly train --env prod"):
        load_bundle(saved)


def test_invalid_manifest_json_refused(saved):
    (saved / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        verify_bundle(saved)


def test_unsupported_format_version_refused(saved):
    manifest_path = saved / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = 99
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format_version 99 is not supported"):
        load_bundle(saved)


def test_unlisted_joblib_refused_before_unpickling(saved, monkeypatch):
    (saved / "extra.joblib").write_bytes(b"not even a pickle")
    monkeypatch.setattr(bundle.joblib, "load", lambda *a, **k: pytest.fail("unpickled before verification"))
    with pytest.raises(BundleError, match=r"not listed in the manifest: extra\.joblib"):
        load_bundle(saved)


def test_path_traversal_in_manifest_refused(saved):
    manifest_path = saved / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["../escape.joblib"] = {"sha256": "0" * 64, "size": 1}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="not a plain file name"):
        load_bundle(saved)


def test_scikit_learn_version_mismatch_refused(saved, monkeypatch):
    major, minor = (int(p) for p in sklearn.__version__.split(".")[:2])
    monkeypatch.setattr(bundle, "sklearn_version", lambda: f"{major}.{minor + 1}.0")
    with pytest.raises(BundleError, match=rf"version-incompatible.*scikit-learn=={major}\.{minor}\b"):
        load_bundle(saved)
    with pytest.raises(BundleError, match="version-incompatible"):
        verify_bundle(saved)


def test_scikit_learn_patch_difference_accepted(saved, monkeypatch):
    major, minor = sklearn.__version__.split(".")[:2]
    monkeypatch.setattr(bundle, "sklearn_version", lambda: f"{major}.{minor}.99")
    assert load_bundle(saved)[0]["thresholds"] == {"alert": 0.83}


def test_deeply_nested_manifest_refused_with_a_message_not_a_recursion_error(saved):
    # a parser recurses per level: before, json.loads ended in RecursionError (a traceback, exit 1)
    (saved / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BundleError, match=r"manifest\.json nests 100000 levels deep \(at most 64 expected\)"):
        load_bundle(saved)


def test_manifest_depth_ignores_brackets_inside_strings(saved):
    manifest_path = saved / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["model_note"] = "[" * 1000 + '\\"{' * 100   # text, not structure
    manifest_path.write_text(json.dumps(manifest))
    assert verify_bundle(saved)["model_note"] == manifest["model_note"]


def test_oversized_manifest_refused_unread(saved, monkeypatch):
    monkeypatch.setattr(bundle, "MAX_MANIFEST_BYTES", 100)
    with pytest.raises(BundleError, match=r"manifest\.json has \d+ bytes \(at most 100 expected\)"):
        verify_bundle(saved)
