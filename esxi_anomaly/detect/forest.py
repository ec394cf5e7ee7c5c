"""Isolation forest calibrated to a percentile of its training scores (higher = more anomalous)."""
from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.ensemble import IsolationForest

CALIBRATION_POINTS = 2001


class CalibratedForest(BaseEstimator):
    """`score(X)` is the share of training rows less anomalous than each row, in [0, 1]."""

    def __init__(self, n_estimators: int = 200, max_samples: int | str = 256, max_features: float = 1.0,
                 random_state=None, n_jobs=None):
        self.n_estimators = n_estimators
        self.max_samples = max_samples
        self.max_features = max_features
        self.random_state = random_state
        self.n_jobs = n_jobs

    def fit(self, X, y=None):
        self.fit_raw_scores(X)
        return self

    def fit_raw_scores(self, X) -> np.ndarray:
        """Fit, and return the raw scores of the training rows (callers calibrate on them without
        scoring the same rows again)."""
        X = np.asarray(X, dtype="float64")
        max_samples = min(self.max_samples, len(X)) if isinstance(self.max_samples, int) else self.max_samples
        self.forest_ = IsolationForest(
            n_estimators=self.n_estimators, max_samples=max_samples, max_features=self.max_features,
            random_state=self.random_state, n_jobs=self.n_jobs,
        ).fit(X)
        train = self.raw_score(X)
        self.calibration_ = np.quantile(train, np.linspace(0.0, 1.0, CALIBRATION_POINTS))
        self.n_features_in_ = X.shape[1]
        return train

    def raw_score(self, X) -> np.ndarray:
        """The forest's anomaly score with the sign flipped: higher = more anomalous."""
        return -self.forest_.score_samples(np.asarray(X, dtype="float64"))

    def score(self, X) -> np.ndarray:
        return self.percentile(self.raw_score(X))

    def percentile(self, raw: np.ndarray) -> np.ndarray:
        grid = np.linspace(0.0, 1.0, CALIBRATION_POINTS)
        return np.interp(raw, self.calibration_, grid, left=0.0, right=1.0)
