"""Keys and groups for tuples of columns."""
import numpy as np
import pytest

from esxi_anomaly.features import hashing
from esxi_anomaly.features.hashing import first_in_order, grouped_in_order, in_sorted, row_groups, sorted_union


@pytest.mark.parametrize("sizes", [[3, 2], [2**40, 2**40]])   # one mixed-radix key / pairwise factorisation
def test_row_groups_number_tuples_by_first_appearance(sizes):
    a = np.array([2, 0, 2, 1, 0, 2])
    b = np.array([1, 1, 1, 0, 1, 0])
    group, first = row_groups([a, b], sizes)
    assert group.tolist() == [0, 1, 0, 2, 1, 3]
    assert first.tolist() == [0, 1, 3, 5]


@pytest.mark.parametrize("slice_rows", [1, 7, 1000, 1 << 20])
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("top", [40, 65_537])   # 16-bit codes are sorted otherwise
def test_first_and_grouped_in_order_equal_numpys_whole_array_forms(monkeypatch, slice_rows, dtype, top):
    monkeypatch.setattr(hashing, "ORDER_SLICE_ROWS", slice_rows)
    rng = np.random.default_rng(slice_rows)
    codes = rng.choice(np.array([0, 2, 3, 9, top], dtype=np.int32), size=500, p=[0.5, 0.3, 0.1, 0.09, 0.01])
    order = rng.permutation(500).astype(dtype)
    ids, first = first_in_order(codes, order)
    want_ids, want_first = np.unique(codes[order], return_index=True)
    assert np.array_equal(ids, want_ids) and np.array_equal(first, want_first)
    grouped = grouped_in_order(codes, order)
    assert grouped.dtype == dtype
    assert np.array_equal(grouped, order[np.argsort(codes[order], kind="stable")])
    # a part of the rows, as an order of alerts only is
    assert np.array_equal(grouped_in_order(codes, order[:123]), order[:123][np.argsort(codes[order[:123]], kind="stable")])
    assert np.array_equal(first_in_order(codes, order[:123])[1], np.unique(codes[order[:123]], return_index=True)[1])


def test_first_and_grouped_in_order_of_nothing():
    empty = np.zeros(0, dtype=np.int32)
    assert [len(a) for a in first_in_order(empty, empty)] == [0, 0]
    assert len(grouped_in_order(empty, empty)) == 0


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
@pytest.mark.parametrize("sort_above", [0, 1 << 17])   # keys looked up in ascending order, or as they come
def test_in_sorted_and_sorted_union_equal_numpys_set_operations(monkeypatch, dtype, sort_above):
    monkeypatch.setattr(hashing, "SORT_LOOKUPS_ABOVE", sort_above)
    rng = np.random.default_rng(11)
    known = np.unique(rng.integers(0, 2**62, 5000).astype(dtype))
    keys = np.concatenate([rng.choice(known, 300), rng.integers(0, 2**62, 300).astype(dtype), known[[0, -1]],
                           np.array([0, 2**62], dtype=dtype)])
    rng.shuffle(keys)
    assert np.array_equal(in_sorted(known, keys), np.isin(keys, known))
    assert not in_sorted(None, keys).any() and not in_sorted(known[:0], keys).any()
    assert len(in_sorted(known, keys[:0])) == 0
    new = np.setdiff1d(np.unique(keys), known)[::-1]          # distinct, unseen, in no order
    union = sorted_union(known, new)
    assert union.dtype == known.dtype and np.array_equal(union, np.union1d(known, new))
    assert np.array_equal(sorted_union(None, new), np.unique(new))
