"""Zeek conn.log / dns.log readers (TSV and JSON): real samples, bad input, properties, chunking.

Record counts of the real samples were checked independently of this code:
  grep -vc '^#' conn.log                      -> TSV records (header/footer lines start with '#')
  wc -l                                        -> JSON records (one object per line)
  awk -F'\\t' '!/^#/{a=$22; n+= (a=="-"||a=="(empty)") ? 1 : split(a,x,",")}'
                                               -> long-form DNS rows (answers is column 22; a
                                                  response without answers keeps one row)
"""
from __future__ import annotations

import pytest

from esxi_anomaly import schema
from esxi_anomaly.ingest import Quarantine, ReadSummary, read_connections, read_dns

SLIPS = "zeek-stratosphere-slips"


def _read(reader, path):
    quarantine, summary = Quarantine(), ReadSummary()
    frame = reader(str(path), quarantine, summary)
    return frame, quarantine, summary


# --- real samples ---------------------------------------------------------------------------

def test_slips_test10_conn_tsv(samples):
    conns, quarantine, summary = _read(read_connections, samples / SLIPS / "test10-mixed-zeek-dir/conn.log")
    schema.validate(conns, "connections")
    assert len(conns) == 117 and len(quarantine) == 0
    assert summary.files[0].format == "zeek_conn_tsv"
    row = conns.set_index("event_id").loc["CYwXsR3yfDq6hooIU2"]
    assert row.to_dict() == {
        "ts": 1601998366.786397, "src_ip": "2001:718:2:1663:dc58:6d9:ef13:51a5", "src_port": 53879,
        "dst_ip": "2001:718:2:1611:0:1:0:90", "dst_port": 53, "proto": "udp", "duration": 0.00697,
        "bytes_out": 37.0, "bytes_in": 89.0, "packets_out": 1.0, "packets_in": 1.0, "conn_state": "SF",
        "process": "", "esxi_host": "", "source": "zeek_conn_tsv",
    }
    assert conns.ts.is_monotonic_increasing


def test_slips_test10_dns_tsv_long_form(samples):
    dns, quarantine, _ = _read(read_dns, samples / SLIPS / "test10-mixed-zeek-dir/dns.log")
    schema.validate(dns, "dns_answers")
    # 93 responses -> 110 rows: 65 answer records + 45 responses without answers
    assert len(dns) == 110 and dns.event_id.nunique() == 64 and len(quarantine) == 0
    assert (dns.answer_index == -1).sum() == 45
    assert dns.rtype.value_counts().to_dict() == {
        "A": 25, "AAAA": 22, "TXT": 21, "CNAME": 19, "SRV": 13, "": 8, "PTR": 2}
    first = dns[dns.event_id == "CYwXsR3yfDq6hooIU2"]
    assert first[["rtype", "answer", "answer_index", "ttl", "query", "rcode"]].values.tolist() == [
        ["CNAME", "clients.l.google.com", 0, 15.0, "clients6.google.com", "NOERROR"],
        ["AAAA", "2a00:1450:4014:80c::200e", 1, 105.0, "clients6.google.com", "NOERROR"],
    ]
    # ts is the response time: query ts 1601998366.786397 + rtt 0.006970
    assert first.ts.tolist() == pytest.approx([1601998366.793367] * 2, abs=1e-6)
    assert first.client_ip.iloc[0] == "2001:718:2:1663:dc58:6d9:ef13:51a5"
    assert first.resolver_ip.iloc[0] == "2001:718:2:1611:0:1:0:90"
    # TXT: the text after "TXT <len> " is kept, Zeek's \x2c escapes decoded to commas
    # (Zeek writes a multi-string TXT record as one answer "TXT 9 txtvers=1 TXT 5 note= ...")
    txt = dns[dns.answer.str.contains("pdl=", regex=False)].answer.iloc[0]
    assert txt.startswith("txtvers=1 TXT 5 note= TXT 28 ty=Samsung M267x 287x Series")
    assert "pdl=application/octet-stream,application/PCL,application/vnd.hp-PCL," in txt


def test_slips_test9_json_pair(samples):
    conns, q1, s1 = _read(read_connections, samples / SLIPS / "test9-mixed-zeek-dir/conn.log")
    dns, q2, s2 = _read(read_dns, samples / SLIPS / "test9-mixed-zeek-dir/dns.log")
    assert (s1.files[0].format, s2.files[0].format) == ("zeek_conn_json", "zeek_dns_json")
    assert len(conns) == 576 and len(q1) == 0
    # 239 responses -> 654 rows (597 answer records + 57 without answers)
    assert len(dns) == 654 and len(q2) == 0 and (dns.answer_index == -1).sum() == 57
    row = conns.set_index("event_id").loc["CeXwwk4XHhkKHn7kag"]
    assert (row.ts, row.src_ip, row.src_port, row.dst_ip, row.dst_port, row.proto) == (
        30.043784, "10.0.2.15", 49158, "195.113.232.73", 80, "tcp")
    assert (row.bytes_out, row.bytes_in, row.packets_out, row.packets_in, row.conn_state) == (97, 179, 5, 5, "SF")
    answers = dns[dns.event_id == "CR1Opz1Bc5HpC8tASc"]
    assert answers[["rtype", "answer", "answer_index", "ttl"]].values.tolist() == [
        ["CNAME", "www.msftncsi.com.edgesuite.net", 0, 386.0],
        ["CNAME", "a1961.g2.akamai.net", 1, 300.0],
        ["A", "195.113.232.73", 2, 20.0],
        ["A", "195.113.232.75", 3, 20.0],
    ]
    assert answers.ts.iloc[0] == pytest.approx(30.037934 + 0.004871999999998877)
    nx = dns[(dns.event_id == "CTudTc7oyRltJwU32")]
    assert nx[["query", "rtype", "answer", "answer_index", "rcode"]].values.tolist() == [
        ["isatap.felk.cvut.cz", "A", "", -1, "NXDOMAIN"]]
    assert nx.ttl.isna().all()


def test_slips_test18_labelled_extra_columns(samples):
    base = samples / SLIPS / "test18-malicious-ctu-sme-11-win/zeek-labeled"
    conns, q1, _ = _read(read_connections, base / "conn.log.labeled")
    dns, q2, s2 = _read(read_dns, base / "dns.log.labeled")
    assert len(conns) == 766 and len(q1) == 0
    assert ((conns.dst_ip == "66.63.168.35") & (conns.dst_port == 5888)).sum() == 719  # RemcosRAT C2
    row = conns.set_index("event_id").loc["C6SgKom3WB2KEL2ae"]
    assert (row.ts, row.src_port, row.dst_port, row.duration, row.bytes_out, row.conn_state) == (
        1677024003.714845, 65164, 5888, 0.037629, 0.0, "REJ")
    # this dns.log says "#path conn": it is recognised by its #fields
    assert s2.files[0].format == "zeek_dns_tsv"
    assert len(dns) == 22 and len(q2) == 0
    assert set(dns.answer_index) == {-1} and set(dns.rcode) == {""} and set(dns.rtype) == {"*"}


def test_wrccdc_gzip_dns(samples):
    dns, quarantine, summary = _read(read_dns, samples / "zeek-brimdata-wrccdc/zeek-default/dns.log.gz")
    assert len(quarantine) == 0
    # 53,615 responses (zcat | grep -vc '^#'), 13,933 without answers -> 93,605 rows
    assert len(dns) == 93_605 and (dns.answer_index == -1).sum() == 13_933
    assert dns.answer_index.max() >= 1
    first = dns[dns.event_id == "CqKst53mF3det3eDV9"].head(2)
    assert first[["rtype", "answer", "ttl"]].values.tolist() == [
        ["CNAME", "ise.wrccdc.cpp.edu", 2230.0], ["A", "134.71.3.16", 41830.0]]
    assert summary.files[0].ts_min == pytest.approx(1521911720.865716 + 0.000870)
