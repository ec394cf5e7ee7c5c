"""`esxcli network ip connection list` snapshots -> connections (the ESXi host's own sockets).

Input: one or more snapshots appended to one file, each the command's table output
(formats.md (d)): a header line `Proto  Recv Q  Send Q  Local Address  Foreign Address  State
World ID  CC Algo  World Name`, a dashes line giving the column spans, then rows. Columns are cut
at the dash spans (State and CC Algo are blank for UDP, so splitting on spaces would shift them).
The `--formatter=csv` output (header `...,ForeignAddress,LocalAddress,Proto,...,WorldName,`) is
read too.

Snapshot time: the command prints none, so collection scripts must write it before each table.
Accepted, on their own line before a table:
  * `# <ISO 8601 time> [<esxi host>]`, e.g. `# 2024-05-01T10:00:00Z esx01.lab` (time without a
    zone is UTC; the optional host fills esxi_host);
  * the output of ESXi `date` (`Wed May  1 10:00:00 UTC 2024`; only UTC/GMT is accepted).
A table with no time line before it gets the file's modification time (logged at debug level).

Rows: src = Local Address, dst = Foreign Address (the host's side first). Not connections, skipped
and counted at debug level (not quarantined): LISTEN sockets, sockets with no foreign peer
(`0.0.0.0:0`, `*:*`: unconnected UDP), and accepted inbound sockets, i.e. whose local port is
LISTENed on (same address or wildcard) in the same snapshot: their foreign side is the client, so
reporting local->foreign would invent an outbound connection to an ephemeral port.
Repeated sightings of one socket (proto, local, foreign, world id, world name) across snapshots
become one row: ts = first snapshot seen, duration = last - first seen (0 for one sighting).
conn_state = the TCP state of the first sighting; process = World Name; event_id = stable id of
the first sighting's line. Rows are aggregated over the whole file, then cut into chunks.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections import Counter
from typing import Iterator

import pandas as pd

from esxi_anomaly import schema
from esxi_anomaly.ingest.base import Quarantine, SourceFormat, stable_event_id
from esxi_anomaly.ingest.syslog_envelope import iter_lines, parse_rfc3339

log = logging.getLogger(__name__)

NAME = "esxcli_connections"
_HEADER = re.compile(r"\s*Proto\s+Recv Q\s+Send Q\s+Local Address\s+Foreign Address\s+State\s+World ID\b")
_DASHES = re.compile(r"\s*-{3,}(?:\s+-{3,}){5,}\s*\Z")
_CSV_HEADER = re.compile(r"\s*(?=.*\bLocalAddress\b)(?=.*\bForeignAddress\b)(?=.*\bProto\b)[A-Za-z,]+\s*\Z")
_TIME_COMMENT = re.compile(r"#\s*(?P<ts>\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?)"
                           r"(?:\s+(?P<host>[A-Za-z0-9._:-]{1,253}))?\s*\Z")
_DATE_OUTPUT = re.compile(r"[A-Z][a-z]{2} (?P<mon>[A-Z][a-z]{2}) +(?P<day>\d{1,2}) (?P<time>\d\d:\d\d:\d\d) "
                          r"(?:UTC|GMT) (?P<year>\d{4})\s*\Z")
_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), start=1)}
_COLUMNS = ["proto", "recv_q", "send_q", "local", "foreign", "state", "world_id", "cc_algo", "world_name"]
_CSV_NAMES = {"Proto": "proto", "RecvQ": "recv_q", "SendQ": "send_q", "LocalAddress": "local",
              "ForeignAddress": "foreign", "State": "state", "WorldID": "world_id", "CCAlgo": "cc_algo",
              "WorldName": "world_name"}
_NO_PEER = {"0.0.0.0:0", "*:*", ":::0", "[::]:0", "*.*"}


class _BadRecord(ValueError):
    pass


def sniff(head: bytes) -> bool:
    text = head.decode("utf-8", "replace")
    return any(_HEADER.match(line) or _CSV_HEADER.match(line) for line in text.splitlines()[:500])


def split_endpoint(text: str) -> tuple[str, int]:
    """`ip:port` or `[ipv6]:port` -> (ip, port); the port is after the last colon."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise _BadRecord(f"bad endpoint {text[:64]!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return ipaddress.ip_address(host).compressed, int(port)
    except ValueError:
        raise _BadRecord(f"bad address {host[:64]!r}") from None


def _snapshot_time(line: str) -> tuple[float, str] | None:
    m = _TIME_COMMENT.match(line)
    if m:
        ts = parse_rfc3339(m.group("ts"))
        return (ts, m.group("host") or "") if ts is not None else None
    m = _DATE_OUTPUT.match(line)
    if m and m.group("mon") in _MONTHS:
        ts = parse_rfc3339(f"{m.group('year')}-{_MONTHS[m.group('mon')]:02d}-{int(m.group('day')):02d}"
                           f"T{m.group('time')}Z")
        return (ts, "") if ts is not None else None
    return None


def _spans(dashes: str) -> list[tuple[int, int]]:
    """Column (start, end) from the dashes line; the last column runs to the end of the line."""
    spans = [(m.start(), m.end()) for m in re.finditer(r"-+", dashes)]
    starts = [s for s, _ in spans]
    return [(start, starts[i + 1] if i + 1 < len(starts) else 1 << 30) for i, start in enumerate(starts)]


def read(path: str, quarantine: Quarantine, chunk_rows: int) -> Iterator[pd.DataFrame]:
    observations = _observations(path, quarantine)
    if observations.empty:
        return
    keys = ["proto", "src_ip", "src_port", "dst_ip", "dst_port", "world_id", "process"]
    grouped = observations.groupby(keys, sort=False, dropna=False)
    first = observations.loc[grouped["ts"].idxmin()].reset_index(drop=True)
    last = grouped["ts"].max().reset_index(drop=True)
    first["duration"] = last.to_numpy() - first["ts"].to_numpy()
    first = first.sort_values(["ts", "line"], kind="stable", ignore_index=True)
    first["source"] = NAME
    for start in range(0, len(first), chunk_rows):
        yield schema.conform(first.iloc[start:start + chunk_rows].reset_index(drop=True), "connections")


def _observations(path: str, quarantine: Quarantine) -> pd.DataFrame:
    try:
        file_time = float(os.path.getmtime(path))
    except OSError:
        file_time = float("nan")
    rows: list[dict] = []
    skipped: Counter = Counter()
    snapshot_ts, snapshot_host, pending_time = None, "", None
    spans = csv_columns = None
    table: list[tuple[int, dict]] = []

    def close_table() -> None:
        _emit(path, table, rows, skipped, quarantine)
        table.clear()

    for line_no, line in iter_lines(path, quarantine):
        stripped = line.strip()
        if snapshot_ts is not None and snapshot_ts != snapshot_ts:  # NaN: no file time either
            snapshot_ts = None
        if not stripped:
            continue
        stamp = _snapshot_time(stripped)
        if stamp is not None:
            close_table()
            spans = csv_columns = None
            pending_time = stamp
            continue
        if _HEADER.match(line) or _CSV_HEADER.match(stripped):
            close_table()
            if pending_time is None:
                log.debug("%s:%d: snapshot without a time line, using the file time", path, line_no)
            snapshot_ts, snapshot_host = pending_time or (file_time, "")
            pending_time = None
            spans = None
            csv_columns = ([_CSV_NAMES.get(c.strip(), "") for c in stripped.split(",")]
                           if _CSV_HEADER.match(stripped) else None)
            continue
        if _DASHES.match(line) and csv_columns is None and snapshot_ts is not None:
            spans = _spans(line)
            continue
        if stripped.startswith("#"):
            continue  # other comments
        if csv_columns is not None:
            values = dict(zip(csv_columns, (v.strip() for v in stripped.split(","))))
        elif spans is not None and len(spans) >= len(_COLUMNS) and snapshot_ts is not None:
            values = {name: line[start:end].strip() for name, (start, end) in zip(_COLUMNS, spans)}
        else:
            quarantine.add(path, line_no, "row outside an esxcli connection table", line)
            continue
        if snapshot_ts is None:
            quarantine.add(path, line_no, "row without a snapshot time", line)
            continue
        values["ts"], values["esxi_host"], values["raw"] = snapshot_ts, snapshot_host, line
        table.append((line_no, values))
    close_table()
    if skipped:
        log.debug("%s: skipped %s", path, dict(skipped))
    columns = ["line", "event_id", "ts", "proto", "src_ip", "src_port", "dst_ip", "dst_port",
               "conn_state", "world_id", "process", "esxi_host"]
    return pd.DataFrame(rows, columns=columns)


def _emit(path, table, rows, skipped, quarantine) -> None:
    """Turn one snapshot's rows into observations (needs the whole table for LISTEN ports)."""
    parsed = []
    listening: set[tuple[str, str, int]] = set()
    for line_no, values in table:
        try:
            proto = values.get("proto", "").lower()
            if proto not in ("tcp", "udp", "tcp6", "udp6"):
                raise _BadRecord(f"bad proto {values.get('proto', '')[:16]!r}")
            local_ip, local_port = split_endpoint(values.get("local", ""))
            state = values.get("state", "").upper()
            world_id = values.get("world_id", "")
            if world_id and not world_id.isdigit():
                raise _BadRecord(f"bad world id {world_id[:16]!r}")
        except _BadRecord as exc:
            quarantine.add(path, line_no, str(exc), values["raw"])
            continue
        proto = proto.rstrip("6")
        if state == "LISTEN":
            listening.add((proto, local_ip, local_port))
            skipped["LISTEN"] += 1
            continue
        foreign = values.get("foreign", "")
        if foreign in _NO_PEER:
            skipped["no foreign peer"] += 1
            continue
        try:
            foreign_ip, foreign_port = split_endpoint(foreign)
        except _BadRecord as exc:
            quarantine.add(path, line_no, str(exc), values["raw"])
            continue
        parsed.append((line_no, values, proto, local_ip, local_port, foreign_ip, foreign_port, state, world_id))
    wildcard = {"0.0.0.0", "::"}
    for line_no, values, proto, local_ip, local_port, foreign_ip, foreign_port, state, world_id in parsed:
        if proto == "tcp" and ((proto, local_ip, local_port) in listening
                               or any((proto, w, local_port) in listening for w in wildcard)):
            skipped["inbound (accepted on a listening port)"] += 1
            continue
        rows.append({
            "line": line_no, "event_id": stable_event_id("esxcli", path, line_no), "ts": values["ts"],
            "proto": proto, "src_ip": local_ip, "src_port": local_port, "dst_ip": foreign_ip,
            "dst_port": foreign_port, "conn_state": state, "world_id": world_id,
            "process": values.get("world_name", ""), "esxi_host": values["esxi_host"],
        })


FORMATS = [
    SourceFormat(NAME, "connections", sniff, read,
                 "`esxcli network ip connection list` snapshots (table or --formatter=csv), timed by `# <ISO>` lines"),
]
