"""Infoblox NIOS response log -> dns_answers: every RR with type and TTL; other named lines skipped."""
from __future__ import annotations

import logging
import subprocess

import pandas as pd

from tests.ingest._lines import read_lines
from hypothesis import given, settings
from hypothesis import strategies as st

from esxi_anomaly import schema
from esxi_anomaly.ingest import bind_query
from esxi_anomaly.ingest.base import IngestError, Quarantine, detect_format
from esxi_anomaly.ingest.infoblox import read, sniff, split_rrs

SAMPLE = "infoblox-nios-elastic-integrations/test-dns.log"
LINE_A = ("<30>Mar 11 23:51:31 infoblox.localdomain named[17742]: 07-Apr-2022 08:08:10.043 client 192.168.0.1#57398 "
          "UDP: query: a2.foo.com IN A response: NOERROR +AED a2.foo.com 28800 IN A 192.168.0.3;")


def read_all(path, quarantine=None) -> pd.DataFrame:
    quarantine = quarantine if quarantine is not None else Quarantine()
    chunks = list(read(str(path), quarantine, 3))  # small chunks: chunking must not change the result
    out = pd.concat(chunks, ignore_index=True) if chunks else schema.empty("dns_answers")
    schema.validate(out, "dns_answers")
    return out


def test_sample_every_rr_kept(samples, caplog):
    path = samples / SAMPLE
    # independent count: 8 response lines holding 7 RRs, 3 responses without RRs
    assert int(subprocess.run(["grep", "-c", " response: ", str(path)], capture_output=True, text=True).stdout) == 8
    q = Quarantine()
    with caplog.at_level(logging.INFO):
        df = read_all(path, q)
    assert len(q) == 0
    df["ttl"] = df["ttl"].fillna(-1.0)
    assert df[["client_ip", "resolver_ip", "query", "rtype", "answer", "answer_index", "ttl", "rcode"]].values.tolist() == [
        ["192.168.0.1", "", "a1.foo.com", "A", "foo.com", 0, 28800.0, "NOERROR"],
        ["192.168.0.1", "", "a1.foo.com", "A", "0.0.0.0", 1, 28800.0, "NOERROR"],
        ["192.168.0.1", "", "test.com", "", "", -1, -1.0, "REFUSED"],
        ["192.168.0.1", "", "a2.foo.com", "A", "192.168.0.3", 0, 28800.0, "NOERROR"],
        ["192.168.0.1", "", "non-exist.foo.com", "", "", -1, -1.0, "NXDOMAIN"],
        ["192.168.0.1", "", "a1.foo.com", "A", "192.168.0.2", 0, 28800.0, "NOERROR"],
        ["192.168.0.1", "", "a1.foo.com", "A", "192.168.0.3", 1, 28800.0, "NOERROR"],
        ["192.168.1.90", "10.50.1.227", "settings-win.data.microsoft.com", "", "", -1, -1.0, "REFUSED"],
        ["89.160.20.128", "89.160.20.112", "89.160.20.128.a1.foo.com", "PTR", "089.160.20.112.a1.foo.com", 0, 21801.0, "NOERROR"],
        ["89.160.20.128", "89.160.20.112", "settings-win.data.microsoft.com", "TXT", '"k=rsa; p=abc" "def" "ghi" "jkl" "AB"', 0, 3600.0, "NOERROR"],
    ]
    assert df["ts"].tolist()[:2] == [pd.Timestamp("2022-04-07T08:08:10.043Z").timestamp()] * 2
    assert df["ts"].iloc[-1] == pd.Timestamp("2023-05-09T11:54:36.185Z").timestamp()
    assert df["event_id"].nunique() == 8 and (df["source"] == "infoblox_nios").all()
    assert ("skipped 20 lines that are not responses: "
            "{'other': 6, 'query': 4, 'query_error': 2, 'rpz': 2, 'zone_transfer': 6}") in caplog.text


def test_sniff_claims_the_sample_and_bind_does_not(samples):
    head = (samples / SAMPLE).read_bytes()
    assert sniff(head) and not bind_query.sniff(head)
    assert detect_format(str(samples / SAMPLE), "dns_answers").name == "infoblox_nios"
    assert not sniff((samples / "vsphere-elastic-integrations/test-format-common.log").read_bytes())
    assert not sniff((samples / "windows-dns-analytical-elastic-integrations/test-events.json").read_bytes())


def test_cname_chain_kept_in_order(tmp_path):
    # RR list verbatim from the Microsoft Sentinel Infoblox sample quoted in formats.md (f),
    # behind the header of sample line 5.
    line = ("<45>Mar 11 23:51:31 infoblox.localdomain named[17742]: 07-Apr-2022 08:08:10.043 client 192.168.0.1#57398 UDP: "
            "query: c2.foo.com IN A response: NOERROR +ED c2.foo.com. 28800 IN CNAME a2.foo.com.; a2.foo.com. 28800 IN A 1.1.1.2")
    path = tmp_path / "cname.log"
    path.write_text(line + "\n")
    df = read_all(path)
    assert df[["query", "rtype", "answer", "answer_index"]].values.tolist() == [
        ["c2.foo.com", "CNAME", "a2.foo.com", 0], ["c2.foo.com", "A", "1.1.1.2", 1]]


def test_split_rrs_respects_quotes():
    assert split_rrs('a 1 IN TXT "x;y" "z\\";w"; b 2 IN A 1.2.3.4;') == ['a 1 IN TXT "x;y" "z\\";w"', "b 2 IN A 1.2.3.4"]


def test_bad_lines_are_quarantined_and_valid_ones_kept(tmp_path):
    path = tmp_path / "bad.log"
    path.write_bytes(
        (LINE_A + "\n").encode()
        + b"\x00\xff\xfe binary junk\n"
        + LINE_A.replace("response: NOERROR +AED", "response:").encode() + b"\n"
        + LINE_A.replace("28800 IN A 192.168.0.3;", "28800 IN A 192.168.0.3; broken-rr;").encode() + b"\n"
        + b"x" * 70_000 + b"\n"
        + (LINE_A + "\n").encode()[:60])  # truncated last line
    q = Quarantine()
    df = read_all(path, q)
    assert df["answer"].tolist() == ["192.168.0.3", "192.168.0.3"]
    assert [(r.line, r.reason) for r in q.records] == [
        (2, "not a syslog or BIND log line"),
        (3, "malformed Infoblox response line"),
        (4, "malformed resource record #2 in response"),
        (5, "line longer than 65536 characters"),
    ]


def test_gzip_and_empty_file(tmp_path):
    import gzip

    gz = tmp_path / "r.log.gz"
    gz.write_bytes(gzip.compress((LINE_A + "\n").encode()))
    assert read_all(gz)["answer"].tolist() == ["192.168.0.3"]
    truncated = tmp_path / "t.log.gz"
    truncated.write_bytes(gzip.compress(((LINE_A + "\n") * 200).encode())[:-30])
    q = Quarantine()
    df = read_all(truncated, q)
    assert 0 < len(df) < 200 and len(q) == 0        # iter_file reports the cut (tests/ingest/test_accounting.py)
    empty = tmp_path / "e.log"
    empty.write_text("")
    assert len(read_all(empty)) == 0


def _read_lines(lines):
    return read_lines(lines, read_all, "dns_answers")

@settings(max_examples=50, deadline=None)
@given(garbage=st.lists(st.text(max_size=120), max_size=8), where=st.integers(0, 8))
def test_valid_lines_survive_garbage(garbage, where):
    lines = [g.replace("\n", " ").replace("\r", " ") for g in garbage]
    lines.insert(min(where, len(lines)), LINE_A)
    df = _read_lines(lines)
    assert df["answer"].tolist() == ["192.168.0.3"]


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_mutated_lines_never_raise(data):
    pos = data.draw(st.integers(0, len(LINE_A)))
    cut = data.draw(st.integers(0, 20))
    junk = data.draw(st.text(max_size=20)).replace("\n", " ")
    _read_lines([LINE_A[:pos] + junk + LINE_A[pos + cut:]])
