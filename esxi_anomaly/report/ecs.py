"""JSON lines in Elastic Common Schema (ECS) 9.4: one document per ranked connection
(`ecs_records`), or per incident (`incident_records`).

`event.kind` is "alert" only for alerts (evidence-backed rows, `alert`), "event" otherwise, so a
SIEM's alert queue holds only what the detector stands behind; alerts carry the MITRE ATT&CK
technique they detect (`threat.*`: DNS Calculation, T1568.003, a sub-technique of Dynamic
Resolution T1568, tactic Command and Control TA0011).
Documents are nested objects, as Elasticsearch stores them; `ECS_FIELDS` lists the dotted ECS
names used, and everything of our own lives under `esxi_anomaly.*` (ECS's rule for custom
fields). Empty values (empty text, NaN, unknown port -1) are left out rather than written as
null. Output is ASCII-only JSON, so no log text can break a line (not even U+2028).
"""
from __future__ import annotations

import ipaddress
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from esxi_anomaly import schema
from esxi_anomaly.atomic import atomic_path
from esxi_anomaly.report.layout import check_names

CUSTOM_PREFIX = "esxi_anomaly."
ECS_VERSION = "9.4.0"
# What an alert detects (MITRE ATT&CK): ECS puts a sub-technique's id under
# threat.technique.subtechnique.*, its parent technique under threat.technique.*
THREAT = {
    "framework": "MITRE ATT&CK",
    "tactic": {"id": ["TA0011"], "name": ["Command and Control"],
               "reference": ["https://attack.mitre.org/tactics/TA0011/"]},
    "technique": {"id": ["T1568"], "name": ["Dynamic Resolution"],
                  "reference": ["https://attack.mitre.org/techniques/T1568/"],
                  "subtechnique": {"id": ["T1568.003"], "name": ["DNS Calculation"],
                                   "reference": ["https://attack.mitre.org/techniques/T1568/003/"]}},
}

# Dotted ECS name -> expected JSON type: "str", "int", "float", "ip", "port", "timestamp",
# "str_list" or "dns_answers".
ECS_TYPES: dict[str, str] = {
    "@timestamp": "timestamp",
    "event.id": "str",
    "event.kind": "str",
    "event.category": "str_list",
    "event.type": "str_list",
    "event.module": "str",
    "event.risk_score": "float",
    "event.start": "timestamp",
    "event.end": "timestamp",
    "ecs.version": "str",
    "threat.framework": "str",
    "threat.tactic.id": "str_list",
    "threat.tactic.name": "str_list",
    "threat.tactic.reference": "str_list",
    "threat.technique.id": "str_list",
    "threat.technique.name": "str_list",
    "threat.technique.reference": "str_list",
    "threat.technique.subtechnique.id": "str_list",
    "threat.technique.subtechnique.name": "str_list",
    "threat.technique.subtechnique.reference": "str_list",
    "related.ip": "ip_list",
    "source.ip": "ip",
    "source.port": "port",
    "destination.ip": "ip",
    "destination.port": "port",
    "network.transport": "str",
    "process.name": "str",
    "host.name": "str",
    "dns.question.name": "str",
    "dns.answers": "dns_answers",
    "rule.name": "str_list",
    "message": "str",
}
ECS_FIELDS = frozenset(ECS_TYPES)

CUSTOM_TYPES: dict[str, str] = {
    "esxi_anomaly.rank": "int",
    "esxi_anomaly.score": "float",
    "esxi_anomaly.forest_score": "float",
    "esxi_anomaly.rule_score": "float",
    "esxi_anomaly.transform": "str",
    "esxi_anomaly.dns_delay": "float",
    "esxi_anomaly.top_features": "str",
    "esxi_anomaly.src_kind": "str",
    "esxi_anomaly.esxi_host": "str",
    "esxi_anomaly.family": "str",
    "esxi_anomaly.seen_by": "str_list",
    # incidents (`incident_records`)
    "esxi_anomaly.connections": "int",
    "esxi_anomaly.alerts": "int",
    "esxi_anomaly.dst_ports": "port_list",
    "esxi_anomaly.answers": "str_list",
    "esxi_anomaly.event_ids": "str_list",
    "esxi_anomaly.top_event_id": "str",
}

# ranked column -> (dotted field, converter kind), in document order
DIRECT = [
    ("event_id", "event.id", "str"),
    ("src_ip", "source.ip", "str"),
    ("src_port", "source.port", "port"),
    ("dst_ip", "destination.ip", "str"),
    ("dst_port", "destination.port", "port"),
    ("proto", "network.transport", "lower"),
    ("process", "process.name", "str"),
    ("src_name", "host.name", "str"),
    ("query", "dns.question.name", "str"),
    ("explanation", "message", "str"),
    ("rank", "esxi_anomaly.rank", "int"),
    ("score", "esxi_anomaly.score", "float"),
    ("forest_score", "esxi_anomaly.forest_score", "float"),
    ("rule_score", "esxi_anomaly.rule_score", "float"),
    ("transform", "esxi_anomaly.transform", "str"),
    ("dns_delay", "esxi_anomaly.dns_delay", "float"),
    ("top_features", "esxi_anomaly.top_features", "str"),
    ("src_kind", "esxi_anomaly.src_kind", "str"),
    ("esxi_host", "esxi_anomaly.esxi_host", "str"),
    ("family", "esxi_anomaly.family", "str"),
]
# Columns that are not in schema.RANKED but exported when a frame has them (evaluation labels).
EXTRAS = ("family",)
# The columns of schema.RANKED that `ecs_records` builds a field from other than one-to-one.
COMPOSED = {
    "ts": "@timestamp",
    "score": "event.risk_score (0-100) besides esxi_anomaly.score",
    "answer": "dns.answers[].data",
    "rtype": "dns.answers[].type",
    "rules": "rule.name (a list)",
    "seen_by": "esxi_anomaly.seen_by (a list)",
    "alert": "event.kind (\"alert\" for alerts, else \"event\") and threat.* on alerts",
}
# The columns of schema.RANKED deliberately left out of the documents, and why.
NOT_EXPORTED = {
    "suppressed": "not in the documents so far: a suppressed row's score is already lowered; CSV/Parquet carry it",
}


def unmapped_columns(spec=None) -> list[str]:
    """The ranked columns (`spec`, default `schema.RANKED`) that this writer neither exports nor
    declares in NOT_EXPORTED: a column added to the spec must be given a place here."""
    spec = schema.RANKED if spec is None else spec
    mapped = {c for c, _, _ in DIRECT} | set(COMPOSED) | set(NOT_EXPORTED)
    return [c for c in spec if c not in mapped]


check_names([c for c, _, _ in DIRECT] + list(COMPOSED) + list(NOT_EXPORTED), "report.ecs", EXTRAS)
if unmapped_columns():
    raise RuntimeError(f"report.ecs has no ECS mapping for the ranked columns {unmapped_columns()} "
                       "(map them, or list them in NOT_EXPORTED)")

_TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")


def _column_values(ranked: pd.DataFrame, column: str, kind: str) -> list:
    """Plain Python values of one column, None where the value is empty."""
    series = ranked[column]
    if kind in ("str", "lower"):
        values = series.fillna("").astype(str)
        if kind == "lower":
            values = values.str.lower()
        return [v if v else None for v in values.tolist()]
    numbers = pd.to_numeric(series, errors="coerce").to_numpy(dtype="float64")
    if kind == "port":
        valid = np.isfinite(numbers) & (numbers >= 0) & (numbers <= 65535)
        return [int(v) if ok else None for v, ok in zip(numbers.tolist(), valid.tolist())]
    if kind == "int":
        return [int(v) if math.isfinite(v) else None for v in numbers.tolist()]
    return [float(v) if math.isfinite(v) else None for v in numbers.tolist()]


def _timestamps(ranked: pd.DataFrame) -> list:
    if "ts" not in ranked.columns:
        return [None] * len(ranked)
    seconds = pd.to_numeric(ranked["ts"], errors="coerce")
    times = pd.to_datetime(seconds, unit="s", utc=True)
    text = times.dt.strftime("%Y-%m-%dT%H:%M:%S.%f").str.slice(0, 23) + "Z"
    return [t if isinstance(t, str) else None for t in text.tolist()]


def _put(document: dict, dotted: str, value: object) -> None:
    *parents, leaf = dotted.split(".") if dotted != "@timestamp" else [dotted]
    node = document
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def ecs_records(ranked: pd.DataFrame) -> list[dict]:
    """The ECS documents for `ranked`, in row order."""
    count = len(ranked)
    direct = [(tuple(field.split(".")[:-1]), field.split(".")[-1], _column_values(ranked, column, kind))
              for column, field, kind in DIRECT if column in ranked.columns]
    timestamps = _timestamps(ranked)
    scores = _column_values(ranked, "score", "float") if "score" in ranked.columns else [None] * count
    answers = _column_values(ranked, "answer", "str") if "answer" in ranked.columns else [None] * count
    rtypes = _column_values(ranked, "rtype", "str") if "rtype" in ranked.columns else [None] * count
    rules = (ranked["rules"].fillna("").astype(str).tolist() if "rules" in ranked.columns else [""] * count)
    seen_by = (ranked["seen_by"].fillna("").astype(str).str.split().tolist() if "seen_by" in ranked.columns
               else [[]] * count)
    alerts = _alerts(ranked)

    records = []
    for i in range(count):
        document: dict = {}
        if timestamps[i] is not None:
            document["@timestamp"] = timestamps[i]
        document["event"] = {"kind": "alert" if alerts[i] else "event", "module": "esxi_anomaly",
                             "category": ["network"], "type": ["connection"]}
        if scores[i] is not None:
            document["event"]["risk_score"] = round(min(max(scores[i], 0.0), 1.0) * 100.0, 2)
        for parents, leaf, values in direct:
            value = values[i]
            if value is not None:
                node = document
                for part in parents:
                    child = node.get(part)
                    node = child if child is not None else node.setdefault(part, {})
                node[leaf] = value
        if answers[i] is not None:
            answer = {"data": answers[i]}
            if rtypes[i] is not None:
                answer["type"] = rtypes[i]
            _put(document, "dns.answers", [answer])
        fired = [r.strip() for r in rules[i].split(";") if r.strip()]
        if fired:
            _put(document, "rule.name", fired)
        if seen_by[i]:   # the vantage points ("<source>:<esxi_host>"), space-separated in the ranked rows
            _put(document, "esxi_anomaly.seen_by", seen_by[i])
        _finish(document, alerts[i])
        records.append(document)
    return records


def _alerts(frame: pd.DataFrame) -> list[bool]:
    """Each row's alert flag (False for all when the frame has none: only a flagged row alerts)."""
    if "alert" not in frame.columns:
        return [False] * len(frame)
    return frame["alert"].fillna(False).astype(bool).tolist()


def _finish(document: dict, alert: bool) -> None:
    """The fields every document ends with: the ECS version, and on alerts what they detect."""
    if alert:
        document["threat"] = json.loads(json.dumps(THREAT))   # a copy per document
    document["ecs"] = {"version": ECS_VERSION}


def incident_records(incidents: pd.DataFrame) -> list[dict]:
    """One ECS document per incident (`report.incidents`: the frames its `finish` yields), in row
    order: the C2 name, source, destinations and ports, time span, connection count, all event ids."""
    count = len(incidents)
    text = {c: _column_values(incidents, c, "str") if c in incidents.columns else [None] * count
            for c in ("incident_id", "src_ip", "src_name", "query", "transform", "rules", "explanation",
                      "src_kind", "esxi_host", "top_event_id")}
    lists = {c: incidents[c].fillna("").astype(str).str.split().tolist() if c in incidents.columns
             else [[]] * count for c in ("dst_ips", "dst_ports", "answers", "event_ids")}
    numbers = {c: _column_values(incidents, c, kind) if c in incidents.columns else [None] * count
               for c, kind in (("rank", "int"), ("score", "float"), ("connections", "int"), ("alerts", "int"))}
    starts, ends = (_timestamps(incidents.assign(ts=incidents[c]) if c in incidents.columns
                                else incidents.iloc[:, :0]) for c in ("first_ts", "last_ts"))
    alerts = _alerts(incidents)
    records = []
    for i in range(count):
        document: dict = {}
        if starts[i] is not None:
            document["@timestamp"] = starts[i]
        event = {"kind": "alert" if alerts[i] else "event", "module": "esxi_anomaly", "category": ["network"],
                 "type": ["connection"]}
        for field, value in (("id", text["incident_id"][i]), ("start", starts[i]), ("end", ends[i])):
            if value is not None:
                event[field] = value
        if numbers["score"][i] is not None:
            event["risk_score"] = round(min(max(numbers["score"][i], 0.0), 1.0) * 100.0, 2)
        document["event"] = event
        for dotted, value in (("source.ip", text["src_ip"][i]), ("host.name", text["src_name"][i]),
                              ("dns.question.name", text["query"][i]), ("message", text["explanation"][i])):
            if value is not None:
                _put(document, dotted, value)
        if len(lists["dst_ips"][i]) == 1:
            _put(document, "destination.ip", lists["dst_ips"][i][0])
        related = list(dict.fromkeys(([text["src_ip"][i]] if text["src_ip"][i] else []) + lists["dst_ips"][i]))
        if related:
            _put(document, "related.ip", related)
        fired = [r.strip() for r in (text["rules"][i] or "").split(";") if r.strip()]
        if fired:
            _put(document, "rule.name", fired)
        custom = {"rank": numbers["rank"][i], "score": numbers["score"][i], "transform": text["transform"][i],
                  "connections": numbers["connections"][i], "alerts": numbers["alerts"][i],
                  "src_kind": text["src_kind"][i], "esxi_host": text["esxi_host"][i],
                  "top_event_id": text["top_event_id"][i],
                  "dst_ports": [int(p) for p in lists["dst_ports"][i]] or None,
                  "answers": lists["answers"][i] or None, "event_ids": lists["event_ids"][i] or None}
        document["esxi_anomaly"] = {k: v for k, v in custom.items() if v is not None}
        _finish(document, alerts[i])
        records.append(document)
    return records


def write_jsonl(ranked: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write one ECS JSON document per row of `ranked` to `path` (UTF-8, ASCII-escaped), atomically."""
    with atomic_path(path) as staging, open(staging, "w", encoding="utf-8", newline="\n") as handle:
        for document in ecs_records(ranked):
            handle.write(json.dumps(document, ensure_ascii=True, allow_nan=False, separators=(",", ":")))
            handle.write("\n")
    return Path(path)


def _leaves(node: dict, prefix: str = ""):
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            if not value:
                yield dotted, value
            yield from _leaves(value, dotted + ".")
        else:
            yield dotted, value


def _type_problem(dotted: str, kind: str, value: object) -> str | None:
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    ok = {
        "str": lambda v: isinstance(v, str) and v != "",
        "int": is_int,
        "float": lambda v: (is_int(v) or isinstance(v, float)) and math.isfinite(v),
        "port": lambda v: is_int(v) and 0 <= v <= 65535,
        "timestamp": lambda v: isinstance(v, str) and bool(_TIMESTAMP.match(v)),
        "str_list": lambda v: isinstance(v, list) and bool(v) and all(isinstance(x, str) and x for x in v),
        "port_list": lambda v: isinstance(v, list) and bool(v) and all(is_int(x) and 0 <= x <= 65535 for x in v),
        "dns_answers": lambda v: isinstance(v, list) and bool(v) and all(
            isinstance(a, dict) and set(a) <= {"data", "type"} and isinstance(a.get("data"), str)
            and isinstance(a.get("type", ""), str) for a in v),
    }
    if kind in ("ip", "ip_list"):
        try:
            for one in (value if kind == "ip_list" and isinstance(value, list) and value else [value]):
                ipaddress.ip_address(one)
            return None
        except (TypeError, ValueError):
            return f"{dotted}={value!r} is not an IP address"
    if not ok[kind](value):
        return f"{dotted}={value!r} is not a valid {kind}"
    return None


def validate_ecs_record(obj: dict) -> list[str]:
    """Check one document: every leaf is a known ECS field (or esxi_anomaly.*) of the right type.

    Returns the sorted dotted leaf names; raises ValueError listing every problem.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"an ECS document is a JSON object, not {type(obj).__name__}")
    problems, names = [], []
    for dotted, value in _leaves(obj):
        names.append(dotted)
        kind = ECS_TYPES.get(dotted) or CUSTOM_TYPES.get(dotted)
        if kind is None:
            if dotted.startswith(CUSTOM_PREFIX) and isinstance(value, (str, int, float, bool, list)):
                continue
            problems.append(f"{dotted} is neither an ECS field used here nor under {CUSTOM_PREFIX}")
            continue
        problem = _type_problem(dotted, kind, value)
        if problem:
            problems.append(problem)
    risk = obj.get("event", {}).get("risk_score") if isinstance(obj.get("event"), dict) else None
    if risk is not None and not (isinstance(risk, (int, float)) and 0 <= risk <= 100):
        problems.append(f"event.risk_score={risk!r} is outside 0-100")
    for required in ("event.kind", "event.module"):
        if required not in names:
            problems.append(f"{required} is missing")
    if problems:
        raise ValueError("; ".join(problems))
    return sorted(names)
