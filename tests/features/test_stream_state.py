"""Causal counts carried across batches: exact values, and batches split in time = one batch."""
from __future__ import annotations

import numpy as np

from esxi_anomaly.features.stream_state import StreamState, trailing_count

KEYS = np.array([1, 1, 2, 1, 1, 2, 1], dtype=np.uint64)
TS = np.array([0.0, 100.0, 100.0, 350.0, 400.0, 401.0, 400.0])


def test_trailing_count_exact():
    # key 1 at 0, 100, 350, 400, 400: windows (t-300, t]; equal times count the earlier ones only
    assert trailing_count(KEYS, TS, 300.0, None, "x").tolist() == [1, 2, 1, 2, 2, 1, 3]


def test_trailing_count_window_edge_is_open():
    keys = np.array([7, 7], dtype=np.uint64)
    assert trailing_count(keys, np.array([1000.0, 1300.0]), 300.0, None, "x").tolist() == [1, 1]
    assert trailing_count(keys, np.array([1000.0, 1299.999]), 300.0, None, "x").tolist() == [1, 2]


def test_trailing_count_batches_equal_one_run():
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 5, 2000).astype(np.uint64)
    ts = np.sort(rng.uniform(1.7e9, 1.7e9 + 7200, 2000).round(3))
    whole = trailing_count(keys, ts, 300.0, None, "rate")
    state, parts = StreamState(), []
    for lo, hi in ((0, 500), (500, 501), (501, 1400), (1400, 2000)):
        parts.append(trailing_count(keys[lo:hi], ts[lo:hi], 300.0, state, "rate"))
    assert np.array_equal(np.concatenate(parts), whole)
    kept_keys, kept_ts = state.recent["rate"]
    assert (kept_ts > ts[-1] - 300.0).all() and len(kept_ts) == (ts > ts[-1] - 300.0).sum()
