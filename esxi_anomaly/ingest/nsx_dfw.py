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
row of the same (host, dir, proto, src, dst) in the same block of lines (below): duration and
counts are filled, oriented src->dst (for OUT: out counts are *_out; for IN: in counts are
*_out). A TERM without its start row becomes its own row with conn_state `TERM` and ts = the end
time.

Time: the body's own ISO timestamp, else the envelope's; BSD envelope timestamps get their year
from the file's modification time. A record with no usable time is quarantined.
esxi_host = the syslog HOSTNAME when the envelope has one, else "".

Speed: lines are taken in blocks. One regex pass over the block (`findall`) takes apart every
printable-ASCII line of the common shapes (raw, RFC 5424 with `-` SD, ESXi 8 on-disk, RFC 3164
with an ISO time), and times, addresses, protocols and TERM counts are converted column-wise.
Every other line (other envelopes, non-ASCII text, odd values, anything bad) takes the per-line
path, which decides exactly as before; tests check both paths give the same rows and quarantine.
A TERM line completes a PASS row of the same block (`_BLOCK_LINES` lines, whatever the chunk size:
the rows do not depend on it).
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
import pyarrow as pa
import pyarrow.compute as pc

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
    proto = _proto_name(m.group("proto"))
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


def _proto_name(text: str) -> str:
    """`PROTO 6` -> tcp, `IPV6-ICMP` -> icmp, `TCP` -> tcp."""
    if text.startswith("PROTO "):
        number = int(text[6:])
        return _PROTO_NUMBERS.get(number, str(number))
    return _PROTO_NAMES.get(text.lower(), text.lower())


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
    event_prefix = stable_event_id("nsx", path, 0)[:-1]   # "nsx-<digest>-": hashed once per file
    block_lines = _BLOCK_LINES   # not the chunk size: the rows must not depend on it (`_chunks` cuts the frames)
    # the line reader's own records (over-long lines) wait for their block, to keep line order
    line_quarantine = Quarantine(max_records=block_lines + 2)
    block = _Block(path, default_year, event_prefix)
    numbers: list[int] = []
    lines: list[str] = []
    for line_no, line in iter_lines(path, line_quarantine):
        numbers.append(line_no)
        lines.append(line)
        if len(lines) >= block_lines:
            yield from _chunks(block.rows(numbers, lines, _take(line_quarantine), quarantine), chunk_rows)
            numbers, lines = [], []
    yield from _chunks(block.rows(numbers, lines, _take(line_quarantine), quarantine), chunk_rows)
    if block.skipped:
        log.debug("%s: %d syslog lines of other programs skipped", path, block.skipped)


_BLOCK_LINES = 250_000
_FAST_PIECE = 50_000
_ROW_COLUMNS = ["line", "ts", "src_ip", "src_port", "dst_ip", "dst_port", "proto", "host", "dir", "reason",
                "action", "pkts_in", "pkts_out", "bytes_in", "bytes_out"]
_ROW_DTYPES = {"line": np.int64, "ts": np.float64, "src_port": np.int64, "dst_port": np.int64, "pkts_in": np.float64,
               "pkts_out": np.float64, "bytes_in": np.float64, "bytes_out": np.float64}

# The common shapes of the per-line path (`_classify`), in printable ASCII only (there \S = [!-~] and
# \d = [0-9] for sure): a line this matches is taken apart exactly as `_classify` would take it.
_TS_TOKEN_ASCII = r"[0-9]{4}-[!-SU-~]*T[!-~]*"
_TAG_ASCII = r"[!-9;-Z\\^-~]{1,128}(?:\[[!-\\^-~]{0,64}\])?:"
_FAST = (
    r"^(?:"
    r"<[0-9]{1,3}>1 (?P<ets1>[!-~]+) (?P<host1>[!-~]+) [!-~]+ [!-~]+ [!-~]+ - *"          # RFC 5424, SD "-"
    r"|(?P<ets2>" + _TS_TOKEN_ASCII + r") [A-Z][a-z]\([0-9]{1,3}\)\+? " + _TAG_ASCII + r" +"  # ESXi 8 on disk
    r"|(?:<[0-9]{1,3}> ?)?(?P<ets3>" + _TS_TOKEN_ASCII + r") (?P<host3>[!-~]+) " + _TAG_ASCII + r" +"  # RFC 3164
    r")?"
    r"(?:(?P<bts>[0-9]{4}-[0-9][0-9]-[0-9][0-9]T[!-~]{1,40}) )?"
    r"(?:(?:[0-9A-Fa-f]{1,16}|<[ -;=?-~]{0,128}>) )?"
    r"INET6? (?P<reason>[A-Za-z][A-Za-z-]{0,31}) "
    r"(?:(?P<action>" + "|".join(ACTIONS) + r") )?"
    r"[!-~]{1,128} (?P<dir>IN|OUT) "
    r"(?:[0-9]{1,6} )?"
    r"(?P<proto>PROTO [0-9]{1,3}|[A-Za-z][A-Za-z0-9-]{0,15}) "
    r"(?:[A-Z_]{2,16} )?"
    r"(?P<sip>[0-9A-Fa-f:.]{2,64})(?:/(?P<sport>[0-9]{1,5}))?->"
    r"(?P<dip>[0-9A-Fa-f:.]{2,64})(?:/(?P<dport>[0-9]{1,5}))?"
    r"(?: (?P<extra>[ -~]*))?$"
)
_FAST_LINES = re.compile(_FAST, re.M)   # per line or over a whole block: lines hold no newline
_FAST_TS = (r"^(?P<y>[0-9]{4})-(?P<mo>[0-9]{2})-(?P<d>[0-9]{2})T(?P<h>[0-9]{2}):(?P<mi>[0-9]{2}):(?P<s>[0-9]{2})"
            r"(?:\.(?P<frac>[0-9]{1,9}))?(?P<zone>Z|z|[+-][0-9]{2}:?[0-9]{2})?$")
_FAST_COUNTS = r"^(?P<a>[0-9]{1,19})/(?P<b>[0-9]{1,19}) (?P<c>[0-9]{1,19})/(?P<d>[0-9]{1,19})(?: |$)"
_MAX_EXTRA = 4096
_MAX_CACHED_ADDRESSES = 1_000_000


def _take(q: Quarantine) -> list:
    records, q.records, q.counts = q.records, [], {}
    return records


def _chunks(frame: pd.DataFrame | None, chunk_rows: int) -> Iterator[pd.DataFrame]:
    if frame is None or not len(frame):
        return
    for start in range(0, len(frame), chunk_rows):
        yield frame.iloc[start:start + chunk_rows].reset_index(drop=True)


class _Block:
    """Turns a block of lines into connection rows: the column-wise fast path, then `_classify`
    for the lines it left, then TERM lines completing their sessions."""

    def __init__(self, path: str, default_year: int | None, event_prefix: str):
        self.path, self.default_year, self.event_prefix = path, default_year, event_prefix
        self.skipped = 0
        self._addresses: dict[str, str | None] = {}

    def rows(self, numbers: list[int], lines: list[str], line_records: list, quarantine: Quarantine):
        bad: list[tuple[int, str, str]] = [(r.line, r.reason, r.raw) for r in line_records]
        block = None
        if lines:
            fast, taken = self._fast(lines)
            slow = np.ones(len(lines), dtype=bool)
            slow[taken] = False
            fast["line"] = np.asarray(numbers, dtype=np.int64)[taken]
            rest = self._slow(numbers, lines, np.flatnonzero(slow), bad)
            order = np.argsort(np.concatenate([fast["line"], rest["line"]]), kind="stable")
            block = {name: np.concatenate([fast[name], rest[name]])[order] for name in _ROW_COLUMNS}
        for line, reason, raw in sorted(bad, key=lambda b: b[0]):   # in line order, as read
            quarantine.add(self.path, line, reason, raw)
        if block is None or not len(block["line"]):
            return None
        return _frame(_merge_sessions(block), self.event_prefix)

    # -- the fast path ------------------------------------------------------------------------

    def _fast(self, lines: list[str]) -> tuple[dict, np.ndarray]:
        """Rows of the lines the fast regex takes apart with plain values, and their positions."""
        if len(lines) > _FAST_PIECE:   # the regex's tuples hold a Python string per field: go piecewise
            pieces = [(self._fast(lines[i:i + _FAST_PIECE]), i) for i in range(0, len(lines), _FAST_PIECE)]
            return ({name: np.concatenate([rows[name] for (rows, _), _ in pieces]) for name in pieces[0][0][0]},
                    np.concatenate([taken + start for (_, taken), start in pieces]))
        found = _FAST_LINES.findall("\n".join(lines))   # one match per line when every line fits
        if len(found) == len(lines):
            taken = np.arange(len(lines))
        else:
            matches = [_FAST_LINES.match(line) for line in lines]
            taken = np.array([i for i, m in enumerate(matches) if m], dtype=np.int64)
            found = [m.groups("") for m in matches if m]   # "" for an absent group, as findall gives
        if not len(taken):
            return _no_rows(), taken
        col = dict(zip(_FAST_LINES.groupindex, np.array(found, dtype=object).T))
        # time: the body's own, else the envelope's ("-" = none)
        ets = np.where(col["ets1"] != "", col["ets1"], np.where(col["ets2"] != "", col["ets2"], col["ets3"]))
        ts, ok = _epoch_seconds(np.where(col["bts"] != "", col["bts"], ets))
        host = np.where(col["host1"] == "-", "", col["host1"])
        host = np.where(host != "", host, col["host3"])
        src_ip, src_ok = self._normalise(col["sip"])
        dst_ip, dst_ok = self._normalise(col["dip"])
        src_port, dst_port = _port(col["sport"]), _port(col["dport"])
        ok &= src_ok & dst_ok & (src_port <= 65535) & (dst_port <= 65535)
        extra = pa.array(col["extra"], pa.string())
        ok &= pc.less_equal(pc.utf8_length(extra), _MAX_EXTRA).to_numpy(zero_copy_only=False)
        counts = _term_counts(extra, col["reason"] == "TERM")
        codes, protos = pd.factorize(col["proto"])
        proto = np.array([_proto_name(p) for p in protos], dtype=object)[codes]
        host, direction, reason, action = (_shared(values) for values in (host, col["dir"], col["reason"], col["action"]))
        rows = {"ts": ts, "src_ip": src_ip, "src_port": src_port, "dst_ip": dst_ip, "dst_port": dst_port,
                "proto": proto, "host": host, "dir": direction, "reason": reason, "action": action,
                "pkts_in": counts[:, 0], "pkts_out": counts[:, 1], "bytes_in": counts[:, 2], "bytes_out": counts[:, 3]}
        return {name: values[ok] for name, values in rows.items()}, taken[ok]

    def _normalise(self, ips: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`_split_address`'s address, per distinct value; ok=False where it would refuse it."""
        codes, uniques = pd.factorize(ips)
        out = np.empty(len(uniques), dtype=object)
        if len(self._addresses) > _MAX_CACHED_ADDRESSES:
            self._addresses.clear()
        for i, ip in enumerate(uniques):
            if ip not in self._addresses:
                try:
                    self._addresses[ip] = _split_address(ip)[0]
                except _BadRecord:
                    self._addresses[ip] = None
            out[i] = self._addresses[ip]
        ok = np.array([v is not None for v in out], dtype=bool)
        return out[codes], ok[codes]

    # -- the per-line path --------------------------------------------------------------------

    def _slow(self, numbers, lines, positions, bad) -> dict:
        out = []
        for i in positions:
            line_no, line = numbers[i], lines[i]
            kind, fields, env = _classify(line, self.default_year)
            if kind == "blank":
                continue
            if kind == "other":
                self.skipped += 1
                continue
            if kind == "bad":
                bad.append((line_no, fields, line))
                continue
            ts = parse_rfc3339(fields["ts"]) if fields["ts"] else (env.ts if env is not None else None)
            if ts is None:
                bad.append((line_no, "no usable timestamp", line))
                continue
            counts = fields["counts"] or (np.nan,) * 4   # pkts in, pkts out, bytes in, bytes out
            out.append((line_no, ts, fields["src_ip"], fields["src_port"], fields["dst_ip"], fields["dst_port"],
                        fields["proto"], env.host if env is not None else "", fields["dir"], fields["reason"],
                        fields["action"], *counts))
        if not out:
            return _no_rows(with_line=True)
        return {name: np.array(values, dtype=_ROW_DTYPES.get(name, object))
                for name, values in zip(_ROW_COLUMNS, zip(*out))}


def _shared(values: np.ndarray) -> np.ndarray:
    """The same values, one string object per distinct value (a block holds few hosts or actions)."""
    codes, uniques = pd.factorize(values)
    return np.asarray(uniques, dtype=object)[codes]


def _no_rows(with_line: bool = False) -> dict:
    return {name: np.empty(0, dtype=_ROW_DTYPES.get(name, object))
            for name in _ROW_COLUMNS if with_line or name != "line"}


def _epoch_seconds(text: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`parse_rfc3339` column-wise, with the same float operations; ok=False where it would not
    parse (the per-line path then decides)."""
    parts = pc.extract_regex(pa.array(text, pa.string()), _FAST_TS)
    ok = parts.is_valid().to_numpy(zero_copy_only=False)
    parts = pc.if_else(ok, parts, pa.scalar({"y": "1970", "mo": "01", "d": "01", "h": "00", "mi": "00", "s": "00",
                                             "frac": "", "zone": ""}, parts.type))
    y, mo, d, h, mi, sec = (pc.cast(parts.field(name), pa.int64()).to_numpy()
                            for name in ("y", "mo", "d", "h", "mi", "s"))
    month = np.clip((y - 1970) * 12 + (mo - 1), -24000, 120000)
    first = np.datetime64("1970-01", "M") + month.astype("timedelta64[M]")
    first_day = first.astype("datetime64[D]")
    days_in_month = ((first + 1).astype("datetime64[D]") - first_day).astype(np.int64)
    ok &= (y >= 1) & (mo >= 1) & (mo <= 12) & (d >= 1) & (d <= days_in_month) & (h <= 23) & (mi <= 59) & (sec <= 59)
    days = (first_day - np.datetime64("1970-01-01", "D")).astype(np.int64) + d - 1
    seconds = (days * 86400 + h * 3600 + mi * 60 + sec).astype(np.float64)
    frac = parts.field("frac")
    micros = pc.cast(pc.utf8_slice_codeunits(pc.utf8_rpad(frac, 6, "0"), 0, 6), pa.int64()).to_numpy()
    seconds = np.where(pc.not_equal(frac, "").to_numpy(zero_copy_only=False), seconds + micros / 1e6, seconds)
    zone = parts.field("zone")
    offset = pc.and_(pc.not_equal(zone, ""), pc.invert(pc.is_in(zone, pa.array(["Z", "z"])))).to_numpy(
        zero_copy_only=False)
    if offset.any():
        digits = pc.if_else(offset, pc.replace_substring(zone, ":", ""), "+0000")
        hours = pc.cast(pc.utf8_slice_codeunits(digits, 1, 3), pa.int64()).to_numpy()
        minutes = pc.cast(pc.utf8_slice_codeunits(digits, 3, 5), pa.int64()).to_numpy()
        sign = np.where(pc.starts_with(zone, "-").to_numpy(zero_copy_only=False), -1, 1)
        seconds = np.where(offset, seconds - sign * (hours * 3600 + minutes * 60), seconds)
    return np.where(ok, seconds, np.nan), ok


def _port(text: np.ndarray) -> np.ndarray:
    """A port column; -1 where the address had none."""
    ports = pa.array(text, pa.string())
    return pc.cast(pc.if_else(pc.equal(ports, ""), "-1", ports), pa.int64()).to_numpy()


def _term_counts(extra: pa.Array, is_term: np.ndarray) -> np.ndarray:
    """(pkts in, pkts out, bytes in, bytes out) of TERM lines whose extra text opens with them; NaN else."""
    out = np.full((len(extra), 4), np.nan)
    rows = np.flatnonzero(is_term & pc.not_equal(extra, "").to_numpy(zero_copy_only=False))
    if len(rows):
        parts = pc.extract_regex(extra.take(pa.array(rows)), _FAST_COUNTS)
        valid = parts.is_valid().to_numpy(zero_copy_only=False)
        parts = parts.filter(parts.is_valid())
        for j, name in enumerate(("a", "b", "c", "d")):
            out[rows[valid], j] = pc.cast(parts.field(name), pa.float64()).to_numpy(zero_copy_only=False)
    return out


def _merge_sessions(block: dict) -> dict:
    """A TERM line completes the last PASS row before it of the same (host, dir, proto, src, dst)
    when no other TERM of that key came between and it is not earlier than that row; otherwise it
    stays a row of its own (conn_state TERM). Counts are oriented src -> dst ("in" = towards the vNIC)."""
    is_term = block["reason"] == "TERM"
    is_pass = (block["action"] == "PASS") & ~is_term
    block["conn_state"] = np.where(is_term, "TERM", np.where(block["action"] != "", block["action"], block["reason"]))
    is_in = block["dir"] == "IN"
    counts = {"packets_out": np.where(is_in, block["pkts_in"], block["pkts_out"]),
              "packets_in": np.where(is_in, block["pkts_out"], block["pkts_in"]),
              "bytes_out": np.where(is_in, block["bytes_in"], block["bytes_out"]),
              "bytes_in": np.where(is_in, block["bytes_out"], block["bytes_in"])}
    for name, values in counts.items():   # only TERM lines carry counts
        block[name] = np.where(is_term, values, np.nan)
    block["duration"] = np.full(len(is_term), np.nan)
    keep = np.ones(len(is_term), dtype=bool)
    if not is_term.any():
        return block
    # candidates first by the port pair (cheap integers), then the string parts of the key
    pair = block["src_port"] * 65537 + block["dst_port"]
    events = np.flatnonzero((is_pass | is_term) & np.isin(pair, pair[is_term]))
    if len(events) > 1:
        key = np.zeros(len(events), dtype=np.int64)
        for name in ("host", "dir", "proto", "src_ip", "src_port", "dst_ip", "dst_port"):
            codes, uniques = pd.factorize(block[name][events])
            key = pd.factorize(key * len(uniques) + codes)[0]
        order = np.lexsort((events, key))
        prev, term = events[order[:-1]], events[order[1:]]
        ts = block["ts"]
        closes = (key[order[:-1]] == key[order[1:]]) & is_term[term] & is_pass[prev] & (ts[term] >= ts[prev])
        prev, term = prev[closes], term[closes]
        block["duration"][prev] = ts[term] - ts[prev]
        for name in counts:
            block[name][prev] = block[name][term]
        keep[term] = False
    return {name: values[keep] for name, values in block.items()}


def _frame(block: dict, event_prefix: str) -> pd.DataFrame:
    df = pd.DataFrame({
        "event_id": event_prefix + block["line"].astype(str).astype(object), "ts": block["ts"],
        "src_ip": block["src_ip"], "src_port": block["src_port"], "dst_ip": block["dst_ip"],
        "dst_port": block["dst_port"], "proto": block["proto"], "duration": block["duration"],
        "bytes_out": block["bytes_out"], "bytes_in": block["bytes_in"], "packets_out": block["packets_out"],
        "packets_in": block["packets_in"], "conn_state": block["conn_state"], "esxi_host": block["host"],
        "source": NAME,
    })
    return schema.conform(df, "connections")


FORMATS = [
    SourceFormat(NAME, "connections", sniff, read,
                 "NSX-V/NSX-T/NSX 4 distributed firewall packet logs (dfwpktlogs), raw or in syslog"),
]
