"""Stable 64-bit keys for tuples of columns, cheap enough for hot paths (and `row_groups`: group
numbers for tuples of integer codes).

Each column is factorised and only its distinct values are hashed (`pandas.util.hash_array`, stable
across processes and runs), then columns are mixed with 64-bit arithmetic. Keys are stable across
batches, so lookup tables and carried state keyed on them stay valid.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

_MIX = np.uint64(0x9E3779B97F4A7C15)


def hash_column(values) -> np.ndarray:
    if isinstance(values, pd.Series) and pd.api.types.is_string_dtype(values.dtype) \
            and not pd.api.types.is_object_dtype(values.dtype):
        codes, uniques = pd.factorize(values, use_na_sentinel=False)  # Arrow strings: no object per row
        return pd.util.hash_array(np.asarray(uniques, dtype=object))[codes]
    values = np.asarray(values)
    if values.dtype == np.uint64:  # already a key: lets callers hash a column once and reuse it
        return values
    if values.dtype.kind in "iub":
        return pd.util.hash_array(values.astype("int64"))
    codes, uniques = pd.factorize(values, use_na_sentinel=False)
    return pd.util.hash_array(np.asarray(uniques, dtype=object))[codes]


def combine(*columns) -> np.ndarray:
    """One uint64 key per row for the tuple of `columns`."""
    with np.errstate(over="ignore"):
        key = hash_column(columns[0]).copy()
        for col in columns[1:]:
            key = (key * _MIX) ^ hash_column(col)
            key ^= key >> np.uint64(29)
    return key


def row_groups(codes: list[np.ndarray], sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(group per row, first row of each group) of the distinct tuples of the code columns (codes[k]
    in range(sizes[k])); groups are numbered in the order they first appear."""
    n = len(codes[0])
    if np.prod([float(max(s, 1)) for s in sizes]) < 2.0 ** 62:   # one mixed-radix key, one factorisation
        key = np.zeros(n, dtype="int64")
        for column, size in zip(codes, sizes):
            key = key * max(size, 1) + column
        group = pd.factorize(key)[0]
    else:
        group = np.zeros(n, dtype="int64")
        for column, size in zip(codes, sizes):
            group = pd.factorize(group * max(size, 1) + column)[0]
    # groups are numbered by first appearance: the running maximum first reaches g where g starts
    first = np.searchsorted(np.maximum.accumulate(group), np.arange(group.max() + 1 if n else 0))
    return group, first


SORT_LOOKUPS_ABOVE = 1 << 17   # sorted keys beyond the caches: looking up in ascending order pays


def in_sorted(sorted_keys: np.ndarray | None, keys: np.ndarray) -> np.ndarray:
    """Per key, whether it is in `sorted_keys` (ascending; None or empty: nowhere). Against many sorted
    keys, the keys are looked up in ascending order, each binary search near the last one in memory
    (500k keys in 3M: 170 -> 53 ms, the sort included; in 10k, the sort would cost more than it saves)."""
    if sorted_keys is None or not len(sorted_keys):
        return np.zeros(len(keys), dtype=bool)
    keys = np.asarray(keys)
    order = np.argsort(keys) if len(sorted_keys) > SORT_LOOKUPS_ABOVE else None
    looked_up = keys if order is None else keys[order]
    hit = sorted_keys[np.minimum(np.searchsorted(sorted_keys, looked_up), len(sorted_keys) - 1)] == looked_up
    if order is None:
        return hit
    found = np.empty(len(keys), dtype=bool)
    found[order] = hit
    return found


def sorted_union(sorted_keys: np.ndarray | None, new: np.ndarray) -> np.ndarray:
    """`np.union1d(sorted_keys, new)` for `new` keys that are distinct and not in `sorted_keys`
    (ascending, distinct): the new keys sorted and inserted, not all keys sorted again."""
    new = np.sort(new)
    return new if sorted_keys is None else np.insert(sorted_keys, np.searchsorted(sorted_keys, new), new)


ORDER_SLICE_ROWS = 1 << 20   # rows of an order taken at a time below: a few MB of temporaries, not every row's


def first_in_order(codes: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`np.unique(codes[order], return_index=True)`: the codes (>= 0) present, ascending, and where each
    first comes in `order` (positions into `codes`), slice by slice, without `codes[order]` or a sort
    (at 10M rows, ~200 MB of temporaries less and a fifth of the time)."""
    first = np.full(int(codes.max()) + 1 if len(codes) else 0, -1, dtype=np.int64)
    for lo in range(0, len(order), ORDER_SLICE_ROWS):
        code = codes[order[lo:lo + ORDER_SLICE_ROWS]]
        new = np.flatnonzero(first[code] < 0)[::-1]   # rows of codes not seen before, last first:
        first[code[new]] = lo + new                   # the earliest of each code is written last
    ids = np.flatnonzero(first >= 0)
    return ids, first[ids]


def grouped_in_order(codes: np.ndarray, order: np.ndarray) -> np.ndarray:
    """`order[np.argsort(codes[order], kind="stable")]`: `order`'s positions grouped by their code
    (>= 0), ascending, each group in `order`'s order; a counting sort, slice by slice, whose only
    array of every row is the result (of `order`'s dtype)."""
    size = int(codes.max()) + 1 if len(codes) else 0
    slices = [order[lo:lo + ORDER_SLICE_ROWS] for lo in range(0, len(order), ORDER_SLICE_ROWS)]
    counts = sum((np.bincount(codes[part], minlength=size) for part in slices), np.zeros(size, dtype=np.int64))
    fill = np.r_[0, np.cumsum(counts)[:-1]].astype(np.int64)   # where each code's next position goes
    out = np.empty(len(order), dtype=order.dtype)
    for part in slices:
        code = codes[part]
        # numpy's stable sort of 16-bit keys is a radix sort (of wider ones a merge sort, ~3x slower)
        by_code = np.argsort(code.astype(np.uint16) if size <= 1 << 16 else code, kind="stable")
        count = np.bincount(code, minlength=size)
        sorted_code = code[by_code]
        # the i-th row of the sorted slice goes to its code's next free place: fill + (i - code's start)
        shift = fill - np.r_[0, np.cumsum(count)[:-1]]
        out[np.arange(len(part)) + shift[sorted_code]] = part[by_code]
        fill += count
    return out
