"""Rules as data, the calibrated forest, and the ensemble's contract and score direction."""
from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone

from esxi_anomaly.detect import rules as R
from esxi_anomaly.detect.ensemble import EnsembleDetector
from esxi_anomaly.detect.forest import CalibratedForest


def frame(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "consistency_ports": np.ones(n), "keyed_consistency": np.ones(n), "port_never_seen": np.zeros(n),
        "x": rng.normal(size=n), "y": rng.normal(size=n),
    })


RULES = [
    {"id": "repeat", "weight": 0.9, "when": [["consistency_ports", ">=", 2]], "explain": ""},
    {"id": "keyed_new", "weight": 0.5, "when": [["keyed_consistency", ">=", 2], ["port_never_seen", "==", 1]], "explain": ""},
]


def test_rule_evaluation_and_noisy_or():
    X = pd.DataFrame({"consistency_ports": [1, 2, 2, 1], "keyed_consistency": [1, 1, 3, 3], "port_never_seen": [0, 0, 1, 0]})
    fired = R.evaluate(RULES, X)
    assert fired.tolist() == [[False, False], [True, False], [True, True], [False, False]]
    assert np.allclose(R.rule_score(RULES, fired), [0.0, 0.9, 1 - 0.1 * 0.5, 0.0])


def test_overrides_by_id_and_validation():
    changed = R.apply_overrides(RULES, {"repeat": {"weight": 0.2}, "keyed_new": {"enabled": False},
                                        "extra": {"weight": 0.1, "when": [["x", ">", 3]]}})
    assert [(r["id"], r["weight"]) for r in changed] == [("repeat", 0.2), ("extra", 0.1)]
    with pytest.raises(R.RuleError, match="unknown feature 'nope'"):
        R.validate_rules([{"id": "a", "weight": 0.5, "when": [["nope", ">", 1]]}], ["x"])
    with pytest.raises(R.RuleError, match="weight"):
        R.validate_rules([{"id": "a", "weight": 1.5, "when": [["x", ">", 1]]}], ["x"])
    with pytest.raises(R.RuleError, match="operator"):
        R.validate_rules([{"id": "a", "weight": 0.5, "when": [["x", "~", 1]]}], ["x"])


def test_default_rules_are_valid_against_the_feature_list():
    from esxi_anomaly.features.pipeline import FEATURES

    R.validate_rules(R.default_rules(), FEATURES)


def test_forest_percentile_is_monotone_and_higher_is_more_anomalous():
    X = frame()[["x", "y"]].to_numpy()
    f = CalibratedForest(n_estimators=50, random_state=0).fit(X)
    s = f.score(np.array([[0.0, 0.0], [3.0, 3.0], [8.0, -8.0]]))
    assert 0 <= s[0] < s[1] <= s[2] <= 1


def test_ensemble_contract_direction_and_determinism():
    X = frame()
    det = EnsembleDetector(rules=RULES, n_estimators=50, random_state=3)
    assert clone(det).get_params() == det.get_params()
    det.fit(X)
    probe = pd.DataFrame({"consistency_ports": [1, 3, 1], "keyed_consistency": [1, 1, 1],
                          "port_never_seen": [0, 1, 0], "x": [0.0, 0.0, 9.0], "y": [0.0, 0.0, 9.0]})
    comp = det.components(probe)
    assert comp["score"].between(0, 1).all()
    assert comp["score"][1] > comp["score"][0] and comp["score"][2] > comp["score"][0]
    assert comp["rules"].tolist() == ["", "repeat", ""]
    again = pickle.loads(pickle.dumps(det))
    assert np.array_equal(again.score_samples(probe), det.score_samples(probe))
    other = EnsembleDetector(rules=RULES, n_estimators=50, random_state=3).fit(X)
    assert np.array_equal(other.score_samples(probe), det.score_samples(probe))
    assert 0 < det.threshold_ <= 1
    attributions = det.attributions(probe.iloc[[2]])
    assert attributions[0].split("=")[0] in ("x", "y")


def test_fired_rule_names_per_row():
    from esxi_anomaly.detect.ensemble import _fired_names

    ids = np.array(["a", "b", "c"], dtype=object)
    fired = np.array([[1, 0, 1], [0, 0, 0], [1, 0, 1], [0, 1, 0], [1, 1, 1]], dtype=bool)
    assert _fired_names(ids, fired).tolist() == ["a;c", "", "a;c", "b", "a;b;c"]
    many = np.array([f"r{i}" for i in range(70)], dtype=object)
    wide = np.zeros((2, 70), dtype=bool)
    wide[0, [0, 69]] = True
    assert _fired_names(many, wide).tolist() == ["r0;r69", ""]
    assert _fired_names(ids[:0], fired[:, :0]).tolist() == ["", "", "", "", ""]
