"""Keys and groups for tuples of columns."""
import numpy as np
import pytest

from esxi_anomaly.features.hashing import row_groups


@pytest.mark.parametrize("sizes", [[3, 2], [2**40, 2**40]])   # one mixed-radix key / pairwise factorisation
def test_row_groups_number_tuples_by_first_appearance(sizes):
    a = np.array([2, 0, 2, 1, 0, 2])
    b = np.array([1, 1, 1, 0, 1, 0])
    group, first = row_groups([a, b], sizes)
    assert group.tolist() == [0, 1, 0, 2, 1, 3]
    assert first.tolist() == [0, 1, 3, 5]
