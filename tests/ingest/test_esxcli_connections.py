"""esxcli connection-list snapshots. No verbatim capture exists: the fixtures use the documented
header/dashes/row of formats.md (d) plus rows and time lines written by us (tests/fixtures/esxcli/README.md)."""
from __future__ import annotations

import os
import tempfile

import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esxi_anomaly import schema
from esxi_anomaly.ingest import esxcli_connections as esxcli
from esxi_anomaly.ingest.base import IngestError, Quarantine, stable_event_id

COLS = ["src_ip", "src_port", "dst_ip", "dst_port", "proto", "conn_state", "process", "esxi_host", "ts", "duration"]
T0 = 1714557600.0  # 2024-05-01T10:00:00Z


def read(path, chunk_rows=1000):
    quarantine = Quarantine()
    chunks = list(esxcli.read(str(path), quarantine, chunk_rows))
    df = pd.concat(chunks, ignore_index=True) if chunks else schema.empty("connections")
    schema.validate(df, "connections")
    return df, quarantine


def rows(df):
    return [tuple(r) for r in df[COLS].itertuples(index=False)]


def test_repeated_snapshots_become_one_observation(fixtures):
    path = fixtures / "esxcli" / "snapshots.txt"
    df, quarantine = read(path)
    assert rows(df) == [
        ("127.0.0.1", 18122, "127.0.0.1", 8307, "tcp", "ESTABLISHED", "rhttpproxy-work", "esx01.lab", T0, 300.0),
        ("192.168.35.11", 63389, "192.168.35.14", 8000, "tcp", "ESTABLISHED", "hostd-IO", "esx01.lab", T0, 600.0),
        ("192.168.35.11", 51234, "203.0.113.7", 4444, "udp", "", "vmsyslogd", "esx01.lab", T0, 0.0),
        ("192.168.35.11", 40001, "198.51.100.9", 1117, "tcp", "SYN_SENT", "vmtoolsd", "esx01.lab", T0 + 300, 0.0),
    ]
    # LISTEN, unconnected UDP (ntpd) and the inbound 443 session are not outbound connections
    assert df["event_id"].tolist() == [stable_event_id("esxcli", str(path), n) for n in (4, 7, 9, 16)]
    assert [(r.line, r.reason) for r in quarantine.records] == [
        (22, "bad endpoint '198.51.100.9:99999'"), (23, "bad address 'not-an-ip'")]
    assert (df["source"] == "esxcli_connections").all()


def test_csv_formatter_and_file_time_fallback(fixtures, tmp_path):
    path = tmp_path / "conn.csv"
    path.write_bytes((fixtures / "esxcli" / "snapshots_csv_no_time.csv").read_bytes())
    os.utime(path, (1700000000, 1700000000))
    df, quarantine = read(path)
    assert len(quarantine) == 0
    assert rows(df) == [
        ("127.0.0.1", 18122, "127.0.0.1", 8307, "tcp", "ESTABLISHED", "rhttpproxy-work", "", 1700000000.0, 0.0),
        ("192.168.35.11", 40001, "198.51.100.9", 1117, "tcp", "SYN_SENT", "vmtoolsd", "", 1700000000.0, 0.0),
    ]


def test_chunks_cover_every_row(fixtures):
    small, _ = read(fixtures / "esxcli" / "snapshots.txt", chunk_rows=1)
    big, _ = read(fixtures / "esxcli" / "snapshots.txt")
    assert small.equals(big)


def test_sniff(fixtures):
    assert esxcli.sniff((fixtures / "esxcli" / "snapshots.txt").read_bytes())
    assert esxcli.sniff((fixtures / "esxcli" / "snapshots_csv_no_time.csv").read_bytes())
    assert not esxcli.sniff(b"Proto Recv-Q Send-Q Local Address Foreign Address State\n")  # Linux netstat
    assert not esxcli.sniff(b"\x00\xff" * 1000)


def test_junk_rows_and_long_lines(fixtures, tmp_path):
    text = (fixtures / "esxcli" / "snapshots.txt").read_text().splitlines()
    path = tmp_path / "junk.txt"
    junk = ["tcp ??? garbage", "x" * 70_000, "\x00\x01\x02"]
    path.write_text("\n".join(junk[:1] + text[:4] + junk[1:]) + "\n")
    df, quarantine = read(path)
    assert len(df) == 1
    assert [(r.line, r.reason) for r in quarantine.records] == [
        (1, "row outside an esxcli connection table"),
        (6, "line longer than 65536 characters"),
        (7, "bad proto '\\x00\\x01\\x02'"),
    ]


HEADER = ["# 2024-05-01T10:00:00Z esx01.lab",
          "Proto  Recv Q  Send Q  Local Address                     Foreign Address      State        World ID  CC Algo  World Name",
          "-----  ------  ------  --------------------------------  -------------------  -----------  --------  -------  ----------"]
ROW = "tcp         0       0  " + "10.0.0.{n}:{p}".ljust(34) + "198.51.100.9:1117    ESTABLISHED   2105555  newreno  vmtoolsd"
GARBAGE = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"), max_size=80)


def _read_lines(lines):
    fd, name = tempfile.mkstemp(suffix=".txt")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        quarantine = Quarantine()
        return list(esxcli.read(name, quarantine, 4)), quarantine, name
    finally:
        os.unlink(name)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.booleans(), GARBAGE), max_size=10))
def test_valid_rows_among_garbage_are_all_kept(items):
    lines, valid = list(HEADER), []
    for i, (is_valid, junk) in enumerate(items):
        if is_valid:
            lines.append(ROW.format(n=10 + i, p=40000 + i))
            valid.append(len(lines))
        elif not junk.lstrip().startswith("#") and "Proto" not in junk and not junk.strip().startswith("-"):
            lines.append(junk)
    chunks, _q, name = _read_lines(lines)
    got = {e for c in chunks for e in c["event_id"]}
    assert {stable_event_id("esxcli", name, n) for n in valid} <= got


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 3), st.integers(0, 130), st.text(max_size=10))
def test_mutated_lines_never_raise(which, position, insert):
    lines = HEADER + [ROW.format(n=1, p=40000)]
    line = lines[which]
    lines[which] = line[:position] + insert + line[position + len(insert):]
    try:
        _read_lines(lines)
        esxcli.sniff("\n".join(lines).encode("utf-8", "surrogatepass"))
    except IngestError:
        pass
