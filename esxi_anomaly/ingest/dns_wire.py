"""A small DNS wire-format decoder (RFC 1035) for packets logged as hex, e.g. Windows DNS PacketData.

Decodes the header, the question section and the answer section. Answer RDATA is rendered in
presentation form for A, AAAA, CNAME, NS, PTR, MX, TXT, SRV, SOA, HTTPS/SVCB; any other type uses
the RFC 3597 generic form (``\\# <len> <hex>``). Authority and additional sections are not decoded.

Packets are attacker-controlled: names are length-checked, compression pointers must point
strictly backwards (so they cannot loop), and label bytes outside printable ASCII are escaped.
Every malformed input raises `DNSWireError`, and nothing else.
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

MAX_NAME_OCTETS = 255
MAX_POINTER_HOPS = 64  # backward-only pointers already forbid loops; this bounds long chains

TYPE_NAMES = {
    1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA",
    33: "SRV", 35: "NAPTR", 39: "DNAME", 41: "OPT", 43: "DS", 46: "RRSIG", 47: "NSEC",
    48: "DNSKEY", 64: "SVCB", 65: "HTTPS", 255: "ANY", 257: "CAA",
}
RCODE_NAMES = {
    0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED",
    6: "YXDOMAIN", 7: "YXRRSET", 8: "NXRRSET", 9: "NOTAUTH", 10: "NOTZONE",
}
SVC_PARAM_KEYS = {0: "mandatory", 1: "alpn", 2: "no-default-alpn", 3: "port", 4: "ipv4hint",
                  5: "ech", 6: "ipv6hint"}


class DNSWireError(ValueError):
    """The bytes are not a well-formed DNS message (the message says where it broke)."""


@dataclass(frozen=True)
class Question:
    name: str
    qtype: int
    qclass: int

    @property
    def type_name(self) -> str:
        return type_name(self.qtype)


@dataclass(frozen=True)
class ResourceRecord:
    name: str
    rtype: int
    rclass: int
    ttl: int
    rdata: str  # presentation form; names without the trailing dot

    @property
    def type_name(self) -> str:
        return type_name(self.rtype)


@dataclass(frozen=True)
class Message:
    id: int
    flags: int
    questions: tuple[Question, ...]
    answers: tuple[ResourceRecord, ...]

    @property
    def is_response(self) -> bool:
        return bool(self.flags & 0x8000)

    @property
    def rcode(self) -> int:
        return self.flags & 0x000F

    @property
    def rcode_name(self) -> str:
        return rcode_name(self.rcode)


def type_name(code: int) -> str:
    return TYPE_NAMES.get(code, f"TYPE{code}")


def rcode_name(code: int) -> str:
    return RCODE_NAMES.get(code, f"RCODE{code}")


def decode_hex(text: str) -> Message:
    """Decode a hex string such as Windows' ``0x0007818000...`` PacketData."""
    if not isinstance(text, str):
        raise DNSWireError("packet hex is not a string")
    body = text.strip()
    if body[:2] in ("0x", "0X"):
        body = body[2:]
    try:
        data = bytes.fromhex(body)
    except ValueError:
        raise DNSWireError("packet is not valid hex") from None
    return decode_message(data)


def decode_message(data: bytes) -> Message:
    """Decode header, questions and answers of one DNS message."""
    if len(data) < 12:
        raise DNSWireError(f"message of {len(data)} bytes is shorter than the 12-byte header")
    msg_id, flags, qdcount, ancount, _nscount, _arcount = struct.unpack_from("!HHHHHH", data, 0)
    pos = 12
    questions = []
    for _ in range(qdcount):
        name, pos = read_name(data, pos)
        if pos + 4 > len(data):
            raise DNSWireError(f"question truncated at offset {pos}")
        qtype, qclass = struct.unpack_from("!HH", data, pos)
        pos += 4
        questions.append(Question(name, qtype, qclass))
    answers = []
    for _ in range(ancount):
        rr, pos = _read_rr(data, pos)
        answers.append(rr)
    return Message(msg_id, flags, tuple(questions), tuple(answers))


def read_name(data: bytes, pos: int) -> tuple[str, int]:
    """(name, offset after the name in the original stream); the root name is "."."""
    labels: list[str] = []
    octets = 0
    end = None          # where the stream continues after the first pointer
    hops = 0
    lowest = pos        # pointers must go strictly below every label read so far
    while True:
        if pos >= len(data):
            raise DNSWireError(f"name runs past the end of the message at offset {pos}")
        length = data[pos]
        if length & 0xC0 == 0xC0:
            if pos + 1 >= len(data):
                raise DNSWireError(f"compression pointer truncated at offset {pos}")
            target = ((length & 0x3F) << 8) | data[pos + 1]
            if target >= lowest:
                raise DNSWireError(f"compression pointer at offset {pos} does not point backwards")
            hops += 1
            if hops > MAX_POINTER_HOPS:
                raise DNSWireError("too many compression pointers")
            if end is None:
                end = pos + 2
            pos = lowest = target
            continue
        if length & 0xC0:
            raise DNSWireError(f"unsupported label type 0x{length:02x} at offset {pos}")
        if length == 0:
            pos += 1
            break
        if pos + 1 + length > len(data):
            raise DNSWireError(f"label runs past the end of the message at offset {pos}")
        octets += length + 1
        if octets > MAX_NAME_OCTETS:
            raise DNSWireError("name longer than 255 octets")
        labels.append(_escape_label(data[pos + 1: pos + 1 + length]))
        pos += 1 + length
    return (".".join(labels) if labels else "."), (end if end is not None else pos)


def _escape_label(raw: bytes) -> str:
    out = []
    for b in raw:
        if b in (0x2E, 0x5C, 0x22, 0x28, 0x29, 0x3B, 0x40, 0x24):  # . \ " ( ) ; @ $
            out.append("\\" + chr(b))
        elif 0x21 <= b <= 0x7E:
            out.append(chr(b))
        else:
            out.append(f"\\{b:03d}")
    return "".join(out)


def _escape_text(raw: bytes) -> str:
    out = ['"']
    for b in raw:
        if b in (0x22, 0x5C):
            out.append("\\" + chr(b))
        elif 0x20 <= b <= 0x7E:
            out.append(chr(b))
        else:
            out.append(f"\\{b:03d}")
    out.append('"')
    return "".join(out)


def _read_rr(data: bytes, pos: int) -> tuple[ResourceRecord, int]:
    name, pos = read_name(data, pos)
    if pos + 10 > len(data):
        raise DNSWireError(f"resource record header truncated at offset {pos}")
    rtype, rclass, ttl, rdlength = struct.unpack_from("!HHIH", data, pos)
    pos += 10
    end = pos + rdlength
    if end > len(data):
        raise DNSWireError(f"rdata of {type_name(rtype)} runs past the end of the message at offset {pos}")
    rdata = _render_rdata(data, pos, end, rtype)
    return ResourceRecord(name, rtype, rclass, ttl, rdata), end


def _name_within(data: bytes, pos: int, end: int) -> tuple[str, int]:
    name, after = read_name(data, pos)
    if after > end:
        raise DNSWireError(f"name in rdata at offset {pos} overruns its record")
    return name, after


def _render_rdata(data: bytes, pos: int, end: int, rtype: int) -> str:
    rd = data[pos:end]
    if rtype == 1:
        if len(rd) != 4:
            raise DNSWireError(f"A record with {len(rd)} bytes of rdata")
        return str(ipaddress.IPv4Address(rd))
    if rtype == 28:
        if len(rd) != 16:
            raise DNSWireError(f"AAAA record with {len(rd)} bytes of rdata")
        return str(ipaddress.IPv6Address(rd))
    if rtype in (2, 5, 12, 39):  # NS, CNAME, PTR, DNAME
        name, after = _name_within(data, pos, end)
        return name
    if rtype == 15:
        if len(rd) < 3:
            raise DNSWireError("MX rdata truncated")
        name, _ = _name_within(data, pos + 2, end)
        return f"{struct.unpack_from('!H', data, pos)[0]} {name}"
    if rtype == 33:
        if len(rd) < 7:
            raise DNSWireError("SRV rdata truncated")
        prio, weight, port = struct.unpack_from("!HHH", data, pos)
        name, _ = _name_within(data, pos + 6, end)
        return f"{prio} {weight} {port} {name}"
    if rtype == 16:
        return _render_txt(rd)
    if rtype == 6:
        mname, p = _name_within(data, pos, end)
        rname, p = _name_within(data, p, end)
        if p + 20 > end:
            raise DNSWireError("SOA rdata truncated")
        return " ".join([mname, rname, *map(str, struct.unpack_from("!IIIII", data, p))])
    if rtype in (64, 65):
        return _render_svcb(data, pos, end)
    return f"\\# {len(rd)} {rd.hex().upper()}".rstrip()


def _render_txt(rd: bytes) -> str:
    parts, i = [], 0
    while i < len(rd):
        n = rd[i]
        if i + 1 + n > len(rd):
            raise DNSWireError("TXT character-string runs past its record")
        parts.append(_escape_text(rd[i + 1: i + 1 + n]))
        i += 1 + n
    return " ".join(parts)


def _render_svcb(data: bytes, pos: int, end: int) -> str:
    """RFC 9460 presentation: ``priority target key=value ...``."""
    if end - pos < 3:
        raise DNSWireError("SVCB/HTTPS rdata truncated")
    priority = struct.unpack_from("!H", data, pos)[0]
    target, p = _name_within(data, pos + 2, end)
    out = [str(priority), target]
    while p < end:
        if p + 4 > end:
            raise DNSWireError("SVCB parameter header truncated")
        key, length = struct.unpack_from("!HH", data, p)
        p += 4
        if p + length > end:
            raise DNSWireError("SVCB parameter value runs past its record")
        value = data[p: p + length]
        p += length
        out.append(_render_svc_param(key, value))
    return " ".join(out)


def _render_svc_param(key: int, value: bytes) -> str:
    name = SVC_PARAM_KEYS.get(key, f"key{key}")
    if key == 3:
        if len(value) != 2:
            raise DNSWireError("SVCB port parameter is not 2 bytes")
        return f"port={struct.unpack('!H', value)[0]}"
    if key == 1:
        ids, i = [], 0
        while i < len(value):
            n = value[i]
            if i + 1 + n > len(value):
                raise DNSWireError("SVCB alpn value truncated")
            ids.append(_escape_label(value[i + 1: i + 1 + n]))
            i += 1 + n
        return f"alpn={','.join(ids)}"
    if key == 4 and len(value) % 4 == 0 and value:
        return "ipv4hint=" + ",".join(str(ipaddress.IPv4Address(value[i:i + 4])) for i in range(0, len(value), 4))
    if key == 6 and len(value) % 16 == 0 and value:
        return "ipv6hint=" + ",".join(str(ipaddress.IPv6Address(value[i:i + 16])) for i in range(0, len(value), 16))
    if key == 2 and not value:
        return name
    if key == 0 and len(value) % 2 == 0:
        keys = struct.unpack(f"!{len(value) // 2}H", value)
        return "mandatory=" + ",".join(SVC_PARAM_KEYS.get(k, f"key{k}") for k in keys)
    return f"{name}={value.hex().upper()}" if value else name
