"""DNS-side features of the name behind a connection: shape of the name, churn, client NXDOMAINs.

Every count is per client, so sources can be scored independently of each other.

All counts are causal (what was known at the connection's time), computed with `merge_asof`.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from esxi_anomaly.features.dns_join import DnsJoin
from esxi_anomaly.features.hashing import combine, hash_column
from esxi_anomaly.features.stream_state import StreamState, distinct_running_count

DNS_SIDE_FEATURES = ["query_len", "query_entropy", "name_answer_churn", "client_nxdomain_rate"]


def _entropy(names: pd.Series) -> pd.Series:
    """Shannon entropy (bits/char) of each distinct name, mapped back; loops over distinct names only."""
    uniq = pd.unique(names)
    values = {}
    for name in uniq:
        if not name:
            values[name] = 0.0
            continue
        _, counts = np.unique(np.frombuffer(name.encode("utf-8", "replace"), dtype="uint8"), return_counts=True)
        p = counts / counts.sum()
        values[name] = float(-(p * np.log2(p)).sum())
    return names.map(values).astype("float64")


def _running_by_key(event_ts, event_key, event_value, query_ts, query_key, fallback=None) -> np.ndarray:
    """Value of the latest event with the same key at or before each query time (`fallback`, or 0,
    if none)."""
    left = pd.DataFrame({"ts": query_ts, "key": query_key, "pos": np.arange(len(query_ts))}).sort_values("ts", kind="stable")
    right = pd.DataFrame({"ts": event_ts, "key": event_key, "v": event_value}).sort_values("ts", kind="stable")
    merged = pd.merge_asof(left, right, on="ts", by="key", direction="backward")
    out = np.zeros(len(query_ts)) if fallback is None else np.asarray(fallback, dtype="float64").copy()
    found = merged["v"].notna().to_numpy()
    out[merged["pos"].to_numpy()[found]] = merged["v"].to_numpy()[found]
    return out


def dns_side_features(conns: pd.DataFrame, dns: pd.DataFrame, j: DnsJoin, name: pd.Series,
                      state: StreamState | None = None) -> pd.DataFrame:
    """With `state`, only DNS rows at or after `state.dns_owned_until` are counted (earlier ones,
    the join's look-back margin, were counted by an earlier batch), and the counts continue it."""
    n = len(conns)
    name = name.fillna("").astype("str")
    out = pd.DataFrame({
        "query_len": name.str.len().astype("float64").to_numpy(),
        "query_entropy": _entropy(name).to_numpy(),
    })
    conn_ts = conns["ts"].to_numpy(dtype="float64")
    if state is not None:
        dns = dns[dns["ts"].to_numpy() >= state.dns_owned_until]
    # distinct answers this client has received for the name so far (per client, so that sources
    # can be processed independently, e.g. in Dask partitions by entity)
    name_key = combine(conns["src_ip"].to_numpy(dtype=object), name.to_numpy(dtype=object))
    data = dns[dns["answer_index"].to_numpy() >= 0]
    dq = combine(data["client_ip"].to_numpy(dtype=object), data["query"].to_numpy(dtype=object))
    before = _prior(state, "name_answers", name_key)  # read before this batch updates the state
    churn = distinct_running_count(dq, hash_column(data["answer"].to_numpy(dtype=object)),
                                   data["ts"].to_numpy(dtype="float64"), state, "name_answers").astype("float64")
    churn_now = _running_by_key(data["ts"].to_numpy(dtype="float64"), dq, churn, conn_ts, name_key, fallback=before)
    out["name_answer_churn"] = np.where(name.to_numpy() != "", churn_now, 0.0)
    # share of the client's responses so far that were NXDOMAIN
    resp = dns.drop_duplicates(["event_id", "client_ip", "ts"])
    rc = hash_column(resp["client_ip"].to_numpy(dtype=object))
    cc = hash_column(conns["src_ip"].to_numpy(dtype=object))
    order = np.argsort(resp["ts"].to_numpy(), kind="stable")
    resp, rc = resp.iloc[order], rc[order]
    nx = (resp["rcode"].to_numpy(dtype=object) == "NXDOMAIN").astype("float64")
    nx_run = pd.Series(nx).groupby(rc).cumsum().to_numpy() + _prior(state, "client_nx", rc)
    total_run = pd.Series(np.ones(len(rc))).groupby(rc).cumsum().to_numpy() + _prior(state, "client_responses", rc)
    resp_ts = resp["ts"].to_numpy(dtype="float64")
    nx_now = _running_by_key(resp_ts, rc, nx_run, conn_ts, cc, fallback=_prior(state, "client_nx", cc))
    total_now = _running_by_key(resp_ts, rc, total_run, conn_ts, cc, fallback=_prior(state, "client_responses", cc))
    out["client_nxdomain_rate"] = np.where(total_now > 0, nx_now / np.maximum(total_now, 1), 0.0)
    if state is not None:
        state.add_counts("client_nx", rc, nx)
        state.add_counts("client_responses", rc, np.ones(len(rc)))
    return out[DNS_SIDE_FEATURES]


def _prior(state: StreamState | None, name: str, keys: np.ndarray) -> np.ndarray:
    return state.prior_counts(name, keys) if state is not None else np.zeros(len(keys))
