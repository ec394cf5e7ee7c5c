"""DNS-side features of the name behind a connection: shape of the name, churn, client NXDOMAINs.

Every count is per client, so sources can be scored independently of each other.

All counts are causal (what was known at the connection's time), computed with `merge_asof`.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from esxi_anomaly.features.columns import Coded, ConnColumns, DnsColumns
from esxi_anomaly.features.dns_join import DnsJoin
from esxi_anomaly.features.hashing import combine
from esxi_anomaly.features.stream_state import StreamState, distinct_running_count

DNS_SIDE_FEATURES = ["query_len", "query_entropy", "name_answer_churn", "client_nxdomain_rate"]


def _entropy(names: np.ndarray) -> np.ndarray:
    """Shannon entropy (bits/char) of each name; call it on distinct names (it loops over them)."""
    values = np.zeros(len(names))
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name:
            continue
        _, counts = np.unique(np.frombuffer(name.encode("utf-8", "replace"), dtype="uint8"), return_counts=True)
        p = counts / counts.sum()
        values[i] = float(-(p * np.log2(p)).sum())
    return values


def _running_by_key(event_ts, event_key, event_values: list, query_ts, query_key, fallbacks: list) -> list[np.ndarray]:
    """For each of `event_values`: the value of the latest event with the same key at or before each
    query time (the matching `fallbacks` array where there is none)."""
    left = pd.DataFrame({"ts": query_ts, "key": query_key, "pos": np.arange(len(query_ts))}).sort_values("ts", kind="stable")
    right = pd.DataFrame({"ts": event_ts, "key": event_key, **{f"v{i}": v for i, v in enumerate(event_values)}})
    merged = pd.merge_asof(left, right.sort_values("ts", kind="stable"), on="ts", by="key", direction="backward")
    pos = merged["pos"].to_numpy()
    found = merged["v0"].notna().to_numpy()
    out = []
    for i, fallback in enumerate(fallbacks):
        values = np.asarray(fallback, dtype="float64").copy()
        values[pos[found]] = merged[f"v{i}"].to_numpy()[found]
        out.append(values)
    return out


def dns_side_features(conns, dns, j: DnsJoin, name, state: StreamState | None = None) -> pd.DataFrame:
    """`name` is the name behind each connection ("" if none), as strings or `Coded`.

    With `state`, only DNS rows at or after `state.dns_owned_until` are counted (earlier ones,
    the join's look-back margin, were counted by an earlier batch), and the counts continue it."""
    conns, dns = ConnColumns.of(conns), DnsColumns.of(dns)
    name = name if isinstance(name, Coded) else Coded.of(pd.Series(name, dtype=object).fillna("").to_numpy(dtype=object))
    values = np.asarray(["" if not isinstance(v, str) else v for v in name.values], dtype=object)
    out = pd.DataFrame({
        "query_len": name.per_value(np.array([len(v) for v in values], dtype="float64")),
        "query_entropy": name.per_value(_entropy(values)),
    })
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
    churn_now, = _running_by_key(dns.ts[data], dq, [churn], conn_ts, name_key, [before])
    out["name_answer_churn"] = np.where(name.per_value(values != ""), churn_now, 0.0)
    # share of the client's responses so far that were NXDOMAIN
    owned_rows = np.flatnonzero(owned)
    first = np.sort(owned_rows[np.unique(dns.response[owned_rows], return_index=True)[1]])  # a row per response
    resp_ts = dns.ts[first]
    order = np.argsort(resp_ts, kind="stable")
    first, resp_ts = first[order], resp_ts[order]
    rc = dns.client.keys[first]
    nx = (dns.rcode.codes[first] == dns.rcode.code_of("NXDOMAIN")).astype("float64")
    nx_run = pd.Series(nx).groupby(rc).cumsum().to_numpy() + _prior(state, "client_nx", rc)
    total_run = pd.Series(np.ones(len(rc))).groupby(rc).cumsum().to_numpy() + _prior(state, "client_responses", rc)
    nx_now, total_now = _running_by_key(resp_ts, rc, [nx_run, total_run], conn_ts, src_key,
                                        [_prior(state, "client_nx", src_key), _prior(state, "client_responses", src_key)])
    out["client_nxdomain_rate"] = np.where(total_now > 0, nx_now / np.maximum(total_now, 1), 0.0)
    if state is not None:
        state.add_counts("client_nx", rc, nx)
        state.add_counts("client_responses", rc, np.ones(len(rc)))
    return out[DNS_SIDE_FEATURES]


def _prior(state: StreamState | None, name: str, keys: np.ndarray) -> np.ndarray:
    return state.prior_counts(name, keys) if state is not None else np.zeros(len(keys))
