"""Sysmon EID 3 / EID 22 on the real OTRF exports (derived .jsonl and the original zips).

Expected counts were taken independently with grep on the derived files, e.g.
  grep '"EventID":3,' F | grep -c '"Initiated":"true"'           -> outbound connections
  grep '"EventID":22,' F | grep -o '"QueryResults":"[^"]*"' | awk (count ;-records, 1 if none)
and match samples/README.md (EID22 / EID3 events: cmstp 205/2, bitsadmin 3/8, wevtutil 31/112,
covenant 20/276). covenant has 2 EID 22 events without a QueryResults field (NXDOMAIN): 31 + 2 rows.
"""
from __future__ import annotations

import json
import os
import tempfile

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esxi_anomaly import schema
from esxi_anomaly.ingest import sysmon
from esxi_anomaly.ingest.base import IngestError, Quarantine, read_head, stable_event_id

DIR = "sysmon-otrf-security-datasets"
# name stem -> (zip, derived, outbound EID3 rows, EID22 events, EID22 answer rows)
FILES = {
    "cmstp": ("psh_cmstp_execution_bypassuac.zip",
              "psh_cmstp_execution_bypassuac_2020-10-2201543213.sysmon-eid3-eid22.jsonl", 2, 205, 212),
    "bitsadmin": ("cmd_bitsadmin_download_psh_script.zip",
                  "cmd_bitsadmin_download_psh_script_2020-10-2302365189.sysmon-eid3-eid22.jsonl", 5, 3, 6),
    "wevtutil": ("cmd_wevtutil_modify_security_eventlog_path.zip",
                 "cmd_wevtutil_modify_security_eventlog_path.sysmon-eid3-eid22.jsonl", 83, 31, 98),
    "covenant": ("covenant_psremoting_grunt.zip",
                 "covenant_psremoting_grunt_2019-12-05014931.sysmon-eid3-eid22.jsonl", 185, 20, 33),
}


def read(path, reader, kind):
    quarantine = Quarantine()
    chunks = list(reader(str(path), quarantine, 50))
    df = pd.concat(chunks, ignore_index=True) if chunks else schema.empty(kind)
    schema.validate(df, kind)
    return df, quarantine


@pytest.fixture(scope="module")
def frames(samples):
    out = {}
    for stem, (zip_name, derived, *_counts) in FILES.items():
        for variant, name in (("zip", zip_name), ("derived", f"derived/{derived}")):
            path = samples / DIR / name
            out[stem, variant, "conn"] = read(path, sysmon.read_network, "connections")
            out[stem, variant, "dns"] = read(path, sysmon.read_dns, "dns_answers")
    return out


@pytest.mark.parametrize("stem", FILES)
@pytest.mark.parametrize("variant", ["zip", "derived"])
def test_counts(frames, stem, variant):
    _zip, _derived, outbound, dns_events, dns_rows = FILES[stem]
    conns, q1 = frames[stem, variant, "conn"]
    dns, q2 = frames[stem, variant, "dns"]
    assert len(q1) == 0 and len(q2) == 0
    assert len(conns) == outbound
    assert len(dns) == dns_rows
    assert dns["event_id"].nunique() == dns_events
    assert (conns["source"] == "sysmon_network").all() and (dns["source"] == "sysmon_dns").all()


@pytest.mark.parametrize("stem", FILES)
def test_zip_equals_derived_file(frames, stem):
    for kind in ("conn", "dns"):
        from_zip = frames[stem, "zip", kind][0].drop(columns="event_id")
        derived = frames[stem, "derived", kind][0].drop(columns="event_id")
        pd.testing.assert_frame_equal(from_zip, derived)


def test_wevtutil_exact_values(frames, samples):
    dns, _ = frames["wevtutil", "derived", "dns"]
    ntp = dns[dns["query"] == "ntp.msn.com"].head(3)
    assert [tuple(r) for r in ntp[["rtype", "answer", "answer_index", "client_ip", "rcode"]].itertuples(index=False)] == [
        ("CNAME", "www-msn-com.a-0003.a-msedge.net", 0, "10.0.10.102", "NOERROR"),
        ("CNAME", "a-0003.a-msedge.net", 1, "10.0.10.102", "NOERROR"),
        ("A", "204.79.197.203", 2, "10.0.10.102", "NOERROR"),
    ]
    assert ntp["ts"].tolist() == [1656654157.879] * 3  # UtcTime, not TimeCreated (2022-07-05)
    path = samples / DIR / "derived" / FILES["wevtutil"][1]
    assert ntp["event_id"].iloc[0] == stable_event_id("sysmon", str(path), 1)
    assert dns["rcode"].value_counts().to_dict() == {"NOERROR": 93, "NXDOMAIN": 5}
    conns, _ = frames["wevtutil", "derived", "conn"]
    edge = conns[(conns["dst_ip"] == "204.79.197.203") & (conns["src_port"] == 50686)]
    assert [tuple(r) for r in edge[["src_ip", "dst_port", "proto", "process", "ts"]].itertuples(index=False)] == [
        ("10.0.10.102", 443, "tcp", "msedge.exe", 1656654158.122)]


def test_covenant_nxlog_shape(frames):
    dns, _ = frames["covenant", "derived", "dns"]
    first = dns[dns["event_id"] == "sysmon-IT001.shire.com-171139"]
    assert first[["rtype", "answer"]].values.tolist() == [["AAAA", "::1"], ["A", "127.0.0.1"]]
    # the host's IP comes from its own outbound EID 3 events in the file
    assert set(first["client_ip"]) == {"172.18.39.105"}
    assert sorted(dns["client_ip"].unique()) == ["172.18.39.100", "172.18.39.103", "172.18.39.105", "172.18.39.106"]
    conns, _ = frames["covenant", "derived", "conn"]
    assert conns["event_id"].iloc[0] == "sysmon-HFDC01.shire.com-94834"


def test_cmstp_status_codes(frames):
    dns, _ = frames["cmstp", "derived", "dns"]
    per_event = dns.drop_duplicates("event_id")
    assert per_event["rcode"].value_counts().to_dict() == {"STATUS_9701": 199, "NOERROR": 6}
    assert dns[dns["rcode"] == "STATUS_9701"]["answer"].eq("").all()


def test_query_results_and_rcodes():
    assert sysmon.parse_query_results("type:  5 github.map.fastly.net;::ffff:151.101.248.133;") == [
        ("CNAME", "github.map.fastly.net"), ("A", "151.101.248.133")]
    assert sysmon.parse_query_results("2a00:1450:4014:80c:0:0:0:200e;10.1.2.3;type:  33 x;type:  999 y;") == [
        ("AAAA", "2a00:1450:4014:80c::200e"), ("A", "10.1.2.3"), ("SRV", "x"), ("TYPE999", "y")]
    assert sysmon.parse_query_results("-") == []
    assert [sysmon.rcode_name(s) for s in ("0", "9003", "9002", "9501", "9701", "1460", "x")] == [
        "NOERROR", "NXDOMAIN", "SERVFAIL", "NODATA", "STATUS_9701", "STATUS_1460", ""]


def test_sniff(samples):
    for stem, (zip_name, derived, *_c) in FILES.items():
        assert sysmon.sniff(read_head(str(samples / DIR / zip_name)))
        assert sysmon.sniff(read_head(str(samples / DIR / "derived" / derived)))
    assert not sysmon.sniff(b'{"ts": 1.0, "uid": "C1", "id.orig_h": "10.0.0.1"}\n')  # Zeek JSON
    assert not sysmon.sniff(b'{"EventID": 257, "Channel": "Microsoft-Windows-DNSServer/Analytical"}\n')
    assert not sysmon.sniff(b"\x00\x01\x02" * 100)


EID3 = {"SourceName": "Microsoft-Windows-Sysmon", "EventID": 3, "Hostname": "H1", "UtcTime": "2022-07-01 05:42:38.122",
        "Image": "C:\\x\\a.exe", "Protocol": "tcp", "Initiated": "true", "SourceIp": "10.0.0.5",
        "SourcePort": "50000", "DestinationIp": "1.2.3.4", "DestinationPort": "8443"}
EID22 = {"SourceName": "Microsoft-Windows-Sysmon", "EventID": 22, "Hostname": "H1", "UtcTime": "2022-07-01 05:42:37.879",
         "QueryName": "c2.example", "QueryStatus": "0", "QueryResults": "::ffff:1.2.3.4;"}


def test_bad_records_are_quarantined_other_events_skipped(tmp_path):
    lines = [
        json.dumps(EID3),
        '{"SourceName": "Microsoft-Windows-Sysmon", "EventID": 3, "Init',   # truncated JSON
        "[1, 2]",
        json.dumps({"SourceName": "Microsoft-Windows-Security-Auditing", "EventID": 4624}),  # other provider
        json.dumps({**EID3, "DestinationIp": "1.2.3.999"}),
        json.dumps({**EID3, "UtcTime": "2022-07-01"}),
        json.dumps({**EID3, "Initiated": "false"}),                           # inbound: skipped
        json.dumps({**EID3, "EventID": 1}),                                   # other Sysmon event
        json.dumps({**EID3, "DestinationPort": "65536"}),
        json.dumps(EID22),
        "\x00\xff garbage",
    ]
    path = tmp_path / "events.json"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    conns, quarantine = read(path, sysmon.read_network, "connections")
    assert [tuple(r) for r in conns[["src_ip", "src_port", "dst_ip", "dst_port", "process"]].itertuples(index=False)] == [
        ("10.0.0.5", 50000, "1.2.3.4", 8443, "a.exe")]
    reasons = [(r.line, r.reason.split(":")[0]) for r in quarantine.records]
    assert reasons == [(2, "invalid JSON"), (3, "JSON value is not an object"), (5, "bad DestinationIp '1.2.3.999'"),
                       (6, "bad or missing UtcTime '2022-07-01'"), (9, "bad DestinationPort '65536'"), (11, "invalid JSON")]
    dns, _ = read(path, sysmon.read_dns, "dns_answers")
    assert dns[["client_ip", "query", "rtype", "answer", "rcode"]].values.tolist() == [
        ["10.0.0.5", "c2.example", "A", "1.2.3.4", "NOERROR"]]


def test_dns_client_falls_back_to_computer_name(tmp_path):
    path = tmp_path / "dns.json"
    path.write_text(json.dumps(EID22) + "\n" + json.dumps({**EID22, "host": {"ip": ["fe80::1", "192.168.9.9"]}}) + "\n")
    dns, _ = read(path, sysmon.read_dns, "dns_answers")
    assert dns["client_ip"].tolist() == ["H1", "192.168.9.9"]


def _read_lines(lines, reader):
    fd, name = tempfile.mkstemp(suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        quarantine = Quarantine()
        return list(reader(name, quarantine, 3)), quarantine, name
    finally:
        os.unlink(name)


GARBAGE = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"), max_size=80)
VALID3 = json.dumps(EID3)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.booleans(), GARBAGE), max_size=10))
def test_valid_lines_among_garbage_are_all_kept(items):
    lines, valid_numbers = [], []
    for is_valid, junk in items:
        lines.append(VALID3 if is_valid else junk)
        if is_valid:
            valid_numbers.append(len(lines))
    chunks, _q, name = _read_lines(lines, sysmon.read_network)
    got = [e for c in chunks for e in c["event_id"]]
    assert got == [stable_event_id("sysmon", name, n) for n in valid_numbers]


@settings(max_examples=80, deadline=None)
@given(st.sampled_from([VALID3, json.dumps(EID22)]), st.integers(0, 300), st.text(max_size=10))
def test_mutated_lines_never_raise(line, position, insert):
    mutated = line[:position] + insert + line[position + len(insert):]
    try:
        _read_lines([mutated], sysmon.read_network)
        _read_lines([mutated], sysmon.read_dns)
        sysmon.sniff(mutated.encode("utf-8", "surrogatepass"))
    except IngestError:
        pass


def test_dns_client_of_a_host_with_two_ips_in_its_eid3_events_gets_both(tmp_path):
    # Hostname compared case-blind; the most frequent address first, loopback ignored
    path = tmp_path / "events.json"
    lines = [json.dumps({**EID3, "Hostname": "WS7.corp.local", "SourceIp": ip})
             for ip in ("10.0.0.6", "10.0.0.5", "10.0.0.5", "127.0.0.1")]
    path.write_text("\n".join(lines + [json.dumps({**EID22, "Hostname": "ws7.CORP.local",
                                                    "QueryResults": "type:  5 c.example;::ffff:1.2.3.4;"})]) + "\n")
    dns, _ = read(path, sysmon.read_dns, "dns_answers")
    assert dns[["client_ip", "rtype", "answer", "answer_index"]].values.tolist() == [
        ["10.0.0.5", "CNAME", "c.example", 0], ["10.0.0.5", "A", "1.2.3.4", 1],
        ["10.0.0.6", "CNAME", "c.example", 0], ["10.0.0.6", "A", "1.2.3.4", 1]]


def test_computer_name_client_is_kept_by_the_read_not_quarantined(tmp_path):
    from esxi_anomaly import ingest

    path = tmp_path / "dns.json"
    path.write_text(json.dumps({**EID22, "Hostname": "MAIL01.corp.local"}) + "\n"
                    + json.dumps({**EID22, "Hostname": "bad name!"}) + "\n")
    quarantine = Quarantine()
    dns = ingest.read_dns([path], quarantine)
    assert dns["client_ip"].tolist() == ["MAIL01.corp.local"]   # resolved later (features.identity)
    assert [r.reason for r in quarantine.records] == ["client_ip is not an IP address: 'bad name!'"]
