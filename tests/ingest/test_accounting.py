"""Every input file and record is accounted for: read, partly read, unreadable or of another kind
(issue #13 items 3 and 4): a cut compressed stream keeps every complete record before the cut,
UTF-16 / BOM text is read, out-of-range times and invalid addresses are quarantined, not fatal."""
from __future__ import annotations

import bz2
import builtins
import codecs
import gzip
import json
import lzma
import shutil
import zlib

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from esxi_anomaly import cli
from esxi_anomaly.console import EXIT_INPUT, EXIT_OK
from esxi_anomaly.ingest import (
    IngestError, Quarantine, ReadSummary, UnreadableError, base, read_connections, read_dns, read_inventory,
)

HEADER_LINES = 8
TRUNCATED = "EOFError: Compressed file ended before the end-of-stream marker was reached"


def _conn_lines(fixtures) -> tuple[list[bytes], list[bytes]]:
    lines = (fixtures / "zeek" / "conn.log").read_bytes().split(b"\n")
    return lines[:HEADER_LINES], [ln for ln in lines[HEADER_LINES:] if ln and not ln.startswith(b"#")]


def _big_conn(fixtures, copies: int) -> bytes:
    """`copies` times the fixture's 5 records, each with its own uid (so that it compresses like a log)."""
    header, data = _conn_lines(fixtures)
    rows = [b"%s\tC%016d\t%s" % (ln.split(b"\t", 2)[0], i, ln.split(b"\t", 2)[2])
            for i, ln in enumerate(data * copies)]
    return b"\n".join(header + rows) + b"\n"


@pytest.fixture()
def locked(monkeypatch):
    """Files named "locked*" raise PermissionError on open (chmod 000 does not stop root)."""
    real = builtins.open

    def fake(path, *args, **kw):
        if str(path).rsplit("/", 1)[-1].startswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kw)

    monkeypatch.setattr(base, "open", fake, raising=False)


# --- item 3: every file in the summary ------------------------------------------------------------

@pytest.fixture()
def mixed(fixtures, tmp_path, locked):
    conn = (fixtures / "zeek" / "conn.log").read_bytes()
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a_conn.log").write_bytes(conn)
    (folder / "b_utf16le.log").write_bytes(codecs.BOM_UTF16_LE + conn.decode().encode("utf-16-le"))
    (folder / "c_utf16be.log.gz").write_bytes(gzip.compress(codecs.BOM_UTF16_BE + conn.decode().encode("utf-16-be")))
    (folder / "d_utf8bom.log").write_bytes(codecs.BOM_UTF8 + conn)
    (folder / "e_header_cut.log.gz").write_bytes(gzip.compress(conn)[:5])
    packed = gzip.compress(_big_conn(fixtures, 200))                                      # 1,000 rows
    (folder / "f_cut.log.gz").write_bytes(packed[: len(packed) // 2])
    (folder / "dns.log").write_bytes((fixtures / "zeek" / "dns.log").read_bytes())
    (folder / "locked.log").write_bytes(conn)
    (folder / "notes.txt").write_text("not a log\n")
    return folder


def test_every_file_of_a_folder_is_accounted_for(mixed, fixtures):
    cut = (mixed / "f_cut.log.gz").read_bytes()
    present = zlib.decompressobj(wbits=31).decompress(cut)
    complete = present[: present.rfind(b"\n") + 1]
    rows = complete.count(b"\n") - HEADER_LINES
    assert rows > 100
    q, s = Quarantine(), ReadSummary()
    conns = read_connections(mixed, q, s)
    assert len(conns) == 5 * 4 + rows
    root = f"{mixed}/"
    assert [line.replace(root, "") for line in s.lines()] == [
        "a_conn.log: zeek_conn_tsv, 5 kept, 0 quarantined",
        "b_utf16le.log: zeek_conn_tsv, 5 kept, 0 quarantined",
        "c_utf16be.log.gz: zeek_conn_tsv, 5 kept, 0 quarantined",
        "d_utf8bom.log: zeek_conn_tsv, 5 kept, 0 quarantined",
        "dns.log: zeek_dns_tsv, other kind (dns_answers, not connections)",
        f"e_header_cut.log.gz: unreadable (truncated gzip stream, cut in its header or first block: no data ({TRUNCATED}))",
        f"f_cut.log.gz: zeek_conn_tsv, partly read (truncated gzip stream after {rows} records, the "
        f"{len(present) - len(complete)} bytes of the record it cut not read ({TRUNCATED})), {rows} kept, 1 quarantined",
        "locked.log: unreadable (permission denied)",
        "notes.txt: unreadable (not a known format)",
    ]
    # the files not wholly read are in the quarantine (so --strict fails), each once
    assert [(r.path.replace(root, ""), r.line) for r in q.records] == [
        ("e_header_cut.log.gz", 0), ("f_cut.log.gz", 0), ("locked.log", 0), ("notes.txt", 0)]
    dns = read_dns(mixed, q, s)        # the same folder given to --dns as well
    assert len(dns) == 9 and len(q) == len(q.records) == 4
    assert sum("notes.txt" in line for line in s.lines()) == 1
    assert "dns.log: zeek_dns_tsv, 9 kept, 0 quarantined" in [line.replace(root, "") for line in s.lines()]


def test_a_fifo_in_a_folder_is_unreadable_not_a_hang(fixtures, tmp_path):
    import os

    shutil.copy(fixtures / "zeek" / "conn.log", tmp_path / "conn.log")
    os.mkfifo(tmp_path / "pipe.log")          # opening it would wait for a writer forever
    q, s = Quarantine(), ReadSummary()
    assert len(read_connections(tmp_path, q, s)) == 5
    assert s.lines()[1] == f"{tmp_path}/pipe.log: unreadable (not a regular file)" and len(q) == 1


def test_utf16_and_bom_files_read_like_utf8(mixed):
    plain = read_connections(str(mixed / "a_conn.log"))
    for name in ("b_utf16le.log", "c_utf16be.log.gz", "d_utf8bom.log"):
        pd.testing.assert_frame_equal(read_connections(str(mixed / name)), plain)


@pytest.mark.parametrize("name, match", [
    ("locked.log", r"locked\.log: permission denied$"),
    ("e_header_cut.log.gz", r"e_header_cut\.log\.gz: truncated gzip stream, cut in its header"),
    ("notes.txt", r"notes\.txt: not a known connections format \(tried: "),
])
def test_named_unreadable_file_is_an_error_that_says_why(mixed, name, match):
    with pytest.raises(IngestError, match=match) as caught:
        read_connections(str(mixed / name))
    assert isinstance(caught.value, UnreadableError) == (name != "notes.txt")


# --- item 3: a cut stream keeps every complete record before the cut -----------------------------

@pytest.mark.parametrize("compress, kind, copies, fraction", [
    (gzip.compress, "gzip", 200, 0.5),        # ~1,000 rows, a file read in one piece
    (gzip.compress, "gzip", 4000, 0.8),       # ~20,000 rows, 2.4 MB
    (bz2.compress, "bz2", 4000, 0.8),         # bz2 decompresses whole 900 kB blocks: 2 of 3 are there
    (lzma.compress, "xz", 4000, 0.8),
])
def test_cut_stream_keeps_every_complete_record(fixtures, tmp_path, compress, kind, copies, fraction):
    packed = compress(_big_conn(fixtures, copies))
    cut = packed[: int(len(packed) * fraction)]
    path = tmp_path / "c.log.x"
    path.write_bytes(cut)
    decompressor = {"gzip": lambda: zlib.decompressobj(wbits=31), "bz2": bz2.BZ2Decompressor,
                    "xz": lzma.LZMADecompressor}[kind]()
    present = decompressor.decompress(cut)
    rows = present[: present.rfind(b"\n") + 1].count(b"\n") - HEADER_LINES
    q, s = Quarantine(), ReadSummary()
    assert len(read_connections(str(path), q, s)) == rows > 0
    assert [(f.outcome, f.kept, f.quarantined) for f in s.files] == [("partly read", rows, 1)]
    assert q.records[0].reason.startswith(f"truncated {kind} stream after {rows} records")


# --- the quarantine's own accounting ----------------------------------------------------------------

def test_quarantine_write_notes_the_records_beyond_its_cap(tmp_path):
    q = Quarantine(max_records=3)
    for i in range(5):
        q.add("a.log", i + 1, "bad")
    q.add("b.log", 1, "bad")
    q.add_file("c.log", "permission denied")          # a file problem is kept beyond the cap
    assert len(q) == 7 and len(q.records) == 4
    out = tmp_path / "q.jsonl"
    assert q.write(str(out)) == 6
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["path"], r["line"]) for r in lines[:4]] == [("a.log", 1), ("a.log", 2), ("a.log", 3), ("c.log", 0)]
    assert lines[4:] == [
        {"path": "a.log", "line": 0, "reason": "2 further records quarantined, not kept (limit 3)", "raw": "",
         "omitted": 2},
        {"path": "b.log", "line": 0, "reason": "1 further records quarantined, not kept (limit 3)", "raw": "",
         "omitted": 1}]


def test_quarantine_extend_counts_a_file_problem_once():
    a, b = Quarantine(), Quarantine()
    a.add_file("x.txt", "not a known format")
    b.add_file("x.txt", "not a known format")
    b.add("y.log", 3, "bad")
    a.extend(b)
    assert len(a) == 2 and [(r.path, r.line) for r in a.records] == [("x.txt", 0), ("y.log", 3)]


# --- item 4: times and addresses that would break later stages ----------------------------------

def _conn_with(fixtures, tmp_path, rows: list[tuple[str, str, str]], name="c.log"):
    header, data = _conn_lines(fixtures)
    template = data[0].split(b"\t")
    out = []
    for i, (ts, src, dst) in enumerate(rows):
        fields = list(template)
        fields[0], fields[1], fields[2], fields[4] = ts.encode(), b"Cx%d" % i, src.encode(), dst.encode()
        out.append(b"\t".join(fields))
    path = tmp_path / name
    path.write_bytes(b"\n".join(header + out) + b"\n")
    return path


BAD_TIMES = ["1e300", "-1e300", "4e22", "18446744073709551615", "1e10", "1e14", "-1"]


def test_out_of_range_times_and_invalid_addresses_are_quarantined(fixtures, tmp_path):
    rows = [("1700000000.5", "10.0.0.1", "10.0.0.2")] * 3 + [(t, "10.0.0.1", "10.0.0.2") for t in BAD_TIMES] + [
        ("1700000001", "999.1.1.1", "10.0.0.2"), ("1700000002", "10.0.0.1", "junk"),
        ("1700000003", "fe80::1", "2001:db8::1"), ("0", "10.0.0.1", "10.0.0.2")]
    q, s = Quarantine(), ReadSummary()
    conns = read_connections(str(_conn_with(fixtures, tmp_path, rows)), q, s)
    assert len(conns) == 5 and (s.files[0].kept, s.files[0].quarantined) == (5, 9)
    assert [r.reason.split(" (accepted")[0] for r in q.records] == [
        "time out of range: 1e+300", "time out of range: -1e+300", "time out of range: 4e+22",
        "time out of range: 1.84467e+19", "time out of range: 1e+10", "time out of range: 1e+14",
        "time out of range: -1", "src_ip is not an IP address: '999.1.1.1'", "dst_ip is not an IP address: 'junk'"]
    assert q.records[0].raw.startswith("Cx3\t1e+300\t10.0.0.1\t10.0.0.2")


def test_json_times_and_dns_answers_are_checked_too(fixtures, tmp_path):
    conn = json.loads((fixtures / "zeek" / "conn.json").read_text().splitlines()[0])
    lines = [json.dumps(conn | {"ts": ts}) for ts in (1e300, 4e22, conn["ts"])]
    path = tmp_path / "c.json"
    path.write_text("\n".join(lines) + "\n")
    q = Quarantine()
    assert len(read_connections(str(path), q)) == 1 and len(q) == 2
    dns = (fixtures / "zeek" / "dns.log").read_bytes()
    d = tmp_path / "d.log"
    d.write_bytes(dns.replace(b"\t10.0.0.53\t", b"\t999.1.1.1\t", 1))
    q = Quarantine()
    answers = read_dns(str(d), q)
    assert len(answers) + len(q) == len(read_dns(str(fixtures / "zeek" / "dns.log"))) and len(q) >= 1
    assert all("is not an IP address: '999.1.1.1'" in r.reason for r in q.records)


def test_inspect_reports_every_file_and_fails_only_on_unreadable(fixtures, tmp_path, capsys, locked):
    folder = tmp_path / "in"
    folder.mkdir()
    rows = [("1700000000.5", "10.0.0.1", "10.0.0.2"), ("1e300", "10.0.0.1", "10.0.0.2"),
            ("1e14", "10.0.0.1", "10.0.0.2"), ("1700000001", "999.1.1.1", "10.0.0.2")]
    _conn_with(fixtures, folder, rows, "a_bad_times.log")
    shutil.copy(fixtures / "zeek" / "dns.log", folder / "b_dns.log")
    _conn_with(fixtures, folder, rows[:1], "c_\x1b[31mred.log")
    assert cli.main(["inspect", str(folder)]) == EXIT_OK
    out = capsys.readouterr().out.replace(f"{folder}/", "").splitlines()
    assert out[0] == "a_bad_times.log: zeek_conn_tsv (connections), 1 records, 3 quarantined, " \
                     "2023-11-14 22:13:20 .. 2023-11-14 22:13:20 UTC"
    assert out[-2].startswith("c_\\x1b[31mred.log: zeek_conn_tsv (connections), 1 records")   # escaped
    assert [line.split(":")[0] for line in out[:-1] if not line.startswith(" ")] == [
        "a_bad_times.log", "b_dns.log", "c_\\x1b[31mred.log"]
    # after the files, the DNS coverage of them all: the fixture's DNS clients have no connection here
    assert out[-1] == COVERAGE_NONE
    (folder / "locked.log").write_text("x")
    (folder / "notes.txt").write_text("not a log\n")
    assert cli.main(["inspect", str(folder)]) == EXIT_INPUT
    out = capsys.readouterr().out.replace(f"{folder}/", "").splitlines()
    assert out[-3:] == ["locked.log: unreadable (permission denied)", "notes.txt: unreadable (not a known format)",
                        COVERAGE_NONE]


COVERAGE_NONE = ("warning: DNS source zeek_dns_tsv: 0 of 4 clients (0.0 %) resolved to a connection source, under "
                 "90 %: the others' answers join no connection (names not in the inventory, or hosts with no "
                 "connection log)")


# --- item 8: PowerCLI export with a giant header ------------------------------------------------------

def test_powercli_header_over_the_csv_field_limit(tmp_path):
    path = tmp_path / "vms.csv"
    path.write_text("#TYPE Selected.VMware.VimAutomation.ViCore.Impl.V1.VM.UniversalVirtualMachineImpl\n"
                    f'"Name","VMHost","IPAddress","{"x" * 200_000}\n"vm1","esx1","10.0.0.1"\n')
    with pytest.raises(IngestError, match=r"vms\.csv: header line cannot be parsed as CSV \(field larger than"):
        read_inventory(str(path))
    q, s = Quarantine(), ReadSummary()
    assert len(read_inventory(str(tmp_path), q, s)) == 0
    assert (s.files[0].outcome, len(q)) == ("unreadable", 1)


# --- the shared open layer delivers a clean stream unchanged ------------------------------------------

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300_000).map(lambda b: b * 3),
       kind=st.sampled_from(["gzip", "bz2", "xz", "utf16"]),
       sizes=st.lists(st.integers(1, 1 << 21), min_size=1, max_size=8))
def test_clean_streams_read_back_unchanged_whatever_the_read_sizes(tmp_path, data, kind, sizes):
    """Holding back the partial last line (to drop it on a cut) never alters a clean stream."""
    text = data.decode("latin-1").encode("utf-8")
    packed = {"gzip": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress,
              "utf16": lambda b: gzip.compress(codecs.BOM_UTF16_LE + b.decode().encode("utf-16-le"))}[kind]
    path = tmp_path / f"x.{kind}"
    path.write_bytes(packed(text))
    out = []
    with base.track_streams() as opened, base.open_binary(str(path)) as fh:
        i = 0
        while True:
            size = sizes[i % len(sizes)]
            block = fh.readline(size) if i % 3 == 2 else fh.read(size)
            if not block:
                break
            out.append(block)
            i += 1
    assert b"".join(out) == text and all(s.error is None for s in opened)
