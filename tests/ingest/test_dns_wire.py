"""dns_wire: exact decoding of hand-built packets, hostile packets, and fuzzing."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esxi_anomaly.ingest.dns_wire import DNSWireError, decode_hex, decode_message, read_name

# Real PacketData of event 257 in windows-dns-analytical-elastic-integrations/test-events.json
SAMPLE_257 = ("0x00078180000100010000000006676F6F676C6502657300001C0001C00C001C00010000012C00102607F8B040040C17"
              "000000000000005E")


def name(*labels: bytes) -> bytes:
    return b"".join(bytes([len(l)]) + l for l in labels) + b"\x00"


def rr(owner: bytes, rtype: int, ttl: int, rdata: bytes) -> bytes:
    return owner + struct.pack("!HHIH", rtype, 1, ttl, len(rdata)) + rdata


def packet(answers: list[bytes], qname: bytes = name(b"c2", b"example", b"net"), qtype: int = 1,
           flags: int = 0x8180) -> bytes:
    return struct.pack("!HHHHHH", 0x1234, flags, 1, len(answers), 0, 0) + qname + struct.pack("!HH", qtype, 1) + b"".join(answers)


PTR_TO_QNAME = b"\xc0\x0c"  # the question name starts right after the 12-byte header


def test_windows_sample_packet_decodes_to_the_documented_answer():
    msg = decode_hex(SAMPLE_257)
    assert (msg.id, msg.flags, msg.rcode_name, msg.is_response) == (7, 0x8180, "NOERROR", True)
    assert [(q.name, q.type_name, q.qclass) for q in msg.questions] == [("google.es", "AAAA", 1)]
    assert [(a.name, a.type_name, a.ttl, a.rdata) for a in msg.answers] == [
        ("google.es", "AAAA", 300, "2607:f8b0:4004:c17::5e")]


def test_every_supported_rdata_type_in_presentation_form():
    txt = b"\x0bport=1117\"\\" + b"\x02\x01z"
    svcb = (struct.pack("!H", 1) + b"\x00"                      # priority 1, target "."
            + struct.pack("!HH", 1, 6) + b"\x02h2\x02h3"          # alpn=h2,h3
            + struct.pack("!HH", 3, 2) + struct.pack("!H", 8443)  # port=8443
            + struct.pack("!HH", 4, 4) + bytes([19, 57, 34, 8]))  # ipv4hint
    data = packet([
        rr(PTR_TO_QNAME, 5, 60, name(b"cdn", b"example", b"org")),
        rr(b"\xc0\x2c", 1, 30, bytes([19, 57, 34, 8])),           # owner = the CNAME target above
        rr(PTR_TO_QNAME, 16, 10, txt),
        rr(PTR_TO_QNAME, 33, 10, struct.pack("!HHH", 10, 5, 1117) + name(b"srv", b"example", b"net")),
        rr(PTR_TO_QNAME, 15, 10, struct.pack("!H", 20) + b"\x02mx" + PTR_TO_QNAME),
        rr(PTR_TO_QNAME, 12, 10, name(b"host", b"example")),
        rr(PTR_TO_QNAME, 65, 10, svcb),
        rr(PTR_TO_QNAME, 99, 10, b"\xab\xcd\xef"),
    ])
    msg = decode_message(data)
    assert [(a.name, a.type_name, a.ttl, a.rdata) for a in msg.answers] == [
        ("c2.example.net", "CNAME", 60, "cdn.example.org"),
        ("cdn.example.org", "A", 30, "19.57.34.8"),
        ("c2.example.net", "TXT", 10, '"port=1117\\"\\\\" "\\001z"'),
        ("c2.example.net", "SRV", 10, "10 5 1117 srv.example.net"),
        ("c2.example.net", "MX", 10, "20 mx.c2.example.net"),
        ("c2.example.net", "PTR", 10, "host.example"),
        ("c2.example.net", "HTTPS", 10, "1 . alpn=h2,h3 port=8443 ipv4hint=19.57.34.8"),
        ("c2.example.net", "TYPE99", 10, "\\# 3 ABCDEF"),
    ]


def test_label_bytes_are_escaped_not_trusted():
    data = packet([], qname=name(b"a.b", b"x\x00y", b"ok"))
    assert decode_message(data).questions[0].name == "a\\.b.x\\000y.ok"


def test_nxdomain_without_answers():
    msg = decode_message(packet([], flags=0x8183))
    assert (msg.rcode_name, msg.answers) == ("NXDOMAIN", ())


@pytest.mark.parametrize("data, message", [
    (b"\x00" * 11, "shorter than the 12-byte header"),
    (struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0) + b"\xc0\x0c" + b"\x00\x01\x00\x01", "does not point backwards"),
    (struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0) + b"\x01a\xc0\x0e" + b"\x00\x01\x00\x01", "does not point backwards"),
    (struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0) + b"\x05ab", "label runs past the end"),
    (struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0) + b"\x80ab", "unsupported label type"),
    (packet([rr(PTR_TO_QNAME, 1, 1, b"\x01\x02\x03")]), "A record with 3 bytes"),
    (packet([rr(PTR_TO_QNAME, 1, 1, b"\x01\x02\x03\x04")])[:-1], "runs past the end"),
    (struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0) + (b"\x3f" + b"a" * 63) * 5 + b"\x00\x00\x01\x00\x01", "longer than 255"),
])
def test_malformed_packets_raise_dns_wire_error(data, message):
    with pytest.raises(DNSWireError, match=message):
        decode_message(data)


def test_pointer_chain_cannot_loop():
    # two names pointing at each other: the second pointer goes forwards, so it is refused
    data = b"\x00" * 12 + b"\xc0\x0e" + b"\xc0\x0c"
    with pytest.raises(DNSWireError):
        read_name(data, 12)


@pytest.mark.parametrize("text", ["0xZZ", "abc", 17])
def test_bad_hex_raises_dns_wire_error(text):
    with pytest.raises(DNSWireError):
        decode_hex(text)


def test_every_truncation_of_a_valid_packet_raises_or_decodes():
    full = bytes.fromhex(SAMPLE_257[2:])
    for cut in range(len(full)):
        with pytest.raises(DNSWireError):
            decode_message(full[:cut])
    assert decode_message(full).answers


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_dns_wire_error(data):
    try:
        decode_message(data)
    except DNSWireError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 255)), max_size=6))
def test_mutated_packets_only_raise_dns_wire_error(edits):
    data = bytearray(bytes.fromhex(SAMPLE_257[2:]))
    for pos, value in edits:
        data[pos % len(data)] = value
    try:
        msg = decode_message(bytes(data))
    except DNSWireError:
        return
    assert all(isinstance(a.rdata, str) for a in msg.answers)
