"""NSX DFW packet logs. No real dfwpktlogs file exists: fixtures are the documented verbatim lines
of formats.md (b), some wrapped in documented syslog envelopes (see tests/fixtures/nsx/README.md)."""
from __future__ import annotations

import os
import tempfile
from unittest import mock

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from esxi_anomaly import schema
from esxi_anomaly.ingest import nsx_dfw
from esxi_anomaly.ingest.base import IngestError, Quarantine, stable_event_id


def read(path, chunk_rows=1000):
    quarantine = Quarantine()
    chunks = list(nsx_dfw.read(str(path), quarantine, chunk_rows))
    df = pd.concat(chunks, ignore_index=True) if chunks else schema.empty("connections")
    schema.validate(df, "connections")
    return df, quarantine


def rows(df, columns):
    return [tuple(r) for r in df[columns].itertuples(index=False)]


ADDR = ["src_ip", "src_port", "dst_ip", "dst_port", "proto", "conn_state", "esxi_host"]


def test_raw_nsxt_and_nsxv_lines(fixtures):
    path = fixtures / "nsx" / "nsxt_raw_dfwpktlogs.log"
    df, quarantine = read(path)
    assert len(quarantine) == 0
    assert rows(df, ADDR) == [
        ("192.168.4.3", 49627, "192.168.4.4", 49153, "tcp", "PASS", ""),
        ("192.168.4.3", 49676, "192.168.4.4", 135, "tcp", "DROP", ""),
        ("0.0.0.0", -1, "224.0.0.1", -1, "igmp", "DROP", ""),
        ("fe80::68c2:8472:2364:9be", 546, "ff02::1:2", 547, "udp", "DROP", ""),
        ("1.1.1.10", -1, "1.1.3.10", -1, "icmp", "PASS", ""),
        ("1.1.1.10", -1, "1.1.3.10", -1, "icmp", "PASS", ""),
        ("192.168.110.10", 138, "192.168.110.255", 138, "udp", "DROP", ""),
    ]
    assert df["ts"].tolist()[:4] == pytest.approx([1530647049.749, 1530647162.338, 1530900949.647, 1530901194.764])
    assert df["event_id"][0] == stable_event_id("nsx", str(path), 1)
    assert (df["source"] == "nsx_dfw").all()
    assert df["bytes_out"].isna().all()  # one packet's length is not the session's bytes


def test_esxi8_header(fixtures):
    df, quarantine = read(fixtures / "nsx" / "esxi8_dfwpktlogs.log")
    assert len(quarantine) == 0
    assert rows(df, ADDR) == [("192.168.72.10", -1, "192.168.72.17", -1, "icmp", "PASS", "")] * 2
    assert df["ts"].tolist() == pytest.approx([1772496131.678] * 2)


def test_forwarded_syslog_mixed_with_other_programs(fixtures):
    df, quarantine = read(fixtures / "nsx" / "forwarded_syslog.log")
    assert rows(df, ADDR) == [
        ("10.10.10.11", 4002, "10.10.10.12", 49975, "tcp", "DROP", "esx01.lab"),
        ("192.168.1.201", 47629, "192.168.1.205", 22, "tcp", "PASS", "esx01.lab"),
        ("1.1.1.10", 45120, "91.189.92.38", 443, "tcp", "PASS", "lur-svc.nsxedge-ob-16404613-1-gdefw"),
        ("10.10.10.11", 4003, "10.10.10.12", 49975, "tcp", "REJECT", "esx02.lab"),
    ]
    assert df["ts"].tolist() == pytest.approx([1425957742.671, 1425957743.0, 1600726452.080427, 1425957744.5])
    # the Hostd line (1) is another program's valid record: skipped, not quarantined
    assert [(r.line, r.reason) for r in quarantine.records] == [
        (6, "not a DFW packet-log line"), (7, "bad address '192.168.1.299'")]


def test_term_lines_complete_their_session(fixtures):
    df, quarantine = read(fixtures / "nsx" / "term_session.log")
    assert len(quarantine) == 0
    cols = ["src_port", "conn_state", "bytes_out", "bytes_in", "packets_out", "packets_in"]
    assert rows(df, cols) == [
        (49627, "PASS", 7684.0, 1070.0, 22.0, 14.0),  # IN: "in" counts flow src -> dst
        (50001, "PASS", 900.0, 300.0, 7.0, 5.0),      # OUT: "out" counts flow src -> dst
        (50002, "TERM", 80.0, 40.0, 2.0, 1.0),        # no start row seen
    ]
    assert df["duration"][:2].tolist() == pytest.approx([10.25, 30.5])
    assert np.isnan(df["duration"][2])
    assert df["ts"][2] == pytest.approx(1530647160.0)


def test_chunking_keeps_every_row(fixtures):
    df_small, _ = read(fixtures / "nsx" / "nsxt_raw_dfwpktlogs.log", chunk_rows=2)
    df_big, _ = read(fixtures / "nsx" / "nsxt_raw_dfwpktlogs.log")
    assert df_small.equals(df_big)


@pytest.mark.parametrize("chunk_rows", [1, 2, 3])
def test_term_lines_complete_their_session_whatever_the_chunk_size(fixtures, chunk_rows):
    """`chunk_rows` (`score --chunk-rows`) sizes the frames handed on, not the block of lines a TERM is
    paired within: a smaller one gives the same rows, not a TERM row and an open PASS row apart."""
    small, _ = read(fixtures / "nsx" / "term_session.log", chunk_rows)
    assert small.equals(read(fixtures / "nsx" / "term_session.log")[0])


def test_sniff(fixtures):
    for name in ("nsxt_raw_dfwpktlogs.log", "esxi8_dfwpktlogs.log", "forwarded_syslog.log"):
        assert nsx_dfw.sniff((fixtures / "nsx" / name).read_bytes())
    assert not nsx_dfw.sniff(b"<166>2022-11-04T15:01:58.230Z ESXI Hostd: info hostd[1] x\n")
    assert not nsx_dfw.sniff(b"\x00\x01INET->\xff" * 100)
    assert not nsx_dfw.sniff(b"")


def test_bad_input_is_quarantined_not_raised(tmp_path):
    path = tmp_path / "bad.log"
    good = b"2018-07-03T19:44:09.749Z b6507827 INET match PASS mainrs/1024 IN 52 TCP 192.168.4.3/49627->192.168.4.4/49153 SEW\n"
    path.write_bytes(
        good
        + b"\x00\xff\xfe binary junk\n"
        + b"2018-07-03T19:44:09.749Z b6507827 INET match PASS mainrs/1024 IN 52 TCP 1.2.3.4/70000->1.2.3.5/1 S\n"
        + b"2099-99-99T00:00:00Z b6507827 INET match PASS mainrs/1024 IN 52 TCP 1.2.3.4/7->1.2.3.5/1 S\n"
        + b"A" * 200_000 + b"\n"
        + good.rstrip(b"\n")[:60]  # truncated last line
    )
    df, quarantine = read(path)
    assert len(df) == 1
    assert [(r.line, r.reason) for r in quarantine.records] == [
        (2, "not a DFW packet-log line"),
        (3, "port 70000 out of range"),
        (4, "no usable timestamp"),
        (5, "line longer than 65536 characters"),
        (6, "not a DFW packet-log line"),
    ]


def test_gzip_truncated_stream(tmp_path, fixtures):
    import gzip

    data = gzip.compress((fixtures / "nsx" / "nsxt_raw_dfwpktlogs.log").read_bytes() * 50)
    path = tmp_path / "cut.log.gz"
    path.write_bytes(data[: len(data) // 2])
    df, quarantine = read(path)
    assert 0 < len(df) < 350 and len(quarantine) == 0     # the reader sees the lines before the cut
    from esxi_anomaly.ingest import read_connections

    q = Quarantine()
    assert len(read_connections(str(path), q)) == len(df)   # iter_file says the file was cut
    assert [(r.line, r.reason.split(",")[0]) for r in q.records] == [
        (0, f"truncated gzip stream after {len(df)} records")]


VALID = (
    "2018-07-03T19:46:02.338Z 7396c504 INET match DROP mainrs/1024 OUT 52 TCP 192.168.4.3/49676->192.168.4.4/135 SEW",
    "2018-07-06T18:19:54.764Z 028cd586 INET6 match DROP mainrs/1027 OUT 143 UDP fe80:0:0:0:68c2:8472:2364:9be/546->ff02:0:0:0:0:0:1:2/547",
    "2026-03-03T00:02:11.678Z No(13) FIREWALL-PKTLOG[1069031]: 8b4a1980 INET match PASS 25577 OUT 84 ICMP 192.168.72.10->192.168.72.17",
    "<14>1 2015-03-10T03:22:24.500Z esx02.lab dfwpktlogs - - - 8519 INET match REJECT domain-c##/1101 OUT 125 TCP 10.10.10.11/4003->10.10.10.12/49975 S",
)
GARBAGE = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"), max_size=120)


def _read_lines(lines: list[str]):
    fd, name = tempfile.mkstemp(suffix=".log")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        quarantine = Quarantine()
        chunks = list(nsx_dfw.read(name, quarantine, 3))
        return chunks, quarantine, name
    finally:
        os.unlink(name)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.booleans(), st.sampled_from(VALID), GARBAGE), max_size=12))
def test_valid_lines_among_garbage_are_all_kept(items):
    lines, valid_line_numbers = [], []
    for is_valid, valid, junk in items:
        lines.append(valid if is_valid else junk)
        if is_valid:
            valid_line_numbers.append(len(lines))
    chunks, quarantine, name = _read_lines(lines)
    got = [eid for c in chunks for eid in c["event_id"]]
    for n in valid_line_numbers:
        assert stable_event_id("nsx", name, n) in got


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(VALID), st.integers(0, 200), st.text(max_size=12))
def test_mutated_lines_never_raise(line, position, insert):
    mutated = line[:position] + insert + line[position + len(insert):]
    try:
        _read_lines([mutated])
        nsx_dfw.sniff(mutated.encode("utf-8", "surrogatepass"))
    except IngestError:
        pass


# --- the column-wise fast path decides exactly as the per-line path ------------------------


def _read_both(path, chunk_rows):
    """(frame, quarantine records, lines the fast path took) read as shipped, then per line only."""
    results = []
    for fast in (True, False):
        taken = []
        original = nsx_dfw._Block._fast

        def spy(self, lines):
            rows, positions = original(self, lines)
            taken.append(len(positions))
            return rows, positions

        patch = mock.patch.object(nsx_dfw._Block, "_fast", spy if fast else
                                  lambda self, lines: (nsx_dfw._no_rows(), np.zeros(0, np.int64)))
        with patch:
            df, quarantine = read(path, chunk_rows)
        results.append((df, [(r.line, r.reason, r.raw) for r in quarantine.records], sum(taken)))
    return results


def _ts(data):
    t = data.draw(st.integers(946684800, 2051222400))
    text = pd.Timestamp(t, unit="s").strftime("%Y-%m-%d") + data.draw(st.sampled_from("TTTt")) \
        + pd.Timestamp(t, unit="s").strftime("%H:%M:%S")
    text = data.draw(st.sampled_from([text, text.replace("-01T", "-31T"), text[:11] + "24" + text[13:]]))
    digits = data.draw(st.integers(0, 9))
    frac = "." + "".join(data.draw(st.lists(st.sampled_from("0123456789"), min_size=digits, max_size=digits)))
    return text + (frac if digits else "") + data.draw(st.sampled_from(["Z", "Z", "z", "+05:30", "-0800", ""]))


def _address(data):
    ip = data.draw(st.sampled_from(["10.0.0.1", "10.0.0.2", "192.168.4.3", "010.0.0.1", "10.0.0.256",
                                    "fe80:0:0:0:68c2:8472:2364:9be", "ff02::1:2", "::1", "1:2"]))
    port = data.draw(st.sampled_from(["", "/80", "/49627", "/65535", "/65536", "/99999"]))
    return ip + port


def _dfw_line(data):
    term = data.draw(st.booleans())
    body = " ".join(filter(None, [
        data.draw(st.sampled_from(["", _ts(data)])),
        data.draw(st.sampled_from(["", "b6507827", "8519", "<1 55f1af2f487544e9:b0e059132ad7753d>"])),
        data.draw(st.sampled_from(["INET", "INET6"])),
        "TERM" if term else data.draw(st.sampled_from(["match", "reason-match"])),
        "" if term else data.draw(st.sampled_from(["", "PASS", "PASS", "DROP", "REJECT"])),
        data.draw(st.sampled_from(["mainrs/1024", "25577", "domain-c##/1101"])),
        data.draw(st.sampled_from(["IN", "OUT"])),
        "" if term else data.draw(st.sampled_from(["", "52"])),
        data.draw(st.sampled_from(["TCP", "UDP", "ICMP", "PROTO 2", "PROTO 99", "IPV6-ICMP"])),
        data.draw(st.sampled_from(["FIN", "RST"])) if term else "",
        f"{_address(data)}->{_address(data)}",
        data.draw(st.sampled_from(["", "S", "22/14 7684/1070", "5/7 300/900 x", "1/2 40/80"])),
    ]))
    envelopes = ["", f"<14>1 {_ts(data)} esx01.lab dfwpktlogs 123 - - ", f"<14>1 {_ts(data)} - NSX - - - ",
                 f"<14>1 - esx02.lab dfwpktlogs - - - ", f"{_ts(data)} No(13) FIREWALL-PKTLOG[1069031]: ",
                 f"<166>{_ts(data)} esx01.lab dfwpktlogs: ", f"{_ts(data)} esx03.lab dfwpktlogs[77]: ",
                 '<14>1 2015-03-10T03:22:24.500Z esx02.lab NSX - - [nsx@6876 comp="nsx-edge"] ',
                 "Mar 10 03:22:24 esx04.lab dfwpktlogs: ", "\ufeff"]
    line = data.draw(st.sampled_from(envelopes)) + body
    if data.draw(st.integers(0, 9)) == 0:   # now and then a damaged line
        position = data.draw(st.integers(0, len(line)))
        line = line[:position] + data.draw(st.text(max_size=3)) + line[position + 1:]
    return line.replace("\n", " ").replace("\r", " ")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fast_path_equals_the_per_line_path(tmp_path, data):
    lines = [_dfw_line(data) for _ in range(data.draw(st.integers(1, 40)))]
    path = tmp_path / "dfw.log"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    chunk_rows = data.draw(st.sampled_from([3, 1000]))
    with mock.patch.object(nsx_dfw, "_FAST_PIECE", data.draw(st.sampled_from([2, 50_000]))):
        (fast, fast_bad, taken), (slow, slow_bad, _) = _read_both(path, chunk_rows)
    pd.testing.assert_frame_equal(fast, slow)
    assert fast_bad == slow_bad
    event(f"fast path took {'some' if taken else 'no'} lines")


def test_fast_path_takes_the_common_shapes(fixtures):
    for name, expected in (("nsxt_raw_dfwpktlogs.log", 7), ("esxi8_dfwpktlogs.log", 2), ("term_session.log", 5),
                           ("forwarded_syslog.log", 3)):   # not: hostd, SD element, junk, a bad address
        (fast, fast_bad, taken), (slow, slow_bad, _) = _read_both(fixtures / "nsx" / name, 1000)
        pd.testing.assert_frame_equal(fast, slow)
        assert fast_bad == slow_bad
        assert taken == expected, name
