"""vDS IPFIX: the real logstash-codec-netflow capture (expected values from the origin's
spec/codecs/netflow_spec.rb, context "IPFIX VMware virtual distributed switch"), junk, truncation."""
from __future__ import annotations

import os
import shutil
import tempfile

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esxi_anomaly import schema
from esxi_anomaly.ingest import vds_ipfix
from esxi_anomaly.ingest.base import IngestError, Quarantine, stable_event_id

FOLDER = "vds-ipfix-logstash-codec-netflow"
TPL = "ipfix_test_vmware_vds_tpl.dat"
DATA = ["ipfix_test_vmware_vds_data264.dat", "ipfix_test_vmware_vds_data266.dat",
        "ipfix_test_vmware_vds_data266_267.dat"]
COLS = ["src_ip", "src_port", "dst_ip", "dst_port", "proto", "bytes_out", "packets_out"]
# the five records of the spec, in its order (tpl, data264, data266 x2, data266_267 x2)
EXPECTED = [
    ("172.18.65.21", 61209, "172.18.65.211", 5985, "tcp", 100.0, 2.0),
    ("172.18.65.91", 138, "172.18.65.255", 138, "udp", 229.0, 1.0),
    ("172.18.65.91", 138, "172.18.65.255", 138, "udp", 229.0, 1.0),
    ("172.18.65.21", 61329, "224.0.0.252", 5355, "udp", 104.0, 2.0),
    ("fe80::5187:5cd8:d750:cdc9", 61329, "ff02::1:3", 5355, "udp", 144.0, 2.0),
]
# flowStartMilliseconds, printed by the spec at second precision: 12:17:37, 12:17:42 x2, 12:25:49 x2
EXPECTED_SECONDS = [1482409057, 1482409062, 1482409062, 1482409549, 1482409549]


@pytest.fixture(autouse=True)
def fresh_cache():
    vds_ipfix.clear_template_cache()
    yield
    vds_ipfix.clear_template_cache()


def read_files(paths, chunk_rows=1000):
    quarantine = Quarantine()
    chunks = [c for p in paths for c in vds_ipfix.read(str(p), quarantine, chunk_rows)]
    df = pd.concat(chunks, ignore_index=True) if chunks else schema.empty("connections")
    schema.validate(df, "connections")
    return df, quarantine


def rows(df):
    return [tuple(r) for r in df[COLS].itertuples(index=False)]


def test_folder_in_name_order_finds_templates_of_the_later_tpl_file(samples):
    folder = samples / FOLDER
    paths = sorted(folder.iterdir())  # data files sort before the template file
    assert paths[-1].name == TPL
    df, quarantine = read_files(paths)
    assert len(quarantine) == 0
    assert rows(df) == EXPECTED
    assert (df["ts"] // 1).tolist() == EXPECTED_SECONDS
    assert df["duration"].tolist() == [0.0] * 5
    assert (df["source"] == "vds_ipfix").all()
    # event id = file + byte offset of the record: header 16 + set header 4
    assert df["event_id"][0] == stable_event_id("ipfix", str(folder / DATA[0]), 20)


def test_single_file_of_concatenated_messages(samples, tmp_path):
    blob = b"".join((samples / FOLDER / name).read_bytes() for name in [TPL] + DATA)
    path = tmp_path / "capture.ipfix"
    path.write_bytes(blob)
    df, quarantine = read_files([path])
    assert len(quarantine) == 0
    assert rows(df) == EXPECTED


def test_templates_after_data_in_the_same_file(samples, tmp_path):
    blob = b"".join((samples / FOLDER / name).read_bytes() for name in DATA + [TPL])
    path = tmp_path / "capture.ipfix"
    path.write_bytes(blob)
    df, quarantine = read_files([path])
    assert len(quarantine) == 0
    assert rows(df) == EXPECTED


def test_cache_persists_across_files_of_different_folders(samples, tmp_path):
    read_files([samples / FOLDER / TPL])
    lone = tmp_path / "data264.dat"
    shutil.copy(samples / FOLDER / DATA[0], lone)
    df, quarantine = read_files([lone])
    assert rows(df) == EXPECTED[:1] and len(quarantine) == 0


def test_unknown_template_is_quarantined(samples, tmp_path):
    lone = tmp_path / "data264.dat"
    shutil.copy(samples / FOLDER / DATA[0], lone)
    df, quarantine = read_files([lone])
    assert len(df) == 0
    assert [(r.line, r.reason) for r in quarantine.records] == [(16, "template 264 not seen (observation domain 0)")]


def test_junk_and_truncation_are_quarantined_with_offsets(samples, tmp_path):
    tpl = (samples / FOLDER / TPL).read_bytes()
    data = (samples / FOLDER / DATA[1]).read_bytes()
    junk = b"\xde\xad\xbe\xef" * 10
    path = tmp_path / "mixed.ipfix"
    path.write_bytes(tpl + junk + data + data[:50])
    df, quarantine = read_files([path])
    assert rows(df) == EXPECTED[1:3]
    assert [(r.line, r.reason) for r in quarantine.records] == [
        (1408, "40 bytes that are not an IPFIX message"),
        (1408 + 40 + 164, "truncated message: header says 164 bytes, 50 left"),
    ]


def test_sniff(samples):
    for path in (samples / FOLDER).iterdir():
        assert vds_ipfix.sniff(path.read_bytes()[:65536])
    assert not vds_ipfix.sniff(b"\x00\x09" + b"\x00" * 30)  # NetFlow v9
    assert not vds_ipfix.sniff(b"\x00\x0a\x00\x05" + b"\x00" * 30)  # length below a header
    assert not vds_ipfix.sniff(b"2018-07-03T19:44:09.749Z b6507827 INET match PASS")
    assert not vds_ipfix.sniff(b"")
    # NUL + newline reads as version 10; the set lengths show it is text (a crash-padded JSON log)
    assert not vds_ipfix.sniff(b'\x00\n{"ts":1700000000.1,"uid":"CJ1aaaaaaaaaaaaaa","id.orig_h":"10.0.0.11"}\n')
    message = (samples / FOLDER / DATA[2]).read_bytes()   # two data sets
    assert vds_ipfix.sniff(message[:-10])          # a message cut inside its last set
    assert not vds_ipfix.sniff(message[:18])       # nothing but a header


def _read_blob(blob: bytes):
    folder = tempfile.mkdtemp()
    try:
        path = os.path.join(folder, "x.ipfix")
        with open(path, "wb") as fh:
            fh.write(blob)
        quarantine = Quarantine()
        chunks = list(vds_ipfix.read(path, quarantine, 7))
        return chunks, quarantine, path
    finally:
        shutil.rmtree(folder)


SAMPLE_DIR = os.path.join(os.environ.get("ESXI_ANOMALY_SAMPLES", os.path.join(
    os.path.dirname(__file__), "..", "..", "..", "shared", "samples")), FOLDER)


def _sample(name):
    with open(os.path.join(SAMPLE_DIR, name), "rb") as fh:
        return fh.read()


needs_samples = pytest.mark.skipif(not os.path.isdir(SAMPLE_DIR), reason=f"{SAMPLE_DIR} absent")


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_raise(blob):
    try:
        _read_blob(blob)
        vds_ipfix.sniff(blob)
    except IngestError:
        pass


@needs_samples
@settings(max_examples=80, deadline=None)
@given(st.integers(0, 1408 + 92 - 1), st.binary(min_size=1, max_size=8))
def test_mutated_messages_never_raise(position, patch):
    vds_ipfix.clear_template_cache()
    blob = bytearray(_sample(TPL) + _sample(DATA[0]))
    blob[position:position + len(patch)] = patch
    try:
        _read_blob(bytes(blob))
    except IngestError:
        pass


@needs_samples
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(DATA), st.binary(max_size=40)), max_size=6))
def test_valid_messages_among_garbage_are_all_kept(items):
    vds_ipfix.clear_template_cache()
    blob = _sample(TPL)
    expected_offsets = []
    counts = {DATA[0]: [20], DATA[1]: [20, 92], DATA[2]: [20, 96]}
    for name, junk in items:
        blob += junk
        expected_offsets += [len(blob) + o for o in counts[name]]
        blob += _sample(name)
    chunks, quarantine, path = _read_blob(blob)
    got = {eid for c in chunks for eid in c["event_id"]}
    for offset in expected_offsets:
        assert stable_event_id("ipfix", path, offset) in got
