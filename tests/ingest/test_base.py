"""The shared ingest API (paths, registry, folder splitting, decompression, summaries) on Zeek files,
and format detection that survives junk lines in every line format."""
from __future__ import annotations

import bz2
import gzip
import lzma
import os
import shutil
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from esxi_anomaly.ingest import (
    IngestError, Quarantine, ReadSummary, detect_format, expand_paths, formats, read_connections, read_context,
    read_dns, read_inventory,
)
from tests.conftest import ROOT, SAMPLES
from tests.ingest._lines import CONTAINER_MAGIC


@pytest.fixture()
def zeek_dir(fixtures, tmp_path):
    """A Zeek-style folder: conn.log, dns.log, a nested rotated dns log (gzip) and a stray file."""
    shutil.copy(fixtures / "zeek" / "conn.log", tmp_path / "conn.log")
    shutil.copy(fixtures / "zeek" / "dns.log", tmp_path / "dns.log")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "dns.00:00:00-01:00:00.log.gz").write_bytes(
        gzip.compress((fixtures / "zeek" / "dns.json").read_bytes()))
    (tmp_path / "README.txt").write_text("not a log\n")
    (tmp_path / ".hidden.log").write_bytes((fixtures / "zeek" / "conn.log").read_bytes())
    return tmp_path


def test_registry_has_the_zeek_and_inventory_formats():
    names = {f.name: f.frame for f in formats()}
    assert {k: names[k] for k in ("zeek_conn_tsv", "zeek_conn_json", "zeek_dns_tsv", "zeek_dns_json",
                                  "inventory_csv")} == {
        "zeek_conn_tsv": "connections", "zeek_conn_json": "connections", "zeek_dns_tsv": "dns_answers",
        "zeek_dns_json": "dns_answers", "inventory_csv": "inventory"}


def test_expand_paths_files_globs_folders(zeek_dir):
    root = str(zeek_dir)
    assert expand_paths(zeek_dir) == sorted([
        f"{root}/README.txt", f"{root}/conn.log", f"{root}/dns.log", f"{root}/old/dns.00:00:00-01:00:00.log.gz"])
    assert expand_paths(f"{root}/*.log") == [f"{root}/conn.log", f"{root}/dns.log"]
    assert expand_paths([f"{root}/dns.log", f"{root}/**/dns*", zeek_dir / "dns.log"]) == [
        f"{root}/dns.log", f"{root}/old/dns.00:00:00-01:00:00.log.gz"]
    with pytest.raises(IngestError, match="matches no file"):
        expand_paths(f"{root}/*.nothing")
    with pytest.raises(IngestError, match="no such file or folder"):
        expand_paths(f"{root}/missing.log")


def test_folder_is_split_by_content(zeek_dir):
    q, s = Quarantine(), ReadSummary()
    conns = read_connections(zeek_dir, q, s)
    root = str(zeek_dir)
    # every file is accounted for: the DNS logs are another pass's, the stray file is unreadable
    assert len(conns) == 5 and [(f.path[len(root) + 1:], f.format, f.outcome, f.kept) for f in s.files] == [
        ("README.txt", "unknown", "unreadable", 0), ("conn.log", "zeek_conn_tsv", "read", 5),
        ("dns.log", "zeek_dns_tsv", "other kind", 0),
        ("old/dns.00:00:00-01:00:00.log.gz", "zeek_dns_json", "other kind", 0)]
    assert [(r.path, r.line, r.reason) for r in q.records] == [(f"{root}/README.txt", 0, "not a known format")]
    dns = read_dns(zeek_dir, q, s)       # the same folder as --dns: the stray file is quarantined once
    # 9 rows from dns.log + 3 from the gzipped JSON log, merged and sorted by ts
    assert len(dns) == 12 and dns.ts.is_monotonic_increasing
    assert len(q) == 1 and len(q.records) == 1
    assert s.lines() == [f"{root}/README.txt: unreadable (not a known format)",
                         f"{root}/conn.log: zeek_conn_tsv, 5 kept, 0 quarantined",
                         f"{root}/dns.log: zeek_dns_tsv, 9 kept, 0 quarantined",
                         f"{root}/old/dns.00:00:00-01:00:00.log.gz: zeek_dns_json, 3 kept, 0 quarantined",
                         "DNS source zeek_dns_json: 1 of 1 clients (100.0 %) resolved to a connection source",
                         "DNS source zeek_dns_tsv: 4 of 4 clients (100.0 %) resolved to a connection source"]


def test_read_summary_counts(fixtures, tmp_path):
    data = (fixtures / "zeek" / "conn.log").read_bytes().replace(b"\t1117\t", b"\tport\t")
    (tmp_path / "conn.log").write_bytes(data)
    (tmp_path / "conn.json").write_bytes((fixtures / "zeek" / "conn.json").read_bytes())
    q, s = Quarantine(), ReadSummary()
    # Files are read in sorted path order whatever order they were given in.
    read_connections([tmp_path / "conn.log", tmp_path / "conn.json"], q, s)
    assert [(f.format, f.kept, f.quarantined) for f in s.files] == [
        ("zeek_conn_json", 3, 0), ("zeek_conn_tsv", 4, 1)]
    assert (s.kept, s.quarantined) == (7, 1)
    assert s.files[1].ts_min == 1700000000.05 and s.files[1].ts_max == 1700000003.4
    assert s.lines()[1] == f"{tmp_path}/conn.log: zeek_conn_tsv, 4 kept, 1 quarantined"
    assert q.counts == {str(tmp_path / "conn.log"): 1}


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress])
def test_compression_is_transparent(fixtures, tmp_path, compress):
    plain = fixtures / "zeek" / "conn.log"
    packed = tmp_path / "conn.bin"                     # the name says nothing: content decides
    packed.write_bytes(compress(plain.read_bytes()))
    assert detect_format(str(packed)).name == "zeek_conn_tsv"
    assert read_connections(str(packed)).equals(read_connections(str(plain)))


def test_zip_archive(fixtures, tmp_path):
    import zipfile

    path = tmp_path / "export.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("__MACOSX/._dns.log", b"\x00\x05\x16\x07")
        archive.writestr("dns.log", (fixtures / "zeek" / "dns.log").read_bytes())
    assert len(read_dns(str(path))) == 9


def test_explicit_file_of_another_kind_is_an_error(fixtures):
    with pytest.raises(IngestError, match=r"conn\.log: is zeek_conn_tsv \(connections\), not inventory"):
        read_inventory(str(fixtures / "zeek" / "conn.log"))
    with pytest.raises(IngestError, match=r"dns\.json: is zeek_dns_json \(dns_answers\), not connections"):
        read_connections(str(fixtures / "zeek" / "dns.json"))


def _drain(fh, size: int, read=None) -> tuple[bytes, str]:
    out = b""
    try:
        while True:
            block = (read or fh.read)(size)
            if not block:
                return out, ""
            out += block
    except (OSError, EOFError) as exc:
        return out, f"{type(exc).__name__}: {exc}"


_BODY = b"".join(b"line %d of a log\n" % i for i in range(60_000))   # ~1 MB, > one Arrow read


@pytest.mark.parametrize("name, packed", [
    ("one member", gzip.compress(_BODY)),
    ("two members", gzip.compress(_BODY[:5000]) + gzip.compress(_BODY[5000:])),
    ("zero padding", gzip.compress(_BODY[:5000]) + b"\0" * 512),        # Arrow alone rejects this
    ("trailing garbage", gzip.compress(_BODY[:5000]) + b"garbage"),
    ("truncated", gzip.compress(_BODY)[:200_000]),
    ("header only", gzip.compress(_BODY)[:5]),
    ("empty member", gzip.compress(b"")),
])
@pytest.mark.parametrize("size", [1 << 16, 1 << 22])
def test_gzip_reads_exactly_like_python_gzip(tmp_path, name, packed, size):
    """open_binary decompresses gzip with Arrow, but the data are those of gzip.open; where gzip.open
    raises (truncated, damaged) the stream ends after the last complete line instead, and says why."""
    import io

    from esxi_anomaly.ingest.base import open_binary, open_text, track_streams

    path = tmp_path / "x.gz"
    path.write_bytes(packed)
    with gzip.open(path, "rb") as fh:     # read1: every byte gzip decompresses before it raises
        expected, error = _drain(fh, size, read=fh.read1)
    if error:
        expected = expected[: expected.rfind(b"\n") + 1]      # the cut line is not delivered
    with track_streams() as opened, open_binary(str(path)) as fh:
        assert isinstance(fh, io.BufferedReader)
        data, raised = _drain(fh, size)
    assert (data, raised) == (expected, "")
    assert [f"{type(s.error).__name__}: {s.error}" if s.error else "" for s in opened] == [error]
    with open_text(str(path)) as text:      # line-wise readers (syslog, CSV) get the same lines
        assert "".join(text).encode() == expected


# --- detection survives junk ------------------------------------------------------------------

_READ = {"connections": read_connections, "dns_answers": read_dns, "context": read_context,
         "inventory": read_inventory}
_FIX = ROOT / "tests" / "fixtures"
# (format, frame kind, file, leading header lines junk may not precede)
_LINE_FORMATS = [
    ("zeek_conn_tsv", "connections", _FIX / "zeek" / "conn.log", 8),
    ("zeek_dns_tsv", "dns_answers", _FIX / "zeek" / "dns.log", 8),
    ("zeek_conn_json", "connections", _FIX / "zeek" / "conn.json", 0),
    ("zeek_dns_json", "dns_answers", _FIX / "zeek" / "dns.json", 0),
    ("nsx_dfw", "connections", _FIX / "nsx" / "nsxt_raw_dfwpktlogs.log", 0),
    ("nsx_dfw", "connections", _FIX / "nsx" / "forwarded_syslog.log", 0),
    ("esxcli_connections", "connections", _FIX / "esxcli" / "snapshots.txt", 0),
    ("dnsmasq", "dns_answers", _FIX / "dns_servers" / "dnsmasq_verbatim.log", 0),
    ("unbound", "dns_answers", _FIX / "dns_servers" / "unbound_verbatim.log", 0),
    ("bind_query", "dns_answers", _FIX / "dns_servers" / "bind_query_verbatim.log", 0),
    ("esxi_syslog", "context", _FIX / "esxi_syslog" / "esxi8_ondisk_verbatim.log", 0),
    ("inventory_csv", "inventory", _FIX / "inventory" / "inventory.csv", 1),
    ("powercli_csv", "inventory", _FIX / "inventory_exports" / "powercli_get_vm.csv", 2),
    ("infoblox_nios", "dns_answers", SAMPLES / "infoblox-nios-elastic-integrations" / "test-dns.log", 0),
    ("sysmon_network", "connections", SAMPLES / "sysmon-otrf-security-datasets" / "derived"
     / "cmd_bitsadmin_download_psh_script_2020-10-2302365189.sysmon-eid3-eid22.jsonl", 0),
]
_JUNK_LINE = st.one_of(
    st.integers(1, 4096).map(lambda n: b"\x00" * n),                   # a crash's NUL padding
    st.binary(min_size=1, max_size=120),
    st.text(max_size=120).map(lambda t: t.encode("utf-8", "surrogatepass")),
).map(lambda b: b.replace(b"\n", b" ").replace(b"\r", b" ")).filter(lambda b: not b.startswith(CONTAINER_MAGIC))


def _records(df):
    """The rows as a multiset, without the ids that non-Zeek readers derive from line numbers."""
    return Counter(map(tuple, df.drop(columns=["event_id"], errors="ignore").astype(str).to_numpy().tolist()))


@pytest.mark.parametrize("name,frame,path,header", _LINE_FORMATS, ids=lambda v: getattr(v, "name", v))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_junk_lines_neither_hide_the_format_nor_lose_records(tmp_path, name, frame, path, header, data):
    if not os.path.exists(path):
        pytest.skip(f"{path} is absent")
    lines = path.read_bytes().splitlines()
    for junk in data.draw(st.lists(_JUNK_LINE, min_size=1, max_size=4)):
        if path.suffix == ".csv":
            junk = junk.replace(b'"', b"'")   # an open quote legally joins the lines after it
        lines.insert(data.draw(st.integers(header, len(lines))), junk)
    junky = tmp_path / "junky"
    junky.write_bytes(b"\n".join(lines) + b"\n")
    os.utime(junky, (path.stat().st_atime, path.stat().st_mtime))   # year inference reads the mtime
    assert detect_format(str(junky), frame).name == name
    quarantine = Quarantine()
    got = _records(_READ[frame](str(junky), quarantine))
    assert not _records(_READ[frame](str(path))) - got          # every valid record kept
