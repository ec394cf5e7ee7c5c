"""Write DNS queries as a BIND 9 query log (category `queries`, file channel with `print-time`).

BIND's query log holds no answers (formats.md: "queries only; dnstap needed"), and the reader
(`ingest/bind_query.py`) takes none: each response of the estate becomes its query line, so the
log says which client asked which name and type, when, at which server. One collector file,
`<out>/bind/query.log`, lines as BIND 9.16+ prints them:

    04-Mar-2024 00:01:10.142 queries: info: client @0x7f3a2c0b1e40 10.10.1.21#53211 (www.example.com): query: www.example.com IN A +E(0)K (10.10.1.53)

Flags: `+` recursion desired, `E(0)` EDNS version 0, `K` a cookie (most clients), `D` DNSSEC OK
(some). The query type is the first record type of the response that is not a CNAME (A when none).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from esxi_anomaly.synth._text_writer import (answers_of_clients_but, col, hash64, hex_of, ms_floor,
                                              write_in_time_order)

_CHAIN_TYPES = ("CNAME", "DNAME")
_MONTHS = np.asarray(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), dtype=object)


def responses(dns: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """(records in response order, one row per response with `qtype`, start index of each response).

    `records` gains `owner`: the target of the CNAME before it in its response, else the query name."""
    codes, _ = pd.factorize(dns["event_id"])
    d = dns.take(np.lexsort((dns["answer_index"].to_numpy(), codes))).reset_index(drop=True)
    uid = d["event_id"].to_numpy(dtype=object)
    if not len(d):
        return d.assign(owner=pd.Series([], dtype=object)), d.assign(qtype=pd.Series([], dtype=object)), np.array([], dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, uid[1:] != uid[:-1]])
    rtype = d["rtype"].to_numpy(dtype=object)
    answer = d["answer"].to_numpy(dtype=object)
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(d)]))
    chain_at = np.where(np.isin(rtype, _CHAIN_TYPES), np.arange(len(d)), -1)
    prev = np.maximum.accumulate(np.r_[-1, chain_at[:-1]])
    d["owner"] = np.where(prev >= group_start, answer[np.maximum(prev, 0)], d["query"].to_numpy(dtype=object))
    real = np.where(~np.isin(rtype, _CHAIN_TYPES) & (rtype != ""), np.arange(len(d)), len(d))
    first_real = np.minimum.reduceat(real, starts)
    last = np.r_[starts[1:] - 1, len(d) - 1]
    first = d.iloc[starts].reset_index(drop=True)
    first["qtype"] = np.where(first_real <= last, rtype[np.minimum(first_real, len(d) - 1)], "A")
    first["ancount"] = np.diff(np.r_[starts, len(d)]) - (answer[starts] == "")
    return d, first, starts


def _bind_time(ms: np.ndarray) -> pd.Series:
    """`04-Mar-2024 00:01:10.142` of epoch milliseconds (sliced from ISO text: strftime is slow)."""
    iso = pd.Series(np.datetime_as_string(np.asarray(ms, dtype=np.int64).astype("datetime64[ms]"), unit="ms").astype(object))
    month = pd.Series(_MONTHS[iso.str.slice(5, 7).astype(int).to_numpy() - 1], dtype=object)
    return (iso.str.slice(8, 10) + "-" + month + "-" + iso.str.slice(0, 4) + " " + iso.str.slice(11, 23)).astype(object)


def query_lines(dns: pd.DataFrame) -> pd.DataFrame:
    """One query line per response: ms, line."""
    _, first, _ = responses(dns)
    if not len(first):
        return pd.DataFrame({"ms": np.array([], dtype=np.int64), "line": np.array([], dtype=object)})
    h = hash64(first["event_id"])
    ms = ms_floor(first["ts"])
    client = first["client_ip"].astype(object)
    # BIND prints the client object's address: stable per client for a while, 12 hex digits
    handle = "@0x7f" + hex_of(client + col((ms // 3_600_000) % 7), 10)
    flags = ("+E(0)" + pd.Series(np.where(h % np.uint64(5) != 0, "K", ""), dtype=object)
             + pd.Series(np.where(h % np.uint64(7) == 0, "D", ""), dtype=object))
    server = first["resolver_ip"].astype(object).replace("", "127.0.0.1")   # a server answers on some address
    query = first["query"].astype(object)
    line = (_bind_time(ms) + " queries: info: client " + handle + " " + client + "#"
            + col(1024 + (h >> np.uint64(16)) % np.uint64(64000)) + " (" + query + "): query: " + query
            + " IN " + first["qtype"].astype(object) + " " + flags + " (" + server + ")")
    return pd.DataFrame({"ms": ms, "line": line})


def write_bind(ds, out_dir, exclude=()) -> list[Path]:
    """`<out_dir>/bind/query.log`: the queries of every client not in `exclude`, in time order."""
    lines = query_lines(answers_of_clients_but(ds, exclude))
    return [write_in_time_order(Path(out_dir) / "bind" / "query.log", lines)]


__all__ = ["write_bind", "query_lines", "responses"]
