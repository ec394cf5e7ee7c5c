"""`esxcli network ip connection list` snapshots -> connections (the ESXi host's own sockets).

Input: one or more snapshots appended to one file, each the command's table output
(formats.md (d)): a header line `Proto  Recv Q  Send Q  Local Address  Foreign Address  State
World ID  CC Algo  World Name`, a dashes line giving the column spans, then rows. Columns are cut
at the dash spans (State and CC Algo are blank for UDP, so splitting on spaces would shift them).
The `--formatter=csv` output (header `...,ForeignAddress,LocalAddress,Proto,...,WorldName,`, quoted
or not) is read too, with the `Time`/`Timestamp` and `Host`/`VMHost` columns a collector may add.

Snapshot time: the command prints none, so it comes from what the collector wrote, the first found of
  1. a time line before the table: a `#` line holding an ISO 8601 / RFC 3339 time anywhere
     (`# 2024-05-01T10:00:00Z esx01.lab`, `# esx02 2024-03-07 00:00:22.5+01:00`, `# 20240307T000022Z`;
     a lone other token naming the host fills esxi_host), a line that is only such a time (with an
     optional host), or `date` output, alone or on a `#` line (`Wed May  1 10:00:00 UTC 2024`, RFC 2822
     `Wed, 01 May 2024 10:00:00 +0000`); times without a zone are UTC (ESXi's clock), and a zone
     abbreviation other than UTC/GMT/UT/Z is ambiguous and not used;
  2. a CSV row's own time column;
  3. a time in the file name (`esx01_2024-03-07T000022Z_connections.txt`, `esxcli-20240307-000022.txt`);
  4. the read option `snapshot_time` (`--snapshot-time`): epoch seconds, or "mtime" for the file's
     modification time.
Never silently the modification time: the rows of a table with none of these are quarantined, one
record per row, with the reason.

Direction, from the host's own view: a socket whose local port is a server port is an accepted
(inbound) connection, reported from the client's side (src = Foreign Address, dst = Local Address,
process "" since the world name belongs to the server end). A server port is one LISTENed on (same
address or wildcard) in the same snapshot or, when the snapshot has no LISTEN row for either end, an
ESXi service port (threat-notes section 3) that the foreign port is not. The server socket of a
connection whose client socket is in the same snapshot (the host talking to itself) is its twin,
skipped. Other rows: src = Local Address, dst = Foreign Address. Not connections, skipped and
counted at debug level: LISTEN sockets and sockets with no foreign peer (`0.0.0.0:0`, `*:*`).
Repeated sightings of one socket (proto, both ends, world id, process) across snapshots
become one row: ts = first snapshot seen, duration = last - first seen (0 for one sighting).
conn_state = the TCP state of the first sighting; event_id = stable id of the first sighting's line.
Rows are aggregated over the whole file, then cut into chunks.
"""
from __future__ import annotations

import csv
import ipaddress
import logging
import os
import re
from datetime import datetime, timedelta, timezone
from typing import Iterator, Mapping

import numpy as np
import pandas as pd

from esxi_anomaly import schema
from esxi_anomaly.ingest.base import Quarantine, SourceFormat, stable_event_id
from esxi_anomaly.ingest.syslog_envelope import iter_lines

log = logging.getLogger(__name__)

NAME = "esxcli_connections"
NO_TIME = "esxcli table without a snapshot time; give --snapshot-time or add a '# <ISO time>' line"
_HEADER = re.compile(r"\s*Proto\s+Recv Q\s+Send Q\s+Local Address\s+Foreign Address\s+State\s+World ID\b")
_DASHES = re.compile(r"\s*-{3,}(?:\s+-{3,}){5,}\s*\Z")
_CSV_HEADER = re.compile(r"\s*(?=.*\bLocalAddress\b)(?=.*\bForeignAddress\b)(?=.*\bProto\b)[A-Za-z\",_ ]+\s*\Z")
_COLUMNS = ["proto", "recv_q", "send_q", "local", "foreign", "state", "world_id", "cc_algo", "world_name"]
_CSV_NAMES = {"proto": "proto", "recvq": "recv_q", "sendq": "send_q", "localaddress": "local",
              "foreignaddress": "foreign", "state": "state", "worldid": "world_id", "ccalgo": "cc_algo",
              "worldname": "world_name",
              # added by collectors (PowerCLI, DFIR scripts), not by esxcli
              "time": "time", "timestamp": "time", "datetime": "time", "snapshottime": "time",
              "collectiontime": "time", "collectedat": "time", "host": "host", "hostname": "host",
              "vmhost": "host", "esxihost": "host"}
_NO_PEER = {"0.0.0.0:0", "*:*", ":::0", "[::]:0", "*.*", "*:0"}
_BATCH_ROWS = 100_000     # rows of whole tables checked at once (bounds the raw lines held)

# Ports ESXi serves (threat-notes section 3, "Inbound" column): a socket on one of them whose peer's
# port is not one is an accepted connection. Client-side ports that receive replies (68, 546, 53)
# and ports ESXi only sends to (902/udp heartbeats) are left out.
TCP_SERVICE_PORTS = frozenset({22, 23, 80, 427, 443, 902, 903, 2020, 2222, 2233, 5988, 5989, 8000, 8080, 8100,
                               8182, 8200, 8300, 8889, 9080, *range(5900, 5965)})
UDP_SERVICE_PORTS = frozenset({161, 427, 5001, 6999, 8182, 8301, 8302, 12321, 12345, 23451})

# -- snapshot times ------------------------------------------------------------------------------

_MONTHS = {m: i for i, m in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), start=1)}
_UTC_NAMES = {"UTC", "GMT", "UT", "Z"}
_ISO_TEXT = (r"(?<![\d-])(?P<y>\d{4})-(?P<mo>\d\d)-(?P<d>\d\d)[Tt ](?P<h>\d\d):(?P<mi>\d\d):(?P<s>\d\d)"
             r"(?:[.,](?P<f>\d{1,9}))?(?:\s?(?P<z>[Zz](?![A-Za-z])|(?:UTC|GMT)(?![A-Za-z])|[+-]\d\d(?::?\d\d)?))?"
             r"(?![\d:])")
_ISO = re.compile(_ISO_TEXT)
_ISO_BASIC = re.compile(r"(?<!\d)(?P<y>\d{4})(?P<mo>\d\d)(?P<d>\d\d)T(?P<h>\d\d)(?P<mi>\d\d)(?P<s>\d\d)"
                        r"(?:[.,](?P<f>\d{1,9}))?(?P<z>Z(?![A-Za-z])|[+-]\d\d(?:\d\d)?)?(?!\d)")
_HOST_TOKEN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}"
_BARE_ISO = re.compile(rf"\s*(?:(?P<h1>{_HOST_TOKEN})\s+)?(?P<t>{_ISO_TEXT.replace('?P<', '?P<b')})"
                       rf"(?:\s+(?P<h2>{_HOST_TOKEN}))?\s*\Z")
# `date` (`Thu Mar  7 00:00:22 UTC 2024`) and RFC 2822 / `date -R` (`Thu, 07 Mar 2024 00:00:22 +0000`)
_DATE = re.compile(r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)[a-z]*,? +(?P<mon>[A-Za-z]{3})[a-z]* +(?P<d>\d{1,2}) +"
                   r"(?P<h>\d\d):(?P<mi>\d\d):(?P<s>\d\d) +(?P<z>[A-Za-z]{1,6}|[+-]\d{4}) +(?P<y>\d{4})(?!\d)")
_RFC2822 = re.compile(r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), +(?P<d>\d{1,2}) +(?P<mon>[A-Za-z]{3}) +(?P<y>\d{4}) +"
                      r"(?P<h>\d\d):(?P<mi>\d\d):(?P<s>\d\d) +(?P<z>[A-Za-z]{1,6}|[+-]\d{4})(?![\w])")
# file names: extended or basic ISO date and time, any of - _ . : between parts; only Z or a
# colon offset as zone (a "-0001" after the time is more likely a sequence number)
_NAME_TIME = re.compile(r"(?<!\d)(?P<y>\d{4})(?P<sep>-?)(?P<mo>\d\d)(?P=sep)(?P<d>\d\d)[Tt_.\- ]?"
                        r"(?P<h>\d\d)[:\-_.]?(?P<mi>\d\d)[:\-_.]?(?P<s>\d\d)(?:[.,](?P<f>\d{1,9}))?"
                        r"(?P<z>[Zz](?![a-z])|[+-]\d\d:\d\d)?(?!\d)")


class _BadTime(ValueError):
    """A text shaped like a time that cannot be used (impossible date, ambiguous zone)."""


def _epoch(y, mo, d, h, mi, s, frac=None, zone=None) -> float:
    """Seconds since the epoch; `zone` "", None, Z/UTC/GMT/UT or [+-]hh[[:]mm]. Raises _BadTime."""
    offset = 0
    if zone and zone.upper() not in _UTC_NAMES:
        if zone[0] not in "+-":
            raise _BadTime(f"zone {zone!r} is ambiguous (accepted: UTC, GMT, Z or a numeric offset)")
        digits = zone[1:].replace(":", "")
        offset = (int(digits[:2]) * 60 + int(digits[2:4] or 0)) * (-1 if zone[0] == "-" else 1)
        if abs(offset) > 18 * 60:
            raise _BadTime(f"offset {zone!r} out of range")
    try:
        dt = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), tzinfo=timezone(timedelta(minutes=offset)))
    except ValueError as exc:
        raise _BadTime(f"not a date ({exc})") from None
    return dt.timestamp() + (int(frac[:6].ljust(6, "0")) / 1e6 if frac else 0.0)


def _from_match(m: re.Match, prefix: str = "") -> float:
    g = m.groupdict()
    return _epoch(g[prefix + "y"], g[prefix + "mo"], g[prefix + "d"], g[prefix + "h"], g[prefix + "mi"],
                  g[prefix + "s"], g.get(prefix + "f"), g.get(prefix + "z"))


def _from_date(m: re.Match) -> float:
    month = _MONTHS.get(m.group("mon").lower())
    if month is None:
        raise _BadTime(f"no month {m.group('mon')!r}")
    return _epoch(m.group("y"), month, m.group("d"), m.group("h"), m.group("mi"), m.group("s"), None, m.group("z"))


def parse_time(text: str) -> float:
    """Epoch seconds of a whole text that is an ISO 8601 time (extended or basic), `date` or RFC 2822
    output, or a number of seconds. Raises ValueError naming the problem."""
    text = text.strip()
    try:
        return float(text) if re.fullmatch(r"\d{9,11}(?:\.\d+)?", text) else _parse_whole(text)
    except _BadTime as exc:
        raise ValueError(f"{text[:48]!r}: {exc}") from None


def _parse_whole(text: str) -> float:
    for pattern, convert in ((_ISO, _from_match), (_ISO_BASIC, _from_match), (_DATE, _from_date),
                             (_RFC2822, _from_date)):
        m = pattern.fullmatch(text)
        if m:
            return convert(m)
    raise _BadTime("not an ISO 8601 time, `date` output or epoch seconds")


def snapshot_time_option(text: str) -> float | str:
    """The value of `--snapshot-time`: "mtime", or a time `parse_time` reads. ValueError otherwise."""
    return "mtime" if text.strip().lower() == "mtime" else parse_time(text)


def _stamp(line: str) -> tuple[float, str] | str | None:
    """A time line: (time, host), a str saying why its time cannot be used, or None (not one)."""
    text = line.strip()
    try:
        if text.startswith("#"):
            body = text.lstrip("#")
            for pattern, convert in ((_ISO, _from_match), (_ISO_BASIC, _from_match), (_DATE, _from_date),
                                     (_RFC2822, _from_date)):
                m = pattern.search(body)
                if m:
                    return convert(m), _host_of(body[:m.start()] + " " + body[m.end():])
            return None
        m = _BARE_ISO.match(text)
        if m:
            return _from_match(m, "b"), m.group("h1") or m.group("h2") or ""
        m = _DATE.fullmatch(text) or _RFC2822.fullmatch(text)
        if m:
            return _from_date(m), ""
    except _BadTime as exc:
        return f"esxcli snapshot time {text[:64]!r} not used: {exc}"
    return None


def _host_of(rest: str) -> str:
    """The host named beside a time on a `#` line: `host=NAME`, or the one other token when it looks
    like a host name (has a digit, a dot or a hyphen: "esx02", "esx01.lab"; not a word like "snapshot")."""
    tokens = [t.strip("[](){}\"',;") for t in rest.split()]
    for token in tokens:
        key, sep, value = token.partition("=")
        if sep and key.lower() in ("host", "hostname", "esxi", "esxi_host", "vmhost", "server") and value:
            return value
    tokens = [t for t in tokens if t and not t.endswith((":", "="))]
    if len(tokens) == 1 and re.fullmatch(_HOST_TOKEN, tokens[0]) and re.search(r"[\d.-]", tokens[0]):
        return tokens[0]
    return ""


def _name_time(path: str) -> float | None:
    """The time in a per-snapshot file name, if it holds one (a date with a time of day)."""
    for m in _NAME_TIME.finditer(os.path.basename(path)):
        try:
            return _from_match(m)
        except _BadTime:
            continue
    return None


# -- reading ------------------------------------------------------------------------------------

def sniff(head: bytes) -> bool:
    text = head.decode("utf-8", "replace")
    return any(_HEADER.match(line) or _CSV_HEADER.match(line) for line in text.splitlines()[:500])


def split_endpoint(text: str) -> tuple[str, int]:
    """`ip:port` or `[ipv6]:port` -> (ip, port); the port is after the last colon. ValueError if not."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"bad endpoint {text[:64]!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return ipaddress.ip_address(host).compressed, int(port)
    except ValueError:
        raise ValueError(f"bad address {host[:64]!r}") from None


def _spans(dashes: str) -> list[tuple[int, int]]:
    """Column (start, end) from the dashes line; the last column runs to the end of the line."""
    starts = [m.start() for m in re.finditer(r"-+", dashes)]
    return [(start, starts[i + 1] if i + 1 < len(starts) else 1 << 30) for i, start in enumerate(starts)]


def read(path: str, quarantine: Quarantine, chunk_rows: int,
         options: Mapping | None = None) -> Iterator[pd.DataFrame]:
    """`options`: {"snapshot_time": epoch seconds | "mtime"}, the time of tables that have none."""
    observations = _observations(path, quarantine, _fallback_time(path, options or {}))
    if observations.empty:
        return
    keys = ["proto", "src_ip", "src_port", "dst_ip", "dst_port", "world_id", "process"]
    grouped = observations.groupby(keys, sort=False, dropna=False)
    first = observations.loc[grouped["ts"].idxmin()].reset_index(drop=True)
    last = grouped["ts"].max().reset_index(drop=True)
    first["duration"] = last.to_numpy() - first["ts"].to_numpy()
    first = first.sort_values(["ts", "line"], kind="stable", ignore_index=True)
    prefix = stable_event_id("esxcli", path, 0)[:-1]    # the file's digest, computed once
    first["event_id"] = prefix + first["line"].astype(str)
    first["source"] = NAME
    for start in range(0, len(first), chunk_rows):
        yield schema.conform(first.iloc[start:start + chunk_rows].reset_index(drop=True), "connections")


def _fallback_time(path: str, options: Mapping) -> tuple[float, str]:
    """(time, where it comes from) for tables without a time line; NaN when there is none."""
    named = _name_time(path)
    if named is not None:
        return named, "file name"
    value = options.get("snapshot_time")
    if value == "mtime":
        try:
            return float(os.path.getmtime(path)), "--snapshot-time mtime"
        except OSError:
            return float("nan"), ""
    if value is not None:
        return float(value), "--snapshot-time"
    return float("nan"), ""


class _Table:
    """One snapshot table being read: its time and host, its columns (spans or CSV names)."""

    def __init__(self, index: int, stamp, fallback: tuple[float, str]):
        self.index = index
        if isinstance(stamp, tuple):
            self.ts, self.host, self.reason = stamp[0], stamp[1], ""
        else:   # no time line (None) or an unusable one (its reason)
            self.ts, self.host = fallback[0], ""
            self.reason = "" if fallback[0] == fallback[0] else (f"{stamp}; {NO_TIME}" if stamp else NO_TIME)
        self.spans: list | None = None
        self.csv: list | None = None


def _observations(path: str, quarantine: Quarantine, fallback: tuple[float, str]) -> pd.DataFrame:
    """The sightings of every table, oriented, in line order (checked a batch of tables at a time)."""
    names = ["line", "table", "ts", "host", "reason", "row_time", "row_host", "proto", "local", "foreign",
             "state", "world_id", "world_name", "raw"]
    batch: dict[str, list] = {n: [] for n in names}
    out: list[pd.DataFrame] = []
    skipped: dict[str, int] = {}
    table: _Table | None = None
    stamp = None
    tables = 0
    if fallback[1]:
        log.debug("%s: tables without a time line take the time of the %s", path, fallback[1])

    def flush() -> None:
        if batch["line"]:
            out.append(_check(path, batch, quarantine, skipped))
            for values in batch.values():
                values.clear()

    for line_no, line in iter_lines(path, quarantine):
        stripped = line.strip()
        if not stripped:
            continue
        if table is not None and table.spans is not None and stripped[:3] in ("tcp", "udp"):
            # the common line, a row of a fixed-width table: no other test needed
            values = {name: line[start:end].strip() for name, (start, end) in zip(_COLUMNS, table.spans)}
        else:
            found = _stamp(stripped)
            if found is not None:
                table, stamp = None, found
                continue
            if _HEADER.match(line) or _CSV_HEADER.match(stripped):
                if len(batch["line"]) >= _BATCH_ROWS:   # only between tables: LISTEN rows decide within one
                    flush()
                table = _Table(tables, stamp, fallback)
                tables += 1
                stamp = None
                if _CSV_HEADER.match(stripped):
                    table.csv = [_CSV_NAMES.get(re.sub(r"[\s_\"]", "", c).lower(), "") for c in _csv_fields(stripped)]
                continue
            if table is not None and table.csv is None and table.spans is None and _DASHES.match(line):
                spans = _spans(line)
                table.spans = spans if len(spans) >= len(_COLUMNS) else None
                continue
            if stripped.startswith("#"):
                continue  # other comments
            if table is not None and table.csv is not None:
                values = dict(zip(table.csv, _csv_fields(stripped)))
            elif table is not None and table.spans is not None:
                values = {name: line[start:end].strip() for name, (start, end) in zip(_COLUMNS, table.spans)}
            else:
                quarantine.add(path, line_no, "row outside an esxcli connection table", line)
                continue
        batch["line"].append(line_no)
        batch["table"].append(table.index)
        batch["ts"].append(table.ts)
        batch["host"].append(table.host)
        batch["reason"].append(table.reason)
        batch["row_time"].append(values.get("time", ""))
        batch["row_host"].append(values.get("host", ""))
        for name in ("proto", "local", "foreign", "state", "world_id", "world_name"):
            batch[name].append(values.get(name, ""))
        batch["raw"].append(line)
    flush()
    if skipped:
        log.debug("%s: skipped %s", path, skipped)
    columns = ["line", "ts", "proto", "src_ip", "src_port", "dst_ip", "dst_port", "conn_state", "world_id",
               "process", "esxi_host"]
    out = [frame for frame in out if len(frame)]
    return pd.concat(out, ignore_index=True)[columns] if out else pd.DataFrame(columns=columns)


def _csv_fields(line: str) -> list[str]:
    return [v.strip() for v in next(csv.reader([line]), [])]


class _PerDistinct:
    """`fn` applied once per distinct text of `values` (snapshots repeat the same sockets and
    times); `mask`/`take` give per-row arrays of what it returned."""

    def __init__(self, values: np.ndarray, fn):
        self.codes, uniques = pd.factorize(values, use_na_sentinel=False)
        self.results = [fn(u) for u in uniques]

    def mask(self, test) -> np.ndarray:
        return np.array([bool(test(r)) for r in self.results], dtype=bool)[self.codes]

    def take(self, convert=lambda r: r, dtype=object) -> np.ndarray:
        out = np.empty(len(self.results), dtype=dtype)
        out[:] = [convert(r) for r in self.results]
        return out[self.codes]


def _per_distinct(values: np.ndarray, fn) -> np.ndarray:
    return _PerDistinct(values, fn).take()


def _endpoint(text: str):
    try:
        return split_endpoint(text)
    except ValueError as exc:
        return str(exc)


def _row_time(text: str):
    if not text:
        return None
    try:
        return parse_time(text)
    except ValueError:
        return f"bad snapshot time {text[:48]!r}"


def _check(path: str, batch: dict, quarantine: Quarantine, skipped: dict) -> pd.DataFrame:
    """One batch of whole tables: bad rows quarantined (first reason wins, in line order), LISTEN
    and peerless rows counted, the rest oriented from the client's side."""
    col = {name: np.array(values, dtype=object) for name, values in batch.items()}
    n = len(col["line"])
    reason = np.full(n, "", dtype=object)

    def refuse(mask: np.ndarray, text) -> None:
        mask = mask & (reason == "")
        reason[mask] = text[mask] if isinstance(text, np.ndarray) else text

    # time: the row's own column, else its table's; a table without one is quarantined whole
    row_time = _PerDistinct(col["row_time"], _row_time)
    refuse(row_time.mask(lambda r: isinstance(r, str)), row_time.take(str))
    own = row_time.mask(lambda r: isinstance(r, float))
    ts = np.array(batch["ts"], dtype="float64")
    ts[own] = row_time.take(lambda r: r if isinstance(r, float) else np.nan, "float64")[own]
    untimed = np.isnan(ts)
    refuse(untimed & (col["reason"] != ""), col["reason"])
    refuse(untimed, NO_TIME)
    host = np.where(col["row_host"] != "", col["row_host"], col["host"])

    proto = _per_distinct(col["proto"], lambda v: v.lower().rstrip("6") if v.lower() in
                          ("tcp", "udp", "tcp6", "udp6") else f"bad proto {v[:16]!r}")
    refuse(~np.isin(proto, ("tcp", "udp")), proto)
    local = _PerDistinct(col["local"], _endpoint)
    refuse(local.mask(lambda r: isinstance(r, str)), local.take(str))
    world_id = col["world_id"]
    bad_id = _PerDistinct(world_id, lambda v: f"bad world id {v[:16]!r}" if v and not v.isdigit() else "")
    refuse(bad_id.mask(bool), bad_id.take())
    state = _per_distinct(col["state"], str.upper)
    listen = state == "LISTEN"
    no_peer = ~listen & np.isin(col["foreign"], list(_NO_PEER))
    foreign = _PerDistinct(np.where(listen | no_peer, "0.0.0.0:0", col["foreign"]), _endpoint)
    refuse(foreign.mask(lambda r: isinstance(r, str)), foreign.take(str))
    bad = reason != ""
    for i in np.flatnonzero(bad):
        quarantine.add(path, int(col["line"][i]), reason[i], col["raw"][i])

    ok = ~bad
    for what, mask in (("LISTEN", listen & ok), ("no foreign peer", no_peer & ok)):
        if mask.any():
            skipped[what] = skipped.get(what, 0) + int(mask.sum())
    keep = ok & ~listen & ~no_peer
    if not keep.any():
        return pd.DataFrame()
    ts, host, proto = ts[ok], host[ok], proto[ok]
    # a snapshot: one table, or one time and host within a CSV table that carries its own times
    snap = pd.factorize(pd.MultiIndex.from_arrays([np.array(batch["table"])[ok], ts, host]))[0]
    local_ip, local_port = _split(local, ok)
    foreign_ip, foreign_port = _split(foreign, ok)
    inbound, twin = _direction(snap, proto, local_ip, local_port, foreign_ip, foreign_port, listen[ok])
    conn = keep[ok] & ~twin
    if twin.any():
        what = "server side of a connection to the host itself"
        skipped[what] = skipped.get(what, 0) + int(twin.sum())
    if (inbound & conn).any():
        what = "inbound, reported from the client's side"
        skipped[what] = skipped.get(what, 0) + int((inbound & conn).sum())
    inb = inbound[conn]
    l_ip, l_port, f_ip, f_port = local_ip[conn], local_port[conn], foreign_ip[conn], foreign_port[conn]
    return pd.DataFrame({
        "line": col["line"][ok][conn].astype("int64"), "ts": ts[conn], "proto": proto[conn],
        "src_ip": np.where(inb, f_ip, l_ip), "src_port": np.where(inb, f_port, l_port),
        "dst_ip": np.where(inb, l_ip, f_ip), "dst_port": np.where(inb, l_port, f_port),
        "conn_state": state[ok][conn], "world_id": world_id[ok][conn],
        # the world name is the server end's: not the initiator's program
        "process": np.where(inb, "", col["world_name"][ok][conn]), "esxi_host": host[conn],
    })


def _split(endpoints: _PerDistinct, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ip, port) arrays of the parsed endpoints of `rows`."""
    ips = endpoints.take(lambda r: r[0] if isinstance(r, tuple) else "")
    ports = endpoints.take(lambda r: r[1] if isinstance(r, tuple) else -1, "int64")
    return ips[rows], ports[rows]


def _direction(snap, proto, local_ip, local_port, foreign_ip, foreign_port, listen):
    """(inbound, twin) per sighting of one batch: inbound = accepted on a server port; twin = the
    server socket of a connection whose client socket is in the same snapshot."""
    wildcards = np.array(["0.0.0.0", "::"], dtype=object)
    ip_codes, _ = pd.factorize(np.concatenate([local_ip, foreign_ip, wildcards]))
    n = len(snap)
    l_ip, f_ip = ip_codes[:n], ip_codes[n:2 * n]
    any4, any6 = ip_codes[2 * n], ip_codes[2 * n + 1]
    n_ips = int(ip_codes.max()) + 1
    group = snap.astype("int64") * 2 + (proto == "udp")

    def key(g, ip, port):   # (snapshot, proto, ip, port) as one integer
        return (g * n_ips + ip) * 65536 + port

    listening = key(group[listen], l_ip[listen], local_port[listen])

    def listened(ip, port):   # on that address or on a wildcard one (0.0.0.0, ::)
        return (np.isin(key(group, ip, port), listening) | np.isin(key(group, any4, port), listening)
                | np.isin(key(group, any6, port), listening)) & ~listen

    listen_local, listen_foreign = listened(l_ip, local_port), listened(f_ip, foreign_port)
    tcp, udp = proto == "tcp", proto == "udp"

    def service(port):
        return (tcp & np.isin(port, list(TCP_SERVICE_PORTS))) | (udp & np.isin(port, list(UDP_SERVICE_PORTS)))

    # LISTEN rows are the host's own word; the service ports only decide where they say nothing
    inbound = (listen_local & ~listen_foreign) | (
        ~listen_local & ~listen_foreign & ~listen & service(local_port) & ~service(foreign_port))
    ends, _ = pd.factorize(np.concatenate([l_ip * 65536 + local_port, f_ip * 65536 + foreign_port]))
    local_end, foreign_end = ends[:n].astype("int64"), ends[n:].astype("int64")
    m = int(ends.max()) + 1
    as_seen = (group * m + local_end) * m + foreign_end
    reversed_ = (group * m + foreign_end) * m + local_end
    outbound = ~inbound & ~listen
    twin = inbound & np.isin(reversed_, as_seen[outbound])
    return inbound, twin


FORMATS = [
    SourceFormat(NAME, "connections", sniff, read,
                 "`esxcli network ip connection list` snapshots (table or --formatter=csv), timed by a "
                 "`# <ISO>` or `date` line, a time column or the file name", takes_options=True),
]
