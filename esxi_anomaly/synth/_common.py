"""Vectorised helpers shared by the generators: hashing, IPv4 text, Zeek uids, ephemeral ports."""
from __future__ import annotations

import ipaddress

import numpy as np
import pandas as pd

_ALPHABET = np.frombuffer(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
UID_CHARS = 17

# Ephemeral source-port ranges (threat-notes §5.4): Linux default, Windows/IANA; ESXi like Linux.
EPHEMERAL = {"linux": (32768, 60999), "windows": (49152, 65535), "esxi": (32768, 60999)}


def mix64(x: np.ndarray | int) -> np.ndarray:
    """splitmix64 finaliser: a fast, seed-free integer hash (stable across runs and platforms)."""
    z = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def ip_to_int(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def ips_to_int(texts) -> np.ndarray:
    """IPv4 dotted strings -> uint32 (vectorised by splitting once per unique value)."""
    values = pd.Series(texts, dtype="str")
    codes, uniques = pd.factorize(values)
    table = np.array([int(ipaddress.IPv4Address(u)) for u in uniques], dtype=np.uint32)
    return table[codes]


def int_to_ip(values) -> np.ndarray:
    """uint32 -> dotted strings (object array); formats each distinct address once."""
    values = np.asarray(values, dtype=np.uint32)
    uniques, inverse = np.unique(values, return_inverse=True)
    a, b, c, d = (uniques >> 24) & 255, (uniques >> 16) & 255, (uniques >> 8) & 255, uniques & 255
    table = np.array([f"{w}.{x}.{y}.{z}" for w, x, y, z in zip(a.tolist(), b.tolist(), c.tolist(), d.tolist())],
                     dtype=object)
    return table[inverse.reshape(-1)] if len(values) else np.array([], dtype=object)


def octets(values) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    v = np.asarray(values, dtype=np.int64)
    return (v >> 24) & 255, (v >> 16) & 255, (v >> 8) & 255, v & 255


def new_uids(rng: np.random.Generator, n: int, taken=None) -> np.ndarray:
    """`n` distinct Zeek-style uids ("C" + 17 base-62 characters), none of them in `taken` (array-like)."""
    out = np.empty(0, dtype=object)
    # object dtype: pandas' Arrow-string isin falls back to a Python loop
    taken = np.asarray([] if taken is None else taken, dtype=object)
    while len(out) < n:
        need = n - len(out)
        chars = _ALPHABET[rng.integers(0, 62, size=(need, UID_CHARS))]
        raw = np.full((need, UID_CHARS + 1), ord("C"), dtype=np.uint8)
        raw[:, 1:] = chars
        fresh = raw.view(f"S{UID_CHARS + 1}").reshape(-1).astype(str).astype(object)
        out = np.concatenate([out, fresh])
        keep = ~pd.Series(out, dtype=object).duplicated().to_numpy()
        if len(taken):
            keep &= ~pd.Series(out, dtype=object).isin(taken).to_numpy()
        out = out[keep]
    return out[:n]


def ephemeral_ports(rng: np.random.Generator, os_kind: np.ndarray) -> np.ndarray:
    """One client source port per row, from the row's OS ephemeral range."""
    os_kind = np.asarray(os_kind)
    out = rng.integers(EPHEMERAL["linux"][0], EPHEMERAL["linux"][1] + 1, size=len(os_kind))
    win = os_kind == "windows"
    out[win] = rng.integers(EPHEMERAL["windows"][0], EPHEMERAL["windows"][1] + 1, size=int(win.sum()))
    return out.astype(np.int32)


def str_series(values, n: int | None = None) -> pd.Series:
    """A pandas "str" column from an array (or a scalar broadcast to `n` rows)."""
    if n is not None and np.ndim(values) == 0:
        return pd.Series(np.full(n, values, dtype=object), dtype="str")
    return pd.Series(np.asarray(values, dtype=object), dtype="str")


def sort_by_ts(df: pd.DataFrame) -> pd.DataFrame:
    """Rows stably ordered by `ts` (numpy argsort: string tie-break columns would be far slower).

    Rows of one DNS response share a ts and stay together in their original order.
    """
    order = np.argsort(df["ts"].to_numpy(), kind="stable")
    return df.take(order).reset_index(drop=True)
