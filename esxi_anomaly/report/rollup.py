"""Per-entity roll-up of ranked anomalies: one row per source entity, worst first.

An analyst triages entities (a VM, an ESXi management interface), not single connections; this
says which entity to open first, how often it alerted, when, and why its worst row ranked high.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from esxi_anomaly.features.hashing import first_in_order, row_groups
from esxi_anomaly.report.layout import check_names

ENTITY_KEYS = ("src_ip", "src_name", "src_kind", "esxi_host")

# the ranked output's columns (`schema.RANKED`) the roll-up reads; `family` only when a frame has it
RANKED_INPUTS = (*ENTITY_KEYS, "rank", "score", "event_id", "ts", "transform", "explanation", "alert")
check_names(RANKED_INPUTS, "report.rollup")

ROLLUP_COLUMNS = ["src_ip", "src_name", "src_kind", "esxi_host", "max_score", "connections", "alerts",
                  "first_seen", "last_seen", "transforms", "families", "top_event_id", "top_ts",
                  "top_explanation"]


def recount_alerts(alerts: np.ndarray, codes: list[np.ndarray], rows: np.ndarray, alert: np.ndarray) -> None:
    """Correct the alert counts per group (`alerts`, in place) of a sink for `rows` (positions in the order
    the rows were added; `codes`: the group of each row, an array per table added) whose alert became
    `alert` after the sink counted them (`scoring.write`: raised by their name's evidence, or held back
    by the alert budget, while the sinks count the rows)."""
    starts = np.cumsum([0] + [len(c) for c in codes])
    table = np.searchsorted(starts, rows, side="right") - 1
    group = np.empty(len(rows), dtype=np.int64)
    for k in np.unique(table):   # per table holding changed rows, not per row
        here = table == k
        group[here] = codes[k][rows[here] - starts[k]]
    np.add.at(alerts, group, np.where(alert, 1, -1))


def encode_values(column, lookup: dict) -> np.ndarray:
    """Codes of `column`'s values (Arrow) in `lookup` (value -> code, extended with new values), the
    codes of a streamed summary's keys across its blocks; null is its own value."""
    encoded = pc.dictionary_encode(column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column,
                                   null_encoding="encode")
    local = np.array([lookup.setdefault(v, len(lookup)) for v in encoded.dictionary.to_pylist()] or [0],
                     dtype="int64")
    return local[encoded.indices.to_numpy(zero_copy_only=False)]


class DistinctPairs:
    """The distinct (group, text value) pairs of one column, gathered block by block (`add`) and joined
    per group at the end (`joined`): numpy over codes, pandas over the pairs, no Python tuple per pair.
    `skip`: values that are not kept (an empty cell, a missing port)."""

    COMPACT_EVERY = 16   # blocks added between two deduplications of the pairs gathered

    def __init__(self, skip: tuple[str, ...] = ("",)):
        self.skip = skip
        self._groups: list[np.ndarray] = []
        self._values: list[np.ndarray] = []

    def add(self, group: np.ndarray, n_groups: int, column) -> None:
        """The pairs of `group` (int codes < n_groups, row-aligned) and `column` (Arrow) in this block."""
        text = pc.fill_null(column.cast(pa.string()), "")
        encoded = pc.dictionary_encode(text.combine_chunks() if isinstance(text, pa.ChunkedArray) else text)
        values = np.array(encoded.dictionary.to_pylist(), dtype=object)
        codes = encoded.indices.to_numpy(zero_copy_only=False)
        first = row_groups([group, codes], [n_groups, len(values)])[1]   # one row per distinct pair
        pair_values = values[codes[first]]
        keep = ~np.isin(pair_values, np.array(self.skip, dtype=object))
        self._groups.append(group[first][keep].astype(np.int64))
        self._values.append(pair_values[keep])
        if len(self._groups) >= self.COMPACT_EVERY:   # blocks repeat their pairs: keep each once
            pairs = self._pairs()
            self._groups, self._values = [pairs["e"].to_numpy()], [pairs["v"].to_numpy(dtype=object)]

    def _pairs(self) -> pd.DataFrame:
        return pd.DataFrame({"e": np.concatenate(self._groups or [np.zeros(0, np.int64)]),
                             "v": np.concatenate(self._values or [np.zeros(0, object)])}).drop_duplicates()

    def joined(self, ids: np.ndarray, sep: str, numeric: bool = False) -> np.ndarray:
        """For each group of `ids`: its distinct values ascending (as integers with `numeric`) joined by
        `sep`; "" for a group without any."""
        pairs = self._pairs()
        joined = pd.Series(dtype="str")
        if len(pairs):
            pairs = pairs.sort_values(["e", "v"], ignore_index=True)
            if numeric:
                pairs = pairs.assign(n=pairs["v"].astype("int64")).sort_values(["e", "n"], kind="stable")
            # each group's values are consecutive now: joined by Arrow, not by a Python call per group
            groups, starts = np.unique(pairs["e"].to_numpy(), return_index=True)
            lists = pa.LargeListArray.from_arrays(pa.array(np.r_[starts, len(pairs)], pa.int64()),
                                                  pa.array(pairs["v"].to_numpy(dtype=object), pa.large_string()))
            joined = pd.Series(pc.binary_join(lists, pa.scalar(sep, pa.large_string())).to_numpy(zero_copy_only=False),
                               index=groups)
        return joined.reindex(ids).fillna("").astype("str").to_numpy()


def _distinct_joined(frame: pd.DataFrame, keys: list[str], column: str) -> pd.Series:
    values = frame[column].fillna("").astype(str)
    present = frame.loc[values != "", keys].assign(**{column: values[values != ""]})
    return present.groupby(keys, sort=False, dropna=False)[column].agg(lambda s: "; ".join(sorted(set(s))))


def entity_rollup(ranked: pd.DataFrame, threshold: float | None = None) -> pd.DataFrame:
    """One row per source entity (src_ip, src_name, src_kind, esxi_host), sorted by max_score descending.

    alerts counts rows with score >= threshold (without one: the rows whose `alert` is set, 0 without
    that column); transforms and families
    are the distinct non-empty values, "; "-joined (families only when `ranked` has a family column);
    top_* describe the entity's highest-scoring row (lowest rank on ties).
    """
    keys = [k for k in ENTITY_KEYS if k in ranked.columns]
    if "src_ip" not in keys:
        raise ValueError("entity_rollup needs a src_ip column")
    columns = [c for c in ROLLUP_COLUMNS if c in keys or c not in ENTITY_KEYS]
    if "family" not in ranked.columns:
        columns.remove("families")
    if ranked.empty:
        return pd.DataFrame(columns=columns)

    frame = ranked.copy()
    frame["_alert"] = (frame["score"] >= threshold) if threshold is not None else \
        (frame["alert"].fillna(False).astype(bool) if "alert" in frame.columns else False)
    order = ["score", "rank"] if "rank" in frame.columns else ["score"]
    frame = frame.sort_values(order, ascending=[False] + [True] * (len(order) - 1), kind="stable",
                              na_position="last")
    grouped = frame.groupby(keys, sort=False, dropna=False)
    rollup = grouped.agg(max_score=("score", "max"), connections=("score", "size"),
                         alerts=("_alert", "sum"), first_seen=("ts", "min"), last_seen=("ts", "max"))
    # groups come in order of first appearance (sort=False), as do the first rows: assign by position
    # (aligning on the key index would lose entities with a missing key value)
    top = frame.drop_duplicates(subset=keys, keep="first")
    rollup["top_event_id"] = top["event_id"].to_numpy() if "event_id" in top.columns else ""
    rollup["top_ts"] = top["ts"].to_numpy()
    rollup["top_explanation"] = top["explanation"].to_numpy() if "explanation" in top.columns else ""
    for column, out in (("transform", "transforms"), ("family", "families")):
        if column in frame.columns:
            rollup[out] = _distinct_joined(frame, keys, column)
            rollup[out] = rollup[out].fillna("").astype("str")
        elif out in columns:
            rollup[out] = ""
    rollup["alerts"] = rollup["alerts"].astype("int64")
    rollup["connections"] = rollup["connections"].astype("int64")
    rollup = rollup.reset_index()
    rollup = rollup.sort_values(["max_score", "connections", "src_ip"], ascending=[False, False, True],
                                kind="stable", na_position="last")
    return rollup[columns].reset_index(drop=True)


class StreamingRollup:
    """`entity_rollup` over scored rows that arrive as Arrow tables, one bucket group at a time.

    `add` keeps per-entity running counts, alert counts, first/last times and distinct transforms
    (families) plus one int32 entity code per row; `finish` takes the global rank order of all rows
    added (indices into their concatenation) and a function returning full rows for given indices,
    to describe each entity's best-ranked row. No per-row Python: key columns are dictionary
    encoded by Arrow, entities combined with integer factorisation.
    Counts come from the `alert` column (False for suppressed rows), not from a threshold.
    """

    _DISTINCT = (("transform", "transforms"), ("family", "families"))

    def __init__(self):
        self._values: dict[str, dict] = {k: {} for k in ENTITY_KEYS}   # key column: value -> code
        self._entities: dict[tuple, int] = {}                          # tuple of key codes -> entity
        self._codes: list[np.ndarray] = []
        self._connections = np.zeros(0, dtype="int64")
        self._alerts = np.zeros(0, dtype="int64")
        self._first = np.zeros(0, dtype="float64")
        self._last = np.zeros(0, dtype="float64")
        self._distinct: dict[str, DistinctPairs] = {}
        self.keys: list[str] | None = None

    def add(self, table: pa.Table) -> None:
        """Count the rows of `table`."""
        if self.keys is None:
            self.keys = [k for k in ENTITY_KEYS if k in table.column_names]
            if "src_ip" not in self.keys:
                raise ValueError("the entity roll-up needs a src_ip column")
            self._distinct = {c: DistinctPairs() for c, _ in self._DISTINCT if c in table.column_names}
        n = table.num_rows
        if not n:
            self._codes.append(np.zeros(0, dtype="int32"))
            return
        parts = [encode_values(table[k], self._values[k]) for k in self.keys]
        combined, first = row_groups(parts, [len(self._values[k]) for k in self.keys])
        tuples = zip(*(p[first].tolist() for p in parts))
        to_global = np.array([self._entities.setdefault(t, len(self._entities)) for t in tuples], dtype="int64")
        entity = to_global[combined].astype("int32")
        self._codes.append(entity)
        size = len(self._entities)
        grow = size - len(self._connections)
        if grow > 0:
            self._connections = np.r_[self._connections, np.zeros(grow, dtype="int64")]
            self._alerts = np.r_[self._alerts, np.zeros(grow, dtype="int64")]
            self._first = np.r_[self._first, np.full(grow, np.nan)]
            self._last = np.r_[self._last, np.full(grow, np.nan)]
        self._connections += np.bincount(entity, minlength=size)
        alert = table["alert"].to_numpy().astype(bool) if "alert" in table.column_names else np.zeros(n, bool)
        self._alerts += np.bincount(entity, weights=alert, minlength=size).astype("int64")
        ts = pd.Series(table["ts"].to_numpy(), dtype="float64").groupby(entity)
        lo, hi = ts.min(), ts.max()
        ids = lo.index.to_numpy()
        self._first[ids] = np.fmin(self._first[ids], lo.to_numpy())
        self._last[ids] = np.fmax(self._last[ids], hi.to_numpy())
        for column, seen in self._distinct.items():
            seen.add(entity, size, table[column])

    def flip(self, rows: np.ndarray, alert: np.ndarray) -> None:
        """Rows added (positions in the order added) whose alert became `alert` after they were counted."""
        recount_alerts(self._alerts, self._codes, rows, alert)

    def finish(self, order: np.ndarray, rows_at) -> pd.DataFrame:
        """The roll-up: `order` ranks all rows added (best first); `rows_at(indices)` returns those
        rows (key columns, event_id, ts, explanation) as a frame, in the order asked."""
        keys = self.keys or ["src_ip"]
        columns = [c for c in ROLLUP_COLUMNS if c in keys or c not in ENTITY_KEYS]
        if "families" not in {out for c, out in self._DISTINCT if c in self._distinct}:
            columns.remove("families")
        entity = np.concatenate(self._codes) if self._codes else np.zeros(0, dtype="int32")
        if not len(entity):
            return pd.DataFrame(columns=columns)
        ids, first_pos = first_in_order(entity, order)
        by_rank = np.argsort(first_pos, kind="stable")     # entities in the order their best row ranks
        ids, first_pos = ids[by_rank], first_pos[by_rank]
        top = rows_at(order[first_pos]).reset_index(drop=True)
        rollup = top[keys].copy()
        rollup["max_score"] = top["score"].to_numpy()
        rollup["connections"] = self._connections[ids]
        rollup["alerts"] = self._alerts[ids]
        rollup["first_seen"] = self._first[ids]
        rollup["last_seen"] = self._last[ids]
        for column, out in self._DISTINCT:
            if column in self._distinct:
                rollup[out] = self._distinct[column].joined(ids, "; ")
            elif out in columns:
                rollup[out] = ""
        rollup["top_event_id"] = top["event_id"].to_numpy() if "event_id" in top.columns else ""
        rollup["top_ts"] = top["ts"].to_numpy()
        rollup["top_explanation"] = top["explanation"].to_numpy() if "explanation" in top.columns else ""
        rollup = rollup.sort_values(["max_score", "connections", "src_ip"], ascending=[False, False, True],
                                    kind="stable", na_position="last")
        return rollup[columns].reset_index(drop=True)
