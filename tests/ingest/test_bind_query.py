"""BIND 9 query log -> dns_answers rows that record a query (answer="", rtype=qtype, rcode="").

No BIND sample file exists: `dns_servers/bind_query_verbatim.log` holds the BIND query lines of
the Infoblox sample (lines 7, 23, 27, 28) and the line quoted in formats.md (f), verbatim.
"""
from __future__ import annotations

import calendar
import logging
import os
import shutil

import numpy as np
import pandas as pd

from tests.ingest._lines import read_lines, read_through
from hypothesis import given, settings
from hypothesis import strategies as st

from esxi_anomaly.ingest import infoblox
from esxi_anomaly.ingest.base import Quarantine, detect_format
from esxi_anomaly.ingest.bind_query import read, sniff

QUERY = "client @0x7f97e40eb500 192.168.1.90#64727 (ocsp.digicert.com): query: ocsp.digicert.com IN A + (192.168.1.10)"


def read_all(path, quarantine=None) -> pd.DataFrame:
    return read_through(read, path, "dns_answers", quarantine, 2)


def test_verbatim_query_lines(fixtures, tmp_path):
    path = tmp_path / "query.log"
    shutil.copy(fixtures / "dns_servers/bind_query_verbatim.log", path)
    # syslog headers have no year: it comes from the file's modification time (2024-12-31 here)
    mtime = calendar.timegm((2024, 12, 31, 0, 0, 0))
    os.utime(path, (mtime, mtime))
    q = Quarantine()
    df = read_all(path, q)
    assert len(q) == 0
    assert df[["client_ip", "resolver_ip", "query", "rtype", "answer", "answer_index", "rcode"]].values.tolist() == [
        ["192.168.0.1", "192.168.0.1", "config.nos-avg.cz", "TXT", "", -1, ""],
        ["192.168.1.90", "192.168.1.10", "ocsp.digicert.com", "A", "", -1, ""],
        ["89.160.20.128", "81.2.69.144", "abugtera.tun.p2.42", "A", "", -1, ""],
        ["10.4.71.204", "192.168.0.1", "version.bind", "TXT", "", -1, ""],
        ["192.168.1.90", "192.168.1.10", "ocsp.digicert.com", "A", "", -1, ""],
    ]
    expected = [pd.Timestamp(t, tz="UTC").timestamp() for t in
                ("2024-03-09 23:59:59", "2024-04-14 16:16:05", "2024-11-27 13:03:52", "2024-11-27 11:53:09")]
    assert df["ts"].tolist()[:4] == expected
    assert np.isnan(df["ts"].iloc[4])  # the bare line carries no time at all
    assert df["ttl"].isna().all() and (df["source"] == "bind_query").all()


def test_year_rolls_back_for_months_after_the_file_time(tmp_path):
    path = tmp_path / "jan.log"
    path.write_text(f"<30>Dec 31 23:59:59 ns1 named[1]: {QUERY}\n<30>Jan  1 00:00:01 ns1 named[1]: {QUERY}\n")
    mtime = calendar.timegm((2025, 1, 1, 0, 5, 0))
    os.utime(path, (mtime, mtime))
    assert read_all(path)["ts"].tolist() == [pd.Timestamp("2024-12-31T23:59:59Z").timestamp(),
                                             pd.Timestamp("2025-01-01T00:00:01Z").timestamp()]


def test_bind_file_channel_time(tmp_path):
    # Constructed: BIND `print-time yes; print-category yes; print-severity yes;` prefix + the verbatim query.
    path = tmp_path / "named.log"
    path.write_text(f"06-Sep-2021 14:40:13.263 queries: info: {QUERY}\n"
                    "06-Sep-2021 14:40:13.300 resolver: info: resolver priming query complete\n")
    df = read_all(path)
    assert df["ts"].tolist() == [pd.Timestamp("2021-09-06T14:40:13.263Z").timestamp()]


def test_sniff(fixtures, samples):
    assert sniff((fixtures / "dns_servers/bind_query_verbatim.log").read_bytes())
    assert detect_format(str(fixtures / "dns_servers/bind_query_verbatim.log"), "dns_answers").name == "bind_query"
    infoblox_head = (samples / "infoblox-nios-elastic-integrations/test-dns.log").read_bytes()
    assert not sniff(infoblox_head) and infoblox.sniff(infoblox_head)
    assert not infoblox.sniff((fixtures / "dns_servers/bind_query_verbatim.log").read_bytes())


def test_infoblox_responses_are_skipped_not_quarantined(samples, caplog):
    q = Quarantine()
    with caplog.at_level(logging.INFO):
        df = read_all(samples / "infoblox-nios-elastic-integrations/test-dns.log", q)
    assert len(df) == 4 and len(q) == 0
    assert "skipped {'infoblox_response': 8, 'other': 16} non-query lines" in caplog.text


def test_bad_lines(tmp_path):
    path = tmp_path / "bad.log"
    path.write_bytes(f"{QUERY}\n\x00\x01garbage\nclient 1.2.3.4#5: query: broken\n{QUERY}\n".encode())
    q = Quarantine()
    df = read_all(path, q)
    assert len(df) == 2
    assert [(r.line, r.reason) for r in q.records] == [(2, "not a BIND log line"), (3, "malformed BIND query line")]


def _read_lines(lines):
    return read_lines(lines, read_all, "dns_answers")

@settings(max_examples=50, deadline=None)
@given(garbage=st.lists(st.text(max_size=120), max_size=8), where=st.integers(0, 8))
def test_valid_lines_survive_garbage(garbage, where):
    lines = [g.replace("\n", " ").replace("\r", " ") for g in garbage]
    lines.insert(min(where, len(lines)), QUERY)
    assert _read_lines(lines)["query"].tolist() == ["ocsp.digicert.com"]


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_mutated_lines_never_raise(data):
    pos = data.draw(st.integers(0, len(QUERY)))
    junk = data.draw(st.text(max_size=20)).replace("\n", " ")
    _read_lines([QUERY[:pos] + junk + QUERY[pos + data.draw(st.integers(0, 20)):]])
