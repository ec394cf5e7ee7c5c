"""The ensemble's alert: evidence backing a row, and a level fitted on the rows without evidence,
which attacks in the history cannot raise."""
from __future__ import annotations

import numpy as np
import pandas as pd

from esxi_anomaly.detect.ensemble import EnsembleDetector, alert_level

RULES = [
    {"id": "repeat", "weight": 0.97, "when": [["consistency_ports", ">=", 2]], "evidence": "dns_calculation"},
    {"id": "weak", "weight": 0.35, "when": [["port_never_seen", "==", 1]]},
]


def history(n=4000, attacks=0, seed=0):
    """Ordinary rows (a weak rule fires on 2 %), plus `attacks` rows the evidence rule backs, odd to
    the forest as well."""
    rng = np.random.default_rng(seed)
    X = pd.DataFrame({"consistency_ports": np.ones(n), "port_never_seen": (rng.random(n) < 0.02).astype(float),
                      "x": rng.normal(size=n), "y": rng.normal(size=n)})
    if attacks:
        X.loc[rng.choice(n, attacks, replace=False), ["consistency_ports", "x", "y"]] = [3.0, 6.0, -6.0]
    return X


def fitted(X):
    return EnsembleDetector(rules=RULES, n_estimators=100, random_state=0).fit(X)


def test_attacks_in_the_history_do_not_raise_the_level():
    clean, dirty = fitted(history()), fitted(history(attacks=200))   # 5 % of the history is attack
    assert abs(dirty.threshold_ - clean.threshold_) < 0.03
    # the level of all training scores (the old one) would sit above every evidence row's score
    all_scores = dirty.components(history(attacks=200))["score"].to_numpy()
    assert np.quantile(all_scores, dirty.threshold_quantile) > 0.97 > dirty.threshold_ + 0.2
    assert dirty.train_alerts_ == 200 and clean.train_alerts_ == 0
    assert dirty.train_max_score_ >= 0.97 > clean.train_max_score_


def test_a_row_alerts_only_with_evidence_at_the_level():
    det = fitted(history())
    probe = pd.DataFrame({"consistency_ports": [1, 3, 1, 3], "port_never_seen": [1, 0, 0, 0],
                          "x": [12.0, 0.0, 0.0, 12.0], "y": [-12.0, 0.0, 0.0, -12.0]})
    comp = det.components(probe)
    assert comp["evidence"].tolist() == [False, True, False, True]
    assert comp["score"][0] >= det.threshold_          # the forest alone outscores the level ...
    assert det.alerts(comp).tolist() == [False, True, False, True]   # ... but never alerts


def test_alert_level_of_no_plain_rows():
    assert alert_level(np.array([]), 0.999) == 0.0
    assert alert_level(np.array([0.1, 0.2, 0.3]), 1.0) == 0.3
