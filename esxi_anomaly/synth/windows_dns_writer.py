"""Write DNS responses as the Windows DNS Server Analytical log (ETW), as the Elastic agent ships it.

One collector file, `<out>/windows_dns/analytical.json`, one JSON event per line, in the shape of
the real events in `windows-dns-analytical-elastic-integrations/test-events.json`: `@timestamp`,
`winlog.event_data` (`Destination` = client, `InterfaceIP` = the server, `Port`, `QNAME` with its
trailing dot, numeric `QTYPE`, `XID`, decimal `Flags`, `RCODE`, `AA`, `AD`, `DNSSEC`, `Zone`,
`BufferSize`, `PacketData`), `event.code` 257 RESPONSE_SUCCESS or 258 RESPONSE_FAILURE
(a non-zero RCODE). The answers exist only in `PacketData`: `0x` + the hex of the whole DNS
response (header, the question, the answer records; names uncompressed, which is valid wire form).
Before each response a 256 QUERY_RECEIVED event (`Source` = client, the query's PacketData)
as the server logs it; readers skip it.

Wire encoding is done once per distinct name and per distinct record (rtype, rdata), then joined
with numpy: no per-response Python.
"""
from __future__ import annotations

import ipaddress
from pathlib import Path

import numpy as np
import pandas as pd

from esxi_anomaly.synth._text_writer import (answers_of_clients_but, col, hash64, hex_of, iso_ms, ms_floor,
                                              write_in_time_order)
from esxi_anomaly.synth.bind_writer import responses

RR_CODES = {"A": 1, "NS": 2, "CNAME": 5, "SOA": 6, "PTR": 12, "MX": 15, "TXT": 16, "AAAA": 28, "SRV": 33,
            "DNAME": 39, "HTTPS": 65}
_NAME_TYPES = ("NS", "CNAME", "PTR", "DNAME")
_RCODES = {"NOERROR": 0, "FORMERR": 1, "SERVFAIL": 2, "NXDOMAIN": 3, "NOTIMP": 4, "REFUSED": 5}
_PROVIDER = ('"winlog":{"provider_guid":"{EB79061A-A566-4698-9119-3ED2807060E7}",'
             '"session":"Elastic-DNSServer-Analytical","channel":"16","opcode":"0","version":0,')


def _wire_name(name: str) -> bytes:
    labels = [l for l in str(name).rstrip(".").split(".") if l]
    return b"".join(bytes([len(l)]) + l.encode("ascii", "replace")[:63] for l in labels) + b"\x00"


def _rdata(rtype: str, answer: str) -> bytes:
    """Wire rdata of one record in presentation form (the estate's `answer`)."""
    if rtype == "A":
        return ipaddress.IPv4Address(answer).packed
    if rtype == "AAAA":
        return ipaddress.IPv6Address(answer).packed
    if rtype in _NAME_TYPES:
        return _wire_name(answer)
    parts = answer.split()
    if rtype == "MX":
        return int(parts[0]).to_bytes(2, "big") + _wire_name(parts[1])
    if rtype == "SRV":
        return b"".join(int(p).to_bytes(2, "big") for p in parts[:3]) + _wire_name(parts[3])
    raw = answer.encode("utf-8")   # TXT and anything else: character-strings of at most 255 octets
    return b"".join(bytes([len(raw[i:i + 255])]) + raw[i:i + 255] for i in range(0, len(raw), 255)) or b"\x00"


def _mapped_hex(values: pd.Series, encode) -> pd.Series:
    """Upper-case hex of `encode(value)`, computed once per distinct value."""
    codes, uniques = pd.factorize(values.astype(object))
    table = np.array([encode(u).hex().upper() for u in uniques] + [""], dtype=object)
    return pd.Series(table[codes], dtype=object)


def _hex_int(values, width: int) -> pd.Series:
    codes, uniques = pd.factorize(pd.Series(np.asarray(values, dtype=np.int64)))
    table = np.array([f"{int(u):0{width}X}" for u in uniques] + [""], dtype=object)
    return pd.Series(table[codes], dtype=object)


def _packed(rtype: str, answer: str) -> bytes:
    return _rdata(rtype, answer)


def event_lines(dns: pd.DataFrame) -> pd.DataFrame:
    """Lines (ms, line) of the 256 and 257/258 events of each response."""
    d, first, starts = responses(dns)
    if not len(first):
        return pd.DataFrame({"ms": np.array([], dtype=np.int64), "line": np.array([], dtype=object)})
    has = (d["answer"] != "").to_numpy()
    rtype = d["rtype"].astype(object)
    rdata = _mapped_hex(rtype + "\t" + d["answer"].astype(object), lambda k: _packed(*k.split("\t", 1)))
    rr = (_mapped_hex(d["owner"], _wire_name) + _hex_int(rtype.map(RR_CODES).fillna(1), 4) + "0001"
          + _hex_int(d["ttl"].fillna(300).round(), 8) + _hex_int(rdata.str.len() // 2, 4) + rdata)
    rrs = np.add.reduceat(np.where(has, rr, "").astype(object), starts)
    h = hash64(first["event_id"])
    xid = (h % np.uint64(65536)).astype(np.int64)
    rcode = first["rcode"].replace("", "NOERROR").map(_RCODES).fillna(2).astype(np.int64).to_numpy()
    flags = 0x8180 | rcode                                   # QR, RD, RA + the rcode
    qtype = first["qtype"].map(RR_CODES).fillna(1).astype(np.int64)
    question = _mapped_hex(first["query"], _wire_name) + _hex_int(qtype, 4) + "0001"
    ancount = first["ancount"].to_numpy(dtype=np.int64)
    response = ("0x" + _hex_int(xid, 4) + _hex_int(flags, 4) + "0001" + _hex_int(ancount, 4) + "00000000"
                + question + pd.Series(rrs, dtype=object))
    query_packet = "0x" + _hex_int(xid, 4) + "0100000100000000000" + "0" + question
    ms = ms_floor(first["ts"])
    elapsed = (h >> np.uint64(20)) % np.uint64(12)           # ms between query and response
    client = first["client_ip"].astype(object)
    server = first["resolver_ip"].astype(object).replace("", "0.0.0.0")
    port = col(1024 + (h >> np.uint64(32)) % np.uint64(64000))
    qname = first["query"].astype(object) + "."
    guid = hex_of(first["event_id"], 16).str.upper()
    guid = "{" + guid.str[:8] + "-" + guid.str[8:12] + "-" + guid.str[12:16] + "-9182-470BEDF5C0A4}"
    internal = first["query"].str.count(r"\.") <= 2
    zone = pd.Series(np.where(internal & (first["rcode"] != "NXDOMAIN"), first["query"].str.split(".", n=1).str[-1], "..Cache"), dtype=object)
    common = ('"TCP":"0","InterfaceIP":"' + server + '","Port":"' + port + '","QNAME":"' + qname + '","QTYPE":"'
              + col(qtype) + '","XID":"' + col(xid) + '","GUID":"' + guid + '"')
    sent = pd.Series(np.where(rcode == 0, "257", "258"), dtype=object)

    def envelope(ms_, code, task, data):
        stamp = pd.Series(iso_ms(ms_), dtype=object)
        created = pd.Series(iso_ms(ms_ + 1500 + (h % np.uint64(900)).astype(np.int64)), dtype=object)
        return ('{"@timestamp":"' + stamp + '",' + _PROVIDER + '"task":"' + task + '","event_data":{' + data
                + '}},"event":{"code":"' + code + '","provider":"Microsoft-Windows-DNSServer","created":"' + created
                + '","kind":"event","dataset":"microsoft_dnsserver.analytical"},"input":{"type":"etw"}}')

    answered = (common + ',"Destination":"' + client + '","Flags":"' + col(flags) + '","RCODE":"' + col(rcode)
                + '","AA":"' + pd.Series(np.where(zone != "..Cache", "1", "0"), dtype=object) + '","AD":"0","DNSSEC":"0","Zone":"'
                + zone + '","Scope":"Default","PolicyName":"NULL","ElapsedTime":"' + col(elapsed.astype(np.int64))
                + '","BufferSize":"' + col(response.str.len().to_numpy() // 2 - 1) + '","AdditionalInfo":"VirtualizationInstance:.","PacketData":"'
                + response + '"')
    received = (common + ',"Source":"' + client + '","Flags":"256","RD":"1","CD":"0","BufferSize":"'
                + col(query_packet.str.len().to_numpy() // 2 - 1) + '","AdditionalInfo":".","PacketData":"' + query_packet + '"')
    q_ms = ms - elapsed.astype(np.int64)
    lines = pd.concat([pd.DataFrame({"ms": q_ms, "order": 0, "line": envelope(q_ms, pd.Series(["256"] * len(first), dtype=object), "1", received)}),
                       pd.DataFrame({"ms": ms, "order": 1, "line": envelope(ms, sent, "2", answered)})], ignore_index=True)
    return lines


def write_windows_dns(ds, out_dir, exclude=()) -> list[Path]:
    """`<out_dir>/windows_dns/analytical.json`: the responses to every client not in `exclude`, in time order."""
    lines = event_lines(answers_of_clients_but(ds, exclude))
    return [write_in_time_order(Path(out_dir) / "windows_dns" / "analytical.json", lines, "order")]


__all__ = ["write_windows_dns", "event_lines", "RR_CODES"]
