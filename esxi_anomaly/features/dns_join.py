"""The DNS join: link each connection to the DNS answers its source received just before it.

Two links per connection, both causal (answer time <= connection time) and windowed
(`max(ttl, min_window_s) + grace_s`, since clients and resolvers reuse answers past their TTL):

* the **IP link**: the most recent answer record, to the same client, whose data *is* the
  connection's `dst_ip` (`pandas.merge_asof` on an integer (client, ip) key);
* the **candidate answers**: every answer record of the client's last `recent_responses` responses in
  the window, whatever their data, for the port/IP derivation tests (a port may come from another
  record or another name than the one that gave the IP).

Keys are integer-coded (`features.columns`), so the join never compares strings row by row.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from esxi_anomaly.features.columns import ConnColumns, DnsColumns

DEFAULT_MIN_WINDOW_S = 300.0
DEFAULT_GRACE_S = 60.0
DEFAULT_RECENT_RESPONSES = 4
DEFAULT_MAX_WINDOW_S = 3_600.0  # caps TTL-based windows; bounds the look-back a streamed batch needs


@dataclass(frozen=True)
class JoinParams:
    min_window_s: float = DEFAULT_MIN_WINDOW_S
    grace_s: float = DEFAULT_GRACE_S
    recent_responses: int = DEFAULT_RECENT_RESPONSES
    max_window_s: float = DEFAULT_MAX_WINDOW_S

    @property
    def lookback_s(self) -> float:
        """How far before a batch's first connection its DNS answers must reach."""
        return max(self.max_window_s, self.min_window_s) + self.grace_s


@dataclass
class DnsJoin:
    """The result of joining connections (in their given row order) to DNS answers.

    `ip_answer_row[i]` is the row in `dns` of the answer that gave connection i its `dst_ip`
    (-1 if none). `pairs` holds the candidate (connection, answer row) pairs for derivation tests.
    """

    ip_answer_row: np.ndarray   # int64, one per connection
    pairs_conn: np.ndarray      # int64 connection index
    pairs_answer: np.ndarray    # int64 row of dns
    pairs_age: np.ndarray       # float64 seconds from the answer to the connection


def answer_window(ttl: np.ndarray, params: JoinParams) -> np.ndarray:
    ttl = np.nan_to_num(np.asarray(ttl, dtype="float64"), nan=0.0)
    return np.minimum(np.maximum(ttl, params.min_window_s), max(params.max_window_s, params.min_window_s)) + params.grace_s


def join(conns, dns, params: JoinParams = JoinParams()) -> DnsJoin:
    """Join `conns` to `dns` (canonical frames or their `columns` views, any order). Indices refer
    to positions."""
    conns, dns = ConnColumns.of(conns), DnsColumns.of(dns)
    n = conns.n
    if n == 0 or dns.n == 0:
        empty = np.empty(0, dtype="int64")
        return DnsJoin(np.full(n, -1, dtype="int64"), empty, empty, np.empty(0))

    clients = pd.factorize(np.concatenate([conns.src.keys, dns.client.keys]))[0]
    conn_client = clients[:n].astype("int64")
    dns_client = clients[n:].astype("int64")
    window = answer_window(dns.ttl, params)
    max_window = float(window.max()) if len(window) else 0.0

    ip_row = _ip_link(conns, dns, conn_client, dns_client, window, max_window)
    pc, pa, age = _recent_answers(dns, conn_client, dns_client, conns.ts, window, max_window, params)
    return DnsJoin(ip_row, pc, pa, age)


def _ip_link(conns: ConnColumns, dns: DnsColumns, conn_client, dns_client, window, max_window) -> np.ndarray:
    rows = np.flatnonzero(dns.has_data & dns.is_rtype("A", "AAAA"))
    ips = pd.factorize(np.concatenate([conns.dst.keys, dns.answer.keys[rows]]))[0]
    n = conns.n
    n_ips = int(ips.max()) + 1 if len(ips) else 1
    conn_ts, dns_ts = conns.ts, dns.ts
    left = pd.DataFrame({"ts": conn_ts, "key": conn_client * n_ips + ips[:n], "pos": np.arange(n)})
    right = pd.DataFrame({
        "ts": dns_ts[rows],
        "key": dns_client[rows] * n_ips + ips[n:],
        "row": rows.astype("int64"),
    })
    merged = _asof(left, right, max_window)
    row = merged["row"].to_numpy()
    found = row >= 0
    ok = np.zeros(n, dtype=bool)
    pos = merged["pos"].to_numpy()
    ok[pos[found]] = (conn_ts[pos[found]] - dns_ts[row[found]]) <= window[row[found]]
    out = np.full(n, -1, dtype="int64")
    out[pos[ok[pos]]] = row[ok[pos]]
    return out


def _recent_answers(dns: DnsColumns, conn_client, dns_client, conn_ts, window, max_window, params):
    """Candidate pairs, sorted by (connection, answer row): all answer rows of the client's last K
    responses within the window."""
    # the responses (all rows of one share client and time), ordered by (client, ts)
    resp_codes = dns.response
    by_code = np.argsort(resp_codes, kind="stable")
    bounds = np.searchsorted(resp_codes[by_code], np.arange(resp_codes.max() + 2), side="left")
    first = by_code[bounds[:-1]]
    order = np.lexsort((dns.ts[first], dns_client[first]))  # stable: ties keep response order
    resp_client, resp_ts = dns_client[first[order]], dns.ts[first[order]]
    resp_start, resp_count = bounds[:-1][order], np.diff(bounds)[order]
    row_window = np.where(dns.has_data, window, -1.0)[by_code]  # rows in response order
    resp_window = np.maximum.reduceat(row_window, bounds[:-1])[order] if len(row_window) else row_window
    n = len(conn_client)
    left = pd.DataFrame({"ts": conn_ts, "key": conn_client, "pos": np.arange(n)})
    right = pd.DataFrame({"ts": resp_ts, "key": resp_client, "row": np.arange(len(resp_ts), dtype="int64")})
    merged = _asof(left, right, max_window)
    last = np.empty(n, dtype="int64")
    last[merged["pos"].to_numpy()] = merged["row"].to_numpy()
    # (connection, response) for the K most recent, connection-major and oldest first, so the
    # expanded pairs come out almost sorted by (connection, row)
    k = params.recent_responses
    rank = last[:, None] - np.arange(k - 1, -1, -1)[None, :]
    ok = (last[:, None] >= 0) & (rank >= 0)
    ok[ok] &= resp_client[rank[ok]] == np.broadcast_to(conn_client[:, None], rank.shape)[ok]
    conn_idx = np.broadcast_to(np.arange(n)[:, None], rank.shape)[ok]
    resp_rank = rank[ok]
    age = conn_ts[conn_idx] - resp_ts[resp_rank]
    live = age <= resp_window[resp_rank]  # a response whose every record has expired adds nothing
    conn_idx, resp_rank, age = conn_idx[live], resp_rank[live], age[live]
    # expand responses to their answer rows
    counts = resp_count[resp_rank]
    ends = np.cumsum(counts)
    pos = np.arange(ends[-1] if len(ends) else 0) + np.repeat(resp_start[resp_rank] - (ends - counts), counts)
    rep_conn, rep_age = np.repeat(conn_idx, counts), np.repeat(age, counts)
    keep = rep_age <= row_window[pos]
    rep_conn, rep_rows, rep_age = rep_conn[keep], by_code[pos[keep]], rep_age[keep]
    key = rep_conn * max(dns.n, 1) + rep_rows
    if len(key) and not (key[1:] > key[:-1]).all():
        sort = np.argsort(key, kind="stable")  # runs: nearly linear
        rep_conn, rep_rows, rep_age = rep_conn[sort], rep_rows[sort], rep_age[sort]
    return rep_conn, rep_rows.astype("int64"), rep_age


def _asof(left: pd.DataFrame, right: pd.DataFrame, tolerance: float) -> pd.DataFrame:
    """Backward merge_asof on ts by integer key; `row` is -1 where nothing matched."""
    left = left.sort_values("ts", kind="stable")
    right = right.sort_values("ts", kind="stable")
    merged = pd.merge_asof(
        left, right, on="ts", by="key", direction="backward", allow_exact_matches=True,
        tolerance=tolerance if tolerance > 0 else None,
    )
    merged["row"] = merged["row"].fillna(-1).astype("int64")
    return merged
