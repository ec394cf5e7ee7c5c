"""State carried across time-ordered batches, so that a run split in chunks equals one run.

Running counts ("distinct ports this transform explained for this client and name so far",
"distinct answers this name has had", "share of the client's responses that were NXDOMAIN") are
causal. Each is kept here as compact numpy/pandas structures keyed on 64-bit hashes:

* `seen[name]`: sorted uint64 keys of the (group, value) pairs already counted;
* `counts[name]`: per group, how many distinct values so far (or any additive total).

A batch owns the DNS rows in its own time span; rows it sees from before (the join's look-back
margin) were owned, and counted, by an earlier batch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from esxi_anomaly.features.hashing import combine, in_sorted, sorted_union


@dataclass
class StreamState:
    seen: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, pd.Series] = field(default_factory=dict)
    dns_owned_until: float = -np.inf   # DNS rows before this time were counted by earlier batches
    recent: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # (keys, ts) in a trailing window

    def prior_counts(self, name: str, groups: np.ndarray) -> np.ndarray:
        table = self.counts.get(name)
        if table is None or not len(table):
            return np.zeros(len(groups))
        return table.reindex(groups).fillna(0.0).to_numpy()

    def add_counts(self, name: str, groups: np.ndarray, amounts: np.ndarray) -> None:
        delta = pd.Series(amounts, dtype="float64").groupby(groups).sum()
        table = self.counts.get(name)
        self.counts[name] = delta if table is None else table.add(delta, fill_value=0.0)

    # a resumed run reads its state back from plain files: numpy arrays without pickles, Arrow
    # tables and JSON, so a file planted in the work folder is data, never code
    def to_files(self, folder: Path) -> None:
        """Write the state into `folder` (created); `from_files` reads it back equal."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"dns_owned_until": self.dns_owned_until, "seen": list(self.seen), "counts": [],
                "recent": list(self.recent)}
        for i, keys in enumerate(self.seen.values()):
            np.save(folder / f"seen-{i}.npy", np.asarray(keys), allow_pickle=False)
        for i, (name, table) in enumerate(self.counts.items()):
            meta["counts"].append([name, table.name])
            write_frame(table.to_frame(name="value"), folder / f"counts-{i}.arrow")
        for i, (keys, ts) in enumerate(self.recent.values()):
            np.save(folder / f"recent-{i}-keys.npy", np.asarray(keys), allow_pickle=False)
            np.save(folder / f"recent-{i}-ts.npy", np.asarray(ts), allow_pickle=False)
        (folder / "state.json").write_text(json.dumps(meta), encoding="utf-8")

    @classmethod
    def from_files(cls, folder: Path) -> "StreamState":
        folder = Path(folder)
        meta = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        state = cls(dns_owned_until=float(meta["dns_owned_until"]))
        for i, name in enumerate(meta["seen"]):
            state.seen[name] = np.load(folder / f"seen-{i}.npy", allow_pickle=False)
        for i, (name, series_name) in enumerate(meta["counts"]):
            state.counts[name] = read_frame(folder / f"counts-{i}.arrow")["value"].rename(series_name)
        for i, name in enumerate(meta["recent"]):
            state.recent[name] = (np.load(folder / f"recent-{i}-keys.npy", allow_pickle=False),
                                  np.load(folder / f"recent-{i}-ts.npy", allow_pickle=False))
        return state


def write_frame(frame: pd.DataFrame, path: Path) -> None:
    """A DataFrame (index, dtypes) as an Arrow IPC file."""
    table = pa.Table.from_pandas(frame, preserve_index=True)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def read_frame(path: Path) -> pd.DataFrame:
    """What `write_frame` wrote (Arrow IPC: read as data, never unpickled)."""
    with pa.OSFile(str(path), "rb") as source:   # read into memory: nothing refers to the file after
        table = pa.ipc.open_file(source).read_all()
    return table.to_pandas()


def distinct_running_count(group: np.ndarray, value: np.ndarray, ts: np.ndarray,
                           state: StreamState | None, name: str) -> np.ndarray:
    """For each item, the number of distinct values of its group up to and including it (in time
    order, ties in given order), continuing the counts in `state` and updating it."""
    n = len(group)
    if n == 0:
        return np.zeros(0, dtype="int64")
    ts = np.asarray(ts)
    in_order = (ts[1:] >= ts[:-1]).all()  # callers mostly pass time-ordered items: skip the sort
    order = np.arange(n) if in_order else np.lexsort((np.arange(n), ts))
    g, pair = group[order], combine(group, value)[order]
    new = ~pd.Series(pair).duplicated().to_numpy()
    if state is not None:
        new &= ~in_sorted(state.seen.get(name), pair)
    running = pd.Series(new.astype("int64")).groupby(g).cumsum().to_numpy()
    if state is not None:
        running = running + state.prior_counts(name, g).astype("int64")
        state.seen[name] = sorted_union(state.seen.get(name), pair[new])   # first of the batch, unseen
        state.add_counts(name, g[new], np.ones(int(new.sum())))
    out = np.empty(n, dtype="int64")
    out[order] = running
    return out


def trailing_count(key: np.ndarray, ts: np.ndarray, window_s: float, state: StreamState | None, name: str) -> np.ndarray:
    """For each item, how many items with its key fall in (ts - window_s, ts], itself and earlier
    equal times included (in given order), continuing from the items `state` kept of the batches
    before, and keeping this batch's last `window_s` seconds for the next."""
    key, ts = np.asarray(key, dtype=np.uint64), np.asarray(ts, dtype="float64")
    n = len(key)
    prev_key, prev_ts = state.recent.get(name, (key[:0], ts[:0])) if state is not None else (key[:0], ts[:0])
    all_key, all_ts = np.concatenate([prev_key, key]), np.concatenate([prev_ts, ts])
    out = np.zeros(n, dtype="int64")
    if len(all_key):
        # items grouped by key, each group in time order (ties: earlier batches, then given order)
        codes, keys = pd.factorize(all_key)
        if len(keys) < 65_535 and (all_ts[1:] >= all_ts[:-1]).all():
            order = np.argsort(codes.astype(np.uint16), kind="stable")  # radix sort
        else:
            order = np.lexsort((all_ts, codes))
        k, t = codes[order], all_ts[order]
        group = np.cumsum(np.r_[True, k[1:] != k[:-1]]) - 1
        window_ms = int(np.ceil(window_s * 1000))
        ms = np.floor(t * 1000).astype(np.int64)  # absolute milliseconds: the same in every batch
        ms -= ms.min()
        stamp = group * (int(ms.max()) + window_ms + 1) + ms  # sorted: (group, time) as one integer
        first = np.searchsorted(stamp, stamp - window_ms, side="right")
        counts = np.arange(len(stamp)) - first + 1
        mine = order >= len(prev_key)
        out[order[mine] - len(prev_key)] = counts[mine]
    if state is not None and len(all_ts):
        keep = all_ts > all_ts.max() - window_s
        state.recent[name] = (all_key[keep], all_ts[keep])
    return out
