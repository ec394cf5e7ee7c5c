"""Isolation forest calibrated to a percentile of its training scores (higher = more anomalous).

Scoring does not call `IsolationForest.score_samples`; three walks compute the same numbers, bit
for bit (tests/detect/test_forest.py):

* `HeapTrees`, whenever the package was built with its C routine (`_heap_walk.c`, compiled at
  install; see setup.py) and the trees are at most HEAP_MAX_DEPTH deep (256-sample trees: 8): each
  tree as a complete binary tree in heap order, walked without branches, 16 rows side by side.
  ~7.4 ns per row and tree on the 2-core EPYC VM, against ~15.5 for `ForestScorer` on connection
  features (benchmarks/README.md). It needs no scikit-learn.
* Else `FlatTrees` for small calls: every tree's nodes as flat numpy arrays, walked level by level
  over all rows and trees at once. It needs no scikit-learn, so a loaded model that scores a small
  file never imports it (1.7 s on 2 cores, more than the whole run); about 2.5x the compiled walk's
  CPU per row.
* Else `ForestScorer` for large calls: scikit-learn's compiled tree walk, faster than
  `score_samples` (COMPILED_WALK_MIN_ROWS, COMPILED_WALK_MIN_ROWS_LOADED: by the call's size and
  by whether the process has imported scikit-learn already).

Why `ForestScorer` is faster than `score_samples`:

* sklearn walks each tree over *all* rows before the next tree, so it streams the whole float32
  copy of X through memory once per tree, then does four numpy passes per tree over all rows
  (two gathers, two adds, under a lock). `ForestScorer` converts a block of rows to float32 once,
  keeps it in cache while every tree's own compiled `tree_.apply` walks it (the C loop releases
  the GIL), and adds one precomputed table lookup per tree: ``depth + c(n_node_samples) - 1`` of
  the leaf, the very expression sklearn evaluates per row, summed in sklearn's tree order.
* the rows of a block are walked sorted by their leaves in the first 3 trees: similar rows one
  after another, so the CPU predicts the walk's branches (~2x per core on connection features).
* row blocks are spread over a thread pool (`n_jobs` threads; results do not depend on it).

The per-core cost of sklearn's compiled tree walk: branchy, ~40 ns per row and tree on random
rows, ~17 ns when consecutive rows branch alike, on the 2-core EPYC VM. `HeapTrees` has no
branches to predict: its rows need no sorting. See benchmarks/forest_scoring.py and
benchmarks/README.md for measured rows/s.
"""
from __future__ import annotations

import ctypes
import os
import pickle
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from esxi_anomaly import compiled
from esxi_anomaly.compiled import POINTER, SIZE
from esxi_anomaly.estimator import Estimator, check_fitted

if TYPE_CHECKING:
    from sklearn.ensemble import IsolationForest

CALIBRATION_POINTS = 2001

# Rows converted to float32 and walked through every tree at a time (8192 x 33 x 4 bytes = 1 MB,
# in L3). Each tree's nodes (~32 KB for 256 samples) are pulled into L1/L2 once per block, which
# costs ~10 us: 2048-row blocks were ~10% slower per row, 16384 no faster than 8192.
BLOCK_ROWS = 8192
# Trees whose leaf ids order the rows of a block (see ForestScorer._score_rows); 2-6 were alike.
SORT_KEY_TREES = 3
# Work items handed to the thread pool: one block each, scheduled dynamically (a core that
# colleagues' jobs slow down does not hold the other up).
TASK_ROWS = BLOCK_ROWS
# Fewer rows than this per thread run on fewer threads (one thread below 2x this).
MIN_ROWS_PER_THREAD = 1024
# Default thread count (n_jobs=None): the usable cores, at most this many.
DEFAULT_MAX_THREADS = 4
# Calls with fewer rows take the flat numpy walk (no scikit-learn import: 1.7 s once per process,
# the numpy walk's extra cost for about 500k rows); larger ones the compiled walk.
COMPILED_WALK_MIN_ROWS = 100_000
# ... unless this process has imported scikit-learn's trees already (a scoring worker: its
# forkserver preloads them): then the compiled walk from this many rows, where the two cost alike.
COMPILED_WALK_MIN_ROWS_LOADED = 1_000
# Rows of the flat walk at a time: its (trees x rows) node and index arrays stay in L2/L3.
FLAT_BLOCK_ROWS = 2048
# Deepest forest the heap walk takes: a tree is stored as 2^depth - 1 splits (9 bytes each) and 2^depth
# leaves (8 bytes), 68 KB at 12 levels (max_samples up to 4096); deeper forests take the other walks.
HEAP_MAX_DEPTH = 12


def average_path_length(n_samples) -> np.ndarray:
    """c(n): sklearn.ensemble._iforest._average_path_length, the same expression on the same floats."""
    n = np.asarray(n_samples, dtype=np.float64)
    shape = n.shape
    n = n.reshape((1, -1))
    out = np.zeros(n.shape)
    mask_1 = n <= 1
    mask_2 = n == 2
    not_mask = ~np.logical_or(mask_1, mask_2)
    out[mask_1] = 0.0
    out[mask_2] = 1.0
    out[not_mask] = 2.0 * (np.log(n[not_mask] - 1.0) + np.euler_gamma) - 2.0 * (n[not_mask] - 1.0) / n[not_mask]
    return out.reshape(shape)


def usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def scoring_threads(n_jobs) -> int:
    """Threads for scoring: None -> usable cores (at most DEFAULT_MAX_THREADS); k > 0 -> k;
    negative -> joblib's meaning (-1 = all cores, -2 = all but one)."""
    cpus = usable_cpus()
    if n_jobs is None:
        return min(cpus, DEFAULT_MAX_THREADS)
    n = int(n_jobs)
    return max(1, cpus + 1 + n if n < 0 else n)


def as_matrix(X, n_features: int) -> np.ndarray:
    """X as the 2-D float array both walks take; ValueError for a wrong shape."""
    if hasattr(X, "toarray") and not isinstance(X, np.ndarray):
        X = X.toarray()                                           # scipy sparse
    X = np.asarray(X)
    if X.dtype not in (np.float32, np.float64):
        X = X.astype(np.float64)   # as sklearn: ints/bools/objects go via float64, then float32
    if X.ndim != 2:
        raise ValueError(f"Expected a 2D array, got an array of shape {X.shape}")
    if X.shape[1] != n_features:
        raise ValueError(f"X has {X.shape[1]} features, but the forest was fitted with {n_features} features")
    return X


def leaf_scores(depths: np.ndarray, denominator) -> np.ndarray:
    """sklearn's final transform of the summed path lengths, verbatim (max_samples=1: zero
    denominator -> 2**-1)."""
    return 2 ** (-np.divide(depths, denominator, out=np.ones_like(depths), where=denominator != 0))


def _in_row_blocks(score_rows, X: np.ndarray, n_threads: int) -> np.ndarray:
    """`score_rows(X, out, start, stop)` over all rows of X, in tasks of TASK_ROWS rows spread over
    up to `n_threads` threads (fewer when there are few rows); returns `out`."""
    n = X.shape[0]
    out = np.empty(n, dtype=np.float64)
    workers = max(1, min(int(n_threads), n // MIN_ROWS_PER_THREAD))
    if workers == 1:
        score_rows(X, out, 0, n)
        return out
    n_tasks = max(workers, -(-n // TASK_ROWS))
    bounds = [n * k // n_tasks for k in range(n_tasks + 1)]
    with ThreadPoolExecutor(workers, thread_name_prefix="forest-score") as pool:
        for done in [pool.submit(score_rows, X, out, a, b) for a, b in zip(bounds, bounds[1:])]:
            done.result()
    return out


def _tree_on_all_columns(tree, features: np.ndarray, n_features: int):
    """A copy of an sklearn `Tree` fitted on ``X[:, features]`` that reads the same columns of X.

    Built through the Tree's pickle protocol (what joblib bundles rely on): only the `feature`
    field of split nodes changes, so `apply(X)` equals the original's `apply(X[:, features])`."""
    cls, (_, n_classes, n_outputs), state = tree.__reduce__()
    state = dict(state)
    nodes = state["nodes"].copy()
    split = nodes["left_child"] >= 0
    nodes["feature"][split] = np.asarray(features, dtype=np.int64)[nodes["feature"][split]]
    state["nodes"] = nodes
    copy = cls(n_features, n_classes, n_outputs)
    copy.__setstate__(state)
    return copy


class ForestScorer:
    """`score_samples` of a fitted IsolationForest, equal to sklearn's, over row blocks and threads.

    Holds references to the forest's trees (or feature-remapped copies when it was fitted with
    ``max_features < 1``) and one float64 table per tree: ~4 KB per 256-sample tree."""

    def __init__(self, forest: IsolationForest):
        estimators = getattr(forest, "estimators_", None)
        if not estimators:
            raise ValueError("the IsolationForest is not fitted")
        self.n_features_in_ = int(forest.n_features_in_)
        max_features = getattr(forest, "_max_features", self.n_features_in_)
        subsets = forest.estimators_features_ if max_features != self.n_features_in_ else None
        depths = getattr(forest, "_decision_path_lengths", None)
        apl = getattr(forest, "_average_path_length_per_tree", None)
        self.trees, self.addends = [], []
        for i, est in enumerate(estimators):
            tree = est.tree_
            if depths is None or apl is None:   # forests pickled by an sklearn without these
                depths_i, apl_i = tree.compute_node_depths(), average_path_length(tree.n_node_samples)
            else:
                depths_i, apl_i = depths[i], apl[i]
            # sklearn adds `depths[leaf] + apl[leaf] - 1.0` per row: the same expression per leaf.
            self.addends.append(np.ascontiguousarray(depths_i + apl_i - 1.0, dtype=np.float64))
            self.trees.append(tree if subsets is None
                              else _tree_on_all_columns(tree, subsets[i], self.n_features_in_))
        max_samples = getattr(forest, "_max_samples", None)
        if max_samples is None:
            max_samples = forest.max_samples_
        self.denominator = len(self.trees) * average_path_length([max_samples])
        # Sort key of a block: the leaf ids of the first trees (see _score_rows), as many as fit
        # in an int64 up to SORT_KEY_TREES.
        self.key_stride = max(int(t.node_count) for t in self.trees[:SORT_KEY_TREES])
        self.n_key_trees = min(len(self.trees), SORT_KEY_TREES, 62 // max(1, self.key_stride.bit_length()))

    def score_samples(self, X, n_threads: int = 1) -> np.ndarray:
        """Equals `forest.score_samples(X)` (lower = more abnormal). 0 rows -> empty (sklearn raises)."""
        out = self.raw_score(X, n_threads)
        return np.negative(out, out=out)

    def raw_score(self, X, n_threads: int = 1) -> np.ndarray:
        """``-score_samples(X)``: higher = more anomalous."""
        return _in_row_blocks(self._score_rows, as_matrix(X, self.n_features_in_), n_threads)

    def _score_rows(self, X: np.ndarray, out: np.ndarray, start: int, stop: int) -> None:
        """sklearn's scores (positive, before its final sign flip) of rows [start, stop) into out."""
        denominator = self.denominator
        trees, addends, n_key = self.trees, self.addends, self.n_key_trees
        for a in range(start, stop, BLOCK_ROWS):
            b = min(a + BLOCK_ROWS, stop)
            # sklearn casts X to float32 (round to nearest) before walking; C order for the walk.
            block = np.ascontiguousarray(X[a:b], dtype=np.float32)
            depths = np.zeros(b - a)
            leaf_value = np.empty(b - a)
            key = np.zeros(b - a, dtype=np.int64)
            for tree, addend in zip(trees[:n_key], addends[:n_key]):
                leaves = tree.apply(block)
                np.take(addend, leaves, out=leaf_value)
                depths += leaf_value                                  # tree order, as sklearn
                key *= self.key_stride
                key += leaves
            # Rows that share their leaves in the first trees lie in one small box of feature
            # space and mostly take the same branches in the other trees too: walking them one
            # after the other lets the CPU predict the branches (~2x faster on connection
            # features, about even on i.i.d. noise). Each row's sum keeps sklearn's tree order.
            order = np.argsort(key, kind="stable") if n_key else None
            if order is not None:
                block = block[order]
                depths = depths[order]
            for tree, addend in zip(trees[n_key:], addends[n_key:]):
                np.take(addend, tree.apply(block), out=leaf_value)
                depths += leaf_value
            scores = leaf_scores(depths, denominator)
            if order is None:
                out[a:b] = scores
            else:
                out[a + order] = scores


class FlatTrees:
    """A fitted isolation forest's trees as flat numpy arrays, walked without scikit-learn.

    Nodes of all trees one after another: `feature` and `threshold` of each split, `children`
    (left at 2n, right at 2n + 1), `missing_right` (where a NaN goes), `addend` (the leaf's
    ``depth + c(n_node_samples) - 1``, as `ForestScorer`). Leaves point to themselves with an
    infinite threshold, so every row takes `depth` steps without a test for having arrived.
    A row goes right when ``x > threshold`` in float64 of its float32 value: sklearn's
    ``x <= threshold`` goes left, NaN by `missing_go_to_left`. Its path lengths are summed in
    tree order: the same floats in the same order as sklearn, so the same scores to the bit."""

    def __init__(self, scorer: ForestScorer):
        trees = scorer.trees
        sizes = np.array([t.node_count for t in trees], dtype=np.intp)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        left = np.concatenate([t.children_left for t in trees]).astype(np.intp)
        right = np.concatenate([t.children_right for t in trees]).astype(np.intp)
        shift = np.repeat(offsets[:-1], sizes)
        leaf = left < 0
        here = np.arange(offsets[-1], dtype=np.intp)
        left = np.where(leaf, here, left + shift)
        right = np.where(leaf, here, right + shift)
        self.children = np.stack([left, right], axis=1).ravel()
        self.feature = np.where(leaf, 0, np.concatenate([t.feature for t in trees])).astype(np.intp)
        self.threshold = np.where(leaf, np.inf, np.concatenate([t.threshold for t in trees]))
        missing_left = np.concatenate([_missing_go_to_left(t) for t in trees])
        self.missing_right = ~missing_left & ~leaf
        self.addend = np.concatenate(scorer.addends)
        self.roots = offsets[:-1].copy()
        self.depth = max(int(t.max_depth) for t in trees)
        self.denominator = scorer.denominator
        self.n_features_in_ = scorer.n_features_in_

    def raw_score(self, X) -> np.ndarray:
        """``-score_samples(X)`` of the forest: higher = more anomalous."""
        X = as_matrix(X, self.n_features_in_)
        out = np.empty(X.shape[0], dtype=np.float64)
        for a in range(0, X.shape[0], FLAT_BLOCK_ROWS):
            b = min(a + FLAT_BLOCK_ROWS, X.shape[0])
            out[a:b] = leaf_scores(self._path_lengths(np.ascontiguousarray(X[a:b], dtype=np.float32)),
                                   self.denominator)
        return out

    def _path_lengths(self, block: np.ndarray) -> np.ndarray:
        """Summed path lengths of a float32 block's rows (trees x rows walked at once)."""
        n, width = block.shape
        values = block.ravel()
        has_nan = bool(np.isnan(values).any())
        row_start = np.arange(n, dtype=np.intp) * width
        node = np.repeat(self.roots[:, None], n, axis=1)          # (trees, rows)
        for _ in range(self.depth):
            value = values[self.feature[node] + row_start]
            go_right = value > self.threshold[node]
            if has_nan:
                go_right |= np.isnan(value) & self.missing_right[node]
            node = self.children[2 * node + go_right]
        depths = np.zeros(n)
        for tree_leaves in node:                                  # tree order, as sklearn
            depths += self.addend[tree_leaves]
        return depths


def heap_walk_routine():
    """The compiled `heap_walk` of `_heap_walk.c`, or None when the package was installed without it."""
    return compiled.routine("esxi_anomaly.detect._heap_walk", "heap_walk",
                            (POINTER, SIZE, SIZE, POINTER, POINTER, POINTER, POINTER, SIZE, ctypes.c_int32, POINTER))


def float32_at_most(values: np.ndarray) -> np.ndarray:
    """The largest float32 <= each float64 value: for a float32 x, ``x <= float32_at_most(t)`` exactly
    when ``float64(x) <= t`` (sklearn's test of a float32 row against a float64 threshold)."""
    with np.errstate(over="ignore"):                 # beyond float32: inf, stepped down to its max
        rounded = values.astype(np.float32)
    above = rounded.astype(np.float64) > values
    rounded[above] = np.nextafter(rounded[above], np.float32(-np.inf))
    return rounded


class HeapTrees:
    """A fitted isolation forest's trees as complete binary trees in heap order, walked by compiled
    code (`_heap_walk.c`): the children of split i are 2i+1 and 2i+2, so a step is
    ``i = 2i + 1 + (x > threshold)``, without branches. Built from `FlatTrees`, whose leaves point
    to themselves: a leaf above the last level becomes splits whose children are that leaf again,
    down to the last level, where the leaf's `addend` is stored. Thresholds are float32, rounded
    down (`float32_at_most`); `missing_right` says where a split sends NaN, tested only in blocks
    holding one. Path lengths are summed in tree order: the same scores as sklearn, to the bit."""

    def __init__(self, flat: FlatTrees):
        n_trees = len(flat.roots)
        at = flat.roots[:, None]                         # the nodes of one level, left to right
        levels = []
        for _ in range(flat.depth):
            levels.append(at)
            at = flat.children[2 * at[:, :, None] + np.array([0, 1])].reshape(n_trees, -1)
        split_nodes = np.concatenate(levels, axis=1) if levels else np.zeros((n_trees, 0), dtype=np.intp)
        self.threshold = np.ascontiguousarray(float32_at_most(flat.threshold[split_nodes]))
        self.feature = np.ascontiguousarray(flat.feature[split_nodes], dtype=np.int32)
        self.missing_right = np.ascontiguousarray(flat.missing_right[split_nodes], dtype=np.uint8)
        self.leaf = np.ascontiguousarray(flat.addend[at])   # (trees, 2^depth)
        self.depth = int(flat.depth)
        self.denominator = flat.denominator
        self.n_features_in_ = flat.n_features_in_

    def raw_score(self, X, n_threads: int = 1) -> np.ndarray:
        """``-score_samples(X)`` of the forest: higher = more anomalous."""
        return _in_row_blocks(self._score_rows, as_matrix(X, self.n_features_in_), n_threads)

    def _score_rows(self, X: np.ndarray, out: np.ndarray, start: int, stop: int) -> None:
        walk = heap_walk_routine()
        for a in range(start, stop, BLOCK_ROWS):
            b = min(a + BLOCK_ROWS, stop)
            block = np.ascontiguousarray(X[a:b], dtype=np.float32)   # sklearn's cast, C order
            depths = np.zeros(b - a)
            missing = self.missing_right.ctypes.data if np.isnan(block).any() else None
            walk(block.ctypes.data, b - a, block.shape[1], self.threshold.ctypes.data, self.feature.ctypes.data,
                 missing, self.leaf.ctypes.data, self.leaf.shape[0], self.depth, depths.ctypes.data)
            out[a:b] = leaf_scores(depths, self.denominator)


def _missing_go_to_left(tree) -> np.ndarray:
    """Where each node sends a NaN (sklearn >= 1.3 records it per node; before, NaN went right)."""
    nodes = tree.__getstate__()["nodes"]
    if "missing_go_to_left" in (nodes.dtype.names or ()):
        return nodes["missing_go_to_left"].astype(bool)
    return np.zeros(tree.node_count, dtype=bool)


class CalibratedForest(Estimator):
    """`score(X)` is the share of training rows less anomalous than each row, in [0, 1].

    `n_jobs`: threads for scoring (None: the usable cores, at most 4; -1: all; small inputs use
    fewer) and sklearn's `n_jobs` for fitting. Scores do not depend on it."""

    def __init__(self, n_estimators: int = 100, max_samples: int | str = 256, max_features: float = 1.0,
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
        from sklearn.ensemble import IsolationForest

        X = np.asarray(X, dtype="float64")
        max_samples = min(self.max_samples, len(X)) if isinstance(self.max_samples, int) else self.max_samples
        forest = IsolationForest(
            n_estimators=self.n_estimators, max_samples=max_samples, max_features=self.max_features,
            random_state=self.random_state, n_jobs=self.n_jobs,
        ).fit(X)
        self.__dict__.pop("_forest_pickle", None)
        self._forest = forest
        self._scorer = (forest, ForestScorer(forest))
        self.trees_ = FlatTrees(self._scorer[1])
        self.n_features_in_ = X.shape[1]
        train = self.raw_score(X)
        self.calibration_ = np.quantile(train, np.linspace(0.0, 1.0, CALIBRATION_POINTS))
        return train

    @property
    def scorer_(self) -> ForestScorer:
        """The compiled walk over `forest_`'s trees, built on first use and never pickled."""
        check_fitted(self, "trees_")
        cached = self.__dict__.get("_scorer")
        if cached is None or cached[0] is not self.forest_:
            cached = (self.forest_, ForestScorer(self.forest_))
            self._scorer = cached
        return cached[1]

    @property
    def heap_trees_(self) -> HeapTrees | None:
        """The heap walk over `trees_`, built on first use and never pickled; None when the package
        has no compiled walk or the trees are deeper than HEAP_MAX_DEPTH."""
        check_fitted(self, "trees_")
        cached = self.__dict__.get("_heap")
        if cached is None or cached[0] is not self.trees_:
            usable = heap_walk_routine() is not None and self.trees_.depth <= HEAP_MAX_DEPTH
            cached = (self.trees_, HeapTrees(self.trees_) if usable else None)
            self._heap = cached
        return cached[1]

    def raw_score(self, X, n_jobs=None) -> np.ndarray:
        """The forest's anomaly score with the sign flipped: higher = more anomalous.
        Equals ``-forest_.score_samples(X)``; 0 rows give an empty array. `n_jobs`: scoring threads
        for this call (None: the estimator's `n_jobs`); the caller's knob, so the fitted model is
        never changed to suit an engine. The heap walk when there is one; else small calls take the
        flat walk, large ones scikit-learn's (any but the smallest once scikit-learn is imported):
        the same numbers."""
        check_fitted(self, "trees_")
        X = as_matrix(X, self.n_features_in_)
        threads = scoring_threads(self.n_jobs if n_jobs is None else n_jobs)
        if self.heap_trees_ is not None:
            return self.heap_trees_.raw_score(X, threads)
        loaded = "sklearn.tree" in sys.modules
        if X.shape[0] < (COMPILED_WALK_MIN_ROWS_LOADED if loaded else COMPILED_WALK_MIN_ROWS):
            return self.trees_.raw_score(X)
        return self.scorer_.raw_score(X, threads)

    def score(self, X, n_jobs=None) -> np.ndarray:
        return self.percentile(self.raw_score(X, n_jobs))

    def percentile(self, raw: np.ndarray) -> np.ndarray:
        """Raw scores as the share of training rows less anomalous, in [0, 1]."""
        check_fitted(self, "calibration_")
        grid = np.linspace(0.0, 1.0, CALIBRATION_POINTS)
        return np.interp(raw, self.calibration_, grid, left=0.0, right=1.0)

    @property
    def forest_(self) -> IsolationForest:
        """scikit-learn's fitted IsolationForest. A pickle holds it as bytes, unpickled when it is
        first asked for: loading a model and scoring with `trees_` never imports scikit-learn."""
        forest = self.__dict__.get("_forest")
        if forest is None:
            check_fitted(self, "_forest_pickle")
            forest = self._forest = pickle.loads(self._forest_pickle)
        return forest

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_scorer", None)
        state.pop("_heap", None)
        forest = state.pop("_forest", None)
        if forest is not None and state.get("_forest_pickle") is None:
            state["_forest_pickle"] = pickle.dumps(forest, protocol=pickle.HIGHEST_PROTOCOL)
        return state

    def __setstate__(self, state):
        state = dict(state)
        if "forest_" in state:                  # pickled before `trees_`: the forest itself
            state["_forest"] = state.pop("forest_")
            state.setdefault("trees_", FlatTrees(ForestScorer(state["_forest"])))
        self.__dict__.update(state)
