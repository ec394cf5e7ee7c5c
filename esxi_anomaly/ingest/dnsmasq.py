"""dnsmasq `log-queries` (plain or `=extra`) -> `dns_answers`, one row per `reply`/`cached` line.

    Jun 22 06:03:07 dnsmasq[9187]: query[A] www.google.com from 127.0.0.1
    Jun 22 06:03:07 dnsmasq[9187]: reply www.google.com is 172.217.12.132
    (extra)  ... dnsmasq[9187]: 17 127.0.0.1/41234 reply www.google.com is 172.217.12.132

dnsmasq writes one line per answer RR and logs the client only on the `query[...]` line. With
`log-queries=extra` every line carries the query's serial number, which groups lines exactly;
without it, a reply is tied to the latest query for the same name (CNAME targets follow their
`<CNAME>` line). A CNAME's target is not logged: it is taken from the next reply line of the
group, else the answer stays `<CNAME>`. Types dnsmasq does not print (`<SRV>`, `<TXT>`...) keep
that text as the answer. `NXDOMAIN`/`NODATA*`/`SERVFAIL`/`REFUSED` become the no-answer row
with that rcode (NODATA -> NOERROR). No TTLs are logged. Times have no year or zone: UTC, year
from the file's modification time. Other dnsmasq lines (forwarded, DHCP, DNSSEC) are skipped and
counted; lines that are not dnsmasq syslog lines are quarantined.
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
    dns_frame, file_reference_time, iter_lines, new_rows, normalise_name, split_syslog, syslog_epochs,
)

log = logging.getLogger(__name__)

SOURCE = "dnsmasq"
PROGRAMS = {"dnsmasq", "pihole-FTL"}
MAX_OPEN_QUERIES = 65_536  # bound the correlation state on endless streams

EXTRA = re.compile(r"^(?P<serial>\d+|\*) (?:(?P<src>[0-9A-Fa-f:.]+)/\d+ )?(?P<body>.*)$")
QUERY = re.compile(r"^query\[(?P<qtype>[A-Za-z0-9]+)\] (?P<name>\S+) from (?P<client>[0-9A-Fa-f:.]+)")
ANSWER = re.compile(r"^(?P<verb>reply|cached|cached-stale|config|/\S+) (?P<name>\S+) is (?P<value>\S+)")
NO_ANSWER_RCODE = {"NXDOMAIN": "NXDOMAIN", "NODATA": "NOERROR", "NODATA-IPv4": "NOERROR",
                   "NODATA-IPv6": "NOERROR", "SERVFAIL": "SERVFAIL", "REFUSED": "REFUSED"}
_SNIFF = re.compile(r"(?:dnsmasq|pihole-FTL)\[\d+\]: (?:\d+ \S+ )?(?:query\[|reply |cached |forwarded |config )")


def sniff(head: bytes) -> bool:
    lines = head.decode("utf-8", "replace").splitlines()[:500]
    return any(_SNIFF.search(l) for l in lines)


class _Group:
    __slots__ = ("event_id", "client", "query", "next_index", "cname_row", "cname_owner")

    def __init__(self, event_id: str, client: str, query: str):
        self.event_id, self.client, self.query = event_id, client, query
        self.next_index = 0
        self.cname_row: int | None = None  # row holding a `<CNAME>` whose target comes next
        self.cname_owner = ""


def _ip(text: str) -> ipaddress._BaseAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def read(path: str, quarantine: Quarantine, chunk_rows: int) -> Iterator[pd.DataFrame]:
    reference = file_reference_time(path)
    skipped: Counter = Counter()
    rows = new_rows()
    times: list[str] = []
    by_serial: dict[str, _Group] = {}
    by_name: dict[str, _Group] = {}
    last_group: _Group | None = None

    def remember(table: dict, key: str, group: _Group) -> None:
        table.pop(key, None)
        table[key] = group
        if len(table) > MAX_OPEN_QUERIES:
            del table[next(iter(table))]

    for lineno, line in iter_lines(path, quarantine):
        if not line.strip():
            continue
        env = split_syslog(line)
        if env is None:
            quarantine.add(path, lineno, "not a syslog line", line)
            continue
        time_text, _host, program, message = env
        if program not in PROGRAMS:
            skipped[f"program {program[:20]}"] += 1
            continue
        serial = None
        extra = EXTRA.match(message)
        if extra and extra["serial"] != "*" and (extra["src"] or QUERY.match(extra["body"]) or ANSWER.match(extra["body"])):
            serial, message = extra["serial"], extra["body"]
        elif extra and extra["serial"] == "*":
            message = extra["body"]
        q = QUERY.match(message)
        if q:
            name = normalise_name(q["name"])
            group = _Group(stable_event_id(SOURCE, path, lineno), q["client"], name)
            if serial is not None:
                remember(by_serial, serial, group)
            remember(by_name, name, group)
            skipped["query"] += 1
            continue
        a = ANSWER.match(message)
        if not a:
            if message.startswith(("reply ", "cached ", "config ")):
                quarantine.add(path, lineno, "malformed dnsmasq answer line", line)
            else:
                skipped[message.split(" ", 1)[0][:20]] += 1
            continue
        name, value = normalise_name(a["name"]), a["value"]
        value_ip, name_ip = _ip(value), _ip(name)
        if value_ip is None and name_ip is not None and not value.startswith("<") and value not in NO_ANSWER_RCODE:
            rtype, answer = "PTR", normalise_name(value)  # reverse lookups log `reply <ip> is <name>`
            name = name_ip.reverse_pointer
        elif value_ip is not None:
            rtype, answer = ("A" if value_ip.version == 4 else "AAAA"), str(value_ip)
        elif value in NO_ANSWER_RCODE:
            rtype, answer = "", ""
        elif value.startswith("<") and value.endswith(">"):
            rtype, answer = value[1:-1].upper()[:16], value
        else:
            quarantine.add(path, lineno, "dnsmasq answer is neither an address nor a known marker", line)
            continue
        group = by_serial.get(serial) if serial is not None else None
        if group is None and serial is None:
            if last_group is not None and last_group.cname_row is not None and name != last_group.cname_owner:
                group = last_group  # the line after `<CNAME>` answers for its target
            else:
                group = by_name.get(name)
        if group is None:
            group = _Group(stable_event_id(SOURCE, path, lineno), "", name)
            if serial is not None:
                remember(by_serial, serial, group)
        if group.cname_row is not None and name != group.cname_owner:
            rows["answer"][group.cname_row] = name
        group.cname_row = None
        if serial is None:
            remember(by_name, name, group)
        if answer == "":
            index, rcode = -1, NO_ANSWER_RCODE[value]
        else:
            index, rcode = group.next_index, "NOERROR"
            group.next_index += 1
        rows["event_id"].append(group.event_id)
        rows["client_ip"].append(group.client)
        rows["resolver_ip"].append("")
        rows["query"].append(group.query)
        rows["rtype"].append(rtype)
        rows["answer"].append(answer)
        rows["answer_index"].append(index)
        rows["ttl"].append(np.nan)
        rows["rcode"].append(rcode)
        times.append(time_text)
        if rtype == "CNAME":
            group.cname_row, group.cname_owner = len(rows["answer"]) - 1, name
        last_group = group
        if len(rows["event_id"]) >= chunk_rows and group.cname_row is None:
            yield _finish(rows, times, reference)
            rows, times = new_rows(), []
            for g in (*by_serial.values(), *by_name.values()):
                g.cname_row = None
    if rows["event_id"]:
        yield _finish(rows, times, reference)
    if skipped:
        log.info("%s: skipped %d lines that are not answers: %s", path, sum(skipped.values()), dict(sorted(skipped.items())))


def _finish(rows: dict[str, list], times: list[str], reference: float) -> pd.DataFrame:
    rows["ts"] = syslog_epochs(times, reference)
    rows["source"] = [SOURCE] * len(rows["event_id"])
    return dns_frame(rows)


FORMATS = [SourceFormat(SOURCE, "dns_answers", sniff, read,
                        "dnsmasq log-queries (plain or extra): one row per reply/cached line, client from the query line")]
