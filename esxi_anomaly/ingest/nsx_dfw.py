"""NSX distributed firewall packet logs (`dfwpktlogs.log`) -> connections.

Body grammar (formats.md (b)), NSX-V 6.x, NSX-T 3.x and NSX 4.x:

    [<ts>] [<vif-hash> | <numeric id> | <edge ids>] INET|INET6 <reason> [<action>] <rule> IN|OUT
        [<pkt-len>] <proto> [<close-reason>] <src>[/<sport>]-><dst>[/<dport>] [<flags>] [<extra>]

Lines come raw (on-disk file) or inside a syslog envelope (ESXi RFC 3164 / RFC 5424 / ESXi 8
`No(13) FIREWALL-PKTLOG[pid]:`), stripped by `syslog_envelope.parse_envelope`. A syslog line of
another program (hostd, vmkernel, ... in a mixed collector file) is not a DFW record: it is
skipped and counted at debug level, not quarantined.

Orientation: src -> dst are kept exactly as logged (the first packet of the session, so src is
the initiator). `IN`/`OUT` is relative to the VM's vNIC: OUT = the VM sent it (src is the VM), IN
= the packet enters the VM (src is the remote peer); src/dst are never swapped. A flow between two
VMs on one host is logged twice (OUT at the sender, IN at the receiver) and gives two rows.
The canonical frame has no direction column, so IN/OUT itself is not carried.

conn_state = the action (PASS, DROP, REJECT, ...). Packet lines carry one packet's length, not
the session's totals, so bytes/packets stay NaN. A `TERM` (session end) line carrying counts
`<pkts in>/<pkts out> <bytes in>/<bytes out>` ("in" = towards the vNIC) completes the open PASS
row of the same (host, dir, proto, src, dst) in the same chunk: duration and counts are filled,
oriented src->dst (for OUT: out counts are *_out; for IN: in counts are *_out). A TERM without
its start row becomes its own row with conn_state `TERM` and ts = the end time.

Time: the body's own ISO timestamp, else the envelope's; BSD envelope timestamps get their year
from the file's modification time. A record with no usable time is quarantined.
esxi_host = the syslog HOSTNAME when the envelope has one, else "".
"""
from __future__ import annotations

import ipaddress
import logging
import os
import re
import time
from typing import Iterator

import numpy as np
import pandas as pd

from esxi_anomaly import schema
from esxi_anomaly.ingest.base import Quarantine, SourceFormat, stable_event_id
from esxi_anomaly.ingest.syslog_envelope import iter_lines, parse_envelope, parse_rfc3339

log = logging.getLogger(__name__)

NAME = "nsx_dfw"
# Syslog program names that carry DFW packet logs (NSX-V, NSX-T grok, ESXi 8 KB, NSX Edge).
DFW_PROGRAMS = frozenset({"dfwpktlogs", "FIREWALL-PKTLOG", "FIREWALL_PKTLOG", "NSX", "nsx-firewall"})
ACTIONS = ("PASS", "DROP", "REJECT", "NAT", "NONAT", "RDR", "NORDR", "PUNT", "REDIRECT", "COPY")
_ADDR = r"[0-9A-Fa-f:.]{2,64}(?:/\d{1,5})?"
_BODY = re.compile(
    r"(?:(?P<ts>\d{4}-\d\d-\d\dT\S{1,40}) )?"
    r"(?:(?P<ident>[0-9A-Fa-f]{1,16}|<[^<>]{0,128}>) )?"
    r"(?P<af>INET6?) (?P<reason>[A-Za-z][A-Za-z-]{0,31}) "
    r"(?:(?P<action>" + "|".join(ACTIONS) + r") )?"
    r"(?P<rule>\S{1,128}) (?P<dir>IN|OUT) "
    r"(?:(?P<len>\d{1,6}) )?"
    r"(?P<proto>PROTO \d{1,3}|[A-Za-z][A-Za-z0-9-]{0,15}) "
    r"(?:(?P<close>[A-Z_]{2,16}) )?"
    r"(?P<src>" + _ADDR + r")->(?P<dst>" + _ADDR + r")"
    r"(?: (?P<extra>.{0,4096}))?\Z",
    re.S,
)
_TERM_COUNTS = re.compile(r"(\d{1,19})/(\d{1,19}) (\d{1,19})/(\d{1,19})(?:\s|\Z)")
_PROTO_NUMBERS = {1: "icmp", 2: "igmp", 6: "tcp", 17: "udp", 47: "gre", 50: "esp", 58: "icmp", 132: "sctp"}
_PROTO_NAMES = {"ipv6-icmp": "icmp", "icmpv6": "icmp", "icmp6": "icmp"}
_COLUMNS = ["event_id", "ts", "src_ip", "src_port", "dst_ip", "dst_port", "proto", "duration",
            "bytes_out", "bytes_in", "packets_out", "packets_in", "conn_state", "esxi_host"]


class _BadRecord(ValueError):
    pass


def parse_body(body: str) -> dict | None:
    """The fields of one DFW body (no syslog envelope), or None if it is not one.

    Raises _BadRecord when the layout matches but a value is invalid (address, port).
    """
    m = _BODY.match(body)
    if not m:
        return None
    src_ip, src_port = _split_address(m.group("src"))
    dst_ip, dst_port = _split_address(m.group("dst"))
    proto = m.group("proto")
    if proto.startswith("PROTO "):
        number = int(proto[6:])
        proto = _PROTO_NUMBERS.get(number, str(number))
    else:
        proto = _PROTO_NAMES.get(proto.lower(), proto.lower())
    counts = None
    if m.group("reason") == "TERM" and m.group("extra"):
        c = _TERM_COUNTS.match(m.group("extra"))
        if c:
            counts = tuple(float(x) for x in c.groups())  # pkts in, pkts out, bytes in, bytes out
    return {
        "ts": m.group("ts"), "reason": m.group("reason"), "action": m.group("action") or "",
        "dir": m.group("dir"), "proto": proto, "src_ip": src_ip, "src_port": src_port,
        "dst_ip": dst_ip, "dst_port": dst_port, "counts": counts,
    }


_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_CANONICAL_V4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}\Z")   # exactly what ip_address keeps as is


def _split_address(text: str) -> tuple[str, int]:
    """`ip[/port]` (split on the last `/`), IPv6 normalised to the compressed form."""
    ip, sep, port = text.rpartition("/")
    if not sep:
        ip, port = text, ""
    if not _CANONICAL_V4.match(ip):   # a canonical dotted quad is its own compressed form
        try:
            ip = ipaddress.ip_address(ip).compressed
        except ValueError:
            raise _BadRecord(f"bad address {ip[:64]!r}") from None
    number = -1
    if port:
        number = int(port)
        if number > 65535:
            raise _BadRecord(f"port {number} out of range")
    return ip, number


def sniff(head: bytes) -> bool:
    """True when one of the first lines is a DFW packet-log record (raw or in syslog)."""
    if b"INET" not in head or b"->" not in head:
        return False
    text = head.decode("utf-8", "replace")
    lines = text.splitlines()[:200]
    if len(head) >= 64 * 1024 and len(lines) > 1:
        lines = lines[:-1]  # the last line of a cut head may be partial
    for line in lines:
        kind, _fields, _env = _classify(line, None)
        if kind == "dfw":
            return True
    return False


def _classify(line: str, default_year: int | None):
    """('dfw', fields, envelope) | ('other', None, envelope) | ('bad', reason, None) | ('blank', ...)."""
    if not line.strip():
        return "blank", None, None
    env = parse_envelope(line, default_year=default_year)
    body = env.message if env is not None else line
    try:
        fields = parse_body(body)
    except _BadRecord as exc:
        return "bad", str(exc), None
    if fields is not None:
        return "dfw", fields, env
    if env is not None and env.program not in DFW_PROGRAMS:
        return "other", None, env
    return "bad", "not a DFW packet-log line", None


def read(path: str, quarantine: Quarantine, chunk_rows: int) -> Iterator[pd.DataFrame]:
    try:
        default_year = time.gmtime(os.path.getmtime(path)).tm_year
    except OSError:
        default_year = None
    rows: list[list] = []
    open_sessions: dict[tuple, int] = {}
    skipped = 0
    event_prefix = stable_event_id("nsx", path, 0)[:-1]   # "nsx-<digest>-": hashed once per file
    for line_no, line in iter_lines(path, quarantine):
        kind, fields, env = _classify(line, default_year)
        if kind == "blank":
            continue
        if kind == "other":
            skipped += 1
            continue
        if kind == "bad":
            quarantine.add(path, line_no, fields, line)
            continue
        ts = parse_rfc3339(fields["ts"]) if fields["ts"] else (env.ts if env is not None else None)
        if ts is None:
            quarantine.add(path, line_no, "no usable timestamp", line)
            continue
        host = env.host if env is not None else ""
        key = (host, fields["dir"], fields["proto"], fields["src_ip"], fields["src_port"],
               fields["dst_ip"], fields["dst_port"])
        if fields["reason"] == "TERM":
            _close_session(rows, open_sessions, key, fields, ts, event_prefix, line_no, host)
        else:
            if fields["action"] == "PASS":
                open_sessions[key] = len(rows)
            rows.append([f"{event_prefix}{line_no}", ts, fields["src_ip"], fields["src_port"],
                         fields["dst_ip"], fields["dst_port"], fields["proto"], np.nan, np.nan, np.nan,
                         np.nan, np.nan, fields["action"] or fields["reason"], host])
        if len(rows) >= chunk_rows:
            yield _frame(rows)
            rows, open_sessions = [], {}
    if skipped:
        log.debug("%s: %d syslog lines of other programs skipped", path, skipped)
    if rows:
        yield _frame(rows)


def _close_session(rows, open_sessions, key, fields, ts, event_prefix, line_no, host) -> None:
    counts = fields["counts"]
    if counts is not None:
        pkts_in, pkts_out, bytes_in, bytes_out = counts
        if fields["dir"] == "IN":  # "in" = towards the vNIC = src -> dst for an IN line
            pkts_in, pkts_out, bytes_in, bytes_out = pkts_out, pkts_in, bytes_out, bytes_in
    else:
        pkts_in = pkts_out = bytes_in = bytes_out = np.nan
    start = open_sessions.pop(key, None)
    if start is not None and ts >= rows[start][1]:
        row = rows[start]
        row[7] = ts - row[1]
        row[8], row[9], row[10], row[11] = bytes_out, bytes_in, pkts_out, pkts_in
        return
    rows.append([f"{event_prefix}{line_no}", ts, fields["src_ip"], fields["src_port"],
                 fields["dst_ip"], fields["dst_port"], fields["proto"], np.nan, bytes_out, bytes_in,
                 pkts_out, pkts_in, "TERM", host])


def _frame(rows: list[list]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=_COLUMNS)
    df["source"] = NAME
    return schema.conform(df, "connections")


FORMATS = [
    SourceFormat(NAME, "connections", sniff, read,
                 "NSX-V/NSX-T/NSX 4 distributed firewall packet logs (dfwpktlogs), raw or in syslog"),
]
