"""The DNS join: link each connection to the DNS answers its source received just before it.

Two links per connection, both causal (answer time <= connection time) and windowed
(`max(ttl, min_window_s) + grace_s`, since clients and resolvers reuse answers past their TTL):

* the **IP link**: the most recent answer record, to the same client, whose data *is* the
  connection's `dst_ip` (a backward as-of search, `latest_at`, on an integer (client, ip) key);
* the **candidate answers**: every answer record of the client's last `recent_responses` responses in
  the window, whatever their data, for the port/IP derivation tests (a port may come from another
  record or another name than the one that gave the IP).

Keys are integer-coded (`features.columns`), so the join never compares strings row by row, and
both links are sorted integer searches (`latest_at`), not DataFrame merges.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from esxi_anomaly.features.columns import ConnColumns, DnsColumns, expand, shared_codes, sorted_unique

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
    latest_response: np.ndarray  # int64 per connection: `dns.response` code of the client's latest
    # response at or before it (any age), -1 if none


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
        return DnsJoin(np.full(n, -1, dtype="int64"), empty, empty, np.empty(0), np.full(n, -1, dtype="int64"))

    conn_client, dns_client = shared_codes(conns.src, dns.client)
    window = answer_window(dns.ttl, params)
    ip_row = _ip_link(conns, dns, conn_client, dns_client, window)
    pc, pa, age, latest = _recent_answers(dns, conn_client, dns_client, conns.ts, window, params)
    return DnsJoin(ip_row, pc, pa, age, latest)


def latest_at(event_key: np.ndarray, event_ts: np.ndarray, query_key: np.ndarray, query_ts: np.ndarray) -> np.ndarray:
    """For each query, the index of the latest event with its key at or before its time (of equal
    times the last given), -1 if none: a backward `merge_asof` by key, on integer arrays.

    Keys are non-negative integers (codes)."""
    out = np.full(len(query_key), -1, dtype=np.int64)
    if not len(event_key) or not len(query_key):
        return out
    event_code, query_code, n_keys = _ranks(event_key, query_key)
    if n_keys < 65_535 and (event_ts[1:] >= event_ts[:-1]).all() and (query_ts[1:] >= query_ts[:-1]).all():
        return _latest_in_time_order(event_code, event_ts, query_code, query_ts)
    # (key, time) as one int64 per item, key rank * span + time rank: exact for any float times
    times = sorted_unique(event_ts)
    span = len(times) + 1
    event_at = event_code * span + np.searchsorted(times, event_ts) + 1
    query_at = query_code * span + np.searchsorted(times, query_ts, side="right")  # 0: before every event
    order = np.argsort(event_at, kind="stable")  # stable: of equal times the last given comes last
    sorted_at = event_at[order]
    pos = np.searchsorted(sorted_at, query_at, side="right") - 1
    hit = pos >= 0
    hit[hit] = sorted_at[pos[hit]] // span == query_code[hit]  # the key's own event, not an earlier key's
    out[hit] = order[pos[hit]]
    return out


def _latest_in_time_order(event_code, event_ts, query_code, query_ts) -> np.ndarray:
    """`latest_at` for events and queries each in time order (the usual case) and codes < 65535:
    one merge by time, a radix sort by code, and a running maximum of the event index per code."""
    m = len(event_code)
    by_time = np.argsort(np.concatenate([event_ts, query_ts]), kind="stable")  # two runs: a linear merge;
    code = np.concatenate([event_code, query_code])[by_time]                    # events first at equal times
    by_code = by_time[np.argsort(code.astype(np.uint16), kind="stable")]  # (code, time)
    is_event = by_code < m
    # the running maximum of code * (m + 1) + event index + 1 restarts at each code's base value
    base = np.concatenate([event_code, query_code])[by_code] * (m + 1)
    running = np.maximum.accumulate(np.where(is_event, base + by_code + 1, base))
    out = np.empty(len(query_code), dtype=np.int64)
    out[by_code[~is_event] - m] = (running - base - 1)[~is_event]
    return out


def _ranks(event_key: np.ndarray, query_key: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Dense codes 0..n_keys-1 of the event keys, the same codes for query keys (n_keys for a key no
    event has), and n_keys."""
    keys = sorted_unique(event_key)
    n_keys = len(keys)
    top = int(max(keys[-1], query_key.max()))
    if top < 4 * (len(event_key) + len(query_key)):  # small keys: a lookup table beats searches
        table = np.full(top + 1, n_keys, dtype=np.int64)
        table[keys] = np.arange(n_keys)
        return table[event_key], table[query_key], n_keys
    at = np.minimum(np.searchsorted(keys, query_key), n_keys - 1)
    return np.searchsorted(keys, event_key), np.where(keys[at] == query_key, at, n_keys), n_keys


def _ip_link(conns: ConnColumns, dns: DnsColumns, conn_client, dns_client, window) -> np.ndarray:
    rows = np.flatnonzero(dns.has_data & dns.is_rtype("A", "AAAA"))
    conn_ip, answer_ip = shared_codes(conns.dst, dns.answer)
    n_ips = max(len(conns.dst.values), int(answer_ip.max(initial=-1)) + 1)
    latest = latest_at(dns_client[rows] * n_ips + answer_ip[rows], dns.ts[rows],
                       conn_client * n_ips + conn_ip, conns.ts)
    row = np.full(len(latest), -1, dtype=np.int64)
    hit = latest >= 0
    row[hit] = rows[latest[hit]]   # (no A/AAAA rows at all: nothing is hit)
    found = np.flatnonzero(row >= 0)
    too_old = conns.ts[found] - dns.ts[row[found]] > window[row[found]]
    row[found[too_old]] = -1
    return row


def _recent_answers(dns: DnsColumns, conn_client, dns_client, conn_ts, window, params):
    """Candidate pairs, sorted by (connection, answer row): all answer rows of the client's last K
    responses, each row within its window; and per connection its client's latest response."""
    # responses (all rows of one share client and time) in (client, ts) order, ties in response
    # order, and the rows grouped by response in that order: a client's last K responses before a
    # connection are then one contiguous range of rows
    resp_codes = dns.response
    first = np.empty(int(resp_codes.max()) + 1, dtype=np.int64)
    first[resp_codes[::-1]] = np.arange(dns.n)[::-1]
    order = np.lexsort((dns.ts[first], dns_client[first]))
    resp_client = dns_client[first[order]]
    at = np.empty(len(order), dtype=np.int64)
    at[order] = np.arange(len(order))
    rows = np.argsort(at[resp_codes], kind="stable")  # stable: rows of a response keep their order
    resp_size = np.bincount(resp_codes, minlength=len(order))[order]
    resp_end = np.cumsum(resp_size)
    resp_start = resp_end - resp_size
    client_first = np.maximum.accumulate(np.where(np.r_[True, resp_client[1:] != resp_client[:-1]],
                                                  np.arange(len(order)), 0))
    # looked up in response-number order (time order when the DNS rows are), then placed
    latest = latest_at(dns_client[first], dns.ts[first], conn_client, conn_ts)
    linked = np.flatnonzero(latest >= 0)
    last = at[latest[linked]]
    oldest = np.maximum(last - (params.recent_responses - 1), client_first[last])
    conn_idx, pos = expand(linked, resp_start[oldest], resp_end[last] - resp_start[oldest])
    row_ts = dns.ts[rows]
    row_window = np.where(dns.has_data, window, -1.0)[rows]  # a row without data never links
    age = conn_ts[conn_idx] - row_ts[pos]
    keep = age <= row_window[pos]
    conn_idx, answer_row, age = conn_idx[keep], rows[pos[keep]], age[keep]
    # oldest response first and rows in order: usually already sorted by (connection, row)
    key = conn_idx * max(dns.n, 1) + answer_row
    if len(key) and not (key[1:] > key[:-1]).all():
        sort = np.argsort(key, kind="stable")  # runs: nearly linear
        conn_idx, answer_row, age = conn_idx[sort], answer_row[sort], age[sort]
    return conn_idx, answer_row, age, latest
