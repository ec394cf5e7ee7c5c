"""dnsmasq log-queries -> dns_answers: one row per reply line, client from the query line.

No dnsmasq sample file exists: `dns_servers/dnsmasq_verbatim.log` holds the lines quoted in
formats.md (f). The `extra`-mode, CNAME and PTR lines below are constructed from dnsmasq's own
format strings (cache.c `log_query`: "%u %s/%u %s %s %s %s"); each test says so.
"""
from __future__ import annotations

import calendar
import logging
import os
import shutil

import pandas as pd

from tests.ingest._lines import read_lines, read_through
from hypothesis import given, settings
from hypothesis import strategies as st

from esxi_anomaly.ingest import bind_query, infoblox, unbound
from esxi_anomaly.ingest.base import Quarantine, detect_format
from esxi_anomaly.ingest.dnsmasq import read, sniff

COLUMNS = ["client_ip", "query", "rtype", "answer", "answer_index", "rcode"]
REPLY = "Jun 22 06:03:07 dnsmasq[9187]: reply www.google.com is 172.217.12.132"


def read_all(path, quarantine=None, chunk_rows=1000) -> pd.DataFrame:
    return read_through(read, path, "dns_answers", quarantine, chunk_rows)


def write(tmp_path, text, name="dnsmasq.log", year=2024):
    path = tmp_path / name
    path.write_text(text)
    mtime = calendar.timegm((year, 12, 31, 0, 0, 0))
    os.utime(path, (mtime, mtime))
    return path


def test_verbatim_lines(fixtures, tmp_path, caplog):
    path = tmp_path / "v.log"
    shutil.copy(fixtures / "dns_servers/dnsmasq_verbatim.log", path)
    mtime = calendar.timegm((2024, 12, 31, 0, 0, 0))
    os.utime(path, (mtime, mtime))
    q = Quarantine()
    with caplog.at_level(logging.INFO):
        df = read_all(path, q)
    assert len(q) == 0
    assert df[COLUMNS].values.tolist() == [
        ["127.0.0.1", "www.google.com", "AAAA", "2607:f8b0:4006:800::2004", 0, "NOERROR"],
        ["127.0.0.1", "www.google.com", "A", "172.217.12.132", 1, "NOERROR"],
        ["", "iapp.org", "", "", -1, "NOERROR"],  # NODATA-IPv6 for a name whose query line is not in the file
    ]
    assert df["ts"].tolist() == [pd.Timestamp("2024-06-22T06:03:07Z").timestamp()] * 3
    assert df["event_id"].nunique() == 2 and df["ttl"].isna().all()
    assert "skipped 2 lines that are not answers: {'forwarded': 1, 'query': 1}" in caplog.text


def test_extra_mode_groups_by_serial_even_when_interleaved(tmp_path):
    # Constructed in the `log-queries=extra` layout: "<serial> <client>/<port> <verb> <name> <is|from> <value>".
    path = write(tmp_path, "\n".join([
        "Jun 22 06:03:07 dnsmasq[9187]: 11 10.0.0.5/40001 query[A] upd.example.net from 10.0.0.5",
        "Jun 22 06:03:07 dnsmasq[9187]: 12 10.0.0.6/40002 query[A] upd.example.net from 10.0.0.6",
        "Jun 22 06:03:07 dnsmasq[9187]: 12 10.0.0.6/40002 forwarded upd.example.net to 1.1.1.1",
        "Jun 22 06:03:08 dnsmasq[9187]: 12 10.0.0.6/40002 reply upd.example.net is <CNAME>",
        "Jun 22 06:03:08 dnsmasq[9187]: 11 10.0.0.5/40001 cached upd.example.net is 19.57.34.8",
        "Jun 22 06:03:08 dnsmasq[9187]: 12 10.0.0.6/40002 reply edge.cdn.example is 19.57.34.9",
        "Jun 22 06:03:09 dnsmasq[9187]: 13 10.0.0.7/40003 config blocked.example is NXDOMAIN",
    ]) + "\n")
    df = read_all(path)
    assert df[COLUMNS].values.tolist() == [
        ["10.0.0.6", "upd.example.net", "CNAME", "edge.cdn.example", 0, "NOERROR"],
        ["10.0.0.5", "upd.example.net", "A", "19.57.34.8", 0, "NOERROR"],
        ["10.0.0.6", "upd.example.net", "A", "19.57.34.9", 1, "NOERROR"],
        ["", "blocked.example", "", "", -1, "NXDOMAIN"],
    ]
    assert df["event_id"].tolist()[0] == df["event_id"].tolist()[2] != df["event_id"].tolist()[1]


def test_plain_mode_cname_target_and_reverse_lookup(tmp_path):
    # Constructed in the plain layout of formats.md (f); `<CNAME>` and `reply <ip> is <name>` per dnsmasq cache.c.
    path = write(tmp_path, "\n".join([
        "Jun 22 06:03:07 dnsmasq[9187]: query[A] www.example.com from 192.168.1.20",
        "Jun 22 06:03:07 dnsmasq[9187]: reply www.example.com is <CNAME>",
        "Jun 22 06:03:07 dnsmasq[9187]: reply web.cdn.example.net is 203.0.113.7",
        "Jun 22 06:03:07 dnsmasq[9187]: query[PTR] 8.8.8.8.in-addr.arpa from 192.168.1.21",
        "Jun 22 06:03:07 dnsmasq[9187]: reply 8.8.8.8 is dns.google",
        "Jun 22 06:03:07 dnsmasq[9187]: query[SRV] _ldap._tcp.corp from 192.168.1.22",
        "Jun 22 06:03:07 dnsmasq[9187]: reply _ldap._tcp.corp is <SRV>",
    ]) + "\n")
    df = read_all(path, chunk_rows=1)
    assert df[COLUMNS].values.tolist() == [
        ["192.168.1.20", "www.example.com", "CNAME", "web.cdn.example.net", 0, "NOERROR"],
        ["192.168.1.20", "www.example.com", "A", "203.0.113.7", 1, "NOERROR"],
        ["192.168.1.21", "8.8.8.8.in-addr.arpa", "PTR", "dns.google", 0, "NOERROR"],
        ["192.168.1.22", "_ldap._tcp.corp", "SRV", "<SRV>", 0, "NOERROR"],
    ]


def test_sniff(fixtures, samples):
    head = (fixtures / "dns_servers/dnsmasq_verbatim.log").read_bytes()
    assert sniff(head)
    assert not (bind_query.sniff(head) or infoblox.sniff(head) or unbound.sniff(head))
    assert detect_format(str(fixtures / "dns_servers/dnsmasq_verbatim.log"), "dns_answers").name == "dnsmasq"
    assert not sniff((samples / "infoblox-nios-elastic-integrations/test-dns.log").read_bytes())


def test_bad_lines(tmp_path):
    path = write(tmp_path, "\n".join([
        REPLY, "\x00\x7fjunk", "Jun 22 06:03:07 dnsmasq[9187]: reply www.google.com is not-an-address",
        "Jun 22 06:03:07 dnsmasq[9187]: reply truncated", REPLY]) + "\n")
    q = Quarantine()
    df = read_all(path, q)
    assert df["answer"].tolist() == ["172.217.12.132"] * 2
    assert [(r.line, r.reason) for r in q.records] == [
        (2, "not a syslog line"), (3, "dnsmasq answer is neither an address nor a known marker"),
        (4, "malformed dnsmasq answer line")]


def _read_lines(lines):
    return read_lines(lines, read_all, "dns_answers")

@settings(max_examples=50, deadline=None)
@given(garbage=st.lists(st.text(max_size=120), max_size=8), where=st.integers(0, 8))
def test_valid_lines_survive_garbage(garbage, where):
    lines = [g.replace("\n", " ").replace("\r", " ") for g in garbage]
    lines.insert(min(where, len(lines)), REPLY)
    df = _read_lines(lines)
    assert df[df["query"] == "www.google.com"]["answer"].tolist() == ["172.217.12.132"]


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_mutated_lines_never_raise(data):
    pos = data.draw(st.integers(0, len(REPLY)))
    junk = data.draw(st.text(max_size=20)).replace("\n", " ")
    _read_lines([REPLY[:pos] + junk + REPLY[pos + data.draw(st.integers(0, 20)):]])
