"""One row per connection and per DNS answer, whatever the number of vantage points that logged it.

NSX DFW logs a VM-to-VM connection at both vNICs (OUT at the source's host, IN at the
destination's, same 5-tuple and millisecond); esxcli lists a socket in every snapshot it is open;
Sysmon EID 3 sees what DFW sees; Sysmon EID 22 and the DNS server log the same answer.

Connections: rows with the same (src_ip, src_port, dst_ip, dst_port, proto), taken in time order,
form one connection while each starts within `TOLERANCE_S` of the row before it, or, when either of
the two is an esxcli snapshot row, within `SNAPSHOT_PERIOD_S` + the earlier row's duration. Two
rows of one vantage point of a source that logs a connection once (Zeek, Sysmon, ...) never merge. The merged row is the earliest
row (its values and event_id), with the largest byte and packet counts of the group and `seen_by`,
the distinct vantage points ("<source>:<esxi_host>") in the order they first saw it.

Reversed twins: a source may log a connection from its other end (esxcli guesses the direction
from LISTEN rows and service ports; Zeek logs a flow backwards when it missed the handshake), so
rows are keyed on the unordered endpoint pair (+ proto). When the rows of one connection disagree
on its direction, the merged row (still the earliest row's values) is turned to the direction of
the earliest row of a source that knows it (`knows_direction`), counts swapped with it; the counts
of the other rows are oriented that way before the largest are taken. (The batch engine writes a
connection with its first row's group: a knowing row of the other direction arriving only in a
later bucket group cannot turn it any more; a knowing row comes first in practice, as esxcli
snapshots follow the connection's start.)

DNS answers: rows with the same (client_ip, query, rtype, answer) from different sources within
`TOLERANCE_S` of each other are one answer, the earliest row.

Vectorised: one sort per frame; per-row Python nowhere.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from esxi_anomaly.features.hashing import combine
from esxi_anomaly.features.stream_state import StreamState

TOLERANCE_S = 2.0            # DFW OUT/IN pairs, Sysmon vs DFW, DNS server vs Sysmon
SNAPSHOT_PERIOD_S = 60.0     # esxcli sees a socket only at its snapshots
SNAPSHOT_SOURCES = ("esxcli_connections",)
# sources that log one connection in several rows of the same vantage point (DFW: OUT and IN when
# both VMs share a host; esxcli: every snapshot); any other source logs a connection once per
# vantage point, so two of its rows there are two connections
REPEATING_SOURCES = ("nsx_dfw", *SNAPSHOT_SOURCES)
COUNTS = ("bytes_out", "bytes_in", "packets_out", "packets_in")
CONN_KEY = ("src_ip", "src_port", "dst_ip", "dst_port", "proto")
# sources that see who opened a connection; Zeek only when its conn_state shows it saw the
# originator's SYN (OTH, SHR, RSTRH, "": midstream or responder-only, its direction is a guess)
KNOWING_SOURCES = ("nsx_dfw", "sysmon_network")
ZEEK_SOURCES = ("zeek_conn_tsv", "zeek_conn_json")
ZEEK_HANDSHAKE_STATES = ("S0", "S1", "SF", "REJ", "S2", "S3", "RSTO", "RSTR", "RSTOS0", "SH")
SWAPPED = {"src_ip": "dst_ip", "src_port": "dst_port", "dst_ip": "src_ip", "dst_port": "src_port",
           "bytes_out": "bytes_in", "bytes_in": "bytes_out", "packets_out": "packets_in", "packets_in": "packets_out"}
DNS_KEY = ("client_ip", "query", "rtype", "answer")
# StreamState.recent: the last row of each key that a later batch's row may still join
_STATE, _STATE_INFO, _STATE_VANTAGE = "merge_conn", "merge_conn_info", "merge_conn_vantage"
_SNAP, _ONCE = 1, 2          # bits of the flags kept in the state


def _pair_key(conns: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(key of the unordered endpoint pair + proto, does the row run from the lower endpoint)."""
    a = combine(conns["src_ip"], conns["src_port"])
    b = combine(conns["dst_ip"], conns["dst_port"])
    forward = a <= b
    return combine(np.where(forward, a, b), np.where(forward, b, a), conns["proto"]), forward


def knows_direction(conns: pd.DataFrame) -> np.ndarray:
    """Per row: does its source know which end opened the connection?"""
    def among(column: str, values: tuple) -> np.ndarray:   # decided per distinct value, not per row
        codes, uniques = pd.factorize(conns[column], use_na_sentinel=False)
        return np.isin(np.asarray(uniques, dtype=object).astype(str), values)[codes]

    return among("source", KNOWING_SOURCES) | (among("source", ZEEK_SOURCES)
                                               & among("conn_state", ZEEK_HANDSHAKE_STATES))


def _rows(conns: pd.DataFrame, key: bool = True) -> dict[str, np.ndarray]:
    """What the merge decides on, per row: endpoint-pair key, start, duration, flags, vantage point key."""
    codes, uniques = pd.factorize(conns["source"], use_na_sentinel=False)
    names = np.asarray(uniques, dtype=object).astype(str)
    flags = (np.isin(names, SNAPSHOT_SOURCES) * _SNAP + ~np.isin(names, REPEATING_SOURCES) * _ONCE)[codes]
    out = {"ts": conns["ts"].to_numpy(dtype="float64"), "duration": conns["duration"].to_numpy(dtype="float64"),
           "flags": flags.astype(np.uint64), "vantage": combine(conns["source"], conns["esxi_host"])}
    if key:
        out["key"] = _pair_key(conns)[0]
    return out


def _starts(r: dict[str, np.ndarray], order: np.ndarray) -> np.ndarray:
    """Per row taken in `order` ((key, time)-sorted): does it start a new connection?"""
    key, ts, duration, flags, vantage = (r[c][order] for c in ("key", "ts", "duration", "flags", "vantage"))
    new = np.ones(len(key), dtype=bool)
    if len(key) > 1:
        snap = (flags & _SNAP) > 0
        tol = np.where(snap[1:] | snap[:-1], SNAPSHOT_PERIOD_S + np.nan_to_num(duration[:-1], nan=0.0), TOLERANCE_S)
        once = (flags & _ONCE) > 0
        same_log = once[1:] & once[:-1] & (vantage[1:] == vantage[:-1])
        new[1:] = ~((key[1:] == key[:-1]) & (ts[1:] - ts[:-1] <= tol) & ~same_log)   # NaN gaps never join
    return new


def _one_log(r: dict[str, np.ndarray]) -> bool:
    """All rows from one vantage point of a source that logs each connection once: nothing merges."""
    v = r["vantage"]
    return bool(((r["flags"] & _ONCE) > 0).all() and (len(v) == 0 or (v == v[0]).all()))


def connection_groups(conns: pd.DataFrame) -> np.ndarray:
    """Per row (in the frame's order), the number of the connection it belongs to. The batch engine
    uses it so that a chunk border never splits one connection."""
    n = len(conns)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    r = _rows(conns, key=False)
    if _one_log(r):
        return np.arange(n)
    r["key"] = _pair_key(conns)[0]
    order = np.lexsort((np.arange(n), r["ts"], r["key"]))
    out = np.empty(n, dtype=np.int64)
    out[order] = np.cumsum(_starts(r, order)) - 1
    return out


def _text_series(values: pa.Array) -> pd.Series:
    return pd.Series(values.to_pandas(types_mapper=pd.ArrowDtype)).astype("str")


def _vantage(conns: pd.DataFrame) -> pa.Array:
    """"<source>:<esxi_host>" (or the source alone when the host is unknown) per row."""
    source = pa.array(conns["source"].array).cast(pa.large_string())
    host = pa.array(conns["esxi_host"].array).cast(pa.large_string())
    with_host = pc.binary_join_element_wise(source, host, pa.scalar(":", pa.large_string()))
    return pc.if_else(pc.equal(host, ""), source, with_host)


def _remember(state: StreamState, r: dict[str, np.ndarray], in_time_order: np.ndarray) -> None:
    """Keep in `state` the last row of each key (rows taken in `in_time_order`) that a later row
    may still join: only the last row of a key decides whether the next one joins."""
    last = in_time_order[~pd.Series(r["key"][in_time_order]).duplicated(keep="last").to_numpy()]
    ts = r["ts"]
    end = np.nanmax(ts) if np.isfinite(ts).any() else -np.inf
    reach = ts[last] + np.maximum(TOLERANCE_S, SNAPSHOT_PERIOD_S + np.nan_to_num(r["duration"][last], nan=0.0))
    keep = last[reach >= end]
    state.recent[_STATE] = (r["key"][keep], ts[keep])
    state.recent[_STATE_INFO] = (r["flags"][keep], r["duration"][keep])
    state.recent[_STATE_VANTAGE] = (r["vantage"][keep], ts[keep])


def _with_earlier(state: StreamState, r: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The rows an earlier batch left in `state` (`_remember`) as rows -m..-1 before the batch's rows
    `r`: they win ties in time."""
    prev = state.recent[_STATE]
    flags, duration = state.recent[_STATE_INFO]
    earlier = {"key": prev[0], "ts": prev[1], "flags": flags, "duration": duration,
               "vantage": state.recent[_STATE_VANTAGE][0]}
    return {c: np.concatenate([earlier[c], r[c]]) for c in r}


def _earlier_of_one_log(state: StreamState, vantage) -> bool:
    """Are the rows an earlier batch left in `state` all of the log at `vantage`, one that logs each
    connection once (so that no row of that log can join them)?"""
    flags = state.recent[_STATE_INFO][0]
    return bool(((flags & _ONCE) > 0).all() and (state.recent[_STATE_VANTAGE][0] == vantage).all())


def merge_connections(conns: pd.DataFrame, state: StreamState | None = None) -> pd.DataFrame:
    """The connections, one row per connection, with a `seen_by` column (see the module), in the
    frame's order. With `state`, rows joining a connection of an earlier batch are dropped (that
    batch kept its first row) and the rows a later batch may join are kept in it."""
    conns = conns.reset_index(drop=True)
    n = len(conns)
    prev = state.recent.get(_STATE) if state is not None else None
    m = len(prev[0]) if prev is not None else 0
    r = _rows(conns, key=False)
    if _one_log(r) and (m == 0 or n and _earlier_of_one_log(state, r["vantage"][0])):
        # one vantage point that logs each connection once (Zeek alone, say), as were the rows an
        # earlier batch left in the state: nothing to merge, the state kept as a merge would keep it
        out = conns.copy(deep=False)
        out["seen_by"] = _text_series(_vantage(conns)) if n else pd.Series([], dtype="str")
        if state is not None and n:
            r["key"] = _pair_key(conns)[0]
            if m:
                r = _with_earlier(state, r)
            ts = r["ts"]
            in_time_order = np.arange(m + n) if (ts[1:] >= ts[:-1]).all() else np.lexsort((np.arange(m + n), ts))
            _remember(state, r, in_time_order)
        return out
    r["key"], forward = _pair_key(conns)
    if m:
        r = _with_earlier(state, r)
    order = np.lexsort((np.arange(m + n), r["ts"], r["key"]))
    new = _starts(r, order)
    group = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    if state is not None:
        _remember(state, r, np.lexsort((np.arange(m + n), r["ts"])))
    rows = order - m                         # frame rows in sorted order (negative: earlier batches)
    first_row = rows[starts]
    # connections whose first row belongs to an earlier batch were written there
    groups_kept = np.flatnonzero(first_row >= 0)
    groups_kept = groups_kept[np.argsort(first_row[groups_kept], kind="stable")]   # in the frame's order
    out = conns.take(first_row[groups_kept]).reset_index(drop=True)
    if len(starts) == m + n:                 # nothing merged: the counts and vantage points are the rows'
        out["seen_by"] = _text_series(_vantage(out))
        return out
    valid = rows >= 0
    # the direction of each connection: its earliest knowing row's, else its earliest row's
    fwd = np.zeros(m + n, dtype=bool)
    knows = np.zeros(m + n, dtype=bool)
    fwd[valid], knows[valid] = forward[rows[valid]], knows_direction(conns)[rows[valid]]
    first_knowing = np.minimum.reduceat(np.where(knows, np.arange(m + n), m + n), starts)
    group_fwd = np.where(first_knowing < m + n, fwd[np.minimum(first_knowing, m + n - 1)], fwd[starts])
    flip = fwd != group_fwd[group]           # rows logged the other way round
    for name in COUNTS:
        values = np.full(m + n, np.nan)
        mine = conns[name].to_numpy(dtype="float64")[rows[valid]]
        theirs = conns[SWAPPED[name]].to_numpy(dtype="float64")[rows[valid]]
        values[valid] = np.where(flip[valid], theirs, mine)
        out[name] = np.fmax.reduceat(values, starts)[groups_kept]
    turn = flip[starts][groups_kept]
    if turn.any():
        ends = ("src_ip", "src_port", "dst_ip", "dst_port")
        turned = {name: out[SWAPPED[name]].where(turn, out[name]).astype(out[name].dtype) for name in ends}
        for name in ends:
            out[name] = turned[name]
    out["seen_by"] = _seen_by(conns, rows, group, starts, groups_kept)
    return out


def _seen_by(conns: pd.DataFrame, rows: np.ndarray, group: np.ndarray, starts: np.ndarray,
             groups_kept: np.ndarray) -> pd.Series:
    """The distinct vantage points of each kept connection, in the order they first saw it."""
    valid = rows >= 0            # rows of earlier batches do not count: their connection was written
    vantage = _vantage(conns)
    codes, texts = pd.factorize(_text_series(vantage), use_na_sentinel=False)
    g, v = group[valid], codes[rows[valid]]
    first = ~pd.Series(g * (len(texts) + 1) + v).duplicated().to_numpy()   # sorted by (group, time)
    g, v = g[first], v[first]
    pos = np.arange(len(g)) - np.searchsorted(g, g)                       # place within its group
    slot = np.full(len(starts), -1, dtype=np.int64)
    slot[groups_kept] = np.arange(len(groups_kept))
    pieces = [pa.nulls(len(groups_kept), pa.large_string())]   # at least one value to join
    text_array = pa.array(np.asarray(texts, dtype=object).astype(str), pa.large_string())
    for k in range(int(pos.max()) + 1 if len(pos) else 0):
        at = pos == k
        take = np.full(len(groups_kept), -1, dtype=np.int64)
        target = slot[g[at]]
        ok = target >= 0
        take[target[ok]] = v[at][ok]
        idx = pa.array(np.where(take >= 0, take, 0), mask=take < 0)
        pieces.append(text_array.take(idx))
    return _text_series(pc.binary_join_element_wise(*pieces, pa.scalar(" ", pa.large_string()), null_handling="skip"))


def duplicate_records(conns: pd.DataFrame) -> np.ndarray:
    """Per row: does it repeat an earlier row of the same vantage point (same 5-tuple, start time,
    source and host) of a source that logs each connection once? A log written twice, or two
    sensors' files merged, gives such rows under another uid; they are one connection, the row of
    the lowest event_id kept (whatever the order the rows come in: a chunked run and a one-shot one
    keep the same). DFW and esxcli rows repeat by design (`REPEATING_SOURCES`): `merge_connections`
    merges those."""
    n = len(conns)
    if n < 2:
        return np.zeros(n, dtype=bool)
    codes, uniques = pd.factorize(conns["source"], use_na_sentinel=False)
    once = ~np.isin(np.asarray(uniques, dtype=object).astype(str), REPEATING_SOURCES)[codes]
    if not once.any():
        return np.zeros(n, dtype=bool)
    # candidates first, on the numeric columns alone (cheap): the full key only for those
    numeric = combine(conns["ts"].to_numpy(dtype="float64").view("int64"), conns["src_port"].to_numpy(),
                      conns["dst_port"].to_numpy())
    candidate = np.flatnonzero(pd.Series(numeric).duplicated(keep=False).to_numpy() & once)
    duplicate = np.zeros(n, dtype=bool)
    if not len(candidate):
        return duplicate
    rows = conns.iloc[candidate]
    key = combine(numeric[candidate], *(rows[c] for c in ("src_ip", "dst_ip", "proto", "source", "esxi_host")))
    event = pd.factorize(rows["event_id"], sort=True, use_na_sentinel=False)[0]
    order = np.lexsort((event, key))
    duplicate[candidate[order]] = pd.Series(key[order]).duplicated().to_numpy()
    return duplicate


def merge_dns(dns: pd.DataFrame) -> pd.DataFrame:
    """The DNS answers, the same answer logged by several sources within `TOLERANCE_S` kept once
    (the earliest row), in the frame's order."""
    n = len(dns)
    if n < 2 or dns["source"].nunique() < 2:
        return dns
    key = combine(*(dns[c] for c in DNS_KEY))
    ts = dns["ts"].to_numpy(dtype="float64")
    source = pd.factorize(dns["source"], use_na_sentinel=False)[0]
    order = np.lexsort((np.arange(n), ts, key))
    k, t, s = key[order], ts[order], source[order]
    joins = (k[1:] == k[:-1]) & (t[1:] - t[:-1] <= TOLERANCE_S) & (s[1:] != s[:-1])
    if not joins.any():
        return dns
    drop = order[1:][joins]
    keep = np.ones(n, dtype=bool)
    keep[drop] = False
    return dns[keep].reset_index(drop=True)
