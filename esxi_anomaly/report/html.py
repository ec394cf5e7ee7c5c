"""Self-contained HTML report for analysts: summary, score histogram with the alert level, the
incident table (it opens on it: rows expand to their connections; an analyst marks incidents
benign or malicious and downloads the verdicts as the CSV `esxi-anomaly label --import-csv`
reads), sortable/filterable ranked table with per-row explanations, per-entity roll-up, and SVG
timelines of the top entities.

One file, no external requests (inline CSS and JS, no fonts, no images by URL). The data is
embedded as JSON in a `<script type="application/json">` block with `<`, `>` and `&` escaped,
so log text cannot close the block; the page script builds the DOM with textContent only. A
Content-Security-Policy allows only this page's own script and style (by hash) and no network.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from esxi_anomaly import schema
from esxi_anomaly.atomic import atomic_path
from esxi_anomaly.report.incidents import EVENT_PORTS, incident_frame, incident_ids
from esxi_anomaly.report.rollup import entity_rollup
from esxi_anomaly.schema import STR

DEFAULT_TOP = 2000
MAX_TEXT = 1000              # characters kept per text cell; long TXT answers are cut
TIMELINE_ENTITIES = 8
TIMELINE_WINDOW = 900.0      # seconds either side of the entity's top anomaly
MAX_TIMELINE_CONNECTIONS = 200
MAX_TIMELINE_DNS = 100
MAX_INCIDENTS = 500          # incidents in the table (all of them are in <out>.incidents.csv)
MAX_INCIDENT_EVENTS = 5000   # event ids (and ports) per incident a verdict download covers
HISTOGRAM_BINS = 50

# How the ranked table shows each column, keyed by its `schema.RANKED` name, in table order:
# label, kind, css class, shown in the table, shown in the expanded detail.
RANKED_DISPLAY: dict[str, tuple[str, str, str, bool, bool]] = {
    "rank": ("Rank", "int", "num", True, False),
    "score": ("Score", "score", "", True, True),
    "ts": ("Time (UTC)", "time", "mono", True, False),
    "src_name": ("Source", "text", "", True, False),
    "src_ip": ("Source IP", "text", "mono", True, False),
    "dst_ip": ("Destination", "text", "mono", True, False),
    "dst_port": ("Port", "int", "num", True, False),
    "query": ("DNS query", "text", "mono clip", True, True),
    "answer": ("Answer", "text", "mono clip", True, True),
    "explanation": ("Why", "text", "why", True, True),
    "transform": ("Transform", "text", "mono", True, True),
    "rules": ("Rules", "text", "mono clip", True, True),
    "family": ("Label", "text", "", True, True),
    "dns_delay": ("DNS \u2192 conn (s)", "float", "num", True, True),
    "src_kind": ("Kind", "text", "", True, True),
    "esxi_host": ("ESXi host", "text", "", True, False),
    "seen_by": ("Seen by", "text", "mono clip", True, True),   # the vantage points that logged it
    "process": ("Process", "text", "", True, False),
    "proto": ("Proto", "text", "", True, False),
    "rtype": ("Type", "text", "", False, True),
    "top_features": ("Top features", "text", "", False, True),
    "forest_score": ("Forest score", "score", "", False, True),
    "rule_score": ("Rule score", "score", "", False, True),
    "event_id": ("Event id", "text", "", False, True),
}
DISPLAY_EXTRAS = ("family",)            # display-only: an evaluation's labels, not a ranked output column
NOT_SHOWN = ("src_port", "suppressed", "alert")   # ranked output columns the table leaves out
# the kinds a column of each spec dtype may be shown as
_KINDS = {"int64": ("int",), "int32": ("int",), "float64": ("score", "float", "time"), STR: ("text",),
          "bool": ()}


def display_problems(spec=None) -> list[str]:
    """What keeps RANKED_DISPLAY from matching the ranked output spec (`spec`, default
    `schema.RANKED`): names that are neither spec columns nor DISPLAY_EXTRAS, kinds the column's
    dtype does not allow, spec columns neither shown nor in NOT_SHOWN. Checked at import."""
    spec = schema.RANKED if spec is None else spec
    problems = [f"{k!r} is not a ranked column" for k in [*RANKED_DISPLAY, *NOT_SHOWN]
                if k not in spec and k not in DISPLAY_EXTRAS]
    problems += [f"{k!r} is shown as {shown[1]!r}, which dtype {spec[k]} does not allow"
                 for k, shown in RANKED_DISPLAY.items() if k in spec and shown[1] not in _KINDS.get(spec[k], ())]
    problems += [f"{c!r} is neither shown nor in NOT_SHOWN" for c in spec if c not in RANKED_DISPLAY and c not in NOT_SHOWN]
    return problems


if display_problems():
    raise RuntimeError("report.html's ranked table does not match schema.RANKED: " + "; ".join(display_problems()))
# (key, label, kind, css class, in table, in detail): what `_table` takes
RANKED_COLUMNS = [(key, *spec) for key, spec in RANKED_DISPLAY.items()]

ENTITY_COLUMNS = [
    ("src_name", "Entity", "text", ""),
    ("src_ip", "IP", "text", "mono"),
    ("src_kind", "Kind", "text", ""),
    ("esxi_host", "ESXi host", "text", ""),
    ("max_score", "Max score", "score", ""),
    ("connections", "Connections", "int", "num"),
    ("alerts", "Alerts", "int", "num"),
    ("first_seen", "First seen", "time", "mono"),
    ("last_seen", "Last seen", "time", "mono"),
    ("transforms", "Transforms", "text", "mono clip"),
    ("families", "Labels", "text", ""),
    ("top_explanation", "Top explanation", "text", "why"),
]

INCIDENT_COLUMNS = [
    ("rank", "Rank", "int", "num"),
    ("alert", "Alert", "text", ""),
    ("score", "Score", "score", ""),
    ("src_name", "Source", "text", ""),
    ("src_ip", "Source IP", "text", "mono"),
    ("query", "C2 name", "text", "mono clip"),
    ("dst_ips", "Destinations", "text", "mono clip"),
    ("dst_ports", "Ports", "text", "mono clip"),
    ("transform", "Transform", "text", "mono"),
    ("connections", "Connections", "int", "num"),
    ("first_ts", "First (UTC)", "time", "mono"),
    ("last_ts", "Last (UTC)", "time", "mono"),
    ("explanation", "Why", "text", "why"),
]

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src '@SCRIPT_HASH@'; \
style-src '@STYLE_HASH@'; img-src data:; base-uri 'none'; form-action 'none'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<link rel="icon" href="data:,">
<title>esxi-anomaly report</title>
<style>@STYLE@</style>
</head>
<body>
<header><h1 id="title">esxi-anomaly report</h1><div class="sub" id="subtitle"></div></header>
<main>
<noscript><p>This report renders its tables with JavaScript; the same rows are in the CSV/JSON outputs.</p></noscript>
<section id="summary-section"><h2>Summary</h2><div id="summary"></div>
<div id="histogram"></div></section>
<section id="incidents-section"><h2>Incidents</h2>
<div class="legend">One row per source, C2 name (or destination) and derivation, alerts first. Expand a row for \
its connections; mark incidents benign or malicious and download the verdicts for \
<code>esxi-anomaly label --import-csv</code>.</div>
<div class="toolbar"><button id="download-verdicts" type="button">Download verdicts (CSV)</button>\
<span class="count" id="verdict-count"></span></div>
<div class="scroll"><table id="incidents"></table></div></section>
<section id="ranked-section"><h2>Ranked connections</h2>
<div class="toolbar"><input id="filter" type="search" placeholder="Filter rows (any text: VM, IP, domain, rule...)" \
aria-label="filter rows"><span class="count" id="count"></span></div>
<div class="scroll"><table id="ranked"></table></div></section>
<section id="entities-section"><h2>Entities</h2>
<div class="legend">One row per source; click a row to filter the ranked table to it.</div>
<div class="scroll"><table id="entities"></table></div></section>
<section id="timelines-section"><h2>Timelines of the top entities</h2>
<div class="legend">Window of @WINDOW@ around each entity's top anomaly (dashed line). Diamonds: DNS answers \
to the entity; dots: its connections by destination port (log scale), coloured by score, grey if unscored; \
ringed: the top anomaly. Hover for details.</div>
<div id="timelines"></div></section>
</main>
<script type="application/json" id="report-data">@DATA@</script>
<script>@SCRIPT@</script>
</body>
</html>
"""


def _asset(name: str) -> str:
    return resources.files("esxi_anomaly.report").joinpath(name).read_text(encoding="utf-8")


def _csp_hash(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


def _embed_json(data: object) -> str:
    # `<` inside the JSON would let log text close the script block; escape it (and > &) as \\u00XX.
    text = json.dumps(data, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _json_values(series: pd.Series, kind: str) -> list:
    if kind == "text":
        text = series.fillna("").astype(str)
        long = text.str.len() > MAX_TEXT
        if long.any():
            text = text.where(~long, text.str.slice(0, MAX_TEXT) + "\u2026")
        return text.tolist()
    numbers = pd.to_numeric(series, errors="coerce").to_numpy(dtype="float64")
    finite = np.isfinite(numbers)
    if kind == "int":
        return [int(v) if ok else None for v, ok in zip(numbers.tolist(), finite.tolist())]
    return [float(v) if ok else None for v, ok in zip(numbers.tolist(), finite.tolist())]


def _table(frame: pd.DataFrame, columns: list[tuple]) -> dict:
    present = [c for c in columns if c[0] in frame.columns]
    specs = []
    for spec in present:
        key, label, kind, cls = spec[:4]
        entry = {"key": key, "label": label, "kind": kind, "cls": cls}
        if len(spec) > 4:
            entry["visible"], entry["detail"] = spec[4], spec[5]
        specs.append(entry)
    values = [_json_values(frame[c[0]], "text" if c[2] == "text" else ("int" if c[2] == "int" else "float"))
              for c in present]
    return {"columns": specs, "rows": [list(row) for row in zip(*values)] if values else []}


def _iso(ts: float) -> str:
    return pd.Timestamp(ts, unit="s", tz="UTC").strftime("%Y-%m-%d %H:%M:%SZ") if np.isfinite(ts) else ""


def _summary(ranked: pd.DataFrame, shown: int, rollup: pd.DataFrame, summary: dict | None,
             incidents: int) -> dict:
    summary = dict(summary or {})
    scored = summary.pop("connections", len(ranked))  # a run passes its total; the table may be its top N
    cards = [["connections scored", f"{int(scored):,}"], ["rows in table", f"{shown:,}"],
             ["entities", f"{len(rollup):,}"], ["incidents", f"{incidents:,}"]]
    if "alerts" in rollup.columns:   # the roll-up counts every row's alert flag, not only the rows shown
        cards.append(["alerts", f"{int(rollup['alerts'].sum()):,}"])
    if "score" in ranked.columns and len(ranked):
        cards.append(["top score", f"{ranked['score'].max():.3f}"])
    details = []
    if "ts" in ranked.columns and len(ranked):
        ts = pd.to_numeric(ranked["ts"], errors="coerce")
        details.append(["time range", f"{_iso(ts.min())} \u2013 {_iso(ts.max())}"])
    if "family" in ranked.columns:
        counts = ranked["family"].fillna("").astype(str).replace("", "(none)").value_counts()
        details.append(["labels (all rows)", ", ".join(f"{k}: {v}" for k, v in counts.items())])
    title = summary.pop("title", None)
    # the run's blind spots first, in words (`RunSummary.report_summary`)
    details = [["warning", str(line)[:MAX_TEXT]] for line in summary.pop("diagnostics", None) or []] + details
    share = summary.pop("dns_share", None)
    if share is not None:
        details.append(["DNS coverage", f"{100 * float(share):.0f} % of the connections scored were joined to a DNS answer"])
    for key, value in summary.items():
        text = value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)
        details.append([str(key), text[:MAX_TEXT]])
    env = summary.get("env")
    return {"title": title or (f"esxi-anomaly report \u2014 {env}" if env else "esxi-anomaly report"),
            "subtitle": "DNS-calculated C2 (MITRE ATT&CK T1568.003): connections ranked by anomaly score",
            "cards": cards, "details": details}


def _nearest(frame: pd.DataFrame, centre: float, limit: int) -> tuple[pd.DataFrame, bool]:
    if len(frame) <= limit:
        return frame.sort_values("ts", kind="stable"), False
    distance = (frame["ts"] - centre).abs()
    return frame.loc[distance.nsmallest(limit).index].sort_values("ts", kind="stable"), True


def _timelines(ranked: pd.DataFrame, rollup: pd.DataFrame, connections: pd.DataFrame | None,
               dns_answers: pd.DataFrame | None, entities: int, window: float) -> list[dict]:
    if rollup.empty or "ts" not in ranked.columns:
        return []
    chosen = rollup.head(entities)
    ips = chosen["src_ip"].astype(str).tolist()
    scores = ranked.drop_duplicates("event_id").set_index("event_id")["score"] if "event_id" in ranked else None

    if connections is not None and {"ts", "src_ip", "dst_ip", "dst_port"} <= set(connections.columns):
        conns = connections[connections["src_ip"].isin(ips)]
    else:  # no canonical frame: the ranked rows are connections too
        conns = ranked[ranked["src_ip"].isin(ips)]
    conns = conns.assign(score=conns["event_id"].map(scores) if scores is not None and "event_id" in conns
                         else np.nan)
    conns = conns.assign(**{c: default for c, default in (("event_id", ""), ("dst_ip", ""), ("dst_port", -1))
                            if c not in conns})

    if dns_answers is not None and {"ts", "client_ip", "query", "answer"} <= set(dns_answers.columns):
        dns = dns_answers[dns_answers["client_ip"].isin(ips)]
        dns = dns.assign(rtype=dns["rtype"] if "rtype" in dns else "")
    elif {"dns_delay", "query", "answer"} <= set(ranked.columns):
        with_dns = ranked[ranked["src_ip"].isin(ips) & ranked["dns_delay"].notna()]
        dns = pd.DataFrame({"ts": with_dns["ts"] - with_dns["dns_delay"], "client_ip": with_dns["src_ip"],
                            "query": with_dns["query"], "answer": with_dns["answer"],
                            "rtype": with_dns["rtype"] if "rtype" in with_dns else ""})
        dns = dns.drop_duplicates(["ts", "client_ip", "query", "answer"])
    else:
        dns = pd.DataFrame(columns=["ts", "client_ip", "query", "answer", "rtype"])

    timelines = []
    for entity in chosen.itertuples(index=False):
        centre = float(entity.top_ts)
        if not np.isfinite(centre):
            continue
        lo, hi = centre - window, centre + window
        own = conns[(conns["src_ip"] == entity.src_ip) & conns["ts"].between(lo, hi)]
        own, cut_conns = _nearest(own, centre, MAX_TIMELINE_CONNECTIONS)
        answers = dns[(dns["client_ip"] == entity.src_ip) & dns["ts"].between(lo, hi)]
        answers, cut_dns = _nearest(answers, centre, MAX_TIMELINE_DNS)
        event_ids = _json_values(own["event_id"], "text")
        connection_points = [
            [ts, dst, port, score, int(eid != "" and eid == entity.top_event_id), eid]
            for ts, dst, port, score, eid in zip(_json_values(own["ts"], "float"), _json_values(own["dst_ip"], "text"),
                                                 _json_values(own["dst_port"], "int"),
                                                 _json_values(own["score"], "float"), event_ids)]
        dns_points = [list(p) for p in zip(_json_values(answers["ts"], "float"),
                                           _json_values(answers["query"], "text"),
                                           _json_values(answers["rtype"], "text"),
                                           _json_values(answers["answer"], "text"))]
        timelines.append({
            "name": str(entity.src_name) if "src_name" in chosen else str(entity.src_ip),
            "ip": str(entity.src_ip), "score": float(entity.max_score), "top_ts": centre,
            "start": lo, "end": hi, "explanation": str(entity.top_explanation)[:MAX_TEXT],
            "connections": connection_points, "dns": dns_points, "truncated": cut_conns or cut_dns,
        })
    return timelines


def _row_incidents(rows: pd.DataFrame) -> list:
    """The incident id of each ranked row (`incidents.incident_ids`)."""
    if not len(rows) or "src_ip" not in rows.columns:
        return [""] * len(rows)
    text = {c: rows[c].fillna("").astype(str) if c in rows.columns else pd.Series("", index=rows.index)
            for c in ("src_ip", "query", "dst_ip", "transform")}
    key = text["query"].where(text["query"] != "", text["dst_ip"])
    return incident_ids(text["src_ip"], key, text["transform"]).tolist()


def _incidents(incidents: pd.DataFrame) -> dict:
    """The incident table, and for each incident its event ids and their ports (for the verdicts)."""
    incidents = incidents.head(MAX_INCIDENTS)
    shown = incidents.assign(alert=np.where(incidents["alert"].astype(bool), "alert", ""))
    table = _table(shown, [(*c, True, False) for c in INCIDENT_COLUMNS])
    events = incidents["event_ids"].fillna("").astype(str).str.split(" ", n=MAX_INCIDENT_EVENTS).str.slice(
        0, MAX_INCIDENT_EVENTS)
    ports = incidents[EVENT_PORTS].fillna("").astype(str).str.split(" ", n=MAX_INCIDENT_EVENTS).str.slice(
        0, MAX_INCIDENT_EVENTS) if EVENT_PORTS in incidents.columns else [[] for _ in range(len(incidents))]
    table["id"] = incidents["incident_id"].astype(str).tolist()
    table["events"] = [[e for e in ids if e] for ids in events]
    table["ports"] = [[p for p in ps if p] for ps in ports]
    table["queries"] = incidents["query"].fillna("").astype(str).tolist()
    return table


def _histogram(ranked: pd.DataFrame, counts: list | None, level: float | None) -> dict:
    """Score counts in HISTOGRAM_BINS equal bins over 0..1 (`counts`: of a whole run; else of
    `ranked`), and the alert level."""
    if counts is None:
        scores = pd.to_numeric(ranked["score"], errors="coerce").dropna().clip(0.0, 1.0) if "score" in ranked \
            else pd.Series(dtype="float64")
        counts = np.histogram(scores.to_numpy(), bins=HISTOGRAM_BINS, range=(0.0, 1.0))[0].tolist()
    level = float(level) if isinstance(level, (int, float)) and np.isfinite(level) else None
    return {"counts": [int(c) for c in counts], "level": level}


def render_html(ranked: pd.DataFrame, *, dns_answers: pd.DataFrame | None = None,
                connections: pd.DataFrame | None = None, summary: dict | None = None, top: int | None = None,
                timeline_entities: int = TIMELINE_ENTITIES, timeline_window: float = TIMELINE_WINDOW,
                rollup: pd.DataFrame | None = None, incidents: pd.DataFrame | None = None,
                incident_count: int | None = None, score_histogram: list | None = None,
                alert_level: float | None = None) -> str:
    """The report as one HTML string (see write_html)."""
    top = DEFAULT_TOP if top is None else int(top)
    order = ["rank"] if "rank" in ranked.columns else ["score"]
    ordered = ranked.sort_values(order, ascending="rank" in ranked.columns, kind="stable")
    threshold = (summary or {}).get("threshold")
    if rollup is None:   # alerts: the rows flagged when there is an alert column, else by the threshold
        use_threshold = "alert" not in ranked.columns and isinstance(threshold, (int, float))
        rollup = entity_rollup(ranked, threshold=threshold if use_threshold else None)
    if incidents is None:
        incidents = incident_frame(ranked) if {"src_ip", "score", "event_id"} <= set(ranked.columns) \
            else pd.DataFrame(columns=["rank", "incident_id", "alert", "event_ids", "query"])
        incident_count = len(incidents)
    shown = ordered.head(top)
    level = alert_level if alert_level is not None else threshold
    rows = _table(shown, RANKED_COLUMNS)
    rows["incident"] = _row_incidents(shown)
    data = {
        "summary": _summary(ranked, len(shown), rollup, summary,
                            len(incidents) if incident_count is None else incident_count),
        "histogram": _histogram(ranked, score_histogram, level),
        "incidents": _incidents(incidents),
        "ranked": rows,
        "entities": _table(rollup, [(*c, True, False) for c in ENTITY_COLUMNS]),
        "timelines": _timelines(ranked, rollup, connections, dns_answers, timeline_entities, timeline_window),
    }
    style, script = _asset("report.css"), _asset("report.js")
    replacements = {
        "@SCRIPT_HASH@": _csp_hash(script), "@STYLE_HASH@": _csp_hash(style),
        "@WINDOW@": f"\u00b1{timeline_window / 60:g} min",
    }
    page = _PAGE
    for marker, value in replacements.items():
        page = page.replace(marker, value)
    # Inserted last, and only at their own markers, so no data can be mistaken for a marker.
    head, rest = page.split("@STYLE@")
    middle, tail = rest.split("@DATA@")
    before_script, after_script = tail.split("@SCRIPT@")
    return head + style + middle + _embed_json(data) + before_script + script + after_script


def write_html(ranked: pd.DataFrame, path: str | os.PathLike, *, dns_answers: pd.DataFrame | None = None,
               connections: pd.DataFrame | None = None, summary: dict | None = None, top: int | None = None,
               timeline_entities: int = TIMELINE_ENTITIES, timeline_window: float = TIMELINE_WINDOW,
               rollup: pd.DataFrame | None = None, incidents: pd.DataFrame | None = None,
               incident_count: int | None = None, score_histogram: list | None = None,
               alert_level: float | None = None) -> Path:
    """Write the self-contained HTML report to `path`, atomically.

    The table holds the `top` best-ranked rows (default 2000); timelines show the
    `timeline_entities` worst entities, `timeline_window` seconds either side of their top
    anomaly, from `connections`/`dns_answers` when given (canonical frames), else from the ranked
    rows themselves. `summary` (model/env info, optional "threshold" and "title") is shown as
    key/value pairs. A run passes what it knows of *all* its rows: the entity `rollup`, the first
    `incidents` (`report.incidents` frames) of `incident_count`, the `score_histogram` (counts in
    HISTOGRAM_BINS bins over 0..1) and the `alert_level`; without them they are made from `ranked`.
    """
    page = render_html(ranked, dns_answers=dns_answers, connections=connections, summary=summary, top=top,
                       timeline_entities=timeline_entities, timeline_window=timeline_window, rollup=rollup,
                       incidents=incidents, incident_count=incident_count, score_histogram=score_histogram,
                       alert_level=alert_level)
    with atomic_path(path) as staging:
        staging.write_text(page, encoding="utf-8")
    return Path(path)
