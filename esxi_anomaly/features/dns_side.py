"""DNS-side features of the name behind a connection: shape of the name, churn, client NXDOMAINs.

All counts are causal (what was known at the connection's time), computed with `merge_asof`.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from esxi_anomaly.features.dns_join import DnsJoin

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


def _running_by_key(event_ts, event_key, event_value, query_ts, query_key) -> np.ndarray:
    """Value of the latest event with the same key at or before each query time (0 if none)."""
    left = pd.DataFrame({"ts": query_ts, "key": query_key, "pos": np.arange(len(query_ts))}).sort_values("ts", kind="stable")
    right = pd.DataFrame({"ts": event_ts, "key": event_key, "v": event_value}).sort_values("ts", kind="stable")
    merged = pd.merge_asof(left, right, on="ts", by="key", direction="backward")
    out = np.zeros(len(query_ts))
    out[merged["pos"].to_numpy()] = merged["v"].fillna(0).to_numpy()
    return out


def dns_side_features(conns: pd.DataFrame, dns: pd.DataFrame, j: DnsJoin, name: pd.Series) -> pd.DataFrame:
    n = len(conns)
    name = name.fillna("").astype("str")
    out = pd.DataFrame({
        "query_len": name.str.len().astype("float64").to_numpy(),
        "query_entropy": _entropy(name).to_numpy(),
    })
    if not len(dns) or not n:
        out["name_answer_churn"] = 0.0
        out["client_nxdomain_rate"] = 0.0
        return out[DNS_SIDE_FEATURES]
    conn_ts = conns["ts"].to_numpy(dtype="float64")
    codes, _ = pd.factorize(pd.concat([dns["query"].astype("str"), name], ignore_index=True))
    dq, cq = codes[: len(dns)].astype("int64"), codes[len(dns):].astype("int64")
    # distinct answers the name has had so far, across all clients
    data = dns[dns["answer_index"] >= 0]
    first = ~pd.DataFrame({"q": dq[data.index], "a": data["answer"].to_numpy()}).duplicated().to_numpy()
    churn = pd.Series(first.astype("float64")).groupby(dq[data.index]).cumsum().to_numpy()
    out["name_answer_churn"] = np.where(
        name.to_numpy() != "",
        _running_by_key(data["ts"].to_numpy(dtype="float64"), dq[data.index], churn, conn_ts, cq), 0.0)
    # share of the client's responses so far that were NXDOMAIN
    resp = dns.drop_duplicates("event_id")
    clients, _ = pd.factorize(pd.concat([resp["client_ip"].astype("str"), conns["src_ip"].astype("str")], ignore_index=True))
    rc, cc = clients[: len(resp)].astype("int64"), clients[len(resp):].astype("int64")
    nx = (resp["rcode"].to_numpy(dtype=object) == "NXDOMAIN").astype("float64")
    g = pd.Series(nx).groupby(rc)
    rate = (g.cumsum() / (g.cumcount() + 1)).to_numpy()
    out["client_nxdomain_rate"] = _running_by_key(resp["ts"].to_numpy(dtype="float64"), rc, rate, conn_ts, cc)
    return out[DNS_SIDE_FEATURES]
