"""Canonical frames shared by every stage: connections, dns_answers, inventory, context.

Every reader produces these columns with these dtypes, and every later stage relies on them.
Missing numeric values are NaN (floats) or -1 (ports); missing text is "".
Times are float seconds since the epoch, UTC.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

STR = "str"  # pandas' string dtype (Arrow-backed on pandas 3)

CONNECTIONS: dict[str, str] = {
    "event_id": STR,      # Zeek uid where present, else a stable id from source file + line
    "ts": "float64",      # connection start
    "src_ip": STR,
    "src_port": "int32",  # -1 when unknown
    "dst_ip": STR,
    "dst_port": "int32",  # -1 when unknown (ICMP, ...)
    "proto": STR,         # tcp | udp | icmp | ...
    "duration": "float64",
    "bytes_out": "float64",
    "bytes_in": "float64",
    "packets_out": "float64",
    "packets_in": "float64",
    "conn_state": STR,
    "local_orig": STR,    # Zeek: "T" when the originator is in its Site::local_nets, "F" not, "" unknown
    "local_resp": STR,    # the same for the responder (a re-oriented flow swaps the two)
    "history": STR,       # Zeek's state history ("^...": Zeek flipped the direction itself); "" elsewhere
    "process": STR,       # ESXi world / Windows image when known
    "esxi_host": STR,
    "source": STR,        # format it came from, e.g. "zeek_conn_tsv"
}

DNS_ANSWERS: dict[str, str] = {
    "event_id": STR,
    "ts": "float64",      # time of the response
    "client_ip": STR,
    "resolver_ip": STR,
    "query": STR,
    "rtype": STR,         # A, AAAA, CNAME, TXT, SRV, ...; on the no-answer row the query type if logged, else ""
    "answer": STR,        # rdata as logged ("" for responses with no answers)
    "answer_index": "int16",  # position in the response; -1 for the no-answer row
    "ttl": "float64",
    "rcode": STR,         # NOERROR, NXDOMAIN, ... ("" unknown)
    "source": STR,
}

INVENTORY: dict[str, str] = {
    "ip": STR,
    "name": STR,
    "kind": STR,          # vm | esxi_mgmt | vcenter | infra | unknown
    "esxi_host": STR,
    "role": STR,          # peer group
}

CONTEXT: dict[str, str] = {
    "ts": "float64",
    "host": STR,
    "program": STR,       # hostd, vpxa, vmkernel, shell, vobd, ...
    "event": STR,         # normalised event kind, e.g. syslog_remote_failure, ssh_enabled
    "message": STR,
    "source": STR,
}

INVENTORY_KINDS = ("vm", "esxi_mgmt", "vcenter", "infra", "unknown")

# The ranked output of `score`: one row per scored connection, alerts first, then most anomalous first
# (`RANK_ORDER`). Every writer (CSV, Parquet, ECS JSON lines, HTML) takes its columns, their order and
# dtypes from here.
RANKED: dict[str, str] = {
    "rank": "int64",          # 1 = first in `RANK_ORDER` (alerts, then score)
    "score": "float64",       # higher = more anomalous
    "event_id": STR,
    "ts": "float64",
    "src_ip": STR,
    "src_port": "int32",
    "src_name": STR,          # inventory name, else the IP
    "src_kind": STR,          # INVENTORY_KINDS
    "esxi_host": STR,
    "dst_ip": STR,
    "dst_port": "int32",
    "proto": STR,
    "process": STR,
    "query": STR,             # the DNS evidence joined to the connection ("" without)
    "answer": STR,
    "rtype": STR,
    "dns_delay": "float64",   # seconds from the answer to the connection (NaN without)
    "transform": STR,         # the derivation that maps the answer to the port or address
    "rules": STR,             # rules that fired, space-separated
    "forest_score": "float64",
    "rule_score": "float64",
    "seen_by": STR,           # the vantage points that logged the connection
    "suppressed": "bool",     # an analyst's benign verdict matches (only when the environment has verdicts)
    "explanation": STR,
    "top_features": STR,      # feature attributions (the first `explain_top` ranks only)
    "alert": "bool",
}
RANKED_OPTIONAL = ("suppressed",)   # absent from runs without suppressions: their outputs stay as they were
# the ranking, everywhere: alerts (evidence at the level) first, then by score; the rest of a tie by id
RANK_ORDER = (("alert", "descending"), ("score", "descending"), ("event_id", "ascending"))
RANK_KEYS = tuple(name for name, _ in RANK_ORDER)   # the columns the ranking reads


def ranked_columns(suppressed: bool = False) -> list[str]:
    """The ranked output's columns in order; `suppressed` only when suppressions applied."""
    return [c for c in RANKED if suppressed or c not in RANKED_OPTIONAL]

FRAMES = {
    "connections": CONNECTIONS,
    "dns_answers": DNS_ANSWERS,
    "inventory": INVENTORY,
    "context": CONTEXT,
}

_FILL = {"float64": np.nan, "int32": -1, "int16": -1, STR: ""}


class SchemaError(ValueError):
    """A frame does not match its canonical schema; the message names the column."""


def empty(kind: str) -> pd.DataFrame:
    """An empty frame with the canonical columns and dtypes."""
    spec = FRAMES[kind]
    return pd.DataFrame({c: pd.Series([], dtype=d) for c, d in spec.items()})


def conform(df: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Return `df` with exactly the canonical columns, in order, cast to canonical dtypes.

    Missing columns are filled with the column's missing value; extra columns are dropped.
    Raises SchemaError naming the column that cannot be cast.
    """
    spec = FRAMES[kind]
    out = {}
    n = len(df)
    df = df.reset_index(drop=True)  # align by position, whatever the input's index
    for col, dtype in spec.items():
        if col in df.columns:
            out[col] = _cast(df[col], kind, col, dtype)
        else:
            out[col] = pd.Series(np.full(n, _FILL[dtype]) if dtype != STR else [""] * n, dtype=dtype)
    return pd.DataFrame(out, index=pd.RangeIndex(n))


def _cast(values: pd.Series, kind: str, col: str, dtype: str) -> pd.Series:
    """One column cast to its canonical dtype (missing text -> "", missing ints -> -1)."""
    try:
        if dtype == STR:
            return values.fillna("").astype(STR)
        if dtype.startswith("int"):
            return pd.to_numeric(values, errors="raise").fillna(_FILL[dtype]).astype(dtype)
        return pd.to_numeric(values, errors="raise").astype(dtype)
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"{kind}: column {col!r} cannot be cast to {dtype}: {exc}") from exc


def _has_dtype(values: pd.Series, dtype: str) -> bool:
    actual = values.dtype
    if dtype == STR:   # any non-object string dtype (Arrow- or Python-backed) is used as it is
        return pd.api.types.is_string_dtype(actual) and not pd.api.types.is_object_dtype(actual)
    return str(actual) == dtype


def check_frame(df: pd.DataFrame, kind: str) -> pd.DataFrame:
    """`df` itself when every canonical column of `kind` is there with its dtype (a dtype check
    only: cheap enough per chunk); else a copy whose mismatched columns are cast (`conform`'s
    casts; other columns, extra ones too, kept as they are). SchemaError naming the frame and the
    column when a column is missing or cannot be cast."""
    if not isinstance(df, pd.DataFrame):
        raise SchemaError(f"{kind}: expected a pandas DataFrame, got {type(df).__name__}")
    spec = FRAMES[kind]
    missing = [c for c in spec if c not in df.columns]
    if missing:
        raise SchemaError(f"{kind}: missing column {missing[0]!r}"
                          + (f" (and {', '.join(map(repr, missing[1:]))})" if len(missing) > 1 else ""))
    wrong = [c for c, dtype in spec.items() if not _has_dtype(df[c], dtype)]
    if not wrong:
        return df
    return df.assign(**{c: _cast(df[c], kind, c, spec[c]) for c in wrong})


def check_frames(X, caller: str) -> Frames:
    """The boundary check of an estimator taking `Frames` (`caller` names it in the TypeError):
    each frame through `check_frame`; the inventory may be None. Returns `X` itself when nothing
    needed casting."""
    if not isinstance(X, Frames):
        raise TypeError(f"{caller} expects a schema.Frames(connections, dns_answers, inventory), "
                        f"got {type(X).__name__}")
    conns = check_frame(X.connections, "connections")
    dns = check_frame(X.dns_answers, "dns_answers")
    inventory = None if X.inventory is None else check_frame(X.inventory, "inventory")
    if conns is X.connections and dns is X.dns_answers and inventory is X.inventory:
        return X
    return Frames(conns, dns, inventory)


def validate(df: pd.DataFrame, kind: str) -> None:
    """Raise SchemaError naming the first offending column (missing, wrong dtype, bad values)."""
    spec = FRAMES[kind]
    for col, dtype in spec.items():
        if col not in df.columns:
            raise SchemaError(f"{kind}: missing column {col!r}")
        if not _has_dtype(df[col], dtype):
            raise SchemaError(f"{kind}: column {col!r} has dtype {df[col].dtype}, expected {dtype}")
    if kind == "connections":
        bad = (df["dst_port"] < -1) | (df["dst_port"] > 65535)
        if bad.any():
            raise SchemaError(f"connections: column 'dst_port' has {int(bad.sum())} values outside -1..65535")
    if kind == "inventory":
        bad = ~df["kind"].isin(INVENTORY_KINDS)
        if bad.any():
            raise SchemaError(
                f"inventory: column 'kind' has unknown values {sorted(set(df.loc[bad, 'kind']))[:5]}; "
                f"expected one of {INVENTORY_KINDS}"
            )


@dataclass
class Frames:
    """The canonical inputs of one run."""

    connections: pd.DataFrame
    dns_answers: pd.DataFrame
    inventory: pd.DataFrame
