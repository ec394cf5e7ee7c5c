"""esxcli connection-list snapshots. No verbatim capture exists: the fixtures use the documented
header/dashes/row of formats.md (d) plus rows and time lines written by us (tests/fixtures/esxcli/README.md)."""
from __future__ import annotations

import os
import tempfile

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esxi_anomaly import schema
from esxi_anomaly.ingest import esxcli_connections as esxcli
from esxi_anomaly.ingest.base import IngestError, Quarantine, stable_event_id

COLS = ["src_ip", "src_port", "dst_ip", "dst_port", "proto", "conn_state", "process", "esxi_host", "ts", "duration"]
T0 = 1714557600.0  # 2024-05-01T10:00:00Z


def read(path, chunk_rows=1000, options=None):
    quarantine = Quarantine()
    chunks = list(esxcli.read(str(path), quarantine, chunk_rows, options=options))
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
        # accepted on the LISTENed 443: kept, from the client's side, the world name being the server's
        ("10.0.0.50", 51000, "192.168.35.11", 443, "tcp", "ESTABLISHED", "", "esx01.lab", T0, 0.0),
        ("192.168.35.11", 63389, "192.168.35.14", 8000, "tcp", "ESTABLISHED", "hostd-IO", "esx01.lab", T0, 600.0),
        ("192.168.35.11", 51234, "203.0.113.7", 4444, "udp", "", "vmsyslogd", "esx01.lab", T0, 0.0),
        ("192.168.35.11", 40001, "198.51.100.9", 1117, "tcp", "SYN_SENT", "vmtoolsd", "esx01.lab", T0 + 300, 0.0),
    ]
    # LISTEN and unconnected UDP (ntpd) are not connections
    assert df["event_id"].tolist() == [stable_event_id("esxcli", str(path), n) for n in (4, 6, 7, 9, 16)]
    assert [(r.line, r.reason) for r in quarantine.records] == [
        (22, "bad endpoint '198.51.100.9:99999'"), (23, "bad address 'not-an-ip'")]
    assert (df["source"] == "esxcli_connections").all()


def test_csv_table_without_a_time_is_quarantined_never_given_the_file_time(fixtures, tmp_path):
    path = tmp_path / "conn.csv"
    path.write_bytes((fixtures / "esxcli" / "snapshots_csv_no_time.csv").read_bytes())
    os.utime(path, (1700000000, 1700000000))
    df, quarantine = read(path)
    assert df.empty
    assert [(r.line, r.reason, r.raw[:6]) for r in quarantine.records] == [
        (2, esxcli.NO_TIME, "newren"), (3, esxcli.NO_TIME, "newren"), (4, esxcli.NO_TIME, "cubic,")]
    assert esxcli.NO_TIME == ("esxcli table without a snapshot time; give --snapshot-time or add a "
                              "'# <ISO time>' line")


@pytest.mark.parametrize("given, expected", [(1709769622.0, 1709769622.0), ("mtime", 1700000000.0)])
def test_snapshot_time_option_times_the_tables_without_one(fixtures, tmp_path, given, expected):
    path = tmp_path / "conn.csv"
    path.write_bytes((fixtures / "esxcli" / "snapshots_csv_no_time.csv").read_bytes())
    os.utime(path, (1700000000, 1700000000))
    df, quarantine = read(path, options={"snapshot_time": given})
    assert len(quarantine) == 0
    assert rows(df) == [
        ("127.0.0.1", 18122, "127.0.0.1", 8307, "tcp", "ESTABLISHED", "rhttpproxy-work", "", expected, 0.0),
        ("192.168.35.11", 40001, "198.51.100.9", 1117, "tcp", "SYN_SENT", "vmtoolsd", "", expected, 0.0),
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


# -- snapshot times: what collectors write ----------------------------------------------------

T1 = 1709769622.0  # 2024-03-07T00:00:22Z
TABLE = HEADER[1:] + [
    "tcp         0       0  192.168.35.12:40100                 203.0.113.50:443     ESTABLISHED   2105555  newreno  vmtoolsd"]


@pytest.mark.parametrize("line, ts, host", [
    ("# 2024-03-07T00:00:22Z esx02", T1, "esx02"),
    ("# esx02 2024-03-07T00:00:22Z", T1, "esx02"),             # the host first: once read as mtime
    ("# 2024-03-07T00:00:22Z", T1, ""),
    ("#2024-03-07 00:00:22", T1, ""),                          # space for T, no zone: UTC
    ("# esx02.corp.local 2024-03-07T01:00:22+01:00", T1, "esx02.corp.local"),
    ("# 2024-03-06T19:00:22-0500 esx02", T1, "esx02"),
    ("# 2024-03-07T00:00:22.250Z esx02", T1 + 0.25, "esx02"),
    ("# 2024-03-07T00:00:22,5 UTC", T1 + 0.5, ""),
    ("# collected on esx02 at 2024-03-07T00:00:22Z by dfir.sh", T1, ""),   # prose: no host guessed
    ("# snapshot 2024-03-07T00:00:22Z", T1, ""),               # a word is not a host
    ("# host=esx02 time=2024-03-07T00:00:22Z", T1, "esx02"),
    ("# 20240307T000022Z esx02", T1, "esx02"),
    ("2024-03-07T00:00:22Z", T1, ""),                          # `date -u +%FT%TZ` alone
    ("esx02 2024-03-07T00:00:22+00:00", T1, "esx02"),
    ("Thu Mar  7 00:00:22 UTC 2024", T1, ""),                  # `date`
    ("Thu Mar  7 00:00:22 GMT 2024", T1, ""),
    ("Thu Mar 07 01:00:22 +0100 2024", T1, ""),
    ("Thu, 07 Mar 2024 00:00:22 +0000", T1, ""),               # `date -R`
    ("# Thu Mar  7 00:00:22 UTC 2024 esx02", T1, "esx02"),
])
def test_each_time_line_form_gives_the_exact_time(tmp_path, line, ts, host):
    path = tmp_path / "snap.txt"
    path.write_text("\n".join(["# esxcli network ip connection list", line] + TABLE) + "\n")
    os.utime(path, (1700000000, 1700000000))
    df, quarantine = read(path)
    assert len(quarantine) == 0
    assert rows(df) == [("192.168.35.12", 40100, "203.0.113.50", 443, "tcp", "ESTABLISHED", "vmtoolsd", host, ts, 0.0)]


@pytest.mark.parametrize("line, why", [
    ("Thu Mar  7 00:00:22 CET 2024", "zone 'CET' is ambiguous (accepted: UTC, GMT, Z or a numeric offset)"),
    ("# 2024-02-30T00:00:22Z esx02", "not a date (day is out of range for month)"),
])
def test_an_unusable_time_line_quarantines_its_table(tmp_path, line, why):
    path = tmp_path / "snap.txt"
    path.write_text("\n".join([line] + TABLE) + "\n")
    df, quarantine = read(path)
    assert df.empty
    assert [(r.line, r.reason) for r in quarantine.records] == [
        (4, f"esxcli snapshot time {line!r} not used: {why}; {esxcli.NO_TIME}")]
    df, quarantine = read(path, options={"snapshot_time": T0})   # --snapshot-time stands in
    assert len(quarantine) == 0 and df["ts"].tolist() == [T0]


def test_no_time_line_and_no_option_quarantines_each_row_of_the_table(tmp_path):
    path = tmp_path / "snap.txt"
    path.write_text("\n".join(HEADER + [ROW.format(n=1, p=40000)] + TABLE + [ROW.format(n=2, p=40001)]) + "\n")
    os.utime(path, (1700000000, 1700000000))
    df, quarantine = read(path)
    # the first table is timed; the second (from line 5) has no time line: its rows, LISTEN or not, go
    assert rows(df) == [("10.0.0.1", 40000, "198.51.100.9", 1117, "tcp", "ESTABLISHED", "vmtoolsd", "esx01.lab", T0, 0.0)]
    assert [(r.line, r.reason) for r in quarantine.records] == [(7, esxcli.NO_TIME), (8, esxcli.NO_TIME)]


@pytest.mark.parametrize("name, ts", [
    ("esx01_2024-03-07T000022Z_connections.txt", T1),
    ("esxcli-20240307-000022.txt", T1),
    ("esx01-2024-03-07_00.00.22.log.gz", T1),
    ("esx01_2024-03-07T01:00:22+01:00.txt", T1),
    ("esx01-20241399-000022.txt", None),       # not a date: no time
    ("esx01-2024-03-07.txt", None),            # a day is not a snapshot time
])
def test_per_snapshot_file_names_time_their_tables(tmp_path, name, ts):
    import gzip

    path = tmp_path / name
    data = ("\n".join(TABLE) + "\n").encode()
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    df, quarantine = read(path)
    if ts is None:
        assert df.empty and [r.reason for r in quarantine.records] == [esxcli.NO_TIME]
    else:
        assert len(quarantine) == 0 and df["ts"].tolist() == [ts]
    path.write_bytes(("\n".join(["# 2024-05-01T10:00:00Z"] + TABLE) + "\n").encode())
    if not name.endswith(".gz"):   # a time line before the table wins over the name
        assert read(path)[0]["ts"].tolist() == [T0]


def test_csv_time_and_host_columns(tmp_path):
    path = tmp_path / "export.csv"
    path.write_text(
        '"Timestamp","VMHost","CCAlgo","ForeignAddress","LocalAddress","Proto","RecvQ","SendQ","State","WorldID","WorldName"\n'
        '"2024-03-07T00:00:22Z","esx02","newreno","0.0.0.0:0","0.0.0.0:7777","tcp","0","0","LISTEN","1","backdoor"\n'
        '"2024-03-07T00:00:22Z","esx02","newreno","198.51.100.3:55555","192.168.35.12:7777","tcp","0","0","ESTABLISHED","1","backdoor"\n'
        '"2024-03-07T00:01:22Z","esx02","newreno","198.51.100.3:55556","192.168.35.12:7777","tcp","0","0","ESTABLISHED","1","backdoor"\n'
        '"1709769742","esx03","newreno","203.0.113.50:443","192.168.35.13:40100","tcp","0","0","ESTABLISHED","2","vmtoolsd"\n'
        '"3/7/2024 12:00:22 AM","esx03","newreno","203.0.113.50:443","192.168.35.13:40101","tcp","0","0","ESTABLISHED","2","vmtoolsd"\n'
        '"","esx03","newreno","203.0.113.50:443","192.168.35.13:40102","tcp","0","0","ESTABLISHED","2","vmtoolsd"\n')
    df, quarantine = read(path)
    assert rows(df) == [
        # the LISTEN row of the 00:00:22 snapshot makes its 7777 socket inbound, not the 00:01:22 one's
        ("198.51.100.3", 55555, "192.168.35.12", 7777, "tcp", "ESTABLISHED", "", "esx02", T1, 0.0),
        ("192.168.35.12", 7777, "198.51.100.3", 55556, "tcp", "ESTABLISHED", "backdoor", "esx02", T1 + 60, 0.0),
        ("192.168.35.13", 40100, "203.0.113.50", 443, "tcp", "ESTABLISHED", "vmtoolsd", "esx03", T1 + 120, 0.0),
    ]
    assert [(r.line, r.reason) for r in quarantine.records] == [
        (6, "bad snapshot time '3/7/2024 12:00:22 AM'"), (7, esxcli.NO_TIME)]


# -- direction from the host's own view -------------------------------------------------------

def _snapshot(*rows_text, stamp="# 2024-03-07T00:00:22Z esx01"):
    return [stamp] + HEADER[1:] + [
        f"{proto:<5}       0       0  {local:<32}  {foreign:<19}  {state:<11}  {wid:>8}  newreno  {world}"
        for proto, local, foreign, state, wid, world in rows_text]


def test_accepted_sockets_are_inbound_from_the_client_side(tmp_path):
    path = tmp_path / "snap.txt"
    lines = _snapshot(
        ("tcp", "192.168.35.11:902", "10.0.0.20:50123", "ESTABLISHED", "2099001", "hostd-IO"),      # NFC, accepted
        ("tcp", "192.168.35.11:8000", "192.168.35.14:61000", "ESTABLISHED", "2099002", "vmotion"),  # vMotion in
        ("tcp", "192.168.35.11:40100", "203.0.113.50:443", "ESTABLISHED", "2099003", "vmtoolsd"),   # egress
        ("tcp", "192.168.35.11:40200", "192.168.35.14:8000", "ESTABLISHED", "2099002", "vmotion"),  # vMotion out
        ("tcp", "0.0.0.0:7777", "0.0.0.0:0", "LISTEN", "2099004", "backdoor"),
        ("tcp", "192.168.35.11:7777", "198.51.100.3:55555", "ESTABLISHED", "2099004", "backdoor"),  # LISTENed
        ("udp", "192.168.35.11:161", "10.0.0.9:40000", "", "2099005", "snmpd"),                      # UDP server
        ("udp", "192.168.35.11:8301", "192.168.35.14:8301", "", "2099006", "dvssync"),              # both: as seen
        ("tcp", "127.0.0.1:8307", "0.0.0.0:0", "LISTEN", "2099007", "hostd"),
        ("tcp", "127.0.0.1:18122", "127.0.0.1:8307", "ESTABLISHED", "2099008", "rhttpproxy-work"),
        ("tcp", "127.0.0.1:8307", "127.0.0.1:18122", "ESTABLISHED", "2099007", "hostd"),           # its twin
    ) + _snapshot(   # the next snapshot has no LISTEN row: 7777 is no known service, so it is as seen
        ("tcp", "192.168.35.11:7777", "198.51.100.3:55556", "ESTABLISHED", "2099004", "backdoor"),
        stamp="# 2024-03-07T00:01:22Z esx01")
    path.write_text("\n".join(lines) + "\n")
    df, quarantine = read(path)
    assert len(quarantine) == 0
    h = "esx01"
    assert rows(df) == [
        ("10.0.0.20", 50123, "192.168.35.11", 902, "tcp", "ESTABLISHED", "", h, T1, 0.0),
        ("192.168.35.14", 61000, "192.168.35.11", 8000, "tcp", "ESTABLISHED", "", h, T1, 0.0),
        ("192.168.35.11", 40100, "203.0.113.50", 443, "tcp", "ESTABLISHED", "vmtoolsd", h, T1, 0.0),
        ("192.168.35.11", 40200, "192.168.35.14", 8000, "tcp", "ESTABLISHED", "vmotion", h, T1, 0.0),
        ("198.51.100.3", 55555, "192.168.35.11", 7777, "tcp", "ESTABLISHED", "", h, T1, 0.0),
        ("10.0.0.9", 40000, "192.168.35.11", 161, "udp", "", "", h, T1, 0.0),
        ("192.168.35.11", 8301, "192.168.35.14", 8301, "udp", "", "dvssync", h, T1, 0.0),
        ("127.0.0.1", 18122, "127.0.0.1", 8307, "tcp", "ESTABLISHED", "rhttpproxy-work", h, T1, 0.0),
        ("192.168.35.11", 7777, "198.51.100.3", 55556, "tcp", "ESTABLISHED", "backdoor", h, T1 + 60, 0.0),
    ]


def test_an_inbound_row_is_never_management_egress(tmp_path):
    """Through the feature that scores ESXi egress: the accepted NFC socket's source is the client."""
    from esxi_anomaly.features.mgmt_plane import ManagementPlane

    path = tmp_path / "snap.txt"
    path.write_text("\n".join(_snapshot(
        ("tcp", "192.168.35.11:902", "10.0.0.20:50123", "ESTABLISHED", "2099001", "hostd-IO"),
        ("tcp", "192.168.35.11:40100", "203.0.113.50:4444", "ESTABLISHED", "2099003", "vmtoolsd"))) + "\n")
    df, _ = read(path)
    inventory = pd.DataFrame({"ip": ["192.168.35.11", "10.0.0.20"], "name": ["esx01", "vc"],
                              "kind": ["esxi_mgmt", "vm"], "esxi_host": ["", ""], "role": ["", ""]})
    kinds = df["src_ip"].map(inventory.set_index("ip")["kind"]).fillna("unknown")
    flags = ManagementPlane().fit(inventory).transform(df, pd.DataFrame({"src_kind": kinds}))
    assert list(zip(df["dst_port"], flags["mgmt_unexpected_egress"])) == [(902, 0.0), (4444, 1.0)]


# -- the read summary ------------------------------------------------------------------------

@pytest.mark.parametrize("stamp, warning", [
    ("# 1999-12-31T23:59:00Z", "warning: times before 2000-01-01 (earliest 1999-12-31 23:59:00 UTC)"),
    ("# 2099-01-01T00:00:00Z", "warning: times in the future (latest 2099-01-01 00:00:00 UTC)"),
    ("# 2024-03-07T00:00:22Z", ""),
])
def test_implausible_times_are_warned_about_in_the_read_summary(tmp_path, capsys, stamp, warning):
    from esxi_anomaly import ingest

    path = tmp_path / "snap.txt"
    path.write_text("\n".join([stamp] + TABLE) + "\n")
    summary = ingest.ReadSummary()
    assert len(ingest.read_connections(str(path), ingest.Quarantine(), summary)) == 1
    (stats,) = summary.files
    assert stats.outcome == ingest.READ and stats.reason == warning
    assert ingest.file_line(stats) == f"{path}: esxcli_connections, 1 kept, 0 quarantined" + (
        f" ({warning})" if warning else "")
    from esxi_anomaly import cli

    assert cli.main(["inspect", str(path)]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith(" UTC" + (f", {warning}" if warning else ""))


# -- --snapshot-time on the command line --------------------------------------------------------

def _untimed(tmp_path):
    path = tmp_path / "esx01-connections.txt"
    path.write_text("\n".join(TABLE + [ROW.format(n=2, p=40001)]) + "\n")
    os.utime(path, (1700000000, 1700000000))
    return path


def test_inspect_takes_snapshot_time(tmp_path, capsys):
    from esxi_anomaly import cli

    path = _untimed(tmp_path)
    assert cli.main(["inspect", str(path)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{path}: esxcli_connections (connections), 0 records, 2 quarantined", f"    2 x {esxcli.NO_TIME}"]
    assert cli.main(["inspect", str(path), "--snapshot-time", "2024-03-07T01:00:22+01:00"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{path}: esxcli_connections (connections), 2 records, 0 quarantined, "
        "2024-03-07 00:00:22 .. 2024-03-07 00:00:22 UTC"]
    assert cli.main(["inspect", str(path), "--snapshot-time", "mtime"]) == 0
    assert "2023-11-14 22:13:20 .. 2023-11-14 22:13:20 UTC" in capsys.readouterr().out


def test_snapshot_time_option_is_parsed_for_every_reading_command(capsys):
    from esxi_anomaly import cli

    parser = cli.build_parser()
    common = ["--conn", "c", "--dns", "d"]
    for argv in (["train", "--env", "e", *common], ["refit", "--env", "e", *common],
                 ["score", "--env", "e", "--out", "o.csv", *common], ["inspect", "x"]):
        assert parser.parse_args(argv + ["--snapshot-time", "2024-03-07T00:00:22Z"]).snapshot_time == T1
        assert parser.parse_args(argv + ["--snapshot-time", "1709769622"]).snapshot_time == T1
        assert parser.parse_args(argv).snapshot_time is None
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["inspect", "x", "--snapshot-time", "yesterday"])
    assert exc.value.code == 2
    assert "'yesterday': not an ISO 8601 time" in capsys.readouterr().err


def test_score_spill_workers_get_the_snapshot_time(tmp_path):
    """The local engine reads in worker processes (`local.spill_file`): the option reaches them."""
    from esxi_anomaly.scoring import local
    from esxi_anomaly.scoring.workers import WorkerPool

    path = _untimed(tmp_path)
    job = (str(path), True, "connections", tmp_path / "conn", 3600, "src_ip", 0, 1000)
    assert local.spill_file({}, *job)["summary"].files[0].quarantined == 2
    pool = WorkerPool(1)
    try:
        (result,) = pool.map(local.spill_file, [job + ({"snapshot_time": T1},)])
    finally:
        pool.close()
    assert len(result["quarantine"]) == 0
    (stats,) = result["summary"].files
    assert (stats.kept, stats.ts_min, stats.ts_max) == (2, T1, T1)
    assert sum(result["counts"].values()) == 2


def test_score_reads_untimed_snapshots_with_snapshot_time(tmp_path, small_day, capsys):
    from esxi_anomaly import cli
    from esxi_anomaly.registry import write_model
    from esxi_anomaly.training import TrainConfig

    model, folder = small_day
    bundle = write_model(model, TrainConfig(env="t"), tmp_path / "models")
    path = _untimed(tmp_path)
    argv = ["score", "--model", str(bundle), "--conn", str(path), "--dns", str(folder / "dns.log"),
            "--out", str(tmp_path / "out" / "ranked.csv"), "--no-progress", "--workers", "1"]
    assert cli.main(argv) == 4    # every row quarantined: no connection read
    assert "no connection records were read from --conn" in capsys.readouterr().err
    assert cli.main(argv + ["--snapshot-time", "2024-03-07T00:00:22Z"]) == 0
    ranked = pd.read_csv(tmp_path / "out" / "ranked.csv", dtype=str)
    assert sorted(zip(ranked["src_ip"], ranked["dst_port"], ranked["ts"].astype(float))) == [
        ("10.0.0.2", "1117", T1), ("192.168.35.12", "443", T1)]
