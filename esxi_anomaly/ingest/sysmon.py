"""Sysmon events in JSON lines (Windows event-log exports) -> connections (EID 3) and dns_answers (EID 22).

Two shapes are read (samples/README.md section 2): the flat export (`TimeCreated`, `@timestamp`,
string `Task`, hex `Keywords`) and NXLog `im_msvistalog` (`EventTime`, integer `Task`,
`RecordNumber`). Both carry the event data as top-level fields; `Message` is ignored. Files may be
gzip/bz2/xz or a zip holding one JSON-lines file (`open_binary` opens the first member).

Rules:
* Time is `UtcTime` (the event time on the host), never the collector's `@timestamp`/`EventTime`,
  which lag by hours or days in the samples. A record without a usable UtcTime is quarantined.
* `sysmon_network`: EID 3 with `Initiated` = true only: Sysmon sets it when the local process
  opened the connection, so src = SourceIp:SourcePort is the local side and dst the remote.
  Inbound (`Initiated` false) connections are not outbound connections: skipped and counted.
  process = basename of `Image`; conn_state, bytes, esxi_host are unknown ("" / NaN).
* `sysmon_dns`: EID 22, one row per record of `QueryResults` (`;`-separated):
  `type:  5 <name>` -> CNAME (other `type:  N` codes -> their RR type name), `::ffff:a.b.c.d` and
  bare IPv4 -> A, other IPv6 -> AAAA; `-`/empty -> one row with empty answer. ttl is unknown (NaN).
  rcode from `QueryStatus` (a Win32/DNS status): 0 NOERROR, 9001..9010 the RFC 1035/2136 RCODEs
  (DNS_ERROR_RCODE_* = 9000 + rcode: FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED, YXDOMAIN, YXRRSET,
  NXRRSET, NOTAUTH, NOTZONE), 9501 DNS_INFO_NO_RECORDS -> NODATA; anything else (9701
  DNS_ERROR_RECORD_DOES_NOT_EXIST, 9502 DNS_ERROR_BAD_PACKET, 1460 ERROR_TIMEOUT, 1223
  ERROR_CANCELLED, ...) -> `STATUS_<n>`, since they are client-side outcomes, not server RCODEs.
  client_ip: EID 22 carries no address, so (1) an IP the event itself carries (a `host.ip`
  list, as Winlogbeat adds) is used, else (2) the IP the same `Hostname` used as SourceIp in its
  outbound EID 3 events of the same file (every non-loopback one, Hostname compared case-blind:
  the response is repeated per address, so it joins connections from either NIC; one extra pass
  over the file's EID 3 lines), else (3) the computer name (`Hostname`), which
  `features.identity` resolves through the inventory. resolver_ip is unknown ("").
* event_id: `sysmon-<Hostname>-<EventRecordID|RecordNumber|record_id>` when the export keeps the
  record id, else `stable_event_id("sysmon", path, line)`.
* Lines that are not JSON objects are quarantined. Valid events of other providers or other
  Sysmon event ids are skipped and counted (debug log), not quarantined.

Sniffing: a file whose first lines are Windows event-log JSON objects (`EventID` with `Channel`
or `SourceName`) is claimed by both formats, because full-channel exports put their first Sysmon
event far beyond the sniffed head (3 of the 4 samples). Exports made only of
Microsoft-Windows-DNSServer events are left to the DNS-server readers.
"""
from __future__ import annotations

import ipaddress
import json
import logging
from collections import Counter
from typing import Iterator

import pandas as pd

from esxi_anomaly import schema
from esxi_anomaly.ingest.base import Quarantine, SourceFormat, stable_event_id
from esxi_anomaly.ingest.syslog_envelope import iter_lines, parse_rfc3339

log = logging.getLogger(__name__)

SYSMON_PROVIDER = "Microsoft-Windows-Sysmon"
SYSMON_CHANNEL = "Microsoft-Windows-Sysmon/Operational"
SYSMON_GUID = "{5770385f-c22a-43e0-bf4c-06f5698ffbd9}"
_RECORD_ID_KEYS = ("EventRecordID", "RecordNumber", "record_id")
_RCODES = {0: "NOERROR", 9001: "FORMERR", 9002: "SERVFAIL", 9003: "NXDOMAIN", 9004: "NOTIMP",
           9005: "REFUSED", 9006: "YXDOMAIN", 9007: "YXRRSET", 9008: "NXRRSET", 9009: "NOTAUTH",
           9010: "NOTZONE", 9501: "NODATA"}
_RR_TYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA",
             33: "SRV", 35: "NAPTR", 39: "DNAME", 64: "SVCB", 65: "HTTPS"}
_PROTO = {"tcp": "tcp", "udp": "udp", "icmp": "icmp"}


class _BadRecord(ValueError):
    pass


def is_sysmon(event: dict) -> bool:
    return (event.get("SourceName") == SYSMON_PROVIDER or event.get("Channel") == SYSMON_CHANNEL
            or str(event.get("ProviderGuid", "")).lower() == SYSMON_GUID)


def sniff(head: bytes) -> bool:
    text = head.decode("utf-8", "replace")
    lines = text.splitlines()
    if len(head) >= 64 * 1024 and len(lines) > 1:
        lines = lines[:-1]  # the last line of a cut head may be partial
    windows_events = dns_server_events = 0
    for line in lines[:200]:
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if not isinstance(event, dict) or "EventID" not in event:
            continue
        if is_sysmon(event):
            return True
        source = str(event.get("Channel") or event.get("SourceName") or "")
        if source:
            windows_events += 1
            dns_server_events += "DNSServer" in source
    return windows_events > dns_server_events


def _iter_events(path: str, quarantine: Quarantine, wanted_id: int) -> Iterator[tuple[int, dict]]:
    """(line number, event) for Sysmon events of `wanted_id`; counts everything skipped."""
    skipped: Counter = Counter()
    for line_no, line in iter_lines(path, quarantine):
        text = line.strip()
        if not text:
            continue
        try:
            event = json.loads(text)
        except ValueError as exc:
            quarantine.add(path, line_no, f"invalid JSON: {exc}", line)
            continue
        if not isinstance(event, dict):
            quarantine.add(path, line_no, "JSON value is not an object", line)
            continue
        if not is_sysmon(event):
            skipped["other provider"] += 1
            continue
        if _event_id(event) != wanted_id:
            skipped["other Sysmon event id"] += 1
            continue
        yield line_no, event
    if skipped:
        log.debug("%s: skipped %s", path, dict(skipped))


def _event_id(event: dict) -> int | None:
    try:
        return int(str(event.get("EventID", "")).strip())
    except ValueError:
        return None


def _text(event: dict, key: str) -> str:
    value = event.get(key)
    return "" if value is None else str(value).strip()


def _utc(event: dict) -> float:
    ts = parse_rfc3339(_text(event, "UtcTime"))
    if ts is None:
        raise _BadRecord(f"bad or missing UtcTime {_text(event, 'UtcTime')[:40]!r}")
    return ts


def _ip(value: str, field: str) -> str:
    try:
        return ipaddress.ip_address(value).compressed
    except ValueError:
        raise _BadRecord(f"bad {field} {value[:64]!r}") from None


def _port(value: str, field: str) -> int:
    if not value.isdigit() or int(value) > 65535:
        raise _BadRecord(f"bad {field} {value[:16]!r}")
    return int(value)


def _record_event_id(event: dict, path: str, line_no: int) -> str:
    for key in _RECORD_ID_KEYS:
        value = _text(event, key)
        if value.isdigit():
            return f"sysmon-{_text(event, 'Hostname')}-{value}"
    return stable_event_id("sysmon", path, line_no)


def _image_name(image: str) -> str:
    return image.replace("\\", "/").rsplit("/", 1)[-1]


def _chunks(rows: Iterator[dict], kind: str, source: str, chunk_rows: int) -> Iterator[pd.DataFrame]:
    batch: list[dict] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= chunk_rows:
            yield _frame(batch, kind, source)
            batch = []
    if batch:
        yield _frame(batch, kind, source)


def _frame(batch: list[dict], kind: str, source: str) -> pd.DataFrame:
    df = pd.DataFrame(batch)
    df["source"] = source
    return schema.conform(df, kind)


# --- EID 3 ------------------------------------------------------------------------------------

def read_network(path: str, quarantine: Quarantine, chunk_rows: int) -> Iterator[pd.DataFrame]:
    return _chunks(_network_rows(path, quarantine), "connections", "sysmon_network", chunk_rows)


def _network_rows(path: str, quarantine: Quarantine) -> Iterator[dict]:
    inbound = 0
    for line_no, event in _iter_events(path, quarantine, 3):
        if _text(event, "Initiated").lower() != "true":
            inbound += 1
            continue
        try:
            protocol = _text(event, "Protocol").lower()
            yield {
                "event_id": _record_event_id(event, path, line_no),
                "ts": _utc(event),
                "src_ip": _ip(_text(event, "SourceIp"), "SourceIp"),
                "src_port": _port(_text(event, "SourcePort"), "SourcePort"),
                "dst_ip": _ip(_text(event, "DestinationIp"), "DestinationIp"),
                "dst_port": _port(_text(event, "DestinationPort"), "DestinationPort"),
                "proto": _PROTO.get(protocol, protocol[:16]),
                "process": _image_name(_text(event, "Image")),
            }
        except _BadRecord as exc:
            quarantine.add(path, line_no, str(exc), json.dumps(event)[:512])
    if inbound:
        log.debug("%s: %d inbound (Initiated=false) Sysmon connections skipped", path, inbound)


# --- EID 22 -----------------------------------------------------------------------------------

def read_dns(path: str, quarantine: Quarantine, chunk_rows: int) -> Iterator[pd.DataFrame]:
    return _chunks(_dns_rows(path, quarantine), "dns_answers", "sysmon_dns", chunk_rows)


def host_addresses(path: str) -> dict[str, list[str]]:
    """Hostname (lower case) -> every non-loopback SourceIp of its outbound EID 3 events in `path`,
    the most frequent first: a host with two NICs resolves to both."""
    seen: dict[str, Counter] = {}
    for _line_no, line in iter_lines(path, Quarantine()):  # bad lines are reported by the main pass
        if '"SourceIp"' not in line:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if not isinstance(event, dict) or not is_sysmon(event) or _event_id(event) != 3:
            continue
        if _text(event, "Initiated").lower() != "true":
            continue
        try:
            address = ipaddress.ip_address(_text(event, "SourceIp"))
        except ValueError:
            continue
        if address.is_loopback or address.is_link_local or address.is_unspecified:
            continue
        seen.setdefault(_text(event, "Hostname").lower(), Counter())[address.compressed] += 1
    return {host: [ip for ip, _n in counts.most_common()] for host, counts in seen.items() if host}


def _event_host_ip(event: dict) -> str:
    host = event.get("host")
    candidates = host.get("ip") if isinstance(host, dict) else None
    if isinstance(candidates, str):
        candidates = [candidates]
    for value in candidates or ():
        try:
            address = ipaddress.ip_address(str(value))
        except ValueError:
            continue
        if not (address.is_loopback or address.is_link_local):
            return address.compressed
    return ""


def parse_query_results(results: str) -> list[tuple[str, str]]:
    """[(rtype, answer)] of a Sysmon `QueryResults` value, in order; [] when there is none."""
    out = []
    for token in results.split(";"):
        token = token.strip()
        if not token or token == "-":
            continue
        if token.startswith("type:"):
            code, _, value = token[5:].strip().partition(" ")
            rtype = _RR_TYPES.get(int(code), f"TYPE{code}") if code.isdigit() else ""
            out.append((rtype, value.strip()))
            continue
        try:
            address = ipaddress.ip_address(token)
        except ValueError:
            out.append(("", token))
            continue
        if address.version == 6 and address.ipv4_mapped is not None:
            out.append(("A", str(address.ipv4_mapped)))
        else:
            out.append(("A" if address.version == 4 else "AAAA", address.compressed))
    return out


def rcode_name(status: str) -> str:
    if not status.isdigit():
        return ""
    code = int(status)
    return _RCODES.get(code, f"STATUS_{code}")


def _dns_rows(path: str, quarantine: Quarantine) -> Iterator[dict]:
    addresses = None
    for line_no, event in _iter_events(path, quarantine, 22):
        try:
            ts = _utc(event)
            query = _text(event, "QueryName")
            if not query:
                raise _BadRecord("missing QueryName")
        except _BadRecord as exc:
            quarantine.add(path, line_no, str(exc), json.dumps(event)[:512])
            continue
        clients = [_event_host_ip(event)]
        if not clients[0]:
            if addresses is None:
                addresses = host_addresses(path)
            hostname = _text(event, "Hostname")
            clients = addresses.get(hostname.lower(), [hostname])
        answers = parse_query_results(_text(event, "QueryResults"))
        for client in clients:   # the whole response once per address of the host
            base = {"event_id": _record_event_id(event, path, line_no), "ts": ts, "client_ip": client,
                    "query": query, "rcode": rcode_name(_text(event, "QueryStatus"))}
            if not answers:
                yield {**base, "rtype": "", "answer": "", "answer_index": -1}
            for index, (rtype, answer) in enumerate(answers[:32767]):
                yield {**base, "rtype": rtype, "answer": answer, "answer_index": index}


FORMATS = [
    SourceFormat("sysmon_network", "connections", sniff, read_network,
                 "Sysmon EID 3 (outbound NetworkConnect) from Windows event JSON lines"),
    SourceFormat("sysmon_dns", "dns_answers", sniff, read_dns,
                 "Sysmon EID 22 (DnsQuery) answers from Windows event JSON lines"),
]
