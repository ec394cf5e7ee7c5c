"""One identity per entity: DNS clients named by host name resolve to the IPs of that entity.

Sysmon EID 22 carries the computer's name (`MAIL01.corp.local`), not an address, when neither the
event (`host.ip`) nor an EID 3 event of the same host in the same file gives one (the Sysmon reader
does those two). Such a client is matched here, case-insensitively, with the inventory's names (VM
or host names, FQDN or short) and replaced by that entity's IP; an entity with several IPs gets one
copy of the DNS row per IP, so the answer applies to connections from either. A name nothing
matches is kept as it is: it joins no connection and is counted as unresolved (`coverage`).

Matching: the full name (lower case, no trailing dot) first; else the first label, but only when
one of the two sides is a short name (`mail01` matches `mail01.corp.local`; `mail01.a.local` does
not match `mail01.b.local`). Work is per distinct client name, never per row.

The same resolution runs at read time in the batch engine (before DNS rows are partitioned by
client) and in `pipeline.prepare` (every other path), so both see the same rows.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

_IPV4 = r"^\d{1,3}(?:\.\d{1,3}){3}$"
COVERAGE_WARN = 0.90


def _arrow(values) -> pa.Array:
    if isinstance(values, pd.Series):
        values = values.array
    try:
        arr = pa.array(values)
    except (TypeError, pa.ArrowInvalid):
        arr = pa.array(np.asarray(values, dtype=object), pa.large_string(), from_pandas=True)
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def distinct(values) -> list:
    """The distinct values of a text column (Arrow: no Python object per row)."""
    return pc.unique(_arrow(values)).to_pylist()


def is_name(values) -> np.ndarray:
    """Per value: a host name rather than an IP address or "" (IPv6 has ':', IPv4 four numbers)."""
    arr = _arrow(values)
    if not len(arr):
        return np.zeros(0, bool)
    address = pc.or_(pc.match_substring_regex(arr, _IPV4), pc.match_substring(arr, ":"))
    return pc.invert(pc.or_(address, pc.equal(arr, ""))).to_numpy(zero_copy_only=False).astype(bool)


def _keys(names: pd.Series) -> tuple[pd.Series, pd.Series]:
    full = names.astype("str").str.strip().str.lower().str.rstrip(".")
    return full, full.str.split(".", n=1).str[0]


class Identity:
    """Name -> IPs of the entities of an environment (`table`: key, short, single, ip)."""

    def __init__(self, names, ips):
        names = pd.Series(np.asarray(names, dtype=object), dtype="str")
        ips = pd.Series(np.asarray(ips, dtype=object), dtype="str")
        keep = (names.str.strip() != "") & (ips != "") & pd.Series(is_name(names))
        names, ips = names[keep].reset_index(drop=True), ips[keep].reset_index(drop=True)
        full, short = _keys(names)
        self.table = pd.DataFrame({"key": full, "short": short, "single": full == short,
                                   "ip": ips}).drop_duplicates(["key", "ip"], ignore_index=True)

    @classmethod
    def from_inventory(cls, inventory: pd.DataFrame | None) -> "Identity":
        if inventory is None or not len(inventory):
            return cls([], [])
        return cls(inventory["name"].to_numpy(dtype=object), inventory["ip"].to_numpy(dtype=object))

    def lookup(self, names) -> tuple[np.ndarray, np.ndarray]:
        """(position in `names`, ip) for every IP each name resolves to, sorted by position."""
        names = pd.Series(np.asarray(names, dtype=object), dtype="str")
        if not len(names) or not len(self.table):
            return np.empty(0, np.int64), np.empty(0, object)
        full, short = _keys(names)
        q = pd.DataFrame({"pos": np.arange(len(names)), "key": full, "short": short, "single": full == short})
        exact = q.merge(self.table[["key", "ip"]], on="key")
        rest = q[~q["pos"].isin(exact["pos"])]
        # a short name on either side: compare first labels
        by_short = rest.merge(self.table[["short", "single", "ip"]], on="short", suffixes=("", "_t"))
        by_short = by_short[by_short["single"] | by_short["single_t"]]
        hits = pd.concat([exact[["pos", "ip"]], by_short[["pos", "ip"]]], ignore_index=True)
        hits = hits.drop_duplicates(ignore_index=True).sort_values("pos", kind="stable")
        return hits["pos"].to_numpy(np.int64), hits["ip"].to_numpy(dtype=object)


def resolve_clients(dns: pd.DataFrame, inventory: pd.DataFrame | None,
                    identity: Identity | None = None) -> pd.DataFrame:
    """`dns` with every named `client_ip` that `identity` (default: the inventory's) knows
    replaced by its entity's IP(s): one row per IP, in place of the row, order kept."""
    if not len(dns):
        return dns
    distinct = pc.unique(_arrow(dns["client_ip"]))
    if not is_name(distinct).any():
        return dns   # the usual case (Zeek, DNS servers): nothing to do
    codes, uniques = pd.factorize(dns["client_ip"].to_numpy(dtype=object))
    named = np.flatnonzero(is_name(uniques))
    identity = identity if identity is not None else Identity.from_inventory(inventory)
    pos, ips = identity.lookup(uniques[named])
    if not len(pos):
        return dns
    which = named[pos]                                   # the unique value each IP belongs to
    n_ips = np.bincount(which, minlength=len(uniques))
    first = np.zeros(len(uniques), np.int64)
    first[which[::-1]] = np.arange(len(which))[::-1]     # its first IP in `ips`
    copies = np.maximum(n_ips[codes], 1)
    rows = np.repeat(np.arange(len(dns)), copies)
    k = np.arange(len(rows)) - np.repeat(np.cumsum(copies) - copies, copies)  # copy number
    code = codes[rows]
    client = dns["client_ip"].to_numpy(dtype=object)[rows]
    hit = n_ips[code] > 0
    client[hit] = ips[first[code[hit]] + k[hit]]
    out = dns.take(rows).reset_index(drop=True)
    out["client_ip"] = pd.Series(client, dtype=dns["client_ip"].dtype)
    return out


def coverage(clients: dict[str, set], sources: set, inventory: pd.DataFrame | None) -> dict[str, tuple[int, int]]:
    """Per DNS source: (clients that resolve to a connection source, distinct clients)."""
    identity = None
    out = {}
    for source, values in clients.items():
        values = np.array(sorted(v for v in values if v != ""), dtype=object)
        ok = np.array([v in sources for v in values], dtype=bool)
        named = np.flatnonzero(is_name(values)) if len(values) else np.empty(0, np.int64)
        if len(named):
            identity = identity or Identity.from_inventory(inventory)
            pos, ips = identity.lookup(values[named])
            good = np.array([ip in sources for ip in ips], dtype=bool)
            ok[named[pos[good]]] = True
        out[source] = (int(ok.sum()), len(values))
    return out


def coverage_lines(cover: dict[str, tuple[int, int]]) -> list[str]:
    lines = []
    for source, (resolved, total) in sorted(cover.items()):
        if not total:
            continue
        share = resolved / total
        line = (f"DNS source {source}: {resolved} of {total} clients ({100 * share:.1f} %) resolved to a "
                "connection source")
        if share < COVERAGE_WARN:
            line = (f"warning: {line}, under {100 * COVERAGE_WARN:.0f} %: the others' answers join no "
                    "connection (names not in the inventory, or hosts with no connection log)")
        lines.append(line)
    return lines
