"""Integer-coded views of the canonical frames: what the feature code computes on.

A string column becomes `Coded`: one integer code per row into its distinct values. Work that
depends only on the value (hashing, parsing an IP, the registered domain, an inventory lookup) runs
once per distinct value and is gathered back by code, and equality tests compare integers. Log
columns repeat heavily (a few thousand answers and names behind millions of rows), so this is
where feature extraction gets its speed.

`ConnColumns` and `DnsColumns` hold the coded columns of one batch, built lazily and once, so the
join, the relationship features and the DNS-side features share them.
"""
from __future__ import annotations

from functools import cached_property

import numpy as np
import pandas as pd
import pyarrow as pa

from esxi_anomaly.features.hashing import combine


def distinct(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row the code of its key, and per distinct key the first row holding it."""
    codes, uniques = pd.factorize(keys, use_na_sentinel=False)
    first = np.empty(len(uniques), dtype=np.int64)
    first[codes[::-1]] = np.arange(len(codes))[::-1]
    return codes, first


def gather(values: np.ndarray, rows: np.ndarray, fill) -> np.ndarray:
    """values[rows] where rows >= 0, else `fill` (also when `values` is empty): the lookup of a
    row number that may be -1 (no answer, no match)."""
    if not len(values):
        return np.full(len(rows), fill, dtype=np.asarray(fill).dtype)
    return np.where(rows >= 0, values[np.maximum(rows, 0)], np.asarray(fill, dtype=values.dtype))


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """The distinct values, sorted (`np.unique` without its much slower hashing path)."""
    s = np.sort(values)
    return s[np.r_[True, s[1:] != s[:-1]]] if len(s) else s


def expand(items: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Repeat each item `counts` times, with positions starts..starts+counts-1 alongside."""
    rep = np.repeat(items, counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return rep, np.repeat(starts, counts) + offsets


def shared_codes(a: "Coded", b: "Coded") -> tuple[np.ndarray, np.ndarray]:
    """The codes of two columns renumbered into one numbering, so equal values get equal codes:
    `a`'s codes as they are, `b`'s values matched to `a`'s once per distinct value."""
    at = pd.Index(a.values).get_indexer(b.values) if len(a.values) else np.full(len(b.values), -1)
    new = at < 0
    at[new] = len(a.values) + np.arange(int(new.sum()))
    return a.codes, at.astype(np.int64)[b.codes]


class Coded:
    """A column as `codes` (int64, one per row) into `values` (object array of distinct values)."""

    __slots__ = ("codes", "values", "_value_keys", "_keys")

    def __init__(self, codes: np.ndarray, values: np.ndarray):
        self.codes = np.asarray(codes, dtype=np.int64)
        self.values = np.asarray(values, dtype=object)
        self._value_keys = None
        self._keys = None

    @classmethod
    def of(cls, column) -> "Coded":
        if isinstance(column, Coded):
            return column
        codes, uniques = pd.factorize(column, use_na_sentinel=False)  # Arrow-backed str: hashed in C++
        return cls(codes, np.asarray(uniques, dtype=object))

    def __len__(self) -> int:
        return len(self.codes)

    @property
    def value_keys(self) -> np.ndarray:
        """The stable 64-bit hash of each distinct value (`hashing.hash_column` of it)."""
        if self._value_keys is None:
            self._value_keys = pd.util.hash_array(self.values) if len(self.values) else np.zeros(0, np.uint64)
        return self._value_keys

    @property
    def keys(self) -> np.ndarray:
        """Per row, the stable hash of its value: equal to `hashing.hash_column(strings)`."""
        if self._keys is None:
            self._keys = self.value_keys[self.codes]
        return self._keys

    def per_value(self, result: np.ndarray) -> np.ndarray:
        """Gather a result computed for each distinct value back to rows."""
        return np.asarray(result)[self.codes]

    def strings(self, rows: np.ndarray | None = None, fill: str = "") -> np.ndarray:
        """The values of `rows` (all rows if None) as an object array; rows < 0 give `fill`."""
        if rows is None:
            return self.decode(self.codes, fill)
        rows = np.asarray(rows)
        codes = np.full(len(rows), -1, dtype=np.int64)
        ok = rows >= 0
        codes[ok] = self.codes[rows[ok]]
        return self.decode(codes, fill)

    def decode(self, codes: np.ndarray, fill: str = "") -> np.ndarray:
        """The values of `codes` as an object array; codes < 0 give `fill`."""
        out = np.full(len(codes), fill, dtype=object)
        ok = codes >= 0
        if ok.any():
            out[ok] = self.values[codes[ok]]
        return out

    def text(self, codes: np.ndarray, fill: str = "") -> pd.arrays.ArrowStringArray:
        """The values of `codes` as an Arrow-backed "str" array, decoded in Arrow (no Python object
        per row); codes < 0 give `fill`."""
        values, codes = self.values, np.asarray(codes)
        at = self.code_of(fill)
        if at < 0:
            values, at = np.append(values, fill), len(values)
        dictionary = pa.array(values.astype(str) if len(values) else [], type=pa.large_string())
        indices = pa.array(np.where(codes >= 0, codes, at).astype(np.int32))
        return pd.array(pa.DictionaryArray.from_arrays(indices, dictionary).dictionary_decode(), dtype="str")

    def code_of(self, value) -> int:
        """The code of `value`, or -1 if the column never holds it."""
        hit = np.flatnonzero(self.values == value)
        return int(hit[0]) if len(hit) else -1

    def isin(self, allowed) -> np.ndarray:
        return self.per_value(np.isin(self.values, np.asarray(list(allowed), dtype=object)))

def _coded(column: str) -> cached_property:
    """A view attribute: the frame's `column` as `Coded`, built on first use."""
    return cached_property(lambda self: Coded.of(self.frame[column]))


class _FrameColumns:
    """A canonical frame's columns, each converted or coded on first use and kept."""

    def __init__(self, frame: pd.DataFrame):
        self.frame = frame
        self.n = len(frame)

    @classmethod
    def of(cls, frame):
        """`frame` itself if it is already such a view, else a view of it."""
        return frame if isinstance(frame, cls) else cls(frame)

    @cached_property
    def ts(self) -> np.ndarray:
        return self.frame["ts"].to_numpy(dtype="float64")


class ConnColumns(_FrameColumns):
    """The connection columns the features use, coded once per batch."""

    @cached_property
    def dst_port(self) -> np.ndarray:
        return self.frame["dst_port"].to_numpy(dtype="int64")

    src = _coded("src_ip")
    dst = _coded("dst_ip")
    proto = _coded("proto")


class DnsColumns(_FrameColumns):
    """The DNS answer columns the features use, coded once per batch."""

    @cached_property
    def ttl(self) -> np.ndarray:
        return self.frame["ttl"].to_numpy(dtype="float64")

    @cached_property
    def has_data(self) -> np.ndarray:
        """Rows that carry an answer record (not a no-data / NXDOMAIN response placeholder)."""
        return self.frame["answer_index"].to_numpy() >= 0

    client = _coded("client_ip")
    query = _coded("query")
    rtype = _coded("rtype")
    answer = _coded("answer")
    rcode = _coded("rcode")

    def is_rtype(self, *rtypes: str) -> np.ndarray:
        return self.rtype.isin(rtypes)

    @cached_property
    def response(self) -> np.ndarray:
        """An integer per DNS response, numbered in order of first appearance. A response is
        (event_id, client, ts): Zeek gives every transaction on one socket the same uid."""
        if self.n == 0:
            return np.zeros(0, dtype=np.int64)
        event, first = distinct(self.frame["event_id"])
        event = event.astype(np.int64)
        ts_bits = self.ts.view(np.uint64)
        if (self.client.codes[first][event] == self.client.codes).all() and (ts_bits[first][event] == ts_bits).all():
            return event  # each event id is one response (the usual case): the same numbering
        key = combine(event, self.client.codes, ts_bits)  # batch-local numbering
        return pd.factorize(key)[0].astype(np.int64)

    @cached_property
    def response_size(self) -> np.ndarray:
        """Per row, the number of answer rows of its response."""
        return np.bincount(self.response)[self.response] if self.n else np.zeros(0, dtype=np.int64)
