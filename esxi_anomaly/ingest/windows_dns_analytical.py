"""Windows DNS Server Analytical (ETW) events as JSON -> `dns_answers`, answers from PacketData.

Accepted shapes: the Elastic agent's test/export document ``{"events": [...]}`` (pretty-printed
or not), a JSON array of events, or one event per line. An event carries its fields under
``winlog.event_data`` (Elastic), ``EventData``/``event_data``, at top level, or as the raw event
in a ``message`` string (JSON, or the rendered ``RESPONSE_SUCCESS: TCP=0; ...; PacketData=0x..``).

Only responses sent to clients become rows: 257 RESPONSE_SUCCESS and 258 RESPONSE_FAILURE, with
client = ``Destination``. The answers exist only in ``PacketData`` (hex DNS message), decoded by
`dns_wire`; e.g. event 257 of the Elastic sample -> ``google.es. AAAA 2607:f8b0:4004:c17::5e``,
TTL 300. Other events (256 query received, 259 ignored, 260/261 the server's own recursion, ...)
are skipped and counted (logged at INFO). An event whose PacketData does not decode goes to the
quarantine. A truncated document keeps every event before the damage.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import re
from collections import Counter
from typing import Iterator

import numpy as np
import pandas as pd

from esxi_anomaly.ingest import dns_wire
from esxi_anomaly.ingest.base import IngestError, Quarantine, SourceFormat, open_text, stable_event_id
from esxi_anomaly.ingest.bind_query import dns_frame, iso_epochs, iter_lines, new_rows, normalise_name

log = logging.getLogger(__name__)

SOURCE = "windows_dns_analytical"
PROVIDER = "Microsoft-Windows-DNSServer"
PROVIDER_GUID = "EB79061A-A566-4698-9119-3ED2807060E7"
RESPONSE_CODES = {257, 258}
RENDERED_NAMES = {
    "QUERY_RECEIVED": 256, "RESPONSE_SUCCESS": 257, "RESPONSE_FAILURE": 258, "IGNORED_QUERY": 259,
    "RECURSE_QUERY_OUT": 260, "RECURSE_RESPONSE_IN": 261, "RECURSE_QUERY_TIMEOUT": 262,
}
NAME_TYPES = {"CNAME", "PTR", "NS", "DNAME"}
MAX_DOCUMENT_CHARS = 256 * 1024 * 1024
_DOC_START = re.compile(r'\s*(?:\{\s*"events"\s*:\s*)?\[')
_ELEMENT_START = re.compile(r"\n([ \t]*)\{[ \t]*\r?\n")
_RENDERED = re.compile(r"^\s*(?P<name>[A-Z_]+):\s*(?P<fields>.*)$", re.DOTALL)
_UNSPECIFIED = {"0.0.0.0", "::", ""}


def sniff(head: bytes) -> bool:
    text = head.decode("utf-8", "replace").lstrip("\ufeff \t\r\n")
    if not text.startswith(("{", "[")):
        return False
    return (PROVIDER in text or PROVIDER_GUID.lower() in text.lower()
            or ('"PacketData"' in text and '"QNAME"' in text))


# --- JSON record stream -------------------------------------------------------------------------


def iter_events(path: str, quarantine: Quarantine) -> Iterator[tuple[int, dict]]:
    """(line number, event object) of every event in the file, whatever its JSON shape."""
    try:
        with open_text(path) as fh:
            head = fh.read(64 * 1024)
    except (OSError, EOFError, ValueError) as exc:
        raise IngestError(f"{path}: cannot read ({exc})") from exc
    first_line = head.lstrip("\ufeff \t\r\n").split("\n", 1)[0]
    try:
        json.loads(first_line)
        one_per_line = True
    except ValueError:
        one_per_line = False
    if one_per_line:
        for lineno, line in iter_lines(path, quarantine, max_chars=16 * 1024 * 1024):
            line = line.strip().lstrip("\ufeff")
            if not line:
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                quarantine.add(path, lineno, f"invalid JSON ({exc.args[0][:80]})", line)
                continue
            for event in _events_of(obj):
                yield lineno, event
    else:
        yield from _iter_document(path, quarantine)


def _events_of(obj) -> list:
    if isinstance(obj, dict) and isinstance(obj.get("events"), list):
        return obj["events"]
    if isinstance(obj, list):
        return obj
    return [obj]


def _iter_document(path: str, quarantine: Quarantine) -> Iterator[tuple[int, dict]]:
    try:
        with open_text(path) as fh:
            text = fh.read(MAX_DOCUMENT_CHARS + 1)
    except (OSError, EOFError, ValueError) as exc:
        quarantine.add(path, 0, f"file is truncated or corrupt ({exc})", "")
        return
    if len(text) > MAX_DOCUMENT_CHARS:
        quarantine.add(path, 0, f"JSON document larger than {MAX_DOCUMENT_CHARS} characters; write one event per line", "")
        return
    text = text.lstrip("\ufeff")
    start = _DOC_START.match(text)
    if not start:
        try:
            obj = json.loads(text)
        except ValueError as exc:
            quarantine.add(path, 1, f"invalid JSON document ({exc.args[0][:80]})", text)
            return
        for event in _events_of(obj):
            yield 1, event
        return
    decoder = json.JSONDecoder()
    pos, n = start.end(), len(text)
    line_at, counted_to = 1, 0
    indent = None
    while pos < n:
        while pos < n and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= n or text[pos] == "]":
            return
        line_at += text.count("\n", counted_to, pos)
        counted_to = pos
        try:
            obj, end = decoder.raw_decode(text, pos)
        except ValueError as exc:
            quarantine.add(path, line_at, f"invalid JSON event ({exc.args[0][:80]})", text[pos:pos + 256])
            resync = _next_element(text, pos, indent)
            if resync is None:
                return
            pos = resync
            continue
        if indent is None:
            line_start = text.rfind("\n", 0, pos) + 1
            indent = text[line_start:pos]
        yield line_at, obj
        pos = end
    quarantine.add(path, line_at, "JSON document ends without its closing bracket", "")


def _next_element(text: str, pos: int, indent: str | None) -> int | None:
    for m in _ELEMENT_START.finditer(text, pos + 1):
        if indent is None or m.group(1) == indent:
            return m.start() + 1 + len(m.group(1))
    return None


# --- event normalisation ------------------------------------------------------------------------


def _get(d, *path):
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def normalise_event(item) -> tuple[int | None, str, dict] | None:
    """(event code, time text, event data) of a DNS Server event; None for anything else."""
    if not isinstance(item, dict):
        return None
    data = (_get(item, "winlog", "event_data") or _get(item, "event_data") or _get(item, "EventData")
            or _get(item, "winlog", "EventData"))
    message = item.get("message")
    if not isinstance(data, dict) and isinstance(message, str):
        inner = message.strip()
        if inner.startswith("{"):
            try:
                parsed = json.loads(inner)
            except ValueError:
                return None
            found = normalise_event(parsed)
            if found is not None and not found[1]:
                found = (found[0], _time_text(item), found[2])
            return found
        rendered = _RENDERED.match(inner)
        if rendered and rendered["name"] in RENDERED_NAMES:
            fields = dict(kv.split("=", 1) for kv in re.split(r";\s*", rendered["fields"]) if "=" in kv)
            code = _code(item)
            return (code if code is not None else RENDERED_NAMES[rendered["name"]]), _time_text(item), fields
        return None
    if not isinstance(data, dict):
        if "QNAME" in item or "PacketData" in item:
            data = item
        else:
            return None
    provider = (_get(item, "event", "provider") or _get(item, "winlog", "provider_name")
                or item.get("ProviderName") or item.get("Provider"))
    guid = _get(item, "winlog", "provider_guid") or item.get("ProviderGuid") or ""
    if provider and str(provider) != PROVIDER and PROVIDER_GUID.lower() not in str(guid).lower():
        return None
    return _code(item), _time_text(item), data


def _code(item: dict) -> int | None:
    for value in (_get(item, "event", "code"), _get(item, "winlog", "event_id"), item.get("EventID"),
                  item.get("EventId"), item.get("event_id"), item.get("Id")):
        if isinstance(value, dict):
            value = value.get("#text") or value.get("Value")
        try:
            return int(str(value))
        except (TypeError, ValueError):
            continue
    return None


def _time_text(item: dict) -> str:
    for value in (item.get("@timestamp"), item.get("TimeCreated"), item.get("timestamp"),
                  item.get("EventTime"), _get(item, "event", "created")):
        if isinstance(value, dict):
            value = value.get("SystemTime")
        if isinstance(value, str) and value[:4].isdigit():
            return value
    return ""


def _address(value) -> str:
    text = str(value or "").strip()
    if text in _UNSPECIFIED:
        return ""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text[:64]


# --- reader -------------------------------------------------------------------------------------


def read(path: str, quarantine: Quarantine, chunk_rows: int) -> Iterator[pd.DataFrame]:
    skipped: Counter = Counter()
    rows = new_rows()
    times: list[str] = []
    number = 0
    for lineno, item in iter_events(path, quarantine):
        number += 1
        event = normalise_event(item)
        if event is None:
            skipped["not a DNS Server event"] += 1
            continue
        code, time_text, data = event
        if code not in RESPONSE_CODES:
            skipped[f"event {code}"] += 1
            continue
        try:
            answers, query, rcode = _answers(data)
        except dns_wire.DNSWireError as exc:
            quarantine.add(path, lineno, f"event {code}: PacketData does not decode: {exc}", str(data.get("PacketData"))[:256])
            continue
        event_id = stable_event_id("windns", path, number)
        client = _address(data.get("Destination") or data.get("Source"))
        resolver = _address(data.get("InterfaceIP"))
        for index, (rtype, answer, ttl) in enumerate(answers or [("", "", np.nan)]):
            rows["event_id"].append(event_id)
            rows["client_ip"].append(client)
            rows["resolver_ip"].append(resolver)
            rows["query"].append(query)
            rows["rtype"].append(rtype)
            rows["answer"].append(answer)
            rows["answer_index"].append(index if answers else -1)
            rows["ttl"].append(ttl)
            rows["rcode"].append(rcode)
            times.append(time_text)
        if len(rows["event_id"]) >= chunk_rows:
            yield _finish(rows, times)
            rows, times = new_rows(), []
    if rows["event_id"]:
        yield _finish(rows, times)
    if skipped:
        log.info("%s: skipped %d events that are not responses to clients: %s", path, sum(skipped.values()), dict(sorted(skipped.items())))


def _answers(data: dict) -> tuple[list[tuple[str, str, float]], str, str]:
    qname = normalise_name(str(data.get("QNAME") or ""))
    packet = data.get("PacketData")
    if not packet:
        try:
            rcode = dns_wire.rcode_name(int(str(data.get("RCODE"))))
        except (TypeError, ValueError):
            rcode = ""
        return [], qname, rcode
    message = dns_wire.decode_hex(str(packet))
    query = normalise_name(message.questions[0].name) if message.questions else qname
    answers = [
        (rr.type_name, normalise_name(rr.rdata) if rr.type_name in NAME_TYPES else rr.rdata, float(rr.ttl))
        for rr in message.answers
    ]
    return answers, query, message.rcode_name


def _finish(rows: dict[str, list], times: list[str]) -> pd.DataFrame:
    rows["ts"] = iso_epochs(times)
    rows["source"] = [SOURCE] * len(rows["event_id"])
    return dns_frame(rows)


FORMATS = [SourceFormat(SOURCE, "dns_answers", sniff, read,
                        "Windows DNS Server Analytical events (JSON); answers decoded from PacketData")]
