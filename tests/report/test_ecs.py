"""ECS JSON lines: valid field names and types on every record, risk score 0-100, empties omitted."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from esxi_anomaly.report.ecs import ECS_FIELDS, validate_ecs_record, write_jsonl


def _documents(path):
    return [json.loads(line) for line in path.read_text(encoding="ascii").splitlines()]


def test_every_record_valid_ecs(ranked, tmp_path):
    documents = _documents(write_jsonl(ranked, tmp_path / "ranked.jsonl"))
    assert len(documents) == len(ranked)
    for document in documents:
        names = validate_ecs_record(document)
        assert all(n in ECS_FIELDS or n.startswith("esxi_anomaly.") for n in names)
        assert 0 <= document["event"]["risk_score"] <= 100


def test_first_record_exact(ranked, tmp_path):
    ranked["alert"] = [True, True, False, False, False]
    first = _documents(write_jsonl(ranked, tmp_path / "ranked.jsonl"))[0]
    assert first == {
        "@timestamp": "2026-11-18T11:06:50.000Z",
        "event": {"id": "CxA1", "kind": "alert", "module": "esxi_anomaly", "category": ["network"],
                  "type": ["connection"], "risk_score": 97.0},
        "source": {"ip": "10.0.1.5", "port": 50001},
        "destination": {"ip": "19.57.34.8", "port": 1117},
        "network": {"transport": "tcp"},
        "host": {"name": "vm-web-03"},
        "dns": {"question": {"name": '=HYPERLINK("http://x")'},
                "answers": [{"data": "19.57.34.8", "type": "A"}]},
        "rule": {"name": ["R_APT12", "R_REPEAT"]},
        "message": "port 1117 = 19*57+34 (APT12 a*b+c) from A 19.57.34.8",
        "esxi_anomaly": {"rank": 1, "score": 0.97, "forest_score": 0.88, "rule_score": 1.0,
                         "transform": "apt12_a*b+c", "dns_delay": 2.1,
                         "top_features": "port_rarity=+0.31; dns_match_significance=+0.22",
                         "src_kind": "vm", "esxi_host": "esx01", "family": "apt12"},
        "threat": {"framework": "MITRE ATT&CK",
                   "tactic": {"id": ["TA0011"], "name": ["Command and Control"],
                              "reference": ["https://attack.mitre.org/tactics/TA0011/"]},
                   "technique": {"id": ["T1568"], "name": ["Dynamic Resolution"],
                                 "reference": ["https://attack.mitre.org/techniques/T1568/"],
                                 "subtechnique": {"id": ["T1568.003"], "name": ["DNS Calculation"],
                                                  "reference": ["https://attack.mitre.org/techniques/T1568/003/"]}}},
        "ecs": {"version": "9.4.0"},
    }


def test_empty_values_omitted(ranked, tmp_path):
    documents = _documents(write_jsonl(ranked, tmp_path / "ranked.jsonl"))
    mgmt, last = documents[2], documents[4]
    assert "port" not in mgmt["source"]            # src_port -1 = unknown
    assert "dns_delay" not in mgmt["esxi_anomaly"]  # NaN
    assert "transform" not in mgmt["esxi_anomaly"]  # ""
    assert "answers" not in last["dns"] and "rule" not in last and "message" not in last
    assert mgmt["process"] == {"name": "hostd"}


def test_risk_score_clipped_and_line_separators_escaped(ranked, tmp_path):
    ranked["score"] = [1.7, -0.2, 0.5, np.nan, 0.0]
    ranked["query"] = ["a\u2028b", "c\nd", "x", "y", "z"]
    path = write_jsonl(ranked, tmp_path / "ranked.jsonl")
    lines = path.read_bytes().split(b"\n")
    assert len(lines) == 6 and lines[-1] == b""
    documents = _documents(path)
    assert [d["event"].get("risk_score") for d in documents] == [100.0, 0.0, 50.0, None, 0.0]
    assert documents[0]["dns"]["question"]["name"] == "a\u2028b"


@pytest.mark.parametrize("bad, message", [
    ({"event": {"kind": "alert", "module": "m", "risk_score": 120}}, "outside 0-100"),
    ({"event": {"kind": "alert", "module": "m"}, "source": {"address": "x"}}, "source.address is neither"),
    ({"event": {"kind": "alert", "module": "m"}, "destination": {"port": "443"}}, "destination.port"),
    ({"event": {"kind": "alert", "module": "m"}, "source": {"ip": "not-an-ip"}}, "not an IP"),
    ({"event": {"kind": "alert", "module": "m"}, "@timestamp": "1795000000"}, "@timestamp"),
    ({"event": {"module": "m"}}, "event.kind is missing"),
])
def test_validator_rejects_bad_records(bad, message):
    with pytest.raises(ValueError, match=message):
        validate_ecs_record(bad)


def _reference():
    import csv
    from pathlib import Path

    folder = Path("/work/shared/reference")
    if not (folder / "ecs-9.4.0-fields.csv").is_file():
        pytest.skip("the ECS reference files are not in /work/shared/reference")
    with open(folder / "ecs-9.4.0-fields.csv", newline="", encoding="utf-8") as fh:
        fields = {row["Field"]: row["Type"] for row in csv.DictReader(fh)}
    allowed = json.loads((folder / "ecs-9.4.0-allowed-values.json").read_text(encoding="utf-8"))["allowed_values"]
    return fields, allowed


def test_seen_by_is_a_custom_keyword_list(ranked, tmp_path):
    ranked["seen_by"] = ["nsx_dfw:esx01 nsx_dfw:esx03", "zeek_conn_tsv", "", "esxcli_connections:esx02",
                         "sysmon_network nsx_dfw:esx01"]
    documents = _documents(write_jsonl(ranked, tmp_path / "ranked.jsonl"))
    assert [d["esxi_anomaly"].get("seen_by") for d in documents] == [
        ["nsx_dfw:esx01", "nsx_dfw:esx03"], ["zeek_conn_tsv"], None, ["esxcli_connections:esx02"],
        ["sysmon_network", "nsx_dfw:esx01"]]
    # names: ECS 9.4.0's own fields, or under our custom namespace, which ECS does not define
    fields, allowed = _reference()
    assert not any(name == "esxi_anomaly" or name.startswith("esxi_anomaly.") for name in fields)
    for document in documents:
        for name in validate_ecs_record(document):
            assert name in fields or name.startswith("esxi_anomaly."), name
        assert document["event"]["kind"] in allowed["event.kind"]
        assert set(document["event"]["category"]) <= set(allowed["event.category"])
        assert set(document["event"]["type"]) <= set(allowed["event.type"])
    with pytest.raises(ValueError, match="esxi_anomaly.seen_by"):
        validate_ecs_record({"event": {"kind": "alert", "module": "m"}, "esxi_anomaly": {"seen_by": "x y"}})


# -- against the ECS 9.4.0 field definitions -----------------------------------------------------

_ECS_TYPES = {
    "keyword": str, "constant_keyword": str, "wildcard": str, "match_only_text": str, "text": str,
    "long": int, "integer": int, "short": int, "byte": int, "unsigned_long": int,
    "float": (int, float), "half_float": (int, float), "scaled_float": (int, float), "double": (int, float),
    "boolean": bool, "date": str, "ip": str,
}


def _flat(node, prefix=""):
    """(dotted name, value) of every leaf; arrays of objects (dns.answers) descended into."""
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flat(value, name + ".")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            yield name, value
            for item in value:
                yield from _flat(item, name + ".")
        else:
            yield name, value


def ecs_problems(document: dict, fields: dict, allowed: dict) -> list[str]:
    """Every field of `document` named in ECS 9.4.0 (or under our custom namespace), of its type, and
    the categorisation fields holding allowed values."""
    import ipaddress

    problems = []
    for name, value in _flat(document):
        if name.startswith("esxi_anomaly."):
            continue
        if name not in fields:
            problems.append(f"{name}: not an ECS 9.4.0 field")
            continue
        kind = fields[name]
        values = value if isinstance(value, list) else [value]
        if kind in ("object", "nested"):
            if not all(isinstance(v, dict) for v in values):
                problems.append(f"{name}: {kind} expected, got {value!r}")
            continue
        expected = _ECS_TYPES.get(kind)
        if expected is None:
            problems.append(f"{name}: ECS type {kind} not checked here")
            continue
        for v in values:
            if isinstance(v, bool) and expected is not bool or not isinstance(v, expected):
                problems.append(f"{name}: {v!r} is not a {kind}")
            elif kind == "ip":
                try:
                    ipaddress.ip_address(v)
                except ValueError:
                    problems.append(f"{name}: {v!r} is not an ip")
            elif kind == "date" and not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", v):
                problems.append(f"{name}: {v!r} is not an ISO 8601 date")
            if name in allowed and v not in allowed[name]:
                problems.append(f"{name}: {v!r} is not one of ECS's allowed values")
    return problems


def test_rows_and_incidents_are_valid_ecs_9_4(ranked, tmp_path):
    from esxi_anomaly.report.ecs import incident_records
    from esxi_anomaly.report.incidents import incident_frame

    fields, allowed = _reference()
    assert not any(name.split(".")[0] == "esxi_anomaly" for name in fields)   # ours is a custom namespace
    ranked["alert"] = [True, True, False, False, False]
    ranked["seen_by"] = ["nsx_dfw:esx01", "", "zeek_conn_tsv", "", ""]
    rows = _documents(write_jsonl(ranked, tmp_path / "ranked.jsonl"))
    incidents = incident_records(incident_frame(ranked))
    for document in rows + incidents:
        assert ecs_problems(document, fields, allowed) == []
        validate_ecs_record(document)
        assert document["ecs"] == {"version": "9.4.0"}
    assert [d["event"]["kind"] for d in rows] == ["alert", "alert", "event", "event", "event"]
    assert [d["event"]["kind"] for d in incidents] == ["alert", "alert", "event", "event", "event"]
    for document in rows[:2] + incidents[:2]:
        threat = document["threat"]
        assert threat["framework"] == "MITRE ATT&CK" and threat["tactic"]["id"] == ["TA0011"]
        assert threat["technique"]["id"] == ["T1568"] and threat["technique"]["subtechnique"]["id"] == ["T1568.003"]
    assert not any("threat" in d for d in rows[2:] + incidents[2:])   # only alerts name the technique
    # the checker itself finds a wrong name, type and value
    bad = {"event": {"kind": "warning", "risk_score": "high"}, "source": {"ip": "x", "address": 1}}
    assert len(ecs_problems(bad, fields, allowed)) == 4


def test_incident_documents(ranked):
    from esxi_anomaly.report.ecs import incident_records
    from esxi_anomaly.report.incidents import incident_frame

    ranked["alert"] = [True, True, False, False, False]
    ranked.loc[1, "query"] = ranked.loc[0, "query"]   # rows 1 and 2: one incident (same source, name, transform)
    documents = incident_records(incident_frame(ranked))
    assert len(documents) == 4
    first = documents[0]
    assert first["esxi_anomaly"]["event_ids"] == ["CxA1", "CxA2"] and first["esxi_anomaly"]["connections"] == 2
    assert first["esxi_anomaly"]["dst_ports"] == [1117, 1118]
    assert first["related"]["ip"] == ["10.0.1.5", "19.57.34.8", "19.57.34.9"] and "destination" not in first
    assert first["event"]["start"] == "2026-11-18T11:06:50.000Z" and first["event"]["end"] == "2026-11-18T11:07:50.000Z"
    assert first["dns"]["question"]["name"] == '=HYPERLINK("http://x")'
