"""Isolation forest calibrated to a percentile of its training scores (higher = more anomalous).

Scoring does not call `IsolationForest.score_samples`; `ForestScorer` computes the same numbers
(bit for bit in the tests; the contract is 1e-9) faster:

* sklearn walks each tree over *all* rows before the next tree, so it streams the whole float32
  copy of X through memory once per tree, then does four numpy passes per tree over all rows
  (two gathers, two adds, under a lock). `ForestScorer` converts a block of rows to float32 once,
  keeps it in cache while every tree's own compiled `tree_.apply` walks it (the C loop releases
  the GIL), and adds one precomputed table lookup per tree: ``depth + c(n_node_samples) - 1`` of
  the leaf, the very expression sklearn evaluates per row, summed in sklearn's tree order.
* the rows of a block are walked sorted by their leaves in the first 3 trees: similar rows one
  after another, so the CPU predicts the walk's branches (~2x per core on connection features).
* row blocks are spread over a thread pool (`n_jobs` threads; results do not depend on it).

The per-core cost is sklearn's compiled tree walk (branchy: ~40 ns per row and tree on random
rows, ~17 ns when consecutive rows branch alike, on the 2-core EPYC VM); see
benchmarks/forest_scoring.py and benchmarks/README.md for measured rows/s.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.ensemble import IsolationForest
from sklearn.utils.validation import check_is_fitted

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
        X = self._check(X)
        out = np.empty(X.shape[0], dtype=np.float64)
        n = X.shape[0]
        workers = max(1, min(int(n_threads), n // MIN_ROWS_PER_THREAD))
        if workers == 1:
            self._score_rows(X, out, 0, n)
        else:
            n_tasks = max(workers, -(-n // TASK_ROWS))
            bounds = [n * k // n_tasks for k in range(n_tasks + 1)]
            with ThreadPoolExecutor(workers, thread_name_prefix="forest-score") as pool:
                for done in [pool.submit(self._score_rows, X, out, a, b) for a, b in zip(bounds, bounds[1:])]:
                    done.result()
        return out

    def _check(self, X) -> np.ndarray:
        if hasattr(X, "toarray") and not isinstance(X, np.ndarray):
            X = X.toarray()                                           # scipy sparse
        X = np.asarray(X)
        if X.dtype not in (np.float32, np.float64):
            X = X.astype(np.float64)   # as before: ints/bools/objects go via float64, then float32
        if X.ndim != 2:
            raise ValueError(f"Expected a 2D array, got an array of shape {X.shape}")
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, but the forest was fitted with "
                             f"{self.n_features_in_} features")
        return X

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
            # sklearn's final transform, verbatim (max_samples=1: zero denominator -> 2**-1).
            scores = 2 ** (-np.divide(depths, denominator, out=np.ones_like(depths), where=denominator != 0))
            if order is None:
                out[a:b] = scores
            else:
                out[a + order] = scores


class CalibratedForest(BaseEstimator):
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

    @property
    def scorer_(self) -> ForestScorer:
        """The scoring tables of `forest_`, built on first use and never pickled (bundles saved
        before they existed load and score as before)."""
        check_is_fitted(self, "forest_")
        cached = self.__dict__.get("_scorer")
        if cached is None or cached[0] is not self.forest_:
            cached = (self.forest_, ForestScorer(self.forest_))
            self._scorer = cached
        return cached[1]

    def raw_score(self, X, n_jobs=None) -> np.ndarray:
        """The forest's anomaly score with the sign flipped: higher = more anomalous.
        Equals ``-forest_.score_samples(X)``; 0 rows give an empty array. `n_jobs`: scoring threads
        for this call (None: the estimator's `n_jobs`); the caller's knob, so the fitted model is
        never changed to suit an engine."""
        return self.scorer_.raw_score(X, scoring_threads(self.n_jobs if n_jobs is None else n_jobs))

    def score(self, X, n_jobs=None) -> np.ndarray:
        return self.percentile(self.raw_score(X, n_jobs))

    def percentile(self, raw: np.ndarray) -> np.ndarray:
        """Raw scores as the share of training rows less anomalous, in [0, 1]."""
        check_is_fitted(self, "calibration_")
        grid = np.linspace(0.0, 1.0, CALIBRATION_POINTS)
        return np.interp(raw, self.calibration_, grid, left=0.0, right=1.0)

    def __getstate__(self):
        state = dict(super().__getstate__())   # a copy: the default state is the live __dict__
        state.pop("_scorer", None)
        return state
