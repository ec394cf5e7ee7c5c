"""HTML report, static checks: self-contained, log text escaped, data block cannot be closed, bounded."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd

from esxi_anomaly.report.html import render_html, write_html

from .conftest import T0, XSS_QUERY


def _data(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S)
    return json.loads(match.group(1))


def test_no_external_resource_references(ranked, tmp_path):
    page = write_html(ranked, tmp_path / "r.html", summary={"env": "prod"}).read_text(encoding="utf-8")
    assert not re.search(r"""(?:src|href|action)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert not re.search(r"@import|url\(|<link[^>]+stylesheet|<iframe|<img|<object|<embed", page, re.I)
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]


def test_log_text_cannot_escape_the_data_block(ranked):
    page = render_html(ranked)
    # Exactly two script elements: the JSON data and the page script; no log text opens another.
    assert page.count("<script") == 2
    assert page.count("</script>") == 2
    assert "<script>window.__pwned" not in page
    assert "<img src=x" not in page
    assert "\\u003cscript\\u003ewindow.__pwned=1\\u003c/script\\u003e.evil.example" in page
    data = _data(page)
    queries = [row[[c["key"] for c in data["ranked"]["columns"]].index("query")] for row in data["ranked"]["rows"]]
    assert queries[1] == XSS_QUERY


def test_page_script_never_uses_innerhtml_with_data():
    page = render_html(pd.DataFrame({"rank": [1], "score": [0.5], "ts": [T0], "src_ip": ["10.0.0.1"]}))
    script = page.rsplit("<script>", 1)[1]
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script and "document.write" not in script


def test_table_bounded_by_top_and_sorted_by_rank(ranked):
    shuffled = ranked.iloc[[3, 0, 4, 1, 2]]
    data = _data(render_html(shuffled, top=3))
    keys = [c["key"] for c in data["ranked"]["columns"]]
    assert [row[keys.index("rank")] for row in data["ranked"]["rows"]] == [1, 2, 3]
    assert data["summary"]["cards"][:2] == [["connections scored", "5"], ["rows in table", "3"]]
    # The roll-up still covers every row.
    assert len(data["entities"]["rows"]) == 3


def test_nan_becomes_null_and_long_text_is_cut(ranked):
    ranked.loc[0, "answer"] = "x" * 5000
    data = _data(render_html(ranked))
    keys = [c["key"] for c in data["ranked"]["columns"]]
    rows = data["ranked"]["rows"]
    assert rows[2][keys.index("dns_delay")] is None
    assert len(rows[0][keys.index("answer")]) == 1001


def test_timelines_from_canonical_frames_are_windowed_and_capped(ranked):
    rng = np.random.default_rng(0)
    connections = pd.DataFrame({
        "event_id": ["CxA1"] + [f"n{i}" for i in range(999)],
        "ts": np.concatenate([[T0 + 10], T0 + rng.uniform(-2000, 2000, 999)]),
        "src_ip": "10.0.1.5", "dst_ip": "10.0.0.53", "dst_port": 53,
    })
    dns_answers = pd.DataFrame({"ts": [T0 + 8.0, T0 - 4000.0], "client_ip": "10.0.1.5",
                                "query": ["a.example", "old.example"], "answer": ["19.57.34.8", "1.2.3.4"],
                                "rtype": "A"})
    data = _data(render_html(ranked, connections=connections, dns_answers=dns_answers, timeline_entities=1))
    (timeline,) = data["timelines"]
    assert timeline["ip"] == "10.0.1.5" and timeline["top_ts"] == T0 + 10
    points = timeline["connections"]
    assert len(points) == 200 and timeline["truncated"] is True
    assert all(abs(p[0] - (T0 + 10)) <= 900 for p in points)
    assert [p[4] for p in points].count(1) == 1  # the top anomaly is marked once
    top_point = next(p for p in points if p[4] == 1)
    assert top_point[3] == 0.97 and top_point[5] == "CxA1"
    assert timeline["dns"] == [[T0 + 8.0, "a.example", "A", "19.57.34.8"]]


def test_timelines_fall_back_to_ranked_rows(ranked):
    data = _data(render_html(ranked))
    assert [t["ip"] for t in data["timelines"]] == ["10.0.1.5", "10.0.0.21", "10.0.2.9"]
    first = data["timelines"][0]
    assert [p[5] for p in first["connections"]] == ["CxA1", "CxA2"]
    assert [d[0] for d in first["dns"]] == [T0 + 10 - 2.1, T0 + 70 - 1.5]


def test_seen_by_is_a_column_and_in_the_detail_as_text(ranked):
    hostile = "nsx_dfw:<img src=x onerror=alert(1)>"
    ranked["seen_by"] = ["nsx_dfw:esx01 nsx_dfw:esx03", hostile, "esxcli_connections:esx01", "", "zeek_conn_tsv"]
    page = render_html(ranked)
    assert page.count("<script") == 2 and "<img src=x onerror=alert(1)>" not in page
    data = _data(page)
    spec = next(c for c in data["ranked"]["columns"] if c["key"] == "seen_by")
    assert (spec["label"], spec["kind"], spec["visible"], spec["detail"]) == ("Seen by", "text", True, True)
    keys = [c["key"] for c in data["ranked"]["columns"]]
    assert [row[keys.index("seen_by")] for row in data["ranked"]["rows"]] == [
        "nsx_dfw:esx01 nsx_dfw:esx03", hostile, "esxcli_connections:esx01", "", "zeek_conn_tsv"]


def test_a_run_passes_the_full_roll_up_incidents_and_histogram(ranked):
    from esxi_anomaly.report.incidents import incident_frame
    from esxi_anomaly.report.rollup import entity_rollup

    ranked["alert"] = [True, True, False, False, False]
    everything = pd.concat([ranked, ranked.assign(src_ip="10.9.9.9", src_name="vm-not-shown",
                                                  event_id=ranked["event_id"] + "x", rank=ranked["rank"] + 5)])
    data = _data(render_html(ranked, rollup=entity_rollup(everything), incidents=incident_frame(everything),
                             incident_count=12345, score_histogram=[0] * 49 + [7], alert_level=0.75))
    assert "vm-not-shown" in json.dumps(data["entities"]["rows"])      # an entity none of the table's rows has
    assert len(data["incidents"]["rows"]) == 10 and ["incidents", "12,345"] in data["summary"]["cards"]
    assert ["alerts", "4"] in data["summary"]["cards"]                  # counted by the roll-up, all rows
    assert data["histogram"] == {"counts": [0] * 49 + [7], "level": 0.75}


def test_without_a_run_the_report_makes_incidents_and_histogram_from_its_rows(ranked):
    ranked["alert"] = [True, True, False, False, False]
    data = _data(render_html(ranked, summary={"threshold": 0.6}))
    incidents = data["incidents"]
    keys = [c["key"] for c in incidents["columns"]]
    assert keys[:3] == ["rank", "alert", "score"] and "explanation" in keys
    assert [row[keys.index("alert")] for row in incidents["rows"]] == ["alert", "alert", "", "", ""]
    assert incidents["events"] == [["CxA1"], ["CxA2"], ["CxB1"], ["CxC1"], ["CxC2"]]
    assert incidents["ports"][0] == ["1117"] and incidents["queries"][1] == XSS_QUERY
    assert data["ranked"]["incident"][0] == incidents["id"][0]          # rows know their incident
    assert sum(data["histogram"]["counts"]) == 5 and data["histogram"]["level"] == 0.6
    assert ["alerts", "2"] in data["summary"]["cards"]


def test_the_why_column_wraps():
    from importlib import resources

    css = resources.files("esxi_anomaly.report").joinpath("report.css").read_text(encoding="utf-8")
    rules = re.findall(r"td\.why \{([^}]*)\}", css)
    assert rules and "white-space: normal" in rules[-1] and "text-overflow" not in rules[-1]


def test_the_header_names_the_runs_blind_spots_first(ranked):
    gap = "only 3 % of in-scope connections were joined to a DNS answer: DNS logs missing or encrypted (853 seen)"
    data = _data(render_html(ranked, summary={"diagnostics": [gap], "dns_share": 0.031, "env": "prod"}))
    details = data["summary"]["details"]
    assert details[0] == ["warning", gap]
    assert ["DNS coverage", "3 % of the connections scored were joined to a DNS answer"] in details
    assert not any(key in ("diagnostics", "dns_share") for key, _ in details)
