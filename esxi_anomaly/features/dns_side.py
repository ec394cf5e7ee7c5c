"""DNS-side features of the name behind a connection: shape of the name, churn, client NXDOMAINs.

Every count is per client, so sources can be scored independently of each other.

All counts are causal (what was known at the connection's time), looked up as of the connection's
time with `dns_join.latest_at`.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from esxi_anomaly.features.columns import Coded, ConnColumns, DnsColumns, shared_codes
from esxi_anomaly.features.dns_join import DnsJoin, latest_at
from esxi_anomaly.features.hashing import combine
from esxi_anomaly.features.stream_state import StreamState, distinct_running_count

DNS_SIDE_FEATURES = ["query_len", "query_entropy", "name_answer_churn", "client_nxdomain_rate"]


def _entropy(names: np.ndarray) -> np.ndarray:
    """Shannon entropy (bits/char) of each name's UTF-8 bytes, 0 for empty or missing names; call it on
    distinct names. All names at once: one count per (name, byte), summed per name."""
    values = np.zeros(len(names))
    encoded = [name.encode("utf-8", "replace") if isinstance(name, str) else b"" for name in names]
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    if not lengths.sum():
        return values
    key = np.repeat(np.arange(len(encoded), dtype=np.int64), lengths) * 256 + np.frombuffer(b"".join(encoded), np.uint8)
    keys, counts = np.unique(key, return_counts=True)   # sorted by (name, byte)
    owner = keys >> 8
    p = counts / lengths[owner]
    starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
    values[owner[starts]] = -np.add.reduceat(p * np.log2(p), starts)
    return values


def _latest_value(event_code, event_ts, values: list, query_code, query_ts, fallbacks: list) -> list[np.ndarray]:
    """For each of `values` (one per event): the value of the latest event with the query's code at or
    before its time, else the matching `fallbacks` value."""
    latest = latest_at(event_code, event_ts, query_code, query_ts)
    found = latest >= 0
    out = []
    for value, fallback in zip(values, fallbacks):
        result = np.asarray(fallback, dtype="float64").copy()
        result[found] = np.asarray(value, dtype="float64")[latest[found]]
        out.append(result)
    return out


def dns_side_features(conns, dns, j: DnsJoin, name, state: StreamState | None = None) -> pd.DataFrame:
    """`name` is the name behind each connection ("" if none), as strings or `Coded`.

    With `state`, only DNS rows at or after `state.dns_owned_until` are counted (earlier ones,
    the join's look-back margin, were counted by an earlier batch), and the counts continue it."""
    conns, dns = ConnColumns.of(conns), DnsColumns.of(dns)
    name = name if isinstance(name, Coded) else Coded.of(pd.Series(name, dtype=object).fillna("").to_numpy(dtype=object))
    values = np.asarray(["" if not isinstance(v, str) else v for v in name.values], dtype=object)
    out = {
        "query_len": name.per_value(np.array([len(v) for v in values], dtype="float64")),
        "query_entropy": name.per_value(_entropy(values)),
    }
    conn_ts = conns.ts
    owned = dns.ts >= state.dns_owned_until if state is not None else np.ones(dns.n, dtype=bool)
    # distinct answers this client has received for the name so far (per client, so that sources
    # can be processed independently, e.g. in Dask partitions by entity)
    src_key = conns.src.keys
    name_key = combine(src_key, name.keys)
    data = np.flatnonzero(owned & dns.has_data)
    dq = combine(dns.client.keys[data], dns.query.keys[data])
    before = _prior(state, "name_answers", name_key)  # read before this batch updates the state
    churn = distinct_running_count(dq, dns.answer.keys[data], dns.ts[data], state, "name_answers").astype("float64")
    # the same (client, name) keys as dense codes, for the as-of lookup
    conn_client, dns_client = shared_codes(conns.src, dns.client)
    dns_query, conn_name = shared_codes(dns.query, name)
    n_names = max(len(dns.query.values), int(conn_name.max(initial=-1)) + 1)
    churn_now, = _latest_value(dns_client[data] * n_names + dns_query[data], dns.ts[data], [churn],
                               conn_client * n_names + conn_name, conn_ts, [before])
    out["name_answer_churn"] = np.where(name.per_value(values != ""), churn_now, 0.0)
    # share of the client's responses so far that were NXDOMAIN, as of the client's latest response
    # (the join's); responses before `owned` belong to earlier batches, whose counts `state` holds
    owned_rows = np.flatnonzero(owned)
    first_of = np.full(int(dns.response.max(initial=-1)) + 1, -1)
    first_of[dns.response[owned_rows][::-1]] = owned_rows[::-1]
    first = np.sort(first_of[first_of >= 0])  # a row per owned response, its first, in response order
    order = np.argsort(dns.ts[first], kind="stable")
    first = first[order]
    rc = dns.client.keys[first]
    nx = (dns.rcode.codes[first] == dns.rcode.code_of("NXDOMAIN")).astype("float64")
    nx_run = np.zeros(len(first_of))
    total_run = np.zeros(len(first_of))
    nx_run[dns.response[first]] = pd.Series(nx).groupby(rc).cumsum().to_numpy() + _prior(state, "client_nx", rc)
    total_run[dns.response[first]] = pd.Series(np.ones(len(rc))).groupby(rc).cumsum().to_numpy() \
        + _prior(state, "client_responses", rc)
    latest = j.latest_response
    # an un-owned latest response means no owned one either (owned = at or after a time)
    found = np.flatnonzero(latest >= 0)
    found = found[first_of[latest[found]] >= 0]
    nx_now = np.array(_prior(state, "client_nx", src_key), dtype="float64")
    total_now = np.array(_prior(state, "client_responses", src_key), dtype="float64")
    nx_now[found], total_now[found] = nx_run[latest[found]], total_run[latest[found]]
    out["client_nxdomain_rate"] = np.where(total_now > 0, nx_now / np.maximum(total_now, 1), 0.0)
    if state is not None:
        state.add_counts("client_nx", rc, nx)
        state.add_counts("client_responses", rc, np.ones(len(rc)))
    return pd.DataFrame({feature: out[feature] for feature in DNS_SIDE_FEATURES}, copy=False)


def _prior(state: StreamState | None, name: str, keys: np.ndarray) -> np.ndarray:
    return state.prior_counts(name, keys) if state is not None else np.zeros(len(keys))
