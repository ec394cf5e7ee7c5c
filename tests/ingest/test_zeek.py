"""Zeek conn.log / dns.log readers (TSV and JSON): real samples, bad input, properties, chunking.

Record counts of the real samples were checked independently of this code:
  grep -vc '^#' conn.log                      -> TSV records (header/footer lines start with '#')
  wc -l                                        -> JSON records (one object per line)
  awk -F'\\t' '!/^#/{a=$22; n+= (a=="-"||a=="(empty)") ? 1 : split(a,x,",")}'
                                               -> long-form DNS rows (answers is column 22; a
                                                  response without answers keeps one row)
"""
from __future__ import annotations

import pandas as pd

from tests.ingest._lines import CONTAINER_MAGIC, mutate
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
        "local_orig": "", "local_resp": "", "history": "Dd",   # local_orig/local_resp unset ("-") in this log
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


# --- small fixtures: exact canonical values --------------------------------------------------

import bz2
import gzip
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esxi_anomaly.ingest import IngestError, iter_connections, iter_dns
from esxi_anomaly.ingest import zeek

HEADER_LINES = 8  # the fixtures' header: data line k (0-based) is file line 9 + k


def _lines(path):
    return path.read_bytes().split(b"\n")


def _conn_fixture(fixtures):
    return fixtures / "zeek" / "conn.log"


def test_conn_fixture_exact(fixtures):
    conns, quarantine, _ = _read(read_connections, _conn_fixture(fixtures))
    assert len(quarantine) == 0
    assert conns.event_id.tolist() == [  # sorted by ts
        "C5eeeeeeeeeeeeeee", "C1aaaaaaaaaaaaaaa", "C2bbbbbbbbbbbbbbb", "C3ccccccccccccccc", "C4ddddddddddddddd"]
    unset = conns.set_index("event_id").loc["C3ccccccccccccccc"]
    assert (unset.src_ip, unset.dst_ip, unset.dst_port, unset.conn_state) == ("2001:db8::11", "2001:db8::99", 443, "S0")
    assert math.isnan(unset.duration) and math.isnan(unset.bytes_out) and unset.packets_out == 1.0
    icmp = conns.set_index("event_id").loc["C4ddddddddddddddd"]
    assert (icmp.proto, icmp.src_port, icmp.dst_port) == ("icmp", 8, 0)


def test_dns_fixture_exact(fixtures):
    dns, quarantine, _ = _read(read_dns, fixtures / "zeek" / "dns.log")
    assert len(quarantine) == 0
    got = dns[["event_id", "rtype", "answer", "answer_index", "ttl", "query", "rcode"]]
    rows = [[None if isinstance(v, float) and math.isnan(v) else v for v in r] for r in got.values.tolist()]
    assert rows == [
        ["D1aaaaaaaaaaaaaaa", "CNAME", "cdn.example.net", 0, 60.0, "upd.example.net", "NOERROR"],
        ["D1aaaaaaaaaaaaaaa", "A", "19.57.34.8", 1, 300.0, "upd.example.net", "NOERROR"],
        ["D2bbbbbbbbbbbbbbb", "A", "", -1, None, "nope.example.net", "NXDOMAIN"],
        ["D3ccccccccccccccc", "TXT", "port,4444", 0, 30.0, "café.example.net", "NOERROR"],
        ["D4ddddddddddddddd", "PTR", "gw.example.net", 0, 3600.0, "8.0.0.10.in-addr.arpa", "NOERROR"],
        ["D5eeeeeeeeeeeeeee", "AAAA", "2001:db8::1", 0, 120.0, "v6.example.net", "NOERROR"],
        ["D5eeeeeeeeeeeeeee", "AAAA", "2001:db8::2", 1, None, "v6.example.net", "NOERROR"],
        ["D6fffffffffffffff", "SRV", "", -1, None, "empty.example.net", "NOERROR"],
        ["D7ggggggggggggggg", "*", "", -1, None, "wpad", ""],
    ]
    # response time = ts + rtt; without rtt, ts
    assert dns.ts.iloc[0] == pytest.approx(1699999999.002)
    assert dns.set_index("event_id").loc["D4ddddddddddddddd"].ts == 1700000000.5


def test_json_fixtures_exact(fixtures):
    conns, q1, s1 = _read(read_connections, fixtures / "zeek" / "conn.json")
    assert s1.files[0].format == "zeek_conn_json" and len(q1) == 0
    assert conns.event_id.tolist() == ["CJ1aaaaaaaaaaaaaa", "CJ2bbbbbbbbbbbbbb", "CJ3cccccccccccccc"]
    # ISO-8601 ts (2023-11-14T22:13:21.2Z == 1700000001.2); nested "id" object flattened
    assert conns.ts.tolist() == pytest.approx([1700000000.1, 1700000001.2, 1700000003.4])
    assert conns.iloc[2][["src_ip", "src_port", "dst_ip", "dst_port"]].tolist() == ["10.0.0.12", 8, "10.0.0.1", 0]
    assert math.isnan(conns.iloc[1].bytes_out)
    dns, q2, _ = _read(read_dns, fixtures / "zeek" / "dns.json")
    assert len(q2) == 0
    assert dns[["rtype", "answer", "answer_index", "rcode"]].values.tolist() == [
        ["CNAME", "cdn.example.net", 0, "NOERROR"], ["A", "19.57.34.8", 1, "NOERROR"],
        ["A", "", -1, "NXDOMAIN"]]


def test_tsv_and_json_agree(fixtures):
    tsv = read_dns(str(fixtures / "zeek" / "dns.log"))
    js = read_dns(str(fixtures / "zeek" / "dns.json"))
    cols = ["client_ip", "resolver_ip", "query", "rtype", "answer", "answer_index", "ttl", "rcode"]
    assert js[cols].equals(tsv[cols].head(3).reset_index(drop=True))


# --- bad input ------------------------------------------------------------------------------

def _write(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _with_lines(fixtures, inserts: dict[int, bytes]) -> bytes:
    """The conn fixture with lines inserted before 0-based data line k (key) -> file line 9 + k."""
    lines = _lines(_conn_fixture(fixtures))
    for k in sorted(inserts, reverse=True):
        lines.insert(HEADER_LINES + k, inserts[k])
    return b"\n".join(lines)


def test_wrong_field_count_and_bad_port_are_quarantined_rest_kept(fixtures, tmp_path):
    good = _lines(_conn_fixture(fixtures))[HEADER_LINES].split(b"\t")
    bad_port = b"\t".join(good[:5] + [b"https"] + good[6:]).replace(b"C1aaaa", b"CXport")
    bad_ts = b"\t".join([b"yesterday"] + good[1:]).replace(b"C1aaaa", b"CXtime")
    path = _write(tmp_path, "conn.log", _with_lines(fixtures, {1: b"1700000000.5\tCshort\t10.0.0.1", 3: bad_port, 4: bad_ts}))
    conns, quarantine, summary = _read(read_connections, path)
    assert sorted(conns.event_id) == sorted(
        ["C1aaaaaaaaaaaaaaa", "C2bbbbbbbbbbbbbbb", "C3ccccccccccccccc", "C4ddddddddddddddd", "C5eeeeeeeeeeeeeee"])
    assert [(r.line, r.reason) for r in quarantine.records] == [
        (10, "3 fields, expected 21"),
        (13, "id.resp_p is not a port number"),
        (15, "ts is not a number"),
    ]
    assert quarantine.records[1].raw.startswith("1700000000.100000\tCXportaaaaaaaaaaa")
    assert (summary.kept, summary.quarantined) == (5, 3)


@pytest.mark.parametrize("value, reason", [
    (b"70000", "id.resp_p is not a port number"), (b"-1", "id.resp_p is not a port number"),
    (b"80.5", "id.resp_p is not a port number"), (b"", "id.resp_p is not a port number")])
def test_port_out_of_range(fixtures, tmp_path, value, reason):
    good = _lines(_conn_fixture(fixtures))[HEADER_LINES].split(b"\t")
    line = b"\t".join(good[:5] + [value] + good[6:])
    conns, quarantine, _ = _read(read_connections, _write(tmp_path, "c.log", _with_lines(fixtures, {0: line})))
    assert len(conns) == 5 and [(r.line, r.reason) for r in quarantine.records] == [(9, reason)]


def test_unset_required_fields(fixtures, tmp_path):
    good = _lines(_conn_fixture(fixtures))[HEADER_LINES].split(b"\t")
    no_ts = b"\t".join([b"-"] + good[1:])
    no_src = b"\t".join(good[:2] + [b"-"] + good[3:])
    conns, quarantine, _ = _read(read_connections, _write(tmp_path, "c.log", _with_lines(fixtures, {0: no_ts, 2: no_src})))
    assert len(conns) == 5
    assert [(r.line, r.reason) for r in quarantine.records] == [(9, "ts is unset"), (12, "id.orig_h is unset")]


def test_unset_uid_gets_a_stable_id(fixtures, tmp_path):
    data = _conn_fixture(fixtures).read_bytes().replace(b"C2bbbbbbbbbbbbbbb", b"-")
    path = _write(tmp_path, "c.log", data)
    first = read_connections(str(path))
    again = read_connections(str(path))
    made = first.event_id[~first.event_id.str.startswith("C")].tolist()
    assert len(made) == 1 and made[0].startswith("zeek-") and made[0].endswith("-10")
    assert again.event_id.tolist() == first.event_id.tolist()


def test_binary_junk_in_the_middle(fixtures, tmp_path):
    junk = bytes(range(256)).replace(b"\n", b"") + b"\xff\xfe\x00\t\t\xc3("
    path = _write(tmp_path, "c.log", _with_lines(fixtures, {2: junk, 3: b"\x00" * 50 + b"\t" * 20}))
    conns, quarantine, _ = _read(read_connections, path)
    assert len(conns) == 5
    assert [r.line for r in quarantine.records] == [11, 13]
    # the lone CR inside the junk became \x0d, so the line count is not shifted
    assert [r.reason for r in quarantine.records] == ["line is not valid UTF-8", "ts is not a number"]


def test_invalid_utf8_in_a_field_is_quarantined(fixtures, tmp_path):
    good = _lines(_conn_fixture(fixtures))[HEADER_LINES].split(b"\t")
    line = b"\t".join(good[:2] + [b"10.0.0.\xff"] + good[3:])
    conns, quarantine, _ = _read(read_connections, _write(tmp_path, "c.log", _with_lines(fixtures, {4: line})))
    assert len(conns) == 5 and [(r.line, r.reason) for r in quarantine.records] == [(13, "line is not valid UTF-8")]


def test_one_megabyte_line(fixtures, tmp_path):
    huge = b"1700000000.1\tChuge\t" + b"A" * (1 << 20)
    conns, quarantine, _ = _read(read_connections, _write(tmp_path, "c.log", _with_lines(fixtures, {1: huge})))
    assert len(conns) == 5 and [(r.line, r.reason) for r in quarantine.records] == [(10, "3 fields, expected 21")]
    assert len(quarantine.records[0].raw) == 256


def test_line_over_the_limit_is_skipped_unread(fixtures, tmp_path, monkeypatch):
    monkeypatch.setattr(zeek, "MAX_LINE_BYTES", 64 * 1024)
    huge = b"9" * (300 * 1024)
    path = _write(tmp_path, "c.log", _with_lines(fixtures, {1: huge, 3: huge}))
    quarantine = Quarantine()
    conns = pd.concat(list(iter_connections(str(path), quarantine, chunk_rows=100)))  # 12.8 kB pieces
    assert len(conns) == 5
    assert [(r.line, r.reason) for r in quarantine.records] == [
        (10, "line longer than 65536 bytes"), (13, "line longer than 65536 bytes")]


def test_truncated_plain_file(fixtures, tmp_path):
    data = _conn_fixture(fixtures).read_bytes()
    cut = data.index(b"C4ddddd") + 3                       # in the middle of data line 12
    conns, quarantine, _ = _read(read_connections, _write(tmp_path, "c.log", data[:cut]))
    assert conns.event_id.tolist() == ["C1aaaaaaaaaaaaaaa", "C2bbbbbbbbbbbbbbb", "C3ccccccccccccccc"]
    assert [(r.line, r.reason) for r in quarantine.records] == [(12, "2 fields, expected 21")]


@pytest.mark.parametrize("chunk_rows", [500, 250_000])     # pieces of 64 kB, or the whole file in one
@pytest.mark.parametrize("style", ["tsv", "json"])
def test_truncated_gzip(fixtures, tmp_path, chunk_rows, style):
    """Every record complete before the cut is kept, the cut one is not, the file says so once."""
    import zlib

    if style == "tsv":
        lines = _lines(_conn_fixture(fixtures))
        body = b"\n".join(lines[:HEADER_LINES] + lines[HEADER_LINES:HEADER_LINES + 4] * 2000) + b"\n"
    else:
        body = (fixtures / "zeek" / "conn.json").read_bytes().rstrip(b"\n").replace(b"\n\n", b"\n") + b"\n"
        body = body * 2000
    packed = gzip.compress(body)
    cut = packed[: len(packed) // 2]
    path = _write(tmp_path, "c.log.gz", cut)
    present = zlib.decompressobj(wbits=31).decompress(cut)       # all a decompressor can get
    complete = present[: present.rfind(b"\n") + 1]
    expected = sum(1 for line in complete.split(b"\n") if line.strip() and not line.startswith(b"#"))
    quarantine, summary = Quarantine(), ReadSummary()
    conns = pd.concat(list(iter_connections(str(path), quarantine, summary, chunk_rows=chunk_rows)))
    assert 1000 < len(conns) == expected
    assert [(r.line, r.reason) for r in quarantine.records] == [(0, (
        f"truncated gzip stream after {expected} records, the {len(present) - len(complete)} bytes of the "
        "record it cut not read (EOFError: Compressed file ended before the end-of-stream marker was reached)"))]
    assert [(f.outcome, f.kept, f.quarantined) for f in summary.files] == [("partly read", expected, 1)]


def test_crlf_line_ends(fixtures, tmp_path):
    data = _conn_fixture(fixtures).read_bytes().replace(b"\n", b"\r\n")
    conns, quarantine, _ = _read(read_connections, _write(tmp_path, "c.log", data))
    assert len(conns) == 5 and len(quarantine) == 0 and conns.conn_state.iloc[0] == "REJ"


def test_blank_lines_are_skipped_and_line_numbers_stay_exact(fixtures, tmp_path):
    good = _lines(_conn_fixture(fixtures))[HEADER_LINES].split(b"\t")
    bad = b"\t".join(good[:5] + [b"x"] + good[6:])
    conns, quarantine, _ = _read(read_connections, _write(tmp_path, "c.log", _with_lines(fixtures, {1: b"", 2: b"   ", 3: bad})))
    assert len(conns) == 5 and [(r.line, r.reason) for r in quarantine.records] == [(14, "id.resp_p is not a port number")]


def test_columns_in_any_order_and_a_new_header_mid_file(fixtures, tmp_path):
    lines = _lines(_conn_fixture(fixtures))
    fields = lines[6].split(b"\t")[1:]
    order = list(reversed(range(len(fields))))
    def reorder(line):
        cells = line.split(b"\t")
        return b"\t".join(cells[i] for i in order)
    second = [b"#fields\t" + reorder(lines[6][len(b"#fields\t"):])] + [reorder(l) for l in lines[HEADER_LINES:HEADER_LINES + 5]]
    second = [l.replace(b"\tC", b"\tZ") for l in second]
    data = b"\n".join(lines[:-2] + second) + b"\n#close\tx\n"
    conns, quarantine, _ = _read(read_connections, _write(tmp_path, "c.log", data))
    assert len(quarantine) == 0 and len(conns) == 10
    a = conns[conns.event_id.str.startswith("C")].drop(columns="event_id").reset_index(drop=True)
    b = conns[conns.event_id.str.startswith("Z")].drop(columns="event_id").reset_index(drop=True)
    assert a.equals(b)


def test_unknown_hash_line_and_data_before_fields(tmp_path):
    data = b"1\t2\n#separator \\x09\n#fields\tts\tuid\tid.orig_h\tid.orig_p\tid.resp_h\tid.resp_p\tconn_state\n" \
           b"#whatever\n1.5\tCa\t10.0.0.1\t1\t10.0.0.2\t80\tSF\n"
    conns, quarantine, _ = _read(read_connections, _write(tmp_path, "c.log", data))
    # sniffing needs '#fields' in the head, the stray first line is quarantined
    assert conns[["event_id", "dst_port", "proto"]].values.tolist() == [["Ca", 80, ""]]
    assert [(r.line, r.reason) for r in quarantine.records] == [
        (1, "data before the #fields header"), (4, "unknown '#' line")]


def test_clean_and_repaired_segments_of_one_header_give_one_canonical_chunk(fixtures, tmp_path):
    """A '#' comment splits a piece in two segments: the first clean (fast path), the second with
    a bad line (careful path); both become one chunk with canonical dtypes and exact line numbers."""
    lines = _lines(_conn_fixture(fixtures))
    data = lines[: HEADER_LINES + 2] + [b"#a comment", b"junk"] + lines[HEADER_LINES + 2:]
    quarantine = Quarantine()
    chunks = list(iter_connections(str(_write(tmp_path, "c.log", b"\n".join(data))), quarantine))
    assert len(chunks) == 1
    schema.validate(chunks[0], "connections")
    plain = list(iter_connections(str(_conn_fixture(fixtures))))[0]
    assert chunks[0].equals(plain) and chunks[0].equals(schema.conform(chunks[0], "connections"))
    assert [(r.line, r.reason) for r in quarantine.records] == [(11, "unknown '#' line"), (12, "1 fields, expected 21")]


def test_read_buffers_are_reused_without_corrupting_earlier_chunks(fixtures, tmp_path):
    """Pieces are read into recycled buffers: chunks already handed out must not change."""
    lines = _lines(_conn_fixture(fixtures))
    body = [l for l in lines[HEADER_LINES:] if l and not l.startswith(b"#")]
    many = [l.replace(b"\tC", b"\tC%04d" % i, 1) for i in range(400) for l in body]
    data = b"\n".join(lines[:HEADER_LINES] + many) + b"\n"
    chunks = list(iter_connections(str(_write(tmp_path, "c.log", data)), chunk_rows=40))   # ~5 kB pieces
    assert len(chunks) > 20
    got = pd.concat(chunks, ignore_index=True)
    assert got.event_id.tolist() == [l.split(b"\t")[1].decode() for l in many]
    assert got.equals(pd.concat(list(iter_connections(str(tmp_path / "c.log"))), ignore_index=True))


def test_dns_bad_ttls_and_field_count(tmp_path, fixtures):
    lines = _lines(fixtures / "zeek" / "dns.log")
    bad_ttl = lines[HEADER_LINES].replace(b"60.000000,300.000000", b"sixty,300.0")
    data = b"\n".join(lines[:HEADER_LINES + 1] + [bad_ttl, b"1.0\tDshort"] + lines[HEADER_LINES + 1:])
    dns, quarantine, _ = _read(read_dns, _write(tmp_path, "d.log", data))
    assert len(dns) == 9   # the fixture's 9 rows; the broken copies are quarantined
    assert [(r.line, r.reason) for r in quarantine.records] == [(10, "TTLs are not numbers"), (11, "2 fields, expected 24")]


def test_json_bad_lines(tmp_path, fixtures):
    good = (fixtures / "zeek" / "conn.json").read_bytes().splitlines()
    data = b"\n".join([
        good[0],
        b'{"ts": 1700000000.2, "uid": "Cbad1", "id.orig_h": "10.0.0.1", "id.orig_p": 1, "id.resp_h": "10.0.0.2", "id.resp_p": "https", "conn_state": "SF"}',
        b"{not json",
        b"",
        b"[1, 2, 3]",
        good[1],
        b'{"ts": [1], "uid": "Cbad2", "id.orig_h": "10.0.0.1", "id.resp_h": "10.0.0.2", "id.resp_p": 80, "conn_state": "SF"}',
        b'{"ts": "not a date", "uid": "Cbad3", "id.orig_h": "10.0.0.1", "id.resp_h": "10.0.0.2", "id.resp_p": 80, "conn_state": "SF"}',
        b'{"ts": 1.0, "uid": 7, "id.orig_h": "10.0.0.1", "id.resp_h": "10.0.0.2", "id.resp_p": 80, "conn_state": "SF"}',
        b'{"ts": 1.0, "uid": "Cbad5", "id.resp_h": "10.0.0.2", "id.resp_p": 80, "conn_state": "SF"}',
        b"\xff\xfe\x00junk",
        b'{"ts": 1.0, "uid": "Cdeep", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        good[2],
    ])
    conns, quarantine, _ = _read(read_connections, _write(tmp_path, "c.json", data))
    assert conns.event_id.tolist() == ["CJ1aaaaaaaaaaaaaa", "CJ2bbbbbbbbbbbbbb", "CJ3cccccccccccccc"]
    assert [(r.line, r.reason) for r in quarantine.records] == [
        (3, "invalid JSON"), (5, "not a JSON object"), (11, "invalid JSON"), (12, "invalid JSON"),
        (2, "id.resp_p has the wrong type"), (7, "ts has the wrong type"), (8, "ts has the wrong type"),
        (9, "uid has the wrong type"), (10, "id.orig_h is unset"),
    ]


def test_json_dns_wrong_vector_types(tmp_path):
    base = '{"ts":1.0,"uid":"D%d","id.orig_h":"10.0.0.1","id.resp_h":"10.0.0.53","query":"q","qtype_name":"A",%s}'
    data = "\n".join([base % (1, '"answers":["1.2.3.4"],"TTLs":[5]'), base % (2, '"answers":"1.2.3.4"'),
                      base % (3, '"answers":["a"],"TTLs":["x"]')]).encode()
    dns, quarantine, _ = _read(read_dns, _write(tmp_path, "d.json", data))
    assert dns[["event_id", "answer", "ttl"]].values.tolist() == [["D1", "1.2.3.4", 5.0]]
    assert [(r.line, r.reason) for r in quarantine.records] == [(2, "answers has the wrong type"), (3, "TTLs has the wrong type")]


def test_empty_and_foreign_files_are_rejected_via_shared_api(tmp_path, fixtures):
    empty = _write(tmp_path, "empty.log", b"")
    summary = ReadSummary()     # an empty file holds nothing to lose: read, 0 records
    assert len(read_connections(str(empty), Quarantine(), summary)) == 0
    assert summary.lines() == [f"{empty}: empty, 0 kept, 0 quarantined (empty file)"]
    text = _write(tmp_path, "notes.txt", b"hello\tworld\nthis is not zeek\n")
    with pytest.raises(IngestError, match=r"notes\.txt: not a known connections format \(tried: .*zeek_conn_tsv"):
        read_connections(str(text))
    with pytest.raises(IngestError, match=r"dns\.log: is zeek_dns_tsv \(dns_answers\), not connections"):
        read_connections(str(fixtures / "zeek" / "dns.log"))


def test_header_only_file_reads_nothing(fixtures, tmp_path):
    lines = _lines(_conn_fixture(fixtures))
    conns, quarantine, summary = _read(read_connections, _write(tmp_path, "c.log", b"\n".join(lines[:HEADER_LINES]) + b"\n"))
    assert len(conns) == 0 and len(quarantine) == 0 and summary.files[0].format == "zeek_conn_tsv"
    schema.validate(conns, "connections")


@pytest.mark.parametrize("head, kind", [
    (b"#separator \\x09\n#fields\tts\tuid\tid.orig_h\tid.orig_p\tid.resp_h\tid.resp_p\tconn_state\n", "conn"),
    (b"\t#separator \\x09\n#path\tconn\n#fields\tts\tuid\tid.orig_h\tid.resp_h\tquery\tanswers\n", "dns"),
    (b"#separator \\x2c\n#fields,ts,uid,id.orig_h,id.orig_p,id.resp_h,id.resp_p,orig_bytes\n", "conn"),
    (b"#separator \\x09\n#fields\tts\tuid\tid.orig_h\tid.resp_h\tmethod\thost\turi\n", None),   # http.log
    (b'{"ts":1.0,"id.orig_h":"a","id.resp_p":1,"conn_state":"SF"}\n', "conn"),
    (b'{"ts":1.0,"id":{"orig_h":"a"},"query":"x","qtype_name":"A"}\n', "dns"),
    (b'{"ts":1.0,"id.orig_h":"a","method":"GET"}\n', None),
    (b"\x00\x01\x02", None),
])
def test_sniffing_by_content(head, kind):
    tsv = zeek._tsv_kind(head)
    js = zeek._json_kind(head)
    assert (tsv or js) == kind


def test_other_separator(tmp_path):
    data = (b"#separator \\x2c\n#set_separator\t;\n#fields,ts,uid,id.orig_h,id.orig_p,id.resp_h,id.resp_p,orig_bytes\n"
            b"1.5,Ca,10.0.0.1,1,10.0.0.2,80,7\n")
    conns = read_connections(str(_write(tmp_path, "c.log", data)))
    assert conns[["event_id", "dst_port", "bytes_out"]].values.tolist() == [["Ca", 80, 7.0]]


# --- chunking and compression ---------------------------------------------------------------

def _big_conn(fixtures, copies=400):
    lines = _lines(_conn_fixture(fixtures))
    body = []
    for i in range(copies):
        body += [l.replace(b"\tC", b"\tC%05d" % i, 1) for l in lines[HEADER_LINES:HEADER_LINES + 5]]
    return b"\n".join(lines[:HEADER_LINES] + body) + b"\n#close\tx\n"


def test_small_chunks_equal_one_chunk(fixtures, tmp_path):
    path = str(_write(tmp_path, "c.log", _big_conn(fixtures)))
    small = list(iter_connections(path, chunk_rows=7))
    assert len(small) > 10
    one = pd.concat(list(iter_connections(path, chunk_rows=1_000_000)), ignore_index=True)
    assert pd.concat(small, ignore_index=True).equals(one) and len(one) == 2000
    dns_path = str(fixtures / "zeek" / "dns.log")
    assert pd.concat(list(iter_dns(dns_path, chunk_rows=1)), ignore_index=True).equals(
        pd.concat(list(iter_dns(dns_path, chunk_rows=1000)), ignore_index=True))
    json_path = str(fixtures / "zeek" / "conn.json")
    assert pd.concat(list(iter_connections(json_path, chunk_rows=1)), ignore_index=True).equals(
        pd.concat(list(iter_connections(json_path)), ignore_index=True))


def test_line_numbers_exact_across_small_chunks(fixtures, tmp_path):
    data = _big_conn(fixtures, copies=50).split(b"\n")
    for k in (20, 110, 200):           # tcp lines
        data[k] = data[k].replace(b"\ttcp\t", b"\ttcp\tjunk\t")
    quarantine = Quarantine()
    conns = pd.concat(list(iter_connections(str(_write(tmp_path, "c.log", b"\n".join(data))), quarantine, chunk_rows=9)))
    assert len(conns) == 247
    assert [(r.line, r.reason) for r in quarantine.records] == [(k + 1, "22 fields, expected 21") for k in (20, 110, 200)]


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress])
def test_compressed_equals_plain(fixtures, tmp_path, compress):
    plain = read_dns(str(fixtures / "zeek" / "dns.log"))
    packed = _write(tmp_path, "dns.bin", compress((fixtures / "zeek" / "dns.log").read_bytes()))
    assert read_dns(str(packed)).equals(plain)


# --- properties -----------------------------------------------------------------------------



def _valid_lines(fixtures):
    lines = _lines(_conn_fixture(fixtures))
    return lines[:HEADER_LINES], lines[HEADER_LINES:HEADER_LINES + 5]


def _mutate(line: bytes, data) -> bytes:
    return mutate(line, data, b"\t", 10_000).replace(b"\n", b" ")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_and_mutated_lines_never_break_the_reader(fixtures, tmp_path, data):
    header, valid = _valid_lines(fixtures)
    body: list[tuple[bytes, bool]] = [(l, True) for l in valid]
    n_inject = data.draw(st.integers(1, 6))
    for _ in range(n_inject):
        if data.draw(st.booleans()):
            injected = data.draw(st.binary(max_size=300)).replace(b"\n", b" ")
        else:
            injected = _mutate(data.draw(st.sampled_from(valid)), data)
        if injected.lstrip(b" \t\r").startswith(b"#"):
            injected = b"x" + injected      # a '#' line is a header directive, not a record
        body.insert(data.draw(st.integers(0, len(body))), (injected, False))
    path = tmp_path / "conn.log"
    path.write_bytes(b"\n".join(header + [l for l, _ in body]) + b"\n")
    quarantine = Quarantine()
    conns = read_connections(str(path), quarantine)
    injected_lines = {HEADER_LINES + 1 + i for i, (_, ok) in enumerate(body) if not ok}
    valid_uids = {l.split(b"\t")[1].decode() for l, ok in body if ok}
    assert valid_uids <= set(conns.event_id)                    # every valid record kept
    assert {r.line for r in quarantine.records if r.line} <= injected_lines  # only injected lines blamed
    # rows refused after parsing (no line number) can only be injected ones: every valid one is kept
    refused = [r.reason for r in quarantine.records if not r.line]
    assert all(r.startswith(("time out of range", "src_ip is not", "dst_ip is not")) for r in refused)
    blank = sum(1 for l, ok in body if not ok and not l.strip(b" \t\r\x0b\x0c"))
    assert len(conns) + len(quarantine) + blank >= len(body)    # nothing vanished silently
    schema.validate(conns, "connections")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.lists(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode))
                     .filter(lambda b: not b.startswith(CONTAINER_MAGIC)), min_size=1, max_size=5),
       positions=st.lists(st.integers(0, 2), min_size=5, max_size=5))
def test_random_json_lines_never_break_the_reader(fixtures, tmp_path, junk, positions):
    good = (fixtures / "zeek" / "conn.json").read_bytes().splitlines()
    lines = list(good)
    for i, blob in enumerate(junk):
        lines.insert(positions[i % 5] + i, blob.replace(b"\n", b" "))
    path = tmp_path / "c.json"
    path.write_bytes(b"\n".join(lines))
    conns = read_connections(str(path))
    assert {"CJ1aaaaaaaaaaaaaa", "CJ2bbbbbbbbbbbbbb", "CJ3cccccccccccccc"} <= set(conns.event_id)


def test_local_orig_and_history_tsv_and_json(tmp_path):
    """Zeek's local_orig/local_resp (T/F in TSV, true/false in JSON) and history reach the frame
    (scope reads them: `features.scope`); logs without them give ""."""
    tsv = tmp_path / "conn.log"
    tsv.write_bytes(b"#separator \\x09\n#fields\tts\tuid\tid.orig_h\tid.orig_p\tid.resp_h\tid.resp_p\tproto\t"
                    b"local_orig\tlocal_resp\thistory\n"
                    b"1700000000.0\tC1\t10.0.0.1\t5000\t8.8.8.8\t443\ttcp\tT\tF\tShADadFf\n"
                    b"1700000001.0\tC2\t1.1.1.2\t853\t10.0.0.1\t51234\ttcp\t-\t-\t^dA\n")
    conns, quarantine, _ = _read(read_connections, tsv)
    assert len(quarantine) == 0
    got = conns[["local_orig", "local_resp", "history"]].values.tolist()
    assert got == [["T", "F", "ShADadFf"], ["", "", "^dA"]]
    js = tmp_path / "conn.json"
    js.write_bytes(b'{"ts": 1700000000.0, "uid": "C1", "id.orig_h": "10.0.0.1", "id.orig_p": 5000, "id.resp_h": '
                   b'"8.8.8.8", "id.resp_p": 443, "proto": "tcp", "conn_state": "SF", "local_orig": true, '
                   b'"local_resp": false, "history": "ShAD"}\n'
                   b'{"ts": 1700000001.0, "uid": "C2", "id.orig_h": "10.0.0.1", "id.orig_p": 5001, "id.resp_h": '
                   b'"8.8.8.8", "id.resp_p": 443, "proto": "tcp", "conn_state": "SF"}\n')
    conns, quarantine, _ = _read(read_connections, js)
    assert len(quarantine) == 0
    assert conns[["local_orig", "local_resp", "history"]].values.tolist() == [["T", "F", "ShAD"], ["", "", ""]]
    schema.validate(conns, "connections")
