"""The scikit-learn contract of the detection pieces: `EnsembleDetector` and `CalibratedForest`."""
from __future__ import annotations

import numpy as np

from esxi_anomaly.detect import rules as R
from esxi_anomaly.detect.ensemble import EnsembleDetector
from esxi_anomaly.detect.forest import CalibratedForest

from ..estimator_contract import (assert_clone_keeps_params, assert_fit_contract, assert_params_only_init,
                                  assert_pickle_scores_alike, assert_unfitted_raises, fitted_detector)


def features():
    return fitted_detector()[2]


def test_ensemble_contract():
    params = dict(forest_weight=0.5, forest_floor=0.8, rules=R.default_rules(), n_estimators=10, max_samples=32,
                  max_features=1.0, threshold_quantile=0.99, random_state=3, n_jobs=1)
    assert_params_only_init(EnsembleDetector, params)
    assert_clone_keeps_params(EnsembleDetector(**params))
    X = features()
    unfitted = EnsembleDetector()
    assert_unfitted_raises({"components": lambda: unfitted.components(X),
                            "score_samples": lambda: unfitted.score_samples(X),
                            "attributions": lambda: unfitted.attributions(X.head(3))})
    est = EnsembleDetector(n_estimators=10, max_samples=32, random_state=3)
    assert_fit_contract(est, lambda e: e.fit(X))
    assert_pickle_scores_alike(est, lambda e: e.components(X, n_jobs=1).to_numpy())
    again = EnsembleDetector(n_estimators=10, max_samples=32, random_state=3).fit(X)
    np.testing.assert_array_equal(again.score_samples(X), est.score_samples(X))
    assert again.threshold_ == est.threshold_


def test_calibrated_forest_contract():
    params = dict(n_estimators=10, max_samples=32, max_features=1.0, random_state=5, n_jobs=1)
    assert_params_only_init(CalibratedForest, params)
    assert_clone_keeps_params(CalibratedForest(**params))
    X = features().to_numpy()
    unfitted = CalibratedForest()
    assert_unfitted_raises({"score": lambda: unfitted.score(X), "raw_score": lambda: unfitted.raw_score(X),
                            "percentile": lambda: unfitted.percentile(np.zeros(3)),
                            "scorer_": lambda: unfitted.scorer_})
    est = CalibratedForest(**params)
    assert_fit_contract(est, lambda e: e.fit(X))
    assert_pickle_scores_alike(est, lambda e: e.score(X))
    np.testing.assert_array_equal(CalibratedForest(**params).fit(X).raw_score(X), est.raw_score(X))
    # the thread count is the call's, never the fitted model's: scores do not depend on it
    np.testing.assert_array_equal(est.score(X, n_jobs=2), est.score(X, n_jobs=1))
    assert est.n_jobs == 1
