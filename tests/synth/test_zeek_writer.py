"""write_zeek: exact Zeek headers, vectors, and a round trip through the ingest readers."""
from __future__ import annotations

import gzip
import importlib.util
import json
import time

import numpy as np
import pandas as pd
import pytest

from esxi_anomaly.synth import write_zeek

HEADER = [
    "#separator \\x09", "#set_separator\t,", "#empty_field\t(empty)", "#unset_field\t-",
]
needs_reader = pytest.mark.skipif(importlib.util.find_spec("esxi_anomaly.ingest.zeek") is None,
                                  reason="esxi_anomaly/ingest/zeek.py (the Zeek reader) is not there yet")


@pytest.fixture(scope="module")
def written(small_ds, tmp_path_factory):
    out = tmp_path_factory.mktemp("zeek")
    paths = write_zeek(small_ds, out)
    return out, paths


def test_tsv_headers_exactly_as_zeek_writes_them(written, small_ds):
    out, paths = written
    c = small_ds.connections
    opened = time.strftime("%Y-%m-%d-%H-%M-%S", time.gmtime(c["ts"].min()))
    closed = time.strftime("%Y-%m-%d-%H-%M-%S", time.gmtime((c["ts"] + c["duration"].fillna(0)).max()))
    assert sorted(p.name for p in paths) == ["conn.log", "dns.log", "inventory.csv", "labels.csv"]
    conn = (out / "conn.log").read_text().splitlines()
    assert conn[:4] == HEADER
    assert conn[4:6] == ["#path\tconn", f"#open\t{opened}"]
    assert conn[6].split("\t")[:8] == ["#fields", "ts", "uid", "id.orig_h", "id.orig_p", "id.resp_h", "id.resp_p",
                                       "proto"]
    assert len(conn[6].split("\t")) == len(conn[7].split("\t")) == 22
    assert conn[-1] == f"#close\t{closed}"
    dns = (out / "dns.log").read_text().splitlines()
    assert dns[4] == "#path\tdns"
    assert dns[6].endswith("\tanswers\tTTLs\trejected")
    assert dns[7].endswith("\tvector[string]\tvector[interval]\tbool")
    assert all(len(line.split("\t")) == 24 for line in dns[8:-1])


def test_dns_vectors_and_conn_rows(written, small_ds):
    out, _ = written
    lines = [ln.split("\t") for ln in (out / "dns.log").read_text().splitlines() if not ln.startswith("#")]
    by_uid = {f[1]: f for f in lines}
    assert len(by_uid) == small_ds.dns_answers["event_id"].nunique()
    multi = small_ds.dns_answers.groupby("event_id").filter(lambda g: len(g) >= 3 and (g["rtype"] == "CNAME").any())
    uid = multi["event_id"].iloc[0]
    rows = multi[multi["event_id"] == uid].sort_values("answer_index")
    rec = by_uid[uid]
    assert rec[21] == ",".join(rows["answer"])
    assert rec[22] == ",".join(f"{t:.6f}" for t in rows["ttl"])
    assert rec[13] == "A" and rec[15] == "NOERROR"
    nx = small_ds.dns_answers[small_ds.dns_answers["rcode"] == "NXDOMAIN"]["event_id"].iloc[0]
    assert by_uid[nx][21:24] == ["-", "-", "F"] and by_uid[nx][15] == "NXDOMAIN"
    txt = small_ds.dns_answers[small_ds.dns_answers["rtype"] == "TXT"].iloc[0]
    assert by_uid[txt["event_id"]][21] == f"TXT {len(txt['answer'])} {txt['answer']}"
    # Zeek's ts is the query time: response time minus rtt.
    first = small_ds.dns_answers.drop_duplicates("event_id").set_index("event_id")["ts"]
    some = list(by_uid)[:200]
    assert all(abs(float(by_uid[u][0]) + float(by_uid[u][8]) - first[u]) < 2e-6 for u in some)
    conn_lines = [ln.split("\t") for ln in (out / "conn.log").read_text().splitlines() if not ln.startswith("#")]
    assert len(conn_lines) == len(small_ds.connections)
    hb = next(f for f in conn_lines if f[5] == "902" and f[6] == "udp")
    assert hb[8:12] == ["-", "-", "-", "S0"] and hb[15] == "D"      # one datagram: Zeek's "-" fields


def _compare(frame: pd.DataFrame, back: pd.DataFrame, keys: list[str]) -> None:
    a = frame.sort_values(keys, ignore_index=True)
    b = back.sort_values(keys, ignore_index=True)
    assert len(a) == len(b)
    assert np.abs(a["ts"].to_numpy() - b["ts"].to_numpy()).max() < 2e-6
    # the writer makes Zeek's history up from conn_state; the generated frame has none
    cols = [c for c in a.columns if c not in ("ts", "source", "history")]
    pd.testing.assert_frame_equal(a[cols], b[cols], check_exact=False, rtol=0, atol=1e-6)


@needs_reader
@pytest.mark.parametrize("fmt", ["tsv", "json"])
def test_round_trip_through_the_ingest_readers(small_ds, tmp_path, fmt):
    from esxi_anomaly.ingest import read_connections, read_dns, read_inventory

    write_zeek(small_ds, tmp_path, fmt=fmt)
    conns = read_connections(tmp_path / "conn.log")
    dns = read_dns(tmp_path / "dns.log")
    _compare(small_ds.connections, conns, ["event_id"])
    # The reader types a no-answer row by its query type; the canonical frame leaves rtype "".
    expected = small_ds.dns_answers.copy()
    expected.loc[expected["answer_index"] == -1, "rtype"] = "A"
    # Zeek logs an SRV record's target only, as real Zeek does ("0 100 389 dc01.x" -> "dc01.x")
    srv = expected["rtype"] == "SRV"
    assert srv.any()
    expected.loc[srv, "answer"] = expected.loc[srv, "answer"].str.split().str[-1]
    _compare(expected, dns, ["event_id", "answer_index"])
    assert set(conns["source"]) == {f"zeek_conn_{fmt}"} and set(dns["source"]) == {f"zeek_dns_{fmt}"}
    inv = read_inventory(tmp_path / "inventory.csv")
    pd.testing.assert_frame_equal(inv.sort_values("ip", ignore_index=True)[["ip", "name", "kind", "esxi_host", "role"]],
                                  small_ds.inventory.sort_values("ip", ignore_index=True), check_dtype=False)


@needs_reader
def test_hourly_gzip_files_round_trip(small_ds, tmp_path):
    from esxi_anomaly.ingest import read_connections

    paths = write_zeek(small_ds, tmp_path, gzip=True, hourly=True)
    conn_files = sorted(p.name for p in paths if p.name.startswith("conn."))
    assert conn_files[0] == "conn.2024-03-04-00.log.gz" and len(conn_files) in (48, 49)
    with gzip.open(tmp_path / conn_files[0], "rt") as fh:
        assert fh.readline() == "#separator \\x09\n"
    conns = read_connections(str(tmp_path / "conn.*.log.gz"))
    _compare(small_ds.connections, conns, ["event_id"])


def test_json_lines_omit_unset_fields(small_ds, tmp_path):
    write_zeek(small_ds, tmp_path, fmt="json")
    recs = [json.loads(ln) for ln in (tmp_path / "dns.log").read_text().splitlines()]
    assert len(recs) == small_ds.dns_answers["event_id"].nunique()
    nx = next(r for r in recs if r["rcode_name"] == "NXDOMAIN")
    assert "answers" not in nx and "TTLs" not in nx and nx["RD"] is True
    ok = next(r for r in recs if r.get("answers") and len(r["answers"]) > 1)
    assert isinstance(ok["TTLs"][0], float) and len(ok["TTLs"]) == len(ok["answers"])
    conns = [json.loads(ln) for ln in (tmp_path / "conn.log").read_text().splitlines()]
    hb = next(r for r in conns if r["id.resp_p"] == 902 and r["proto"] == "udp")
    assert "duration" not in hb and "orig_bytes" not in hb and hb["orig_pkts"] == 1


def test_labels_csv_matches(written, small_ds):
    out, _ = written
    back = pd.read_csv(out / "labels.csv", dtype=str)
    pd.testing.assert_frame_equal(back, small_ds.labels, check_dtype=False)
    assert (out / "inventory.csv").read_text().splitlines()[0] == "ip,name,kind,esxi_host,role"


def test_rejects_unknown_format(small_ds, tmp_path):
    with pytest.raises(ValueError, match="fmt"):
        write_zeek(small_ds, tmp_path, fmt="xml")
