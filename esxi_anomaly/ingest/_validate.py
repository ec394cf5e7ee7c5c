"""Checks every reader's records get in one place (`iter_file`), after parsing, vectorised.

A time outside 1970-01-01 .. 2100-01-01 (1e300, -1, 2**64-1, a value in milliseconds) or a text that
is not an IP address in an address column would break later stages (datetime conversion, ECS
`source.ip`); such rows go to the quarantine with the reason instead. Missing values stay allowed
where the frame allows them: NaN times, "" addresses (unknown).
"""
from __future__ import annotations

import ipaddress
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from esxi_anomaly.ingest.base import Quarantine

# From the epoch, not later: Zeek run on a capture with relative times writes ts near 0 (the Slips
# test9 logs in the samples); the bound that matters is the upper one (datetime64[ns] ends in 2262).
TS_MIN = 0.0                # 1970-01-01T00:00:00Z
TS_MAX = 4_102_444_800.0    # 2100-01-01T00:00:00Z (excluded)
IP_COLUMNS = {"connections": ("src_ip", "dst_ip"), "dns_answers": ("client_ip", "resolver_ip"),
              "inventory": ("ip",)}
ADDRESS_RTYPES = ("A", "AAAA")   # their answer is an address
_IPV4 = r"(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4_LINE = f"^{_IPV4}$"
# letters, digits, '-', '_' and dots, at least one letter: a NetBIOS or DNS host name
_HOST_NAME = re.compile(r"(?=[^.]*[A-Za-z_])[A-Za-z0-9_][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)*\.?\Z")
_RAW_COLUMNS = ("event_id", "ts", "src_ip", "dst_ip", "client_ip", "resolver_ip", "query", "rtype", "answer",
                "ip", "name", "host", "event")


def validate_chunk(chunk: pd.DataFrame, frame: str, path: str, quarantine: Quarantine) -> pd.DataFrame:
    """`chunk` without its rows of out-of-range time or invalid address, which are quarantined."""
    n = len(chunk)
    refused = np.zeros(n, bool)
    found: list[tuple[np.ndarray, list[str]]] = []     # (rows, their reasons), the first reason wins
    if "ts" in chunk.columns:
        ts = chunk["ts"].to_numpy(dtype="float64", na_value=np.nan)
        out = ~((ts >= TS_MIN) & (ts < TS_MAX)) & ~np.isnan(ts)
        if out.any():
            idx = np.flatnonzero(out)
            found.append((idx, [f"time out of range: {v:.6g} (accepted: 1970-01-01 to 2100-01-01)" for v in ts[idx]]))
            refused[idx] = True
    checks = [(col, None) for col in IP_COLUMNS.get(frame, ()) if col in chunk.columns]
    if frame == "dns_answers" and "answer" in chunk.columns and "rtype" in chunk.columns:
        checks.append(("answer", chunk["rtype"].isin(ADDRESS_RTYPES).to_numpy()))
    for col, rows in checks:
        values = chunk[col] if rows is None else chunk[col][rows]
        # a DNS client may be a computer name (Sysmon EID 22): resolved later (`features.identity`)
        bad = _invalid_addresses(values, names_ok=col == "client_ip")
        if bad is None:
            continue
        idx = np.flatnonzero(bad) if rows is None else np.flatnonzero(rows)[bad]
        idx = idx[~refused[idx]]
        if len(idx):
            texts = chunk[col].to_numpy(dtype=object)[idx]
            found.append((idx, [f"{col} is not an IP address: {str(v)[:64]!r}" for v in texts]))
            refused[idx] = True
    if not found:
        return chunk
    idx = np.concatenate([rows for rows, _ in found])
    reasons = np.array([r for _, texts in found for r in texts], dtype=object)
    order = np.argsort(idx, kind="stable")          # the quarantine in row order
    idx, reasons = idx[order], reasons[order]
    room = max(0, quarantine.max_records - len(quarantine.records))
    cols = [c for c in _RAW_COLUMNS if c in chunk.columns]
    shown = chunk.iloc[idx[:room]][cols].astype(str)
    raws = list(shown.agg("\t".join, axis=1)) if len(shown) else []
    quarantine.add_many(path, list(reasons), raws + [""] * (len(idx) - len(raws)))
    return chunk[~refused].reset_index(drop=True)


def _invalid_addresses(values: pd.Series, names_ok: bool = False) -> np.ndarray | None:
    """Mask of the values that are neither "" nor an IP address; None when all are fine. Each
    distinct value is checked once: a regex (Arrow) over the distinct values, `ipaddress` for those
    it does not pass (IPv6, junk)."""
    if not len(values):
        return None
    try:
        arr = pa.chunked_array(pa.array(values.array))
    except (TypeError, pa.ArrowInvalid):
        arr = pa.chunked_array([pa.array(values.to_numpy(dtype=object), pa.large_string(), from_pandas=True)])
    distinct = pc.unique(arr)
    plain = pc.or_(pc.match_substring_regex(distinct, _IPV4_LINE), pc.equal(distinct, ""))
    others = pc.filter(distinct, pc.invert(plain)).to_pylist()
    wrong = [v for v in others if not _is_address(v) and not (names_ok and _is_host_name(v))]
    if not wrong:
        return None
    return pc.is_in(arr, value_set=pa.array(wrong, distinct.type)).to_numpy()


def _is_host_name(value) -> bool:
    return isinstance(value, str) and _HOST_NAME.match(value) is not None


def _is_address(value) -> bool:
    if not isinstance(value, str):
        return False
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True
