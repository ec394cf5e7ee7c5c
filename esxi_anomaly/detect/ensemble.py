"""The ensemble: calibrated isolation forest + rule evidence -> one score in [0, 1].

score = 1 - (1 - forest_weight * f) * prod(1 - w_r for fired rules r), with f the forest percentile
rescaled above `forest_floor` (ordinary traffic contributes nothing), plus a tiny forest tie-break
so that rows no rule touches are still ranked. Higher = more anomalous, everywhere.

Alert = evidence: a row is an alert only when an evidence rule fired (`rules.EVIDENCE_KINDS`: a
DNS calculation or a management-plane violation) and its score reaches the alert level
`threshold_`. The level is the `threshold_quantile` quantile of the training rows *without*
evidence: what the forest and the weak rules reach on the history by themselves. Attacks in the
history carry evidence, so they cannot raise it; an evidence row must outscore ordinary traffic.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from esxi_anomaly.detect import rules as R
from esxi_anomaly.detect.forest import CalibratedForest
from esxi_anomaly.estimator import Estimator, check_fitted

TIE_BREAK = 0.01


class EnsembleDetector(Estimator):
    def __init__(self, forest_weight: float = 0.6, forest_floor: float = 0.9, rules: list | None = None,
                 n_estimators: int = 100, max_samples: int = 256, max_features: float = 1.0,
                 threshold_quantile: float = 0.999, random_state=0, n_jobs=None):
        self.forest_weight = forest_weight
        self.forest_floor = forest_floor
        self.rules = rules
        self.n_estimators = n_estimators
        self.max_samples = max_samples
        self.max_features = max_features
        self.threshold_quantile = threshold_quantile
        self.random_state = random_state
        self.n_jobs = n_jobs

    def fit(self, X: pd.DataFrame, y=None):
        self.feature_names_in_ = np.array(X.columns, dtype=object)
        self.rules_ = list(self.rules) if self.rules is not None else R.default_rules()
        R.validate_rules(self.rules_, list(X.columns))
        self.forest_ = CalibratedForest(
            n_estimators=self.n_estimators, max_samples=self.max_samples, max_features=self.max_features,
            random_state=self.random_state, n_jobs=self.n_jobs,
        )
        train_raw = self.forest_.fit_raw_scores(X.to_numpy())
        self.feature_median_ = X.median().to_numpy()
        self.evidence_kinds_ = np.array([r.get("evidence") or "" for r in self.rules_], dtype=object)
        train = self._combine(self.forest_.percentile(train_raw), R.evaluate(self.rules_, X), with_names=False)
        score, evidence = train["score"].to_numpy(), train["evidence"].to_numpy()
        self.threshold_ = alert_level(score[~evidence], self.threshold_quantile)
        self.train_max_score_ = float(score.max()) if len(score) else 0.0
        self.train_alerts_ = int((evidence & (score >= self.threshold_)).sum())   # alerts on the rows fitted
        return self

    def components(self, X: pd.DataFrame, n_jobs=None) -> pd.DataFrame:
        """score, forest_score, rule_score, evidence (an evidence rule fired) and the names of the
        rules fired, per row of `X`.
        `n_jobs`: the forest's scoring threads for this call (None: the fitted `n_jobs`)."""
        check_fitted(self, "forest_")
        X = X[list(self.feature_names_in_)]
        pct = self.forest_.score(X.to_numpy(), n_jobs)
        return self._combine(pct, R.evaluate(self.rules_, X))

    def _combine(self, pct: np.ndarray, fired: np.ndarray, with_names: bool = True) -> pd.DataFrame:
        f = np.clip((pct - self.forest_floor) / (1.0 - self.forest_floor), 0.0, 1.0)
        rule = R.rule_score(self.rules_, fired)
        combined = 1.0 - (1.0 - self.forest_weight * f) * (1.0 - rule)
        score = (1.0 - TIE_BREAK) * combined + TIE_BREAK * pct
        evidence = (fired & R.evidence_mask(self.rules_)).any(axis=1)
        out = pd.DataFrame({"score": score, "forest_score": pct, "rule_score": rule, "evidence": evidence})
        if with_names:
            out["rules"] = _fired_names(np.array([r["id"] for r in self.rules_], dtype=object), fired)
        return out

    def alerts(self, components: pd.DataFrame) -> np.ndarray:
        """Which rows of `components` (from `components`) are alerts: evidence, and a score at the level."""
        check_fitted(self, "forest_")
        return components["evidence"].to_numpy(dtype=bool) & (components["score"].to_numpy() >= self.threshold_)

    def score_samples(self, X: pd.DataFrame) -> np.ndarray:
        return self.components(X)["score"].to_numpy()

    def attributions(self, X: pd.DataFrame, top: int = 3) -> list[str]:
        """Per-row occlusion attribution of the forest score: how much the raw anomaly score drops
        when one feature is set to its training median. Costs rows x features forest evaluations,
        so call it for the top-ranked rows only."""
        check_fitted(self, "forest_")
        X = X[list(self.feature_names_in_)].to_numpy(dtype="float64")
        if not len(X):
            return []
        base = self.forest_.raw_score(X)
        n, d = X.shape
        probes = np.repeat(X, d, axis=0)
        cols = np.tile(np.arange(d), n)
        probes[np.arange(n * d), cols] = self.feature_median_[cols]
        drop = (base[:, None] - self.forest_.raw_score(probes).reshape(n, d))
        names = self.feature_names_in_
        out = []
        for row in drop:
            best = np.argsort(-row)[:top]
            out.append("; ".join(f"{names[k]}={row[k]:+.3f}" for k in best if row[k] > 0))
        return out


def alert_level(plain_scores: np.ndarray, quantile: float) -> float:
    """The alert level from the training scores of rows without evidence: their `quantile`
    quantile. No such rows: 0 (evidence alone decides)."""
    return float(np.quantile(plain_scores, quantile)) if len(plain_scores) else 0.0


def _fired_names(ids: np.ndarray, fired: np.ndarray) -> np.ndarray:
    """Per row, the ids of the rules that fired joined by ";": one string per distinct pattern."""
    if not len(ids):
        return np.full(len(fired), "", dtype=object)
    if len(ids) > 62:  # more rules than bits in an int64 pattern: join row by row
        return np.array([";".join(ids[row]) for row in fired], dtype=object)
    bits = fired.astype(np.int64) @ (np.int64(1) << np.arange(len(ids), dtype=np.int64))  # rules < 63
    inverse, patterns = pd.factorize(bits)   # a hash: np.unique's sort cost ~5x more
    names = np.array([";".join(ids[(p >> np.arange(len(ids))) & 1 == 1]) for p in patterns], dtype=object)
    return names[inverse]
