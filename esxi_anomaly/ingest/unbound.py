"""Unbound `log-replies` lines -> `dns_answers`: one no-answer row per reply, rcode only.

    [96463:8] reply: 127.0.0.1 tvchaosuk.com. AAAA IN NOERROR 0.012482 0 90
    [1791387199] unbound[46658:0] reply: 127.0.0.1 a.home.test. A IN NOERROR 0.000000 1 56

Unbound logs no RDATA, so every reply becomes ``answer=""``, ``answer_index=-1``, ``rtype=""``
with the client, the name and the rcode: it says the client resolved the name (NXDOMAIN matters)
but not to what. The tag is ``reply:`` with `log-tag-queryreply`, else ``info:``. Time: the
``[epoch]`` prefix of a log file, else the syslog header (year-less BSD times take the file's
year), else unknown (NaN): the bare ``[pid:thread]`` form carries no time. Query lines and other
info lines are skipped and counted.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from typing import Iterator

import numpy as np
import pandas as pd

from esxi_anomaly.ingest.base import Quarantine, SourceFormat, stable_event_id
from esxi_anomaly.ingest.bind_query import (
    dns_frame, file_reference_time, iter_lines, new_rows, normalise_name, split_syslog, syslog_epochs,
)

log = logging.getLogger(__name__)

SOURCE = "unbound"
BODY = re.compile(r"(?:^|\s)(?:unbound(?:\[\d+:\w+\])?:?|\[\d+:\w+\]) (?P<tag>info|reply|query): (?P<rest>.*)$")
EPOCH = re.compile(r"^\[(?P<epoch>\d{1,12})\] ")
ASCII_TIME = re.compile(r"^(?P<bsd>(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) [ \d]\d \d\d:\d\d:\d\d) ")
REPLY = re.compile(
    r"^(?P<client>\S+) (?P<qname>\S+) (?P<qtype>[A-Za-z0-9]+) (?P<qclass>[A-Za-z0-9]+) (?P<rcode>[A-Z][A-Z0-9]*) "
    r"\d+\.\d+ [01] \d+(?:\s|$)")
FORMERR = re.compile(r"^(?P<client>\S+) - - - (?P<rcode>[A-Z][A-Z0-9]*) - - -")
QUERY = re.compile(r"^\S+ \S+ [A-Za-z0-9]+ [A-Za-z0-9]+\s*$")


def sniff(head: bytes) -> bool:
    for line in head.decode("utf-8", "replace").splitlines()[:500]:
        body = BODY.search(line)
        if body and (REPLY.match(body["rest"]) or (body["tag"] == "query" and QUERY.match(body["rest"]))):
            return True
    return False


def _client(text: str) -> str:
    return re.split(r"[@#]", text, maxsplit=1)[0]


def _time_text(line: str) -> str:
    m = EPOCH.match(line)
    if m:
        return "E" + m["epoch"]
    env = split_syslog(line)
    if env:
        return "S" + env[0]
    m = ASCII_TIME.match(line)
    return "S" + m["bsd"] if m else ""


def read(path: str, quarantine: Quarantine, chunk_rows: int) -> Iterator[pd.DataFrame]:
    reference = file_reference_time(path)
    skipped: Counter = Counter()
    rows = new_rows()
    times: list[str] = []
    for lineno, line in iter_lines(path, quarantine):
        if not line.strip():
            continue
        body = BODY.search(line)
        if not body:
            if split_syslog(line) or EPOCH.match(line):
                skipped["not unbound"] += 1
            else:
                quarantine.add(path, lineno, "not an Unbound log line", line)
            continue
        rest = body["rest"]
        m = REPLY.match(rest) or FORMERR.match(rest)
        if not m:
            if body["tag"] == "reply":
                quarantine.add(path, lineno, "malformed Unbound reply line", line)
            else:
                skipped["query" if QUERY.match(rest) else "info"] += 1
            continue
        qname = m.groupdict().get("qname")
        rows["event_id"].append(stable_event_id(SOURCE, path, lineno))
        rows["client_ip"].append(_client(m["client"]))
        rows["query"].append(normalise_name(qname) if qname else "")
        rows["rcode"].append(m["rcode"])
        times.append(_time_text(line))
        if len(rows["event_id"]) >= chunk_rows:
            yield _finish(rows, times, reference)
            rows, times = new_rows(), []
    if rows["event_id"]:
        yield _finish(rows, times, reference)
    if skipped:
        log.info("%s: skipped %d lines that are not replies: %s", path, sum(skipped.values()), dict(sorted(skipped.items())))


def _finish(rows: dict[str, list], times: list[str], reference: float) -> pd.DataFrame:
    n = len(rows["event_id"])
    ts = syslog_epochs([t[1:] if t.startswith("S") else "" for t in times], reference)
    epoch = np.array([float(t[1:]) if t.startswith("E") else np.nan for t in times])
    rows.update(ts=np.where(np.isnan(epoch), ts, epoch), resolver_ip=[""] * n, rtype=[""] * n, answer=[""] * n,
                answer_index=[-1] * n, ttl=[np.nan] * n, source=[SOURCE] * n)
    return dns_frame(rows)


FORMATS = [SourceFormat(SOURCE, "dns_answers", sniff, read,
                        "Unbound log-replies: one no-answer row per reply (client, name, rcode)")]
