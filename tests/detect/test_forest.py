"""HeapTrees (the package's compiled heap walk), ForestScorer (scikit-learn's compiled walk), FlatTrees
(the numpy walk) and CalibratedForest.raw_score equal sklearn's IsolationForest.score_samples bit for
bit, whatever the thread count, block size or input quirks."""
from __future__ import annotations

import pickle
import sys
import warnings

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.ensemble import IsolationForest

from esxi_anomaly.detect import forest as forest_mod
from esxi_anomaly.detect.forest import (CalibratedForest, FlatTrees, ForestScorer, HeapTrees, float32_at_most,
                                        heap_walk_routine, scoring_threads, usable_cpus)

# 1e39 does not fit a float32: sklearn's cast and ours both warn, and both give inf.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")


@pytest.fixture
def heap_walk():
    if heap_walk_routine() is None:
        pytest.skip("the package was installed without its compiled heap walk (no C compiler at install)")


@pytest.fixture
def no_heap_walk(monkeypatch):
    """As installed without a C compiler: CalibratedForest takes the other walks."""
    monkeypatch.setattr(forest_mod, "heap_walk_routine", lambda: None)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks, tasks and per-thread minimums of a few rows, so small inputs take every path."""
    monkeypatch.setattr(forest_mod, "BLOCK_ROWS", 64)
    monkeypatch.setattr(forest_mod, "TASK_ROWS", 64)
    monkeypatch.setattr(forest_mod, "MIN_ROWS_PER_THREAD", 16)
    monkeypatch.setattr(forest_mod, "FLAT_BLOCK_ROWS", 50)


def fit(X, **kw) -> IsolationForest:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # max_samples > n_samples etc.
        return IsolationForest(random_state=0, **kw).fit(X)


def assert_same(forest, X, n_threads=1):
    expected = forest.score_samples(X)
    got = ForestScorer(forest).score_samples(X, n_threads=n_threads)
    assert got.shape == expected.shape and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    assert np.array_equal(got, expected)         # same floats, same summation order
    flat = FlatTrees(ForestScorer(forest))
    assert np.array_equal(-flat.raw_score(X), expected)
    if heap_walk_routine() is not None:
        heap = HeapTrees(flat).raw_score(X, n_threads)
        assert heap.dtype == np.float64 and np.array_equal(-heap, expected)
    return got


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(6)


@pytest.fixture(scope="module")
def train(rng):
    return rng.standard_normal((2000, 9))


def quirky(rng, n=1200, d=9):
    """Normal rows, wide rows, NaN, +-inf, values beyond float32, duplicated rows."""
    X = np.vstack([rng.standard_normal((n, d)), 4 * rng.standard_normal((n // 4, d))])
    X[::7, 3 % d] = np.nan
    X[::11, 1 % d] = np.inf
    X[::13, 2 % d] = -np.inf
    X[::17, 4 % d] = 1e39                        # inf once cast to float32, as in sklearn
    X[::19] = np.nan
    X[100:160] = X[40]
    return X


@pytest.mark.parametrize("kw", [
    dict(n_estimators=40, max_samples=256),
    dict(n_estimators=25, max_samples=100, max_features=0.5),
    dict(n_estimators=7, max_samples=64, max_features=3),
    dict(n_estimators=12, max_samples=0.9),
    dict(n_estimators=1, max_samples=2),
    dict(n_estimators=3, max_samples=1),         # zero denominator: sklearn's -0.5 everywhere
])
@pytest.mark.parametrize("n_threads", [1, 3])
def test_equals_sklearn(rng, train, small_blocks, kw, n_threads):
    assert_same(fit(train, **kw), quirky(rng), n_threads)


def test_nan_at_fit_and_single_node_trees(rng, small_blocks):
    """NaN in training data (missing_go_to_left), and constant data (one-node trees)."""
    train = rng.standard_normal((500, 4))
    train[::3, 0] = np.nan
    assert_same(fit(train, n_estimators=15, max_samples=128), quirky(rng, 400, 4), 2)
    const = fit(np.ones((300, 4)), n_estimators=5)
    assert max(est.tree_.node_count for est in const.estimators_) == 1
    assert_same(const, quirky(rng, 300, 4), 2)


def test_values_exactly_at_and_next_to_thresholds(rng, train, small_blocks):
    """float32(x) <= float64 threshold decides, as in sklearn, also at the float32 neighbours."""
    forest = fit(train, n_estimators=20, max_samples=128, max_features=0.7)
    thresholds = [[] for _ in range(9)]
    for est, feats in zip(forest.estimators_, forest.estimators_features_):
        t = est.tree_
        for f, thr in zip(t.feature[t.children_left >= 0], t.threshold[t.children_left >= 0]):
            thresholds[feats[f]].append(thr)
    cols = []
    for values in thresholds:
        v = np.array(values)
        v32 = v.astype(np.float32)
        near = np.concatenate([v, v32, np.nextafter(v32, np.float32(np.inf)), np.nextafter(v32, np.float32(-np.inf))])
        cols.append(rng.choice(near.astype(np.float64), 3000))
    assert_same(forest, np.column_stack(cols), 2)


def test_row_counts_dtypes_and_layouts(rng, train, small_blocks):
    forest = fit(train, n_estimators=30, max_samples=200)
    scorer = ForestScorer(forest)
    X = quirky(rng)
    assert_same(forest, X[:1])
    assert_same(forest, X[:65], 4)               # one full block plus one row
    assert scorer.score_samples(X[:0], n_threads=4).shape == (0,)   # sklearn raises on 0 rows
    assert_same(forest, np.asfortranarray(X), 2)
    assert_same(forest, X.astype(np.float32), 2)
    ints = rng.integers(-3, 4, (500, 9))
    np.testing.assert_array_equal(scorer.score_samples(ints), forest.score_samples(ints.astype(np.float64)))
    with pytest.raises(ValueError, match="8 features"):
        scorer.score_samples(X[:, :8])
    with pytest.raises(ValueError, match="2D"):
        scorer.score_samples(X[0])
    with pytest.raises(ValueError, match="not fitted"):
        ForestScorer(IsolationForest())


def test_thread_count_and_block_size_do_not_change_results(rng, train, monkeypatch):
    forest = fit(train, n_estimators=30, max_samples=256, max_features=0.8)
    X = quirky(rng, 1600)                        # 2000 rows
    expected = forest.score_samples(X)
    for block, min_rows in [(8192, 1024), (64, 16), (7, 1)]:
        monkeypatch.setattr(forest_mod, "BLOCK_ROWS", block)
        monkeypatch.setattr(forest_mod, "TASK_ROWS", block)
        monkeypatch.setattr(forest_mod, "MIN_ROWS_PER_THREAD", min_rows)
        scorer = ForestScorer(forest)
        for threads in (1, 2, 5, 16):
            assert np.array_equal(scorer.score_samples(X, n_threads=threads), expected), (block, threads)


def test_sort_key_trees(train):
    forest = fit(train, n_estimators=2, max_samples=256)
    assert ForestScorer(forest).n_key_trees == 2                  # fewer trees than SORT_KEY_TREES
    big = fit(np.random.default_rng(1).standard_normal((20000, 3)), n_estimators=4, max_samples=20000)
    scorer = ForestScorer(big)
    assert scorer.key_stride ** scorer.n_key_trees < 2 ** 63      # the key cannot overflow


def test_scoring_threads(monkeypatch):
    monkeypatch.setattr(forest_mod, "usable_cpus", lambda: 8)
    assert scoring_threads(None) == forest_mod.DEFAULT_MAX_THREADS == 4
    assert [scoring_threads(n) for n in (1, 3, 12, -1, -2, -20)] == [1, 3, 12, 8, 7, 1]
    assert usable_cpus() >= 1


# --- CalibratedForest --------------------------------------------------------------------------

@pytest.mark.parametrize("n_jobs", [None, 1, 2, -1])
def test_calibrated_raw_score_equals_sklearn(rng, train, n_jobs):
    cf = CalibratedForest(n_estimators=40, max_features=0.8, random_state=1, n_jobs=n_jobs).fit(train)
    X = quirky(rng, 3000)
    assert np.array_equal(cf.raw_score(X), -cf.forest_.score_samples(X))
    assert cf.raw_score(X[:0]).shape == (0,)
    s = cf.score(X)
    assert np.all((s >= 0) & (s <= 1))


def test_pickle_drops_and_rebuilds_the_tables(rng, train):
    cf = CalibratedForest(n_estimators=20, random_state=2).fit(train)
    X = quirky(rng)
    before = cf.raw_score(X)
    assert "_scorer" in cf.__dict__                               # built by fit (training scores)
    state = cf.__getstate__()
    assert "_scorer" not in state and "_scorer" in cf.__dict__    # the live object keeps them
    again = pickle.loads(pickle.dumps(cf))
    assert "_scorer" not in again.__dict__                        # like a bundle saved before them
    assert np.array_equal(again.raw_score(X), before)
    assert np.array_equal(again.score(X), cf.score(X))
    assert clone(cf).get_params() == cf.get_params()


def test_refit_rebuilds_the_tables(rng, train):
    cf = CalibratedForest(n_estimators=20, random_state=2).fit(train)
    first = cf.scorer_
    cf.set_params(random_state=3).fit(train)
    assert cf.scorer_ is not first
    X = quirky(rng)
    assert np.array_equal(cf.raw_score(X), -cf.forest_.score_samples(X))


def test_calls_take_either_walk_with_the_same_scores(rng, train, monkeypatch, no_heap_walk):
    cf = CalibratedForest(n_estimators=30, max_features=0.8, random_state=4).fit(train)
    X = quirky(rng, 800)
    walks = {}
    for name, min_rows in (("flat", 10**9), ("compiled", 0)):
        monkeypatch.setattr(forest_mod, "COMPILED_WALK_MIN_ROWS", min_rows)
        walks[name] = cf.raw_score(X, n_jobs=2)
    assert np.array_equal(walks["flat"], walks["compiled"])
    assert np.array_equal(walks["flat"], -cf.forest_.score_samples(X))


def test_once_sklearn_is_imported_calls_above_a_thousand_rows_take_the_compiled_walk(rng, train, no_heap_walk):
    assert "sklearn.tree" in sys.modules   # the fixture fitted a forest: as in a scoring worker
    cf = pickle.loads(pickle.dumps(CalibratedForest(n_estimators=20, random_state=2).fit(train)))
    X = quirky(rng, 5000)
    small = cf.raw_score(X[:forest_mod.COMPILED_WALK_MIN_ROWS_LOADED - 1])
    assert "_forest" not in cf.__dict__                 # the flat walk: the sklearn forest not unpickled
    assert 5000 < forest_mod.COMPILED_WALK_MIN_ROWS
    large = cf.raw_score(X)
    assert "_forest" in cf.__dict__                     # the compiled walk
    assert np.array_equal(large[:len(small)], small)
    assert np.array_equal(large, -cf.forest_.score_samples(X))


def test_a_pickle_holds_the_sklearn_forest_as_bytes_until_it_is_asked_for(rng, train, no_heap_walk):
    cf = CalibratedForest(n_estimators=20, random_state=2).fit(train)
    X = quirky(rng)
    again = pickle.loads(pickle.dumps(cf))
    assert "_forest" not in again.__dict__ and isinstance(again.__dict__["_forest_pickle"], bytes)
    assert np.array_equal(again.raw_score(X[:100]), cf.raw_score(X[:100]))   # the flat walk: no unpickling
    assert "_forest" not in again.__dict__
    assert np.array_equal(-again.forest_.score_samples(X), cf.raw_score(X))
    twice = pickle.loads(pickle.dumps(again))                                 # the same bytes kept
    assert twice.__dict__["_forest_pickle"] == again.__dict__["_forest_pickle"]


def test_a_pickle_from_before_flat_trees_loads_and_scores_alike(rng, train):
    cf = CalibratedForest(n_estimators=20, random_state=2).fit(train)
    old = {k: v for k, v in cf.__dict__.items() if k not in ("_forest", "_scorer", "trees_", "_forest_pickle")}
    old["forest_"] = cf.forest_
    loaded = CalibratedForest.__new__(CalibratedForest)
    loaded.__setstate__(pickle.loads(pickle.dumps(old)))
    X = quirky(rng)
    assert np.array_equal(loaded.raw_score(X), cf.raw_score(X))


# --- the heap walk ---------------------------------------------------------------------------------

def test_float32_at_most_decides_as_sklearns_float64_comparison(rng):
    t = np.concatenate([rng.standard_normal(3000) * 10.0 ** rng.integers(-40, 40, 3000),
                        [0.0, -0.0, 1e39, -1e39, 3.4028235e38, np.inf, -np.inf, 1e-46, -1e-46]])
    at_most = float32_at_most(t)
    assert at_most.dtype == np.float32
    assert np.all(at_most.astype(np.float64) <= t)
    with np.errstate(over="ignore"):
        up = np.nextafter(at_most, np.float32(np.inf))
    assert np.all((up.astype(np.float64) > t) | (at_most == np.float32(np.inf)))   # the largest such float32
    x = np.concatenate([at_most, up, np.nextafter(at_most, np.float32(-np.inf)), [np.nan, np.inf, -np.inf]])
    for threshold, rounded in zip(t[::37], at_most[::37]):
        np.testing.assert_array_equal(x <= rounded, x.astype(np.float64) <= threshold)


def test_heap_layout_of_a_small_tree(heap_walk):
    """Root split, a leaf on the left, a split on the right: the left leaf becomes a pass-through split
    (infinite threshold) whose two last-level slots both hold it."""
    X = np.array([[0.0], [1.0], [2.0], [3.0]])
    forest = fit(X, n_estimators=1, max_samples=4)
    tree = forest.estimators_[0].tree_
    assert list(tree.children_left) == [1, -1, 3, -1, -1] and list(tree.children_right) == [2, -1, 4, -1, -1]
    heap = HeapTrees(FlatTrees(ForestScorer(forest)))
    addend = ForestScorer(forest).addends[0]
    assert heap.depth == 2
    assert heap.threshold.tolist() == [[float32_at_most(tree.threshold[[0]])[0], np.inf,
                                        float32_at_most(tree.threshold[[2]])[0]]]
    assert heap.feature.tolist() == [[0, 0, 0]]
    assert heap.leaf.tolist() == [[addend[1], addend[1], addend[3], addend[4]]]
    assert np.array_equal(-heap.raw_score(X), forest.score_samples(X))


def test_calibrated_forest_takes_the_heap_walk_without_sklearns_forest(rng, train, heap_walk):
    cf = pickle.loads(pickle.dumps(CalibratedForest(n_estimators=20, max_features=0.8, random_state=2).fit(train)))
    X = quirky(rng, 5000)
    scores = cf.raw_score(X, n_jobs=2)
    assert "_forest" not in cf.__dict__ and isinstance(cf.__dict__["_heap"][1], HeapTrees)
    assert np.array_equal(scores, -cf.forest_.score_samples(X))
    assert "_heap" not in cf.__getstate__()                            # rebuilt after unpickling
    assert np.array_equal(pickle.loads(pickle.dumps(cf)).raw_score(X[:10]), scores[:10])


def test_forests_deeper_than_the_heap_walk_takes_score_alike(rng, train, monkeypatch, heap_walk):
    monkeypatch.setattr(forest_mod, "HEAP_MAX_DEPTH", 5)
    cf = CalibratedForest(n_estimators=10, max_samples=256, random_state=3).fit(train)   # 8 levels
    X = quirky(rng, 3000)
    assert cf.heap_trees_ is None
    assert np.array_equal(cf.raw_score(X), -cf.forest_.score_samples(X))
    shallow = CalibratedForest(n_estimators=10, max_samples=32, random_state=3).fit(train)  # 5 levels
    assert isinstance(shallow.heap_trees_, HeapTrees)
    assert np.array_equal(shallow.raw_score(X), -shallow.forest_.score_samples(X))
