"""Exact, vectorised scoring for a fitted `sklearn.ensemble.IsolationForest` (numpy only).

`FastForest.from_sklearn(forest)` flattens every tree once into numpy tables;
`FastForest.score_samples(X, n_threads=None)` then equals `forest.score_samples(X)` -- bit for bit
in every case tested (the contract is 1e-9 absolute).

Speed (honest status): on the shared 2-core VM, under load averages of 4-8 from other jobs, one
thread of this path costs about the same CPU per row as sklearn's C tree walk (0.8-1.5x across
runs; see benchmarks/forest_scoring.py). numpy needs ~7 passes per tree level (3 gathers at
~1.3 ns/element plus arithmetic), which is what sklearn's branchy C loop costs per level. Gains
come from threads on an idle machine (row blocks, numpy releases the GIL) and from not copying
``X[:, features]`` per tree when ``max_features < 1`` (not measured); a multiple would need
compiled code.

How it works
------------
Rows are scored in blocks (block_rows x n_estimators elements) and each tree level is a handful
of branch-free numpy passes over a (trees x rows) array:

* a tree is padded to a *complete* binary tree of the forest's depth D (padding nodes send every
  row left; all leaves under a padded node carry the same value); level l's table holds node j
  of tree t at ``t * 2**l + j``, so a child index is ``2 * index + go_right`` -- no child table;
* levels 0 and 1 (1 and 2 nodes per tree) compare whole rows of the block, no table gathers;
* each leaf holds its precomputed sklearn addend ``depth + c(n_node_samples) - 1`` (taken from
  the forest's own ``_decision_path_lengths`` / ``_average_path_length_per_tree``), the per-row
  sum runs over trees in sklearn's order, and the final transform is sklearn's own expression.

Forests whose padding would exceed 4x their real nodes (and 2**20 slots) -- deep, lopsided trees --
use a *sparse* layout instead: nodes in breadth-first order with siblings adjacent, a child table, leaves looping onto
themselves. Same results, one more gather per level.

Exactness
---------
sklearn casts X to float32 and tests ``float32(x) <= float64(threshold)``. For a float32 x that
is the same as ``x <= t32`` where ``t32`` is the largest float32 not above the threshold, so the
tables hold such rounded-down float32 thresholds. NaN in X follows each node's
``missing_go_to_left`` (a slower pass is used only for row blocks that contain NaN); +-inf and
values exactly at thresholds behave as in sklearn. Feature subsets (``max_features < 1``) are
folded into the tables (tree feature -> column of X).

Differences from sklearn: 0 rows returns an empty array (sklearn raises); no feature-name
checks; sparse input is densified.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = ["FastForest"]

# Elements (trees x rows) per block (~40 bytes of working arrays each). On the loaded 2-core EPYC VM
# (1 MiB L2, 32 MiB L3) 2**16..2**18 were within noise at 200k rows; 2**19 was clearly slower.
_BLOCK_ELEMENTS = 1 << 17
# Complete (padded) layout while trees * 2**depth stays below this many nodes, or is at most
# 4x the real node count; the sparse layout otherwise.
_COMPLETE_MAX_NODES = 1 << 20


def _average_path_length(n_samples_leaf) -> np.ndarray:
    """sklearn.ensemble._iforest._average_path_length (same expression, same floats)."""
    n = np.asarray(n_samples_leaf, dtype=np.float64)
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


def _float32_floor(threshold: np.ndarray) -> np.ndarray:
    """Largest float32 <= each float64 threshold (NaN stays NaN, +-inf stay)."""
    with np.errstate(over="ignore", invalid="ignore"):
        t32 = threshold.astype(np.float32)
        above = t32.astype(np.float64) > threshold
    t32[above] = np.nextafter(t32[above], np.float32(-np.inf))
    return t32


class FastForest:
    """Exact, vectorised `score_samples` of a fitted IsolationForest (see module docstring)."""

    def __init__(self, *, n_features_in: int, layout: str, depth: int, block_rows: int,
                 feature_offset: np.ndarray, threshold: np.ndarray, missing_right: np.ndarray,
                 leaf_value: np.ndarray, level_start: np.ndarray | None, children: np.ndarray | None,
                 top_feature: np.ndarray, top_threshold: np.ndarray, top_missing_right: np.ndarray,
                 root_left: np.ndarray | None, denominator: np.ndarray, nan_thresholds: bool):
        self.n_features_in_ = int(n_features_in)
        self.layout = layout                    # "complete" or "sparse"
        self.depth = int(depth)                 # levels walked: the deepest tree's depth
        self.block_rows = int(block_rows)       # rows per block; feature offsets are scaled by it
        self.feature_offset = feature_offset    # int32 per node: column * block_rows
        self.threshold = threshold              # float32 per node: largest float32 <= sklearn's
        self.missing_right = missing_right      # bool per node: NaN goes right
        self.leaf_value = leaf_value            # float64: sklearn's per-tree path length of a leaf
        self.level_start = level_start          # complete: offset of each level's table
        self.children = children                # sparse: left child per node (right = left + 1)
        self.top_feature = top_feature          # (T, k) columns tested at the top k levels' nodes
        self.top_threshold = top_threshold      # (T, k) float32
        self.top_missing_right = top_missing_right
        self.root_left = root_left              # sparse: (T, 1) left child of each root
        self.denominator = denominator          # n_estimators * c(max_samples), shape (1,)
        self.nan_thresholds = bool(nan_thresholds)

    @property
    def n_estimators(self) -> int:
        return self.top_feature.shape[0]

    # --- construction -----------------------------------------------------------------------

    @classmethod
    def from_sklearn(cls, forest, layout: str | None = None) -> "FastForest":
        """Flatten a fitted IsolationForest once. `layout` ("complete"/"sparse"): chosen if None."""
        trees = [est.tree_ for est in getattr(forest, "estimators_", ())]
        n_trees = len(trees)
        if n_trees == 0:
            raise ValueError("the forest has no estimators (is it fitted?)")
        n_features = int(forest.n_features_in_)
        subsets = getattr(forest, "estimators_features_", None)
        depths_attr = getattr(forest, "_decision_path_lengths", None)
        apl_attr = getattr(forest, "_average_path_length_per_tree", None)
        depth = max(int(t.max_depth) for t in trees)
        if layout is None:
            total_nodes = sum(int(t.node_count) for t in trees)
            padded = n_trees << (depth + 1)
            layout = "complete" if padded <= max(_COMPLETE_MAX_NODES, 4 * total_nodes) else "sparse"
        if layout not in ("complete", "sparse"):
            raise ValueError(f"layout must be 'complete' or 'sparse', not {layout!r}")
        block_rows = int(min(4096, max(16, 1 << int(np.log2(max(1, _BLOCK_ELEMENTS // n_trees))))))

        # Per tree: sklearn's leaf contribution, features as columns of X, float32-floor thresholds.
        per_tree = []
        nan_thresholds = False
        for i, tree in enumerate(trees):
            left = np.asarray(tree.children_left, dtype=np.int64)
            right = np.asarray(tree.children_right, dtype=np.int64)
            if depths_attr is not None and apl_attr is not None:
                value = depths_attr[i] + apl_attr[i] - 1.0          # exactly sklearn's addend
            else:
                value = tree.compute_node_depths() + _average_path_length(tree.n_node_samples) - 1.0
            is_leaf = left < 0
            feature = np.where(is_leaf, 0, np.asarray(tree.feature, dtype=np.int64))
            if subsets is not None:
                feature = np.asarray(subsets[i], dtype=np.int64)[feature]
            feature[is_leaf] = 0
            threshold = _float32_floor(np.asarray(tree.threshold, dtype=np.float64))
            threshold[is_leaf] = np.inf                              # leaves/padding: always left
            nan_thresholds |= bool(np.isnan(threshold).any())
            missing_right = ~np.asarray(tree.missing_go_to_left, dtype=bool) & ~is_leaf
            per_tree.append((left, right, np.asarray(value, np.float64), feature, threshold, missing_right))
        common = dict(n_features_in=n_features, depth=depth, block_rows=block_rows,
                      denominator=_denominator(forest, n_trees), nan_thresholds=nan_thresholds)

        if layout == "complete":
            width = 1 << depth
            feat = np.zeros((n_trees, width), np.int64)             # heap order, position 1 = root
            thr = np.full((n_trees, width), np.inf, np.float32)
            mright = np.zeros((n_trees, width), bool)
            leaf_value = np.zeros((n_trees, width), np.float64)
            for i, parts in enumerate(per_tree):
                _fill_complete(i, depth, *parts, feat, thr, mright, leaf_value)
            # Level l's table holds node j of tree t at t * 2**l + j: the child of index g is 2g + right.
            levels = [(feat[:, 1 << l: 2 << l].ravel(), thr[:, 1 << l: 2 << l].ravel(),
                       mright[:, 1 << l: 2 << l].ravel()) for l in range(depth)]
            level_start = np.cumsum([0] + [n_trees << l for l in range(depth)])
            top = min(depth, 2) or 1
            cols = slice(1, 1 + top) if top == 1 else [1, 2, 3]
            return cls(layout="complete", **common,
                       feature_offset=(np.concatenate([f for f, _, _ in levels] or [np.zeros(0, np.int64)]) * block_rows).astype(np.int32),
                       threshold=np.concatenate([t for _, t, _ in levels] or [np.zeros(0, np.float32)]),
                       missing_right=np.concatenate([m for _, _, m in levels] or [np.zeros(0, bool)]),
                       leaf_value=leaf_value.ravel(), level_start=level_start, children=None,
                       top_feature=np.ascontiguousarray(feat[:, cols]).astype(np.intp),
                       top_threshold=np.ascontiguousarray(thr[:, cols]),
                       top_missing_right=np.ascontiguousarray(mright[:, cols]), root_left=None)

        # Sparse layout: breadth-first per tree, siblings adjacent, leaves loop onto themselves.
        feats, thrs, mrights, lefts, values, root_left = [], [], [], [], [], []
        offset = 0
        for left, right, value, feature, threshold, missing_right in per_tree:
            order = _bfs_sibling_order(left, right)                 # old ids in new order
            new_id = np.empty(len(order), np.int64)
            new_id[order] = np.arange(len(order)) + offset
            old_left = left[order]
            lefts.append(np.where(old_left >= 0, new_id[np.maximum(old_left, 0)], new_id[order]))
            feats.append(feature[order])
            thrs.append(threshold[order])
            mrights.append(missing_right[order])
            values.append(value[order])
            root_left.append(lefts[-1][0])
            offset += len(order)
        return cls(layout="sparse", **common,
                   feature_offset=(np.concatenate(feats) * block_rows).astype(np.int32), threshold=np.concatenate(thrs),
                   missing_right=np.concatenate(mrights), leaf_value=np.concatenate(values),
                   level_start=None, children=np.concatenate(lefts).astype(np.intp),
                   top_feature=np.array([f[0] for f in feats], dtype=np.intp)[:, None],
                   top_threshold=np.array([t[0] for t in thrs], dtype=np.float32)[:, None],
                   top_missing_right=np.array([m[0] for m in mrights], dtype=bool)[:, None],
                   root_left=np.array(root_left, dtype=np.intp)[:, None])

    # --- scoring ----------------------------------------------------------------------------

    def score_samples(self, X, n_threads: int | None = None) -> np.ndarray:
        """Equals `forest.score_samples(X)` (lower = more abnormal); threads split the rows."""
        if hasattr(X, "toarray") and not isinstance(X, np.ndarray):
            X = X.toarray()                                         # scipy sparse
        X = np.asarray(X)
        if X.ndim != 2:
            raise ValueError(f"expected a 2D array, got shape {X.shape}")
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, but the forest was fitted with {self.n_features_in_}")
        n = X.shape[0]
        depths = np.zeros(n, dtype=np.float64)
        if n:
            n_blocks = -(-n // self.block_rows)
            workers = max(1, min(int(n_threads or os.cpu_count() or 1), n_blocks))
            if workers == 1:
                self._path_lengths(X, depths, 0, n)
            else:
                cuts = [(n_blocks * w // workers) * self.block_rows for w in range(workers)] + [n]
                with ThreadPoolExecutor(workers) as pool:
                    for done in [pool.submit(self._path_lengths, X, depths, cuts[w], cuts[w + 1])
                                 for w in range(workers)]:
                        done.result()
        # sklearn's final transform, verbatim (a zero denominator -- max_samples 1 -- gives -0.5).
        denominator = self.denominator
        scores = 2 ** (-np.divide(depths, denominator, out=np.ones_like(depths), where=denominator != 0))
        return -scores

    def _path_lengths(self, X: np.ndarray, depths: np.ndarray, start: int, stop: int) -> None:
        """For rows [start, stop): sum over trees (in tree order) of the leaf's path length."""
        B, T, complete = self.block_rows, self.n_estimators, self.layout == "complete"
        shape = (T, B)
        xt = np.zeros((self.n_features_in_, B), dtype=np.float32)  # one block, feature-major
        xt_flat = xt.reshape(-1)
        key, idx = np.empty(shape, np.intp), np.empty(shape, np.intp)
        x, thr = np.empty(shape, np.float32), np.empty(shape, np.float32)
        right, right2, right3 = np.empty(shape, bool), np.empty(shape, bool), np.empty(shape, bool)
        values = np.empty(shape, np.float64)
        offset = np.empty(shape, np.int32)
        rows = np.arange(B, dtype=np.intp)
        twice_tree = 2 * np.arange(T, dtype=np.intp)[:, None]
        tf, tt, tm = self.top_feature, self.top_threshold, self.top_missing_right
        for a in range(start, stop, B):
            m = min(B, stop - a)
            np.copyto(xt[:, :m], X[a:a + m].T, casting="unsafe")   # same rounding as astype(float32)
            if m < B:
                xt[:, m:] = 0.0
            exact = self.nan_thresholds or bool(np.isnan(xt[:, :m]).any())
            level = 0
            if self.depth:
                # Level 0: one node per tree -- rows of the block, no table gather.
                np.take(xt, tf[:, 0], axis=0, out=x)
                _go_right(x, tt[:, :1], exact, tm[:, :1], right)
                if complete:
                    np.add(twice_tree, right, out=key)
                else:
                    np.add(self.root_left, right, out=key)
                level = 1
                if complete and self.depth >= 2:
                    # Level 1: both children of every root, then pick by the level-0 decision.
                    np.take(xt, tf[:, 1], axis=0, out=x)
                    _go_right(x, tt[:, 1:2], exact, tm[:, 1:2], right2)
                    np.take(xt, tf[:, 2], axis=0, out=x)
                    _go_right(x, tt[:, 2:3], exact, tm[:, 2:3], right3)
                    np.bitwise_xor(right3, right2, out=right3)
                    np.bitwise_and(right3, right, out=right3)
                    np.bitwise_xor(right2, right3, out=right2)         # right2 if left else right3
                    key += key
                    key += right2
                    level = 2
            elif complete:
                key[...] = twice_tree // 2
            else:
                np.copyto(key, self.root_left)
            for lvl in range(level, self.depth):
                if complete:
                    lo, hi = self.level_start[lvl], self.level_start[lvl + 1]
                else:
                    lo, hi = 0, len(self.threshold)
                np.take(self.feature_offset[lo:hi], key, out=offset, mode="wrap")
                np.add(offset, rows, out=idx)
                np.take(xt_flat, idx, out=x, mode="wrap")
                np.take(self.threshold[lo:hi], key, out=thr, mode="wrap")
                _go_right(x, thr, exact, self.missing_right[lo:hi], right, key)
                if complete:
                    key += key
                else:
                    np.take(self.children, key, out=idx, mode="wrap")
                    key, idx = idx, key
                key += right
            np.take(self.leaf_value, key, out=values, mode="wrap")
            # Axis 0 of a C-ordered (T, B >= 16) array reduces sequentially, ((v0 + v1) + v2)...:
            # sklearn's order, so the sums are bit-identical (a single column would sum pairwise).
            depths[a:a + m] = np.add.reduce(values, axis=0)[:m]


def _go_right(x, threshold, exact, missing_right, out, key=None) -> None:
    """out = the rows go right. Fast: x > t. Exact: sklearn's NaN/threshold rules."""
    if not exact:
        np.greater(x, threshold, out=out)
        return
    # sklearn: NaN x -> missing_go_to_left; otherwise right unless x <= threshold (NaN threshold: right).
    np.less_equal(x, threshold, out=out)
    np.logical_not(out, out=out)
    nan = np.isnan(x)
    if nan.any():
        if key is None:
            out[nan] = np.broadcast_to(missing_right, out.shape)[nan]
        else:
            out[nan] = missing_right[key[nan]]


def _denominator(forest, n_trees: int) -> np.ndarray:
    max_samples = getattr(forest, "_max_samples", None)
    if max_samples is None:
        max_samples = forest.max_samples_
    return n_trees * _average_path_length([max_samples])


def _fill_complete(i, depth, left, right, value, feature, threshold, missing_right,
                   feat, thr, mright, leaf_value) -> None:
    """Write tree i into row i of the padded heap tables (heap index 1 = root)."""
    width = 1 << depth
    nodes = np.array([0], dtype=np.int64)       # sklearn node ids at this level
    heap = np.array([1], dtype=np.int64)        # their heap positions
    for level in range(depth + 1):
        is_leaf = left[nodes] < 0
        if is_leaf.any():
            span = 1 << (depth - level)
            first = (heap[is_leaf] << (depth - level)) - width
            cols = (first[:, None] + np.arange(span)).ravel()
            leaf_value[i, cols] = np.repeat(value[nodes[is_leaf]], span)
        inner = ~is_leaf
        nodes, heap = nodes[inner], heap[inner]
        if not len(nodes):
            break
        feat[i, heap] = feature[nodes]
        thr[i, heap] = threshold[nodes]
        mright[i, heap] = missing_right[nodes]
        nodes = np.stack([left[nodes], right[nodes]], axis=1).ravel()
        heap = np.stack([2 * heap, 2 * heap + 1], axis=1).ravel()


def _bfs_sibling_order(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Node ids in breadth-first order with each node's two children adjacent (left first)."""
    order = [np.array([0], dtype=np.int64)]
    level = order[0]
    while True:
        inner = level[left[level] >= 0]
        if not len(inner):
            break
        level = np.stack([left[inner], right[inner]], axis=1).ravel()
        order.append(level)
    return np.concatenate(order)
