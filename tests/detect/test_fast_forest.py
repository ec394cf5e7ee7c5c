"""FastForest.score_samples equals sklearn's IsolationForest.score_samples (1e-9; in practice bit for bit)."""
from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
from sklearn.ensemble import IsolationForest

from esxi_anomaly.detect import fast_forest
from esxi_anomaly.detect.fast_forest import FastForest

LAYOUTS = ["complete", "sparse"]


def fit(X, **kw) -> IsolationForest:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # max_samples > n_samples etc.
        return IsolationForest(random_state=0, **kw).fit(X)


def assert_same(forest, X, layout=None, n_threads=1):
    expected = forest.score_samples(X)
    got = FastForest.from_sklearn(forest, layout=layout).score_samples(X, n_threads=n_threads)
    assert got.shape == expected.shape and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    return got, expected


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(6)


@pytest.fixture(scope="module")
def train(rng):
    return rng.standard_normal((2000, 9))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kw", [
    dict(n_estimators=40, max_samples=256),
    dict(n_estimators=25, max_samples=100, max_features=0.5),
    dict(n_estimators=7, max_samples=64, max_features=3),
    dict(n_estimators=12, max_samples=0.9),
])
def test_random_data_equals_sklearn(rng, train, layout, kw):
    forest = fit(train, **kw)
    X = np.vstack([rng.standard_normal((1500, 9)), 4 * rng.standard_normal((300, 9))])
    got, expected = assert_same(forest, X, layout)
    assert np.array_equal(got, expected)         # same floats, same summation order


def test_default_layout_choice(train, monkeypatch):
    """Complete (padded) unless padding would cost > 4x the real nodes beyond a size floor."""
    assert FastForest.from_sklearn(fit(train, n_estimators=20, max_samples=256)).layout == "complete"
    monkeypatch.setattr(fast_forest, "_COMPLETE_MAX_NODES", 0)
    lopsided = np.zeros((1024, 2))               # mostly duplicates: deep, thin trees
    lopsided[:40] = np.random.default_rng(0).standard_normal((40, 2)) * 100
    forest = fit(lopsided, n_estimators=10, max_samples=1024)
    ff = FastForest.from_sklearn(forest)
    assert ff.layout == "sparse" and ff.depth == 10
    assert_same(forest, np.random.default_rng(1).standard_normal((500, 2)) * 100)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_values_exactly_at_thresholds(rng, train, layout):
    """Rows made of every threshold, its float32 rounding, and the next float32 up."""
    forest = fit(train, n_estimators=30, max_samples=128)
    thr = np.concatenate([e.tree_.threshold[e.tree_.children_left >= 0] for e in forest.estimators_])
    t32 = thr.astype(np.float32)
    values = np.concatenate([thr, t32, np.nextafter(t32, np.float32(np.inf)),
                             np.nextafter(t32, np.float32(-np.inf))]).astype(np.float64)
    X = np.column_stack([rng.permutation(values) for _ in range(train.shape[1])])
    assert_same(forest, X, layout)
    assert_same(forest, X.astype(np.float32), layout)    # float32 input needs no cast


@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_and_inf_follow_sklearn(rng, train, layout):
    X = rng.standard_normal((1200, 9))
    X[rng.random(X.shape) < 0.05] = np.nan
    X[rng.random(X.shape) < 0.01] = np.inf
    X[rng.random(X.shape) < 0.01] = -np.inf
    X[:5] = np.nan
    assert_same(fit(train, n_estimators=20, max_samples=128), X, layout)
    holes = train.copy()                           # trained with NaN: missing_go_to_left is random
    holes[rng.random(holes.shape) < 0.1] = np.nan
    assert_same(fit(holes, n_estimators=20, max_samples=128), X, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kw, X_train", [
    (dict(n_estimators=1, max_samples=2), np.arange(10.0).reshape(5, 2)),
    (dict(n_estimators=3, max_samples=1), np.arange(10.0).reshape(5, 2)),   # zero denominator: -0.5
    (dict(n_estimators=4), np.ones((30, 2))),                               # single-leaf trees
    (dict(n_estimators=2, max_samples=16, max_features=0.5), np.arange(64.0).reshape(16, 4)),
])
def test_tiny_forests(rng, layout, kw, X_train):
    forest = fit(X_train, **kw)
    X = rng.standard_normal((50, X_train.shape[1])) * 10
    assert_same(forest, X, layout)
    assert_same(forest, X_train, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_row_and_zero_rows(rng, train, layout):
    forest = fit(train, n_estimators=15, max_samples=64)
    ff = FastForest.from_sklearn(forest, layout=layout)
    one = rng.standard_normal((1, 9))
    assert np.array_equal(ff.score_samples(one), forest.score_samples(one))
    empty = ff.score_samples(np.empty((0, 9)))   # sklearn raises on 0 rows; an empty batch is fine here
    assert empty.shape == (0,) and empty.dtype == np.float64


def test_threads_give_identical_results(rng, train, monkeypatch):
    monkeypatch.setattr(fast_forest, "_BLOCK_ELEMENTS", 1 << 11)   # small blocks: many per thread
    forest = fit(train, n_estimators=50, max_samples=256)
    ff = FastForest.from_sklearn(forest)
    assert ff.block_rows == 32
    X = rng.standard_normal((ff.block_rows * 5 + 17, 9))
    one = ff.score_samples(X, n_threads=1)
    assert np.array_equal(one, ff.score_samples(X, n_threads=2))
    assert np.array_equal(one, ff.score_samples(X, n_threads=3))
    assert np.array_equal(one, ff.score_samples(X))          # default: os.cpu_count()
    assert np.array_equal(one, forest.score_samples(X))


def test_pickle_round_trip(rng, train):
    forest = fit(train, n_estimators=20, max_samples=128, max_features=0.7)
    ff = FastForest.from_sklearn(forest)
    back = pickle.loads(pickle.dumps(ff))
    X = rng.standard_normal((700, 9))
    assert np.array_equal(back.score_samples(X), ff.score_samples(X))
    assert np.array_equal(back.score_samples(X), forest.score_samples(X))


def test_input_handling(rng, train):
    forest = fit(train, n_estimators=10, max_samples=64)
    ff = FastForest.from_sklearn(forest)
    X = rng.standard_normal((100, 9))
    assert np.array_equal(ff.score_samples(X.tolist()), forest.score_samples(X))
    assert np.array_equal(ff.score_samples(np.asfortranarray(X)), forest.score_samples(X))
    ints = rng.integers(-3, 3, (100, 9))
    assert np.array_equal(ff.score_samples(ints), forest.score_samples(ints))
    with pytest.raises(ValueError, match="features"):
        ff.score_samples(X[:, :5])
    with pytest.raises(ValueError, match="2D"):
        ff.score_samples(X[0])
    with pytest.raises(ValueError):
        FastForest.from_sklearn(forest, layout="dense")
