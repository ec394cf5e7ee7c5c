"""The scikit-learn contract of the fitted feature pieces: `EntityBaseline` and `ManagementPlane`."""
from __future__ import annotations

from esxi_anomaly.features.baseline import EntityBaseline
from esxi_anomaly.features.mgmt_plane import ManagementPlane

from ..estimator_contract import (assert_clone_keeps_params, assert_fit_contract, assert_params_only_init,
                                  assert_pickle_scores_alike, assert_unfitted_raises, fitted_detector,
                                  small_estate)


def test_entity_baseline_contract():
    assert_params_only_init(EntityBaseline, dict(alpha=2.5))
    assert_clone_keeps_params(EntityBaseline(alpha=2.5))
    _, prepared, _ = fitted_detector()
    X = prepared.baseline_input
    assert_unfitted_raises({"transform": lambda: EntityBaseline().transform(X)})
    est = EntityBaseline(alpha=2.5)
    assert_fit_contract(est, lambda e: e.fit(X))
    assert_pickle_scores_alike(est, lambda e: e.transform(X).to_numpy())
    # deterministic: a second fit gives the same features
    assert EntityBaseline(alpha=2.5).fit(X).transform(X).equals(est.transform(X))


def test_management_plane_contract():
    allow = (("hostd", "dns", "udp", 53, 53, "dns"),)
    assert_params_only_init(ManagementPlane, dict(extra_allow=allow))
    assert_clone_keeps_params(ManagementPlane(extra_allow=allow))
    _, prepared, _ = fitted_detector()
    inventory = small_estate()[1].inventory
    conns, kinds = prepared.conns, prepared.entity_kinds
    assert_unfitted_raises({"transform": lambda: ManagementPlane().transform(conns, kinds)})
    est = ManagementPlane(extra_allow=allow)
    assert_fit_contract(est, lambda e: e.fit(inventory))
    assert_pickle_scores_alike(est, lambda e: e.transform(conns, kinds).to_numpy())
    assert ManagementPlane(extra_allow=allow).fit(inventory).transform(conns, kinds).equals(est.transform(conns, kinds))
