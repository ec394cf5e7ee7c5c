"""Unbound log-replies -> dns_answers: one no-answer row per reply (client, name, rcode).

No Unbound sample file exists: `dns_servers/unbound_verbatim.log` holds the three lines quoted
in formats.md (f), verbatim.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from tests.ingest._lines import read_lines, read_through
from hypothesis import given, settings
from hypothesis import strategies as st

from esxi_anomaly.ingest import bind_query, dnsmasq, infoblox
from esxi_anomaly.ingest.base import Quarantine, detect_format
from esxi_anomaly.ingest.unbound import read, sniff

REPLY = "[1791387199] unbound[46658:0] reply: 127.0.0.1 a.home.test. A IN NOERROR 0.000000 1 56"


def read_all(path, quarantine=None) -> pd.DataFrame:
    return read_through(read, path, "dns_answers", quarantine, 1)


def test_verbatim_lines(fixtures, caplog):
    q = Quarantine()
    with caplog.at_level(logging.INFO):
        df = read_all(fixtures / "dns_servers/unbound_verbatim.log", q)
    assert len(q) == 0
    assert df[["client_ip", "resolver_ip", "query", "rtype", "answer", "answer_index", "rcode"]].values.tolist() == [
        ["127.0.0.1", "", "tvchaosuk.com", "", "", -1, "NOERROR"],
        ["127.0.0.1", "", "a.home.test", "", "", -1, "NOERROR"],
    ]
    assert np.isnan(df["ts"].iloc[0])              # the bare `[pid:thread]` form has no time
    assert df["ts"].iloc[1] == 1791387199.0
    assert df["ttl"].isna().all() and (df["source"] == "unbound").all()
    assert "skipped 1 lines that are not replies: {'query': 1}" in caplog.text


def test_info_tag_syslog_and_formerr(tmp_path):
    # Constructed: the same reply fields with the default `info:` tag behind a syslog header, and
    # the FORMERR layout of unbound's log_reply_info ("%s - - - %s - - - ").
    path = tmp_path / "u.log"
    path.write_text("2024-05-01T10:00:00Z ns1 unbound: [96463:8] info: 10.1.2.3@53124 evil.example. TXT IN NXDOMAIN 0.020000 0 40\n"
                    "[1791387200] unbound[46658:0] info: 10.1.2.4 - - - FORMERR - - - \n"
                    "[1791387201] unbound[46658:0] info: start of service (unbound 1.19.0).\n")
    df = read_all(path)
    assert df[["client_ip", "query", "rcode", "ts"]].values.tolist() == [
        ["10.1.2.3", "evil.example", "NXDOMAIN", pd.Timestamp("2024-05-01T10:00:00Z").timestamp()],
        ["10.1.2.4", "", "FORMERR", 1791387200.0],
    ]


def test_sniff(fixtures, samples):
    head = (fixtures / "dns_servers/unbound_verbatim.log").read_bytes()
    assert sniff(head)
    assert not (bind_query.sniff(head) or infoblox.sniff(head) or dnsmasq.sniff(head))
    assert detect_format(str(fixtures / "dns_servers/unbound_verbatim.log"), "dns_answers").name == "unbound"
    assert not sniff((samples / "infoblox-nios-elastic-integrations/test-dns.log").read_bytes())
    assert not sniff((fixtures / "dns_servers/dnsmasq_verbatim.log").read_bytes())


def test_bad_lines(tmp_path):
    path = tmp_path / "bad.log"
    path.write_bytes((REPLY + "\n\x00\x01\x02\n[1] unbound[1:0] reply: 127.0.0.1 x.\n" + REPLY + "\n").encode())
    q = Quarantine()
    assert len(read_all(path, q)) == 2
    assert [(r.line, r.reason) for r in q.records] == [(2, "not an Unbound log line"), (3, "malformed Unbound reply line")]


def _read_lines(lines):
    return read_lines(lines, read_all, "dns_answers")

@settings(max_examples=50, deadline=None)
@given(garbage=st.lists(st.text(max_size=120), max_size=8), where=st.integers(0, 8))
def test_valid_lines_survive_garbage(garbage, where):
    lines = [g.replace("\n", " ").replace("\r", " ") for g in garbage]
    lines.insert(min(where, len(lines)), REPLY)
    df = _read_lines(lines)
    assert df[df["query"] == "a.home.test"]["ts"].tolist() == [1791387199.0]


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_mutated_lines_never_raise(data):
    pos = data.draw(st.integers(0, len(REPLY)))
    junk = data.draw(st.text(max_size=20)).replace("\n", " ")
    _read_lines([REPLY[:pos] + junk + REPLY[pos + data.draw(st.integers(0, 20)):]])
