"""Incidents: scored rows grouped the way an analyst triages them, one per campaign-like unit.

An incident is one (source entity, C2 name, derivation): the source IP, the DNS name joined to the
connection (`query`; the destination IP when there is none) and the `transform` that derived the
port or address. One campaign of a thousand connections is then one line to triage, not a
thousand. An incident is an alert when any of its rows is; incidents rank as rows do
(`schema.RANK_ORDER` on alert, score: the incident's highest, and the event id of its best row).

`StreamingIncidents` sees every scored row (Arrow tables, one bucket at a time, as the entity
roll-up does) keeping one int32 incident code per row and per-incident running values; `finish`
yields the incidents in rank order, block by block, with all their event ids. No per-row Python.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from esxi_anomaly import schema
from esxi_anomaly.detect import explain
from esxi_anomaly.features.hashing import first_in_order, grouped_in_order, row_groups
from esxi_anomaly.report.layout import check_names
from esxi_anomaly.report.rollup import DistinctPairs, encode_values, recount_alerts

KEYS = ("src_ip", "query", "dst_ip", "transform")   # the incident: src_ip, query (else dst_ip), transform
# the ranked output's columns (`schema.RANKED`) the incidents read
RANKED_INPUTS = (*KEYS, "src_name", "src_kind", "esxi_host", "score", "alert", "event_id", "ts", "dst_port",
                 "answer", "rules", "explanation")
check_names(RANKED_INPUTS, "report.incidents")

# The columns of `<out>.incidents.csv`, in order (types: INCIDENTS_TYPES).
INCIDENTS: dict[str, str] = {
    "rank": "int64",           # 1 = the incident to open first
    "incident_id": "str",      # 16 hex digits, a hash of (src_ip, query or dst_ip, transform): stable across runs
    "score": "float64",        # the highest score of its rows
    "alert": "bool",           # any of its rows is an alert
    "src_ip": "str",
    "src_name": "str",
    "src_kind": "str",
    "esxi_host": "str",
    "query": "str",            # the C2 name ("" when the rows have no DNS answer joined: then one destination)
    "dst_ips": "str",          # distinct destinations, space-separated
    "dst_ports": "str",        # distinct destination ports, space-separated, ascending
    "answers": "str",          # distinct DNS answers, space-separated
    "transform": "str",        # the derivation
    "rules": "str",            # the rules that fired on its best row
    "connections": "int64",
    "alerts": "int64",         # its rows that are alerts
    "first_ts": "float64",
    "last_ts": "float64",
    "top_event_id": "str",     # its best-ranked row
    "explanation": "str",      # the explanation of its best-ranked row
    "event_ids": "str",        # all its rows' event ids, space-separated, best-ranked first
}
EVENT_PORTS = "event_ports"    # beside event_ids in `finish`'s frames (not written): each event's dst_port
DISTINCT = (("dst_ip", "dst_ips"), ("dst_port", "dst_ports"), ("answer", "answers"))
INCIDENT_BLOCK_ROWS = 100_000  # rows whose event ids one block of incidents gathers


def incident_hashes(src_ip, key, transform) -> np.ndarray:
    """A stable 64-bit hash of each (src_ip, query or dst_ip, transform): equal for the rows of one incident."""
    frame = pd.DataFrame({"s": pd.array(src_ip, dtype="str"), "k": pd.array(key, dtype="str"),
                          "t": pd.array(transform, dtype="str")})
    return pd.util.hash_pandas_object(frame, index=False).to_numpy()


def incident_ids(src_ip, key, transform) -> np.ndarray:
    """The incident id of each (src_ip, query or dst_ip, transform): 16 hex digits of `incident_hashes`."""
    return np.array([f"{h:016x}" for h in incident_hashes(src_ip, key, transform).tolist()], dtype=object)


# What a row raised by the alerts of its source and name says (`raised_by_name`).
NAME_NOTE = "; an alert: other connections from this source to this name alerted on DNS-calculation evidence"


def raised_explanation(explanation: pd.Series) -> pd.Series:
    """The explanation of a row raised by its name (`raised_by_name`): its "no DNS-calculation
    evidence" clause gives way to why it is an alert."""
    text = explanation.astype(str)
    for clause in (explain.NO_EVIDENCE_WEAK, explain.NO_EVIDENCE):
        text = text.str.replace(clause, "", regex=False)
    return text + NAME_NOTE


def _text(table: pa.Table, column: str) -> pa.Array:
    return pc.fill_null(table[column].cast(pa.string()), "")


def name_keys(table: pa.Table) -> np.ndarray:
    """A stable 64-bit hash of each row's (src_ip, query): one source's connections to one DNS name."""
    return incident_hashes(_text(table, "src_ip").to_numpy(zero_copy_only=False),
                           _text(table, "query").to_numpy(zero_copy_only=False), np.full(table.num_rows, ""))


def name_candidates(table: pa.Table) -> np.ndarray:
    """Rows that a name's evidence may raise: joined to a name, with a derivation or a rule of their
    own (a row with nothing against it stays as it is), and not suppressed by an analyst's verdict."""
    named = pc.not_equal(_text(table, "query"), "")
    own = pc.or_(pc.not_equal(_text(table, "transform"), ""), pc.not_equal(_text(table, "rules"), ""))
    candidate = pc.and_(named, own).to_numpy(zero_copy_only=False)
    if "suppressed" in table.column_names:
        candidate &= ~pc.fill_null(table["suppressed"], False).to_numpy(zero_copy_only=False)
    return candidate


def raised_by_name(keys: np.ndarray, alert: np.ndarray, candidate: np.ndarray,
                   alerting: np.ndarray | None = None) -> np.ndarray:
    """Rows that become alerts because the same source's connections to the same name alerted on
    evidence: not alerts themselves, `candidate` (`name_candidates`), and their (src_ip, query)
    (`keys`: `name_keys`) among `alerting` (default: those of the `alert` rows that are candidates).
    A keyed derivation needs two answers with the same key and the features are causal, so a
    campaign's first connections lack the evidence its later ones have: the name's consistency
    across answers, applied to all its connections from that source."""
    alerting = keys[alert & candidate] if alerting is None else alerting
    return ~alert & candidate & np.isin(keys, alerting)


def _key_column(table: pa.Table) -> pa.Array:
    """query, or dst_ip where query is empty: the C2 name or destination of each row."""
    query = pc.fill_null(table["query"].cast(pa.string()), "")
    return pc.if_else(pc.equal(query, ""), pc.fill_null(table["dst_ip"].cast(pa.string()), ""), query)


class StreamingIncidents:
    """Incidents over scored rows that arrive as Arrow tables (`add`), described at the end (`finish`)."""

    def __init__(self):
        self._values: list[dict] = [{}, {}, {}]      # src_ip, key, transform: value -> code
        self._incidents: dict[tuple, int] = {}       # tuple of key codes -> incident
        self._codes: list[np.ndarray] = []
        self._connections = np.zeros(0, dtype="int64")
        self._alerts = np.zeros(0, dtype="int64")
        self._first = np.zeros(0, dtype="float64")
        self._last = np.zeros(0, dtype="float64")
        self._max = np.zeros(0, dtype="float64")
        self._distinct = {c: DistinctPairs(skip=("", "-1")) for c, _ in DISTINCT}

    def add(self, table: pa.Table) -> None:
        """Count the rows of `table`."""
        n = table.num_rows
        if not n:
            self._codes.append(np.zeros(0, dtype="int32"))
            return
        columns = [table["src_ip"], _key_column(table), table["transform"]]
        parts = [encode_values(c, lookup) for c, lookup in zip(columns, self._values)]
        combined, first = row_groups(parts, [len(v) for v in self._values])
        tuples = zip(*(p[first].tolist() for p in parts))    # one per incident of this table
        to_global = np.array([self._incidents.setdefault(t, len(self._incidents)) for t in tuples], dtype="int64")
        incident = to_global[combined].astype("int32")
        self._codes.append(incident)
        size = len(self._incidents)
        grow = size - len(self._connections)
        if grow > 0:
            self._connections = np.r_[self._connections, np.zeros(grow, dtype="int64")]
            self._alerts = np.r_[self._alerts, np.zeros(grow, dtype="int64")]
            self._first = np.r_[self._first, np.full(grow, np.nan)]
            self._last = np.r_[self._last, np.full(grow, np.nan)]
            self._max = np.r_[self._max, np.full(grow, np.nan)]
        self._connections += np.bincount(incident, minlength=size)
        alert = table["alert"].to_numpy().astype(bool) if "alert" in table.column_names else np.zeros(n, bool)
        self._alerts += np.bincount(incident, weights=alert, minlength=size).astype("int64")
        frame = pd.DataFrame({"ts": table["ts"].to_numpy(), "score": table["score"].to_numpy()}, dtype="float64")
        grouped = frame.groupby(incident)
        lo, hi = grouped["ts"].min(), grouped["ts"].max()
        ids = lo.index.to_numpy()
        self._first[ids] = np.fmin(self._first[ids], lo.to_numpy())
        self._last[ids] = np.fmax(self._last[ids], hi.to_numpy())
        self._max[ids] = np.fmax(self._max[ids], grouped["score"].max().to_numpy())
        for column, seen in self._distinct.items():
            seen.add(incident, size, table[column])

    def flip(self, rows: np.ndarray, alert: np.ndarray) -> None:
        """Rows added (positions in the order added) whose alert became `alert` after they were counted."""
        recount_alerts(self._alerts, self._codes, rows, alert)

    def __len__(self) -> int:
        return len(self._incidents)

    def finish(self, order: np.ndarray, rows_at: Callable[[np.ndarray], pd.DataFrame],
               values_at: Callable[[np.ndarray], pa.Table], block_rows: int | None = None,
               alerts_only: bool = False) -> Iterator[pd.DataFrame]:
        """The incidents in rank order, as frames of `INCIDENTS` columns (plus `EVENT_PORTS`), block
        by block (about `block_rows` rows' event ids each, default INCIDENT_BLOCK_ROWS). `order` ranks
        all rows added (indices into their concatenation, best first); `rows_at(indices)`: those rows
        (key columns, event_id, rules, explanation) as a frame; `values_at(indices)`: their event_id
        and dst_port (Arrow), in the order asked. One block's event ids are read at a time, and the best
        rows of up to `block_rows` incidents (each read has a fixed cost: at 10M rows, 84 reads took
        2.8 s). `alerts_only`: the alert incidents only."""
        block_rows = INCIDENT_BLOCK_ROWS if block_rows is None else block_rows
        code = np.concatenate(self._codes) if self._codes else np.zeros(0, dtype="int32")
        if not len(code):
            return
        ids, best_pos = first_in_order(code, order)
        best = order[best_pos]                                   # each incident's best-ranked row
        keys = pa.table({"alert": pa.array(self._alerts[ids] > 0), "score": pa.array(self._max[ids]),
                         "event_id": values_at(best)["event_id"].cast(pa.string())})
        ranking = pc.sort_indices(keys, sort_keys=list(schema.RANK_ORDER)).to_numpy()
        if alerts_only:
            ranking = ranking[keys["alert"].to_numpy(zero_copy_only=False)[ranking]]
        ids, best = ids[ranking], best[ranking]
        distinct = {out: self._distinct[column].joined(ids, " ", numeric=out == "dst_ports")   # ports as numbers
                    for column, out in DISTINCT}
        # each incident's rows, best-ranked first: rank positions grouped by incident (a stable sort)
        grouped = grouped_in_order(code, order)
        starts = np.r_[0, np.cumsum(np.bincount(code, minlength=len(self)))]
        del code
        sizes = self._connections[ids]
        cuts = np.r_[0, np.flatnonzero(np.diff(np.cumsum(sizes) // max(block_rows, 1))) + 1, len(ids)]
        tops, tops_from = None, 0   # the best rows of whole blocks of up to `block_rows` incidents, read at once
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            if lo == hi:
                continue
            part = ids[lo:hi]
            if tops is None or hi > tops_from + len(tops):
                stop = max(hi, cuts[np.searchsorted(cuts, lo + block_rows, side="right") - 1])
                tops, tops_from = rows_at(best[lo:stop]).reset_index(drop=True), lo
            top = tops.iloc[lo - tops_from:hi - tops_from].reset_index(drop=True)
            text = {c: top[c].astype("str").to_numpy() if c in top.columns else np.full(hi - lo, "", dtype=object)
                    for c in ("src_ip", "src_name", "src_kind", "esxi_host", "query", "dst_ip", "transform", "rules",
                              "event_id", "explanation")}
            block = pd.DataFrame({
                "rank": np.arange(lo + 1, hi + 1, dtype="int64"),
                "incident_id": incident_ids(text["src_ip"], np.where(text["query"] != "", text["query"], text["dst_ip"]),
                                            text["transform"]),
                "score": self._max[part], "alert": self._alerts[part] > 0,
                **{c: text[c] for c in ("src_ip", "src_name", "src_kind", "esxi_host", "query")},
                **{out: values[lo:hi] for out, values in distinct.items()},
                "transform": text["transform"], "rules": text["rules"],
                "connections": self._connections[part], "alerts": self._alerts[part],
                "first_ts": self._first[part], "last_ts": self._last[part],
                "top_event_id": text["event_id"], "explanation": text["explanation"],
            })
            values = values_at(np.concatenate([grouped[starts[c]:starts[c + 1]] for c in part]))
            offsets = pa.array(np.r_[0, np.cumsum(sizes[lo:hi])].astype("int64"))
            space = pa.scalar(" ", pa.large_string())
            event_ids = pa.LargeListArray.from_arrays(offsets, values["event_id"].combine_chunks()
                                                      .cast(pa.large_string()))
            ports = pa.LargeListArray.from_arrays(offsets, pc.cast(values["dst_port"].combine_chunks(),
                                                                   pa.large_string()))
            block["event_ids"] = pc.binary_join(event_ids, space).to_numpy(zero_copy_only=False)
            block[EVENT_PORTS] = pc.binary_join(ports, space).to_numpy(zero_copy_only=False)
            yield block


def incident_frame(ranked: pd.DataFrame, alerts_only: bool = False) -> pd.DataFrame:
    """The incidents of a ranked frame in memory (all its rows; rank order from `rank`, else the
    ranking of `schema.RANK_ORDER`), with `EVENT_PORTS`: what the HTML report shows."""
    columns = list(INCIDENTS) + [EVENT_PORTS]
    missing = [c for c in ("src_ip", "score", "event_id") if c not in ranked.columns]
    if missing:
        raise ValueError(f"incidents need the columns {missing}")
    if ranked.empty:
        return pd.DataFrame(columns=columns)
    frame = ranked.reset_index(drop=True)
    defaults = {"alert": False, "ts": np.nan, "dst_port": -1}
    frame = frame.assign(**{c: defaults.get(c, "") for c in RANKED_INPUTS if c not in frame.columns})
    table = pa.Table.from_pandas(frame[list(RANKED_INPUTS)], preserve_index=False)
    incidents = StreamingIncidents()
    incidents.add(table)
    if "rank" in frame.columns:
        order = np.argsort(frame["rank"].to_numpy(), kind="stable")
    else:
        order = pc.sort_indices(table.select([k for k, _ in schema.RANK_ORDER]),
                                sort_keys=list(schema.RANK_ORDER)).to_numpy()
    blocks = list(incidents.finish(order, lambda idx: frame.iloc[idx],
                                   lambda idx: table.select(["event_id", "dst_port"]).take(pa.array(idx)),
                                   alerts_only=alerts_only))
    return pd.concat(blocks, ignore_index=True)[columns] if blocks else pd.DataFrame(columns=columns)
