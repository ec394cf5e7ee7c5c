"""BIND 9 query log (category `queries`) -> `dns_answers` rows that say a name was *queried*.

BIND does not log answers. Each query line becomes one row with ``answer=""``,
``answer_index=-1``, ``rtype`` = the query type and ``rcode=""``: context that the client asked
for the name (and when), not evidence of what it resolved to. Use dnstap for answers.

    client @0x7f97e40eb500 192.168.1.90#64727 (ocsp.digicert.com): query: ocsp.digicert.com IN A + (192.168.1.10)

The line may be preceded by a BIND file-channel time (``06-Sep-2021 14:40:13.263``, optionally
followed by ``queries: info:``) or by a syslog header. Times carry no zone and are taken as UTC;
a syslog header without a year gets the year of the file's modification time (see
`bsd_epochs`). Other BIND lines (query-errors, resolver, ...) are skipped and counted.

This module also holds the syslog/BIND time and name helpers shared by the other DNS-server
readers (infoblox, dnsmasq, unbound).
"""
from __future__ import annotations

import logging
import os
import re
import time
from collections import Counter
from typing import Iterator

import numpy as np
import pandas as pd

from esxi_anomaly import schema
from esxi_anomaly.ingest.base import Quarantine, SourceFormat, stable_event_id
from esxi_anomaly.ingest.syslog_envelope import iter_lines

log = logging.getLogger(__name__)

# --- helpers shared by the line-oriented readers of this package ------------------------------
# `iter_lines` (bounded, never-raising line reader) lives in syslog_envelope; re-exported here.

_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), start=1)}

# `<PRI>Mmm dd hh:mm:ss[.fff] [host ...] prog[pid]: msg` (BSD) or `<PRI>[1 ]ISO-TS host prog[pid]: msg`
SYSLOG_BSD = re.compile(
    r"^(?:<\d{1,3}>)?(?P<mon>Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) {1,2}(?P<day>\d{1,2}) "
    r"(?P<time>\d\d:\d\d:\d\d)(?:\.\d+)? (?P<rest>.*)$")
SYSLOG_ISO = re.compile(r"^(?:<\d{1,3}>)?(?:1 )?(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?) (?P<rest>.*)$")
SYSLOG_TAG = re.compile(r"^(?P<hosts>(?:\S+ ){0,3}?)(?P<prog>[A-Za-z][\w./-]*)(?:\[(?P<pid>[^\]\s]{0,32})\])?: (?P<msg>.*)$")


def split_syslog(line: str) -> tuple[str, str, str, str] | None:
    """(time text, host, program, message) of a BSD or RFC 3339 syslog line, else None.

    The time text is ``"Mmm dd hh:mm:ss"`` (BSD, no year) or ISO 8601; see `syslog_epochs`.
    A line written straight to a file by the daemon (``Jun 22 06:03:07 dnsmasq[9187]: ...``)
    has no host: host is "".
    """
    m = SYSLOG_BSD.match(line)
    if m:
        ts = f"{m['mon']} {m['day']} {m['time']}"
    else:
        m = SYSLOG_ISO.match(line)
        if not m:
            return None
        ts = m["ts"]
    tag = SYSLOG_TAG.match(m["rest"])
    if not tag:
        return None
    hosts = tag["hosts"].split()
    return ts, (hosts[-1] if hosts else ""), tag["prog"], tag["msg"]


def file_reference_time(path: str) -> float:
    """When the file was last written: the latest a year-less syslog time can be."""
    try:
        return os.stat(path).st_mtime
    except OSError:
        return time.time()


def bsd_epochs(texts: list[str], reference: float) -> np.ndarray:
    """Epoch seconds of BSD ``Mmm dd hh:mm:ss`` times (UTC), NaN where unparsable.

    The year is the reference's; a month later than the reference month belongs to the year
    before (a January file holding December lines).
    """
    ref = time.gmtime(reference)
    out = []
    for t in texts:
        mon = _MONTHS.get(t[:3], 0)
        year = ref.tm_year if mon <= ref.tm_mon else ref.tm_year - 1
        out.append(f"{year} {t}")
    return _epochs(pd.to_datetime(pd.Series(out, dtype="str"), format="%Y %b %d %H:%M:%S", errors="coerce", utc=True))


def iso_epochs(texts: list[str]) -> np.ndarray:
    """Epoch seconds of ISO 8601 times (no zone = UTC), NaN where unparsable."""
    return _epochs(pd.to_datetime(pd.Series(texts, dtype="str"), format="ISO8601", errors="coerce", utc=True))


def syslog_epochs(texts: list[str], reference: float) -> np.ndarray:
    """Epoch seconds of a mix of BSD (year-less) and ISO 8601 time texts; "" -> NaN."""
    out = np.full(len(texts), np.nan)
    bsd = [i for i, t in enumerate(texts) if t[:3] in _MONTHS]
    iso = [i for i, t in enumerate(texts) if t and t[:1].isdigit()]
    if bsd:
        out[bsd] = bsd_epochs([texts[i] for i in bsd], reference)
    if iso:
        out[iso] = iso_epochs([texts[i] for i in iso])
    return out


def bind_epochs(texts: list[str]) -> np.ndarray:
    """Epoch seconds of BIND ``dd-Mon-yyyy hh:mm:ss.mmm`` times (UTC), NaN where unparsable."""
    s = pd.Series(texts, dtype="str").str.replace(r"^(\S+ \d\d:\d\d:\d\d)$", r"\1.0", regex=True)
    return _epochs(pd.to_datetime(s, format="%d-%b-%Y %H:%M:%S.%f", errors="coerce", utc=True))


def tagged_epochs(times: list[str], reference: float) -> np.ndarray:
    """Epochs of time texts tagged "B" (BIND time) or "S" (syslog header time); "" -> NaN."""
    ts = np.full(len(times), np.nan)
    bind_idx = [i for i, t in enumerate(times) if t.startswith("B")]
    sys_idx = [i for i, t in enumerate(times) if t.startswith("S")]
    if bind_idx:
        ts[bind_idx] = bind_epochs([times[i][1:] for i in bind_idx])
    if sys_idx:
        ts[sys_idx] = syslog_epochs([times[i][1:] for i in sys_idx], reference)
    return ts


def _epochs(dt: pd.Series) -> np.ndarray:
    return (dt - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy(dtype="float64", na_value=np.nan)


def normalise_name(name: str) -> str:
    """DNS names as Zeek logs them: lower case, no trailing dot (the root stays ".")."""
    name = name.strip().lower()
    return name[:-1] if len(name) > 1 and name.endswith(".") else name


def dns_frame(rows: dict[str, list]) -> pd.DataFrame:
    return schema.conform(pd.DataFrame(rows), "dns_answers")


def new_rows() -> dict[str, list]:
    return {c: [] for c in ("event_id", "ts", "client_ip", "resolver_ip", "query", "rtype", "answer",
                            "answer_index", "ttl", "rcode", "source")}


# --- the BIND query log -----------------------------------------------------------------------

SOURCE = "bind_query"
BIND_TIME = re.compile(r"(?P<bts>\d{2}-(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)-\d{4} \d\d:\d\d:\d\d(?:\.\d+)?) ")
QUERY_LINE = re.compile(
    r"client (?:@0x[0-9a-fA-F]+ )?(?P<client>[0-9A-Fa-f:.]+)#\d+(?: \([^)]*\))?: (?:view [^:]*: )?"
    r"query: (?P<qname>\S+) (?P<qclass>[A-Z0-9]+) (?P<qtype>[A-Z0-9]+) [-+]\S* \((?P<server>[0-9A-Fa-f:.]+)\)\s*$")
_QUERY_HINT = re.compile(r"\bclient\b.*\bquery: ")
RESPONSE_HINT = re.compile(r"\bquery: \S+ \S+ \S+ response: ")


def _has_log_prefix(line: str) -> bool:
    return bool(BIND_TIME.match(line) or SYSLOG_BSD.match(line) or SYSLOG_ISO.match(line) or line.startswith("client "))


def sniff(head: bytes) -> bool:
    """A BIND query log: query lines, and no Infoblox-style `response:` lines (that is infoblox)."""
    text = head.decode("utf-8", "replace")
    lines = text.splitlines()[:200]
    if any(RESPONSE_HINT.search(l) for l in lines):
        return False
    return any(QUERY_LINE.search(l) for l in lines)


def read(path: str, quarantine: Quarantine, chunk_rows: int) -> Iterator[pd.DataFrame]:
    reference = file_reference_time(path)
    skipped: Counter = Counter()
    rows = new_rows()
    times: list[str] = []
    for lineno, line in iter_lines(path, quarantine):
        if not line.strip():
            continue
        m = QUERY_LINE.search(line)
        if not m:
            if RESPONSE_HINT.search(line):
                skipped["infoblox_response"] += 1  # a valid line of another format
            elif _QUERY_HINT.search(line):
                quarantine.add(path, lineno, "malformed BIND query line", line)
            elif _has_log_prefix(line):
                skipped["other"] += 1
            else:
                quarantine.add(path, lineno, "not a BIND log line", line)
            continue
        bt = BIND_TIME.search(line, 0, m.start())
        if bt:
            times.append("B" + bt["bts"])
        else:
            env = split_syslog(line)
            times.append("S" + env[0] if env else "")
        rows["event_id"].append(stable_event_id(SOURCE, path, lineno))
        rows["client_ip"].append(m["client"])
        rows["resolver_ip"].append(m["server"])
        rows["query"].append(normalise_name(m["qname"]))
        rows["rtype"].append(m["qtype"])
        if len(rows["event_id"]) >= chunk_rows:
            yield _finish(rows, times, reference)
            rows, times = new_rows(), []
    if rows["event_id"]:
        yield _finish(rows, times, reference)
    if skipped:
        log.info("%s: skipped %s non-query lines", path, dict(skipped))


def _finish(rows: dict[str, list], times: list[str], reference: float) -> pd.DataFrame:
    n = len(rows["event_id"])
    rows.update(ts=tagged_epochs(times, reference), answer=[""] * n, answer_index=[-1] * n, ttl=[np.nan] * n, rcode=[""] * n,
                source=[SOURCE] * n)
    return dns_frame(rows)


FORMATS = [SourceFormat(SOURCE, "dns_answers", sniff, read,
                        "BIND 9 query log: one row per query, no answers (answer='', rtype=qtype)")]
