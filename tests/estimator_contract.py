"""The scikit-learn estimator contract, checked the same way for every learnable piece
(`DnsCalcDetector`, `EnsembleDetector`, `CalibratedForest`, `EntityBaseline`, `ManagementPlane`),
and the small generated batch they are fitted on."""
from __future__ import annotations

import functools
import inspect
import pickle

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from esxi_anomaly.schema import Frames


@functools.lru_cache(maxsize=None)
def small_estate(seed: int = 3):
    """(history, today) Frames of a small generated estate (~8k connections over two days)."""
    from esxi_anomaly.synth import generate

    ds = generate(days=2, seed=seed, scale=0.02)
    c, d = ds.connections, ds.dns_answers
    history = Frames(c[c["ts"] < ds.train_end].reset_index(drop=True),
                     d[d["ts"] < ds.train_end].reset_index(drop=True), ds.inventory)
    today = Frames(c[c["ts"] >= ds.train_end].reset_index(drop=True),
                   d[d["ts"] >= ds.train_end - 3600].reset_index(drop=True), ds.inventory)
    return history, today


@functools.lru_cache(maxsize=None)
def fitted_detector():
    """A small DnsCalcDetector fitted on `small_estate()`'s history, and today's prepared batch
    and feature matrix (the inputs of the pieces)."""
    from esxi_anomaly.model import DnsCalcDetector

    history, today = small_estate()
    model = DnsCalcDetector(n_estimators=20, max_samples=64, random_state=1).fit(history)
    prepared, feats = model.features(today)
    return model, prepared, feats


def assert_params_only_init(cls, params: dict) -> None:
    """sklearn's rule: `__init__` stores every argument unchanged under its own name and nothing else."""
    names = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    assert sorted(names) == sorted(params), "the test must pass every init argument"
    est = cls(**params)
    assert sorted(vars(est)) == sorted(names)
    for name, value in params.items():
        assert getattr(est, name) is value, name
    assert est.get_params(deep=False) == params


def assert_clone_keeps_params(est) -> None:
    twin = clone(est)
    assert twin is not est and type(twin) is type(est)
    assert twin.get_params(deep=False) == est.get_params(deep=False)


def assert_unfitted_raises(calls: dict) -> None:
    """Each `calls[name]()` on an unfitted estimator raises NotFittedError (not a bare AttributeError)."""
    for name, call in calls.items():
        with pytest.raises(NotFittedError):
            call()


def assert_fit_contract(est, fit) -> None:
    """`fit` returns the estimator itself, and what it learns ends in `_` (private caches, with
    a leading underscore, aside)."""
    before = set(vars(est))
    assert fit(est) is est
    learned = set(vars(est)) - before
    assert learned, "fit learned nothing"
    assert all(a.endswith("_") or a.startswith("_") for a in learned), sorted(learned)
    assert not any(a.endswith("_") for a in before), "an attribute ending in _ was set before fit"


def assert_pickle_scores_alike(est, score) -> None:
    again = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(np.asarray(score(again)), np.asarray(score(est)))
