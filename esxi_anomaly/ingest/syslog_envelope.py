"""Strip the syslog envelope that ESXi `vmsyslogd` (or a collector) puts around a log message.

One public function, `parse_envelope(line) -> Envelope | None`, for the header families of
formats.md (a) "Forwarded (remote syslog) formats":

* RFC 5424: `<PRI>1 TIMESTAMP HOST APP PROCID MSGID SD MSG` (ESXi 8, vCenter, NSX Edge);
* RFC 3164 as ESXi sends it: optional `<PRI>` (collectors often strip it), an RFC 3339
  timestamp, host, `App[pid]:` or `App:`, body. On ESXi 8 a strict RFC 5424 SD element may be
  prepended to the body (audit records: `[shell.cmd@6876 subject="root" ...]`): it is moved to
  `structured_data`. `[Originator@6876 sub=...]` (unquoted values) is body text and stays in
  `message`;
* classic BSD RFC 3164 (`<PRI>Mmm dd hh:mm:ss host tag: body`); the year is absent, so `ts`
  is None unless `default_year` is given. A relay that prepends its own BSD header to an ESXi
  line (`Jan 1 12:34:56 10.1.2.3 2023-01-02T12:34:56.789Z esxi01 Hostd: ...`) is unwrapped:
  the inner ESXi header wins;
* ESXi 8 on-disk files (`TS Sev(PRI) Prog[pid]: body`, e.g. `No(13) FIREWALL-PKTLOG[1069031]:`),
  which have no host: `host` is "".

ESXi 6.7/7 on-disk lines (`TS info hostd[tid] [...]`) have no envelope: they return None, as does
anything else that is not a syslog line. The function never raises on any input string.

`iter_lines(path, quarantine)` is the bounded, never-raising line reader the text parsers share.
"""
from __future__ import annotations

import lzma
import re
import zipfile
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterator

from esxi_anomaly.ingest.base import IngestError, Quarantine, open_text

__all__ = ["Envelope", "parse_envelope", "parse_rfc3339", "iter_lines", "MAX_LINE_CHARS"]

MAX_LINE_CHARS = 64 * 1024  # a longer "line" is quarantined in pieces, never held whole


@dataclass(frozen=True)
class Envelope:
    """A syslog header taken apart. Missing parts are "" (text) or None/-1.

    ts: seconds since the epoch, UTC; None when absent or unparseable (KB placeholders,
        BSD timestamps without `default_year`).
    host: HOSTNAME ("" when the line has none, as in ESXi 8 on-disk files).
    program: APP-NAME / tag as written (`Hostd`, `vmkernel`, `FIREWALL-PKTLOG`).
    pid: PROCID / the `[...]` after the tag ("" when absent or `-`).
    message: the body, leading spaces and a UTF-8 BOM removed.
    structured_data: RFC 5424 SD elements verbatim (`[id k="v"]...`), "" when none.
    pri: the PRI value (facility*8 + severity), -1 when the line carries none.
    """

    ts: float | None
    host: str
    program: str
    pid: str
    message: str
    structured_data: str
    pri: int = -1


# Timestamps are matched loosely (any token shaped like a date) and parsed strictly, so that
# headers with placeholder dates (vendor KB copies) still split correctly with ts=None.
_TS_TOKEN = r"\d{4}-[^\sT]*T\S*"
_PRI = r"<(?P<pri>\d{1,3})>"
_TAG = r"(?P<prog>[^\s\[\]:]{1,128})(?:\[(?P<pid>[^\]\s]{0,64})\])?:"

_RFC5424 = re.compile(
    _PRI + r"1 (?P<ts>\S+) (?P<host>\S+) (?P<prog>\S+) (?P<pid>\S+) (?P<msgid>\S+) (?P<rest>.*)\Z",
    re.S,
)
_RFC3164_ISO = re.compile(
    r"(?:" + _PRI + r" ?)?(?P<ts>" + _TS_TOKEN + r") (?P<host>\S+) " + _TAG + r"(?: (?P<msg>.*))?\Z",
    re.S,
)
_ESXI8_DISK = re.compile(
    r"(?P<ts>" + _TS_TOKEN + r") [A-Z][a-z]\((?P<pri>\d{1,3})\)\+? " + _TAG + r"(?: (?P<msg>.*))?\Z",
    re.S,
)
_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), start=1)}
_BSD = re.compile(
    r"(?:" + _PRI + r" ?)?(?P<mon>[A-Z][a-z]{2}) {1,2}(?P<day>\d{1,2}) (?P<time>\d\d:\d\d:\d\d) "
    r"(?P<host>\S+) (?P<rest>.*)\Z",
    re.S,
)
_BSD_TAG = re.compile(_TAG + r"(?: (?P<msg>.*))?\Z", re.S)
_RFC3339 = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(Z|z|[+-]\d\d:?\d\d)?\Z"
)
# One strict RFC 5424 SD element: [SD-ID *(SP PARAM="VALUE")], VALUE escapes \" \\ \].
_SD_ELEMENT = re.compile(r'\[[^\s\]="]{1,64}(?: [^\s\]="]{1,64}="(?:[^"\\]|\\.)*")*\]', re.S)
_MAX_LINE = 1 << 20  # longer input is not a syslog line (ESXi caps messages at 16 KiB)


def parse_rfc3339(text: str) -> float | None:
    """Seconds since the epoch for an RFC 3339 / ISO 8601 timestamp; None if it is not one.

    A timestamp without a zone is taken as UTC (ESXi writes UTC). Sub-microsecond digits are cut.
    """
    m = _RFC3339.match(text)
    if not m:
        return None
    year, month, day, hour, minute, second, frac, zone = m.groups()
    try:
        dt = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second),
                      tzinfo=timezone.utc)
    except ValueError:
        return None
    seconds = dt.timestamp()
    if frac:
        seconds += int(frac[:6].ljust(6, "0")) / 1e6
    if zone and zone not in ("Z", "z"):
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        seconds -= sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
    return seconds


def parse_envelope(line: str, default_year: int | None = None) -> Envelope | None:
    """Split a syslog line into header fields and body; None if `line` has no syslog envelope.

    `default_year` resolves year-less BSD timestamps (`Mar 11 23:51:31`) as UTC in that year.
    """
    if not isinstance(line, str) or len(line) > _MAX_LINE:
        return None
    line = line.rstrip("\r\n")
    if line.startswith("\ufeff"):
        line = line[1:]
    m = _RFC5424.match(line)
    if m:
        return _from_rfc5424(m)
    m = _ESXI8_DISK.match(line) or _RFC3164_ISO.match(line)
    if m:
        host = m.groupdict().get("host") or ""
        sd, msg = _split_leading_sd(m.group("msg") or "")
        return Envelope(parse_rfc3339(m.group("ts")), host, m.group("prog"), m.group("pid") or "",
                        msg, sd, _pri(m.group("pri")))
    m = _BSD.match(line)
    if m:
        return _from_bsd(m, default_year)
    return None


def _from_rfc5424(m: re.Match) -> Envelope | None:
    rest = m.group("rest")
    if rest.startswith("-"):
        sd, msg = "", rest[1:]
    else:
        sd, msg = _split_leading_sd(rest)
        if not sd:
            return None  # SD must be "-" or at least one element
    ts = None if m.group("ts") == "-" else parse_rfc3339(m.group("ts"))
    return Envelope(ts, _nil(m.group("host")), _nil(m.group("prog")), _nil(m.group("pid")),
                    _body(msg), sd, _pri(m.group("pri")))


def _from_bsd(m: re.Match, default_year: int | None) -> Envelope | None:
    rest = m.group("rest")
    pri = _pri(m.group("pri"))
    inner = _RFC3164_ISO.match(rest)
    if inner and not inner.group("pri"):  # relay header around an ESXi line
        sd, msg = _split_leading_sd(inner.group("msg") or "")
        return Envelope(parse_rfc3339(inner.group("ts")), inner.group("host"), inner.group("prog"),
                        inner.group("pid") or "", msg, sd, pri)
    tag = _BSD_TAG.match(rest)
    if not tag:
        return None
    ts = None
    month = _MONTHS.get(m.group("mon"))
    if default_year is not None and month is not None:
        ts = parse_rfc3339(f"{default_year:04d}-{month:02d}-{int(m.group('day')):02d}T{m.group('time')}Z")
    sd, msg = _split_leading_sd(tag.group("msg") or "")
    return Envelope(ts, m.group("host"), tag.group("prog"), tag.group("pid") or "", msg, sd, pri)


def _split_leading_sd(text: str) -> tuple[str, str]:
    """(structured data, rest) when `text` opens with strict RFC 5424 SD elements."""
    text = text.lstrip(" ")
    end = 0
    while True:
        m = _SD_ELEMENT.match(text, end)
        if not m:
            break
        end = m.end()
    if end == 0:
        return "", _body(text)
    return text[:end], _body(text[end:])


def _body(text: str) -> str:
    text = text.lstrip(" ")
    return text[1:] if text.startswith("\ufeff") else text


def _nil(value: str) -> str:
    return "" if value == "-" else value


def _pri(value: str | None) -> int:
    if value is None:
        return -1
    number = int(value)
    return number if number <= 191 else -1


def iter_lines(path: str, quarantine: Quarantine, max_chars: int = MAX_LINE_CHARS) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its end-of-line) for each line of a (compressed) text file.

    Over-long lines go to the quarantine (first `max_chars` kept as raw) and are skipped without
    being held in memory; a truncated or corrupt compressed stream is quarantined at the line
    where it broke and ends the file. Never raises for bad content.
    """
    try:
        fh = open_text(path)
    except (OSError, EOFError, IngestError, lzma.LZMAError, zipfile.BadZipFile, zlib.error) as exc:
        quarantine.add(path, 0, f"cannot open: {exc}")
        return
    line_no = 0
    with fh:
        try:
            while True:
                piece = fh.readline(max_chars + 1)
                if not piece:
                    return
                line_no += 1
                if len(piece) > max_chars and not piece.endswith(("\n", "\r")):
                    quarantine.add(path, line_no, f"line longer than {max_chars} characters", piece)
                    while piece and not piece.endswith(("\n", "\r")):
                        piece = fh.readline(max_chars + 1)
                    continue
                yield line_no, piece.rstrip("\r\n")
        except (OSError, EOFError, lzma.LZMAError, zipfile.BadZipFile, zlib.error) as exc:
            quarantine.add(path, line_no + 1, f"truncated or corrupt stream: {exc}")
