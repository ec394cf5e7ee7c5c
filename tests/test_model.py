"""`DnsCalcDetector` as an estimator: the scikit-learn contract, and bad frames refused at the
boundary by column name (castable dtypes conformed, with the same scores)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from esxi_anomaly import schema
from esxi_anomaly.model import DnsCalcDetector
from esxi_anomaly.schema import Frames, SchemaError

from .estimator_contract import (assert_clone_keeps_params, assert_fit_contract, assert_params_only_init,
                                 assert_pickle_scores_alike, assert_unfitted_raises, fitted_detector,
                                 small_estate)

SMALL = dict(n_estimators=20, max_samples=64)


def test_init_stores_params_only_and_clone_keeps_them():
    params = dict(min_window_s=120.0, grace_s=30.0, recent_responses=3, baseline_alpha=2.0, baseline_split=0.5,
                  forest_weight=0.5, forest_floor=0.8, n_estimators=10, max_samples=32, threshold_quantile=0.99,
                  rule_overrides={"apt12_formula_new_port": {"weight": 0.5}},
                  mgmt_allow=(("hostd", "dns", "udp", 53, 53, "dns"),), max_forest_rows=1000, max_window_s=600.0,
                  random_state=7)
    assert_params_only_init(DnsCalcDetector, params)
    assert_clone_keeps_params(DnsCalcDetector(**params))


def test_unfitted_calls_raise_not_fitted():
    _, today = small_estate()
    model = DnsCalcDetector()
    assert_unfitted_raises({
        "features": lambda: model.features(today),
        "features_prepared": lambda: model.features_prepared(None, today.inventory),
        "score_rows": lambda: model.score_rows(None, None),
        "score_samples": lambda: model.score_samples(today),
        "score": lambda: model.score(today),
        "refit_baseline": lambda: model.refit_baseline(today),
        "threshold_": lambda: model.threshold_,
    })
    assert not hasattr(model, "threshold_")


def test_fit_returns_self_learns_underscored_attributes_and_pickles():
    history, today = small_estate()
    model = DnsCalcDetector(random_state=2, **SMALL)
    assert_fit_contract(model, lambda m: m.fit(history))
    assert_pickle_scores_alike(model, lambda m: m.score_samples(today))


def test_random_state_makes_fits_reproducible():
    history, today = small_estate()
    a = DnsCalcDetector(random_state=4, **SMALL).fit(history).score_samples(today)
    b = DnsCalcDetector(random_state=4, **SMALL).fit(history).score_samples(today)
    np.testing.assert_array_equal(a, b)


# -- frames at the boundary --------------------------------------------------------------------

def with_conns(frames: Frames, conns: pd.DataFrame) -> Frames:
    return Frames(conns, frames.dns_answers, frames.inventory)


@pytest.mark.parametrize("entry", ["fit", "features", "refit_baseline"])
def test_missing_column_is_refused_by_name(entry):
    model, _, _ = fitted_detector()
    history, _ = small_estate()
    bad = with_conns(history, history.connections.drop(columns="dst_port"))
    with pytest.raises(SchemaError, match=r"connections: missing column 'dst_port'"):
        getattr(DnsCalcDetector(**SMALL) if entry == "fit" else model, entry)(bad)
    no_query = Frames(history.connections, history.dns_answers.drop(columns="query"), history.inventory)
    with pytest.raises(SchemaError, match=r"dns_answers: missing column 'query'"):
        getattr(DnsCalcDetector(**SMALL) if entry == "fit" else model, entry)(no_query)


def test_uncastable_column_is_refused_by_name():
    model, _, _ = fitted_detector()
    _, today = small_estate()
    conns = today.connections.assign(ts=today.connections["ts"].astype(object))
    conns.loc[3, "ts"] = "yesterday"
    with pytest.raises(SchemaError, match=r"connections: column 'ts' cannot be cast to float64"):
        model.features(with_conns(today, conns))
    with pytest.raises(SchemaError, match="'ts'"):
        DnsCalcDetector(**SMALL).fit(with_conns(today, conns))


def test_not_frames_is_a_type_error():
    model, _, _ = fitted_detector()
    _, today = small_estate()
    with pytest.raises(TypeError, match="DnsCalcDetector.features expects a schema.Frames"):
        model.features(today.connections)
    with pytest.raises(TypeError, match="DnsCalcDetector.fit expects a schema.Frames"):
        DnsCalcDetector().fit((today.connections, today.dns_answers, today.inventory))


def loosely_typed(frames: Frames) -> Frames:
    """The same data as object strings and int64 numbers: what a hand-made frame looks like."""
    def loosen(df):
        out = df.copy()
        for c in out.columns:
            if pd.api.types.is_string_dtype(out[c].dtype):
                out[c] = out[c].astype(object)
            elif pd.api.types.is_integer_dtype(out[c].dtype):
                out[c] = out[c].astype("int64")
        return out
    return Frames(loosen(frames.connections), loosen(frames.dns_answers), loosen(frames.inventory))


def test_castable_dtypes_are_conformed_with_identical_scores():
    model, _, _ = fitted_detector()
    history, today = small_estate()
    loose = loosely_typed(today)
    assert loose.connections["dst_port"].dtype == "int64" and loose.connections["src_ip"].dtype == object
    np.testing.assert_array_equal(model.score_samples(loose), model.score_samples(today))
    a = DnsCalcDetector(random_state=3, **SMALL).fit(loosely_typed(history)).score_samples(today)
    b = DnsCalcDetector(random_state=3, **SMALL).fit(history).score_samples(today)
    np.testing.assert_array_equal(a, b)


def test_canonical_frames_pass_the_boundary_without_a_copy():
    _, today = small_estate()
    assert schema.check_frames(today, "test") is today
    no_inventory = Frames(today.connections, today.dns_answers, None)
    assert schema.check_frames(no_inventory, "test") is no_inventory
    loose = loosely_typed(today)
    checked = schema.check_frames(loose, "test")
    assert checked is not loose
    for kind, frame in (("connections", checked.connections), ("dns_answers", checked.dns_answers),
                        ("inventory", checked.inventory)):
        schema.validate(frame, kind)         # now canonical dtypes
