"""Infoblox NIOS `named` response log ("capture DNS responses") -> `dns_answers`, one row per RR.

    <30>Mar 11 23:51:31 infoblox.localdomain named[17742]: 07-Apr-2022 08:08:10.043 client 192.168.0.1#57398 UDP: query: a1.foo.com IN A response: NOERROR +ED a1.foo.com 28800 IN A 192.168.0.2; a1.foo.com 28800 IN A 192.168.0.3;

Every RR of the response is kept with its type and TTL (CNAME chains included); a response
without RRs (NXDOMAIN, REFUSED, NODATA) keeps one row with ``answer=""``. The time is the BIND
time inside the message (UTC assumed), else the syslog header. `resolver_ip` is the syslog host
when that is an IP address. The same file carries other `named` lines (queries, query errors,
RPZ, zone transfers, DNSSEC): they are valid lines of another kind, skipped and counted (logged
at INFO), not quarantined. A response line that does not parse, and an RR that does not, are.
"""
from __future__ import annotations

import ipaddress
import logging
import re
from collections import Counter
from typing import Iterator

import numpy as np
import pandas as pd

from esxi_anomaly.ingest.base import Quarantine, SourceFormat, stable_event_id
from esxi_anomaly.ingest.bind_query import (
    BIND_TIME, QUERY_LINE, RESPONSE_HINT, SYSLOG_BSD, SYSLOG_ISO, dns_frame, file_reference_time,
    iter_lines, new_rows, normalise_name, split_syslog, tagged_epochs,
)

log = logging.getLogger(__name__)

SOURCE = "infoblox_nios"
RESPONSE_LINE = re.compile(
    r"client (?:@0x[0-9a-fA-F]+ )?(?P<client>[0-9A-Fa-f:.]+)#\d+:? (?:view [^:]*: )?(?:UDP|TCP): "
    r"query: (?P<qname>\S+) (?P<qclass>[A-Z0-9]+) (?P<qtype>[A-Z0-9]+) response: "
    r"(?P<rcode>[A-Z][A-Z0-9]*) (?P<flags>[-+][A-Z]*)(?: (?P<rrs>.*))?$")
RR = re.compile(r"^(?P<owner>\S+) (?P<ttl>\d{1,10}) (?P<cls>[A-Z][A-Z0-9]*) (?P<rtype>[A-Z][A-Z0-9]*) (?P<rdata>.*)$")
NAME_TYPES = {"CNAME", "PTR", "NS", "DNAME"}

_SKIP_KINDS = [
    ("query", QUERY_LINE),
    ("query_error", re.compile(r"query failed \(|query-errors:")),
    ("rpz", re.compile(r"\brpz\b|RPZ-|CEF:", re.IGNORECASE)),
    ("zone_transfer", re.compile(r"transfer of |[AI]XFR|notify")),
]


def split_rrs(text: str) -> list[str]:
    """RRs separated by `;`, ignoring `;` inside double-quoted TXT strings."""
    parts, buf, quoted, escaped = [], [], False, False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ";" and not quoted:
            parts.append("".join(buf).strip())
            buf = []
            continue
        buf.append(ch)
    parts.append("".join(buf).strip())
    return [p for p in parts if p]


def sniff(head: bytes) -> bool:
    lines = head.decode("utf-8", "replace").splitlines()[:500]
    return any(RESPONSE_LINE.search(l) for l in lines)


def _skip_kind(line: str) -> str | None:
    if not (SYSLOG_BSD.match(line) or SYSLOG_ISO.match(line) or BIND_TIME.match(line)):
        return None
    for kind, pattern in _SKIP_KINDS:
        if pattern.search(line):
            return kind
    return "other"


def _resolver(line: str) -> str:
    env = split_syslog(line)
    if env and env[1]:
        try:
            return str(ipaddress.ip_address(env[1]))
        except ValueError:
            return ""
    return ""


def read(path: str, quarantine: Quarantine, chunk_rows: int) -> Iterator[pd.DataFrame]:
    reference = file_reference_time(path)
    skipped: Counter = Counter()
    rows = new_rows()
    times: list[str] = []
    for lineno, line in iter_lines(path, quarantine):
        if not line.strip():
            continue
        m = RESPONSE_LINE.search(line)
        if not m:
            if RESPONSE_HINT.search(line):
                quarantine.add(path, lineno, "malformed Infoblox response line", line)
                continue
            kind = _skip_kind(line)
            if kind is None:
                quarantine.add(path, lineno, "not a syslog or BIND log line", line)
            else:
                skipped[kind] += 1
            continue
        bt = BIND_TIME.search(line, 0, m.start())
        if bt:
            time_text = "B" + bt["bts"]
        else:
            env = split_syslog(line)
            time_text = "S" + env[0] if env else ""
        event_id = stable_event_id(SOURCE, path, lineno)
        common = (event_id, m["client"], _resolver(line), normalise_name(m["qname"]), m["rcode"])
        answers = []
        for i, rr_text in enumerate(split_rrs(m["rrs"] or "")):
            if rr_text == "-":
                continue
            rr = RR.match(rr_text)
            if not rr:
                quarantine.add(path, lineno, f"malformed resource record #{i + 1} in response", rr_text)
                continue
            rdata = rr["rdata"].strip()
            answers.append((rr["rtype"], normalise_name(rdata) if rr["rtype"] in NAME_TYPES else rdata,
                            float(rr["ttl"])))
        if not answers:
            answers = [("", "", np.nan)]
            indices = [-1]
        else:
            indices = list(range(len(answers)))
        for (rtype, answer, ttl), index in zip(answers, indices):
            _append(rows, common, rtype, answer, index, ttl)
            times.append(time_text)
        if len(rows["event_id"]) >= chunk_rows:
            yield _finish(rows, times, reference)
            rows, times = new_rows(), []
    if rows["event_id"]:
        yield _finish(rows, times, reference)
    if skipped:
        log.info("%s: skipped %d lines that are not responses: %s", path, sum(skipped.values()), dict(sorted(skipped.items())))


def _append(rows, common, rtype, answer, index, ttl) -> None:
    event_id, client, resolver, query, rcode = common
    rows["event_id"].append(event_id)
    rows["client_ip"].append(client)
    rows["resolver_ip"].append(resolver)
    rows["query"].append(query)
    rows["rcode"].append(rcode)
    rows["rtype"].append(rtype)
    rows["answer"].append(answer)
    rows["answer_index"].append(index)
    rows["ttl"].append(ttl)


def _finish(rows: dict[str, list], times: list[str], reference: float) -> pd.DataFrame:
    rows["ts"] = tagged_epochs(times, reference)
    rows["source"] = [SOURCE] * len(rows["event_id"])
    return dns_frame(rows)


FORMATS = [SourceFormat(SOURCE, "dns_answers", sniff, read,
                        "Infoblox NIOS named response log: one row per answer RR, with type and TTL")]
