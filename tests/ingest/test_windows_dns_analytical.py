"""Windows DNS Server Analytical events (JSON) -> dns_answers, answers decoded from PacketData."""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile

import numpy as np
import pandas as pd

from tests.ingest._lines import read_through
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esxi_anomaly import schema
from esxi_anomaly.ingest.base import IngestError, Quarantine, detect_format
from esxi_anomaly.ingest.windows_dns_analytical import read, sniff

SAMPLE = "windows-dns-analytical-elastic-integrations/test-events.json"
TS_257 = pd.Timestamp("2024-04-22T09:31:13.894Z").timestamp()
NXDOMAIN_PACKET = "0x0009818300010000000000000378797A076578616D706C6503636F6D0000010001"  # xyz.example.com A, rcode 3


def read_all(path, quarantine=None) -> pd.DataFrame:
    return read_through(read, path, "dns_answers", quarantine, 1000)


def sample_events(samples):
    return json.loads((samples / SAMPLE).read_text())["events"]


def test_sample_gives_the_one_documented_answer(samples, caplog):
    text = (samples / SAMPLE).read_text()
    # independent counts: 4 events, one of them a 257 response, no 258
    assert len(re.findall(r'"code": "\d+"', text)) == 4
    assert (text.count('"code": "257"'), text.count('"code": "258"')) == (1, 0)
    q = Quarantine()
    with caplog.at_level(logging.INFO):
        df = read_all(samples / SAMPLE, q)
    assert len(q) == 0
    assert df.drop(columns=["event_id"]).to_dict("records") == [{
        "ts": TS_257, "client_ip": "216.160.83.56", "resolver_ip": "172.31.87.64", "query": "google.es",
        "rtype": "AAAA", "answer": "2607:f8b0:4004:c17::5e", "answer_index": 0, "ttl": 300.0,
        "rcode": "NOERROR", "source": "windows_dns_analytical"}]
    assert df.loc[0, "event_id"].startswith("windns-")
    assert "{'event 256': 1, 'event 259': 1, 'event 261': 1}" in caplog.text


def test_sniff_and_registry(samples):
    assert sniff((samples / SAMPLE).read_bytes())
    assert detect_format(str(samples / SAMPLE), "dns_answers").name == "windows_dns_analytical"
    assert not sniff((samples / "infoblox-nios-elastic-integrations/test-dns.log").read_bytes())
    assert not sniff(b'{"ts": 1.0, "uid": "C1", "query": "a.com", "answers": ["1.2.3.4"]}\n')


def test_one_event_per_line_and_message_string_shapes(samples, tmp_path):
    events = sample_events(samples)
    ndjson = tmp_path / "events.ndjson"
    ndjson.write_text("".join(json.dumps(e) + "\n" for e in events))
    wrapped = tmp_path / "wrapped.ndjson"  # raw event carried as a JSON string under `message`
    wrapped.write_text("".join(json.dumps({"@timestamp": e["@timestamp"], "message": json.dumps(e)}) + "\n" for e in events))
    for path in (ndjson, wrapped):
        df = read_all(path)
        assert df[["client_ip", "query", "rtype", "answer", "ttl", "ts"]].values.tolist() == [
            ["216.160.83.56", "google.es", "AAAA", "2607:f8b0:4004:c17::5e", 300.0, TS_257]]


def test_rendered_message_text(samples, tmp_path):
    # Built here from the sample's field values in the Windows "NAME: key=value; ..." rendering
    # (no verbatim rendered line is documented in formats.md).
    data = sample_events(samples)[0]["winlog"]["event_data"]
    rendered = "RESPONSE_SUCCESS: " + "; ".join(f"{k}={v}" for k, v in data.items())
    path = tmp_path / "rendered.ndjson"
    path.write_text(json.dumps({"@timestamp": "2024-04-22T09:31:13.894Z", "message": rendered}) + "\n")
    df = read_all(path)
    assert df[["client_ip", "answer", "ttl"]].values.tolist() == [["216.160.83.56", "2607:f8b0:4004:c17::5e", 300.0]]


def test_response_failure_keeps_one_row_without_answer(tmp_path):
    event = {"@timestamp": "2024-04-22T10:00:00Z", "event": {"code": "258", "provider": "Microsoft-Windows-DNSServer"},
             "winlog": {"event_data": {"Destination": "10.0.0.5", "InterfaceIP": "0.0.0.0", "QNAME": "xyz.example.com.",
                                       "RCODE": "3", "PacketData": NXDOMAIN_PACKET}}}
    path = tmp_path / "nx.ndjson"
    path.write_text(json.dumps(event) + "\n")
    df = read_all(path)
    assert df[["client_ip", "resolver_ip", "query", "rtype", "answer", "answer_index", "rcode"]].values.tolist() == [
        ["10.0.0.5", "", "xyz.example.com", "", "", -1, "NXDOMAIN"]]
    assert np.isnan(df.loc[0, "ttl"])


def test_truncated_document_keeps_events_before_the_damage(samples, tmp_path):
    text = (samples / SAMPLE).read_text()
    cut = text.index('"code": "256"')  # inside the third event
    path = tmp_path / "truncated.json"
    path.write_text(text[:cut])
    q = Quarantine()
    df = read_all(path, q)
    assert df["answer"].tolist() == ["2607:f8b0:4004:c17::5e"]
    assert [r.reason.split(" (")[0] for r in q.records] == ["invalid JSON event"]
    third_event = [m.start() for m in re.finditer(r"\n        \{\n", text)][2] + 1
    assert q.records[0].line == text[:third_event].count("\n") + 1 == 109  # grep -n "^        {" gives 3, 57, 109, 215


def test_bad_packet_data_is_quarantined_and_the_rest_kept(samples, tmp_path):
    events = sample_events(samples)
    broken = json.loads(json.dumps(events[0]))
    broken["winlog"]["event_data"]["PacketData"] = "0x0007818000010001"  # header cut short
    path = tmp_path / "mixed.ndjson"
    path.write_text(json.dumps(broken) + "\n" + "not json at all\n" + json.dumps(events[0]) + "\n\x00\x01\n")
    q = Quarantine()
    df = read_all(path, q)
    assert df["answer"].tolist() == ["2607:f8b0:4004:c17::5e"]
    assert [(r.line, r.reason.split(":")[0]) for r in q.records] == [
        (1, "event 257"), (2, "invalid JSON (Expecting value"), (4, "invalid JSON (Expecting value")]
    assert "PacketData does not decode" in q.records[0].reason


def _read_text(text: str) -> tuple[pd.DataFrame, Quarantine]:
    fd, path = tempfile.mkstemp(suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogatepass") as fh:
            fh.write(text)
        q = Quarantine()
        try:
            return read_all(path, q), q
        except IngestError:
            return schema.empty("dns_answers"), q
    finally:
        os.unlink(path)


@pytest.fixture(scope="module")
def valid_line(samples):
    return json.dumps(sample_events(samples)[0])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.lists(st.text(st.characters(exclude_categories=("Cs",)), max_size=80), max_size=6),
       where=st.integers(0, 6))
def test_valid_events_survive_garbage_lines(valid_line, garbage, where):
    lines = [g.replace("\n", " ").replace("\r", " ") for g in garbage]
    lines.insert(min(where, len(lines)), valid_line)
    lines.insert(0, valid_line)  # the first line decides the one-event-per-line shape
    df, _ = _read_text("\n".join(lines) + "\n")
    assert df["answer"].tolist() == ["2607:f8b0:4004:c17::5e"] * 2


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mutated_documents_never_raise(samples, data):
    text = (samples / SAMPLE).read_text()
    cut = data.draw(st.integers(0, len(text)))
    junk = data.draw(st.text(max_size=40))
    _read_text(text[:cut] + junk + text[cut:])
