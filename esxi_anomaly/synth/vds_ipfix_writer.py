"""Write guest traffic as vSphere Distributed Switch IPFIX (RFC 7011, version 10) capture files.

One file per ESXi host, `<out>/ipfix/<host>.ipfix`: the raw UDP payloads a collector saves, back
to back. Each file starts with a template message (set 2) holding the vDS layouts seen in the
real capture (`vds-ipfix-logstash-codec-netflow/ipfix_test_vmware_vds_tpl.dat`): template 256
for IPv4 and 258 for IPv6 flows, with sourceIPv4Address, destinationIPv4Address,
octetDeltaCount, packetDeltaCount, flowStart/EndMilliseconds, ports, ingress/egressInterface,
layer2SegmentId, protocolIdentifier, flowEndReason, tcpControlBits, ipClassOfService, maxTTL,
flowDirection and VMware's (PEN 6876) 890/888/889 interface attributes, then paddingOctets.
Data messages follow in flow-end order, at most 19 records each (one MTU-sized datagram), with
the export time of their last flow end and the RFC 7011 sequence number (data records sent before).

Coverage: every connection with a guest (inventory kind vm/infra/vcenter) at either end, exported
once, by the host where it enters the switch (the source guest's host, else the destination's).
One record per connection in its initiator's direction, not split by the active timeout: the
reader's rows then are the estate's connections (5-tuple, start within a millisecond).
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pandas as pd

from esxi_anomaly.synth._text_writer import VM_KINDS, entity_maps, hash64

VMWARE_PEN = 6876
RECORDS_PER_MESSAGE = 19
_PROTO = {"icmp": 1, "tcp": 6, "udp": 17, "gre": 47, "esp": 50, "sctp": 132}


def _layout(v6: bool) -> list[tuple[int, int, str]]:
    """(IE id, enterprise, numpy type) of the vDS flow template, in wire order."""
    addr = ("V16", 27, 28) if v6 else (">u4", 8, 12)
    return [(addr[1], 0, addr[0]), (addr[2], 0, addr[0]), (1, 0, ">u8"), (2, 0, ">u8"), (152, 0, ">u8"),
            (153, 0, ">u8"), (7, 0, ">u2"), (11, 0, ">u2"), (10, 0, ">u4"), (14, 0, ">u4"), (351, 0, ">u8"),
            (4, 0, "u1"), (136, 0, "u1"), (6, 0, "u1"), (5, 0, "u1"), (53, 0, "u1"), (61, 0, "u1"),
            (890, VMWARE_PEN, ">u2"), (888, VMWARE_PEN, ">u2"), (889, VMWARE_PEN, "u1"), (210, 0, "u1")]


def _record_dtype(v6: bool) -> np.dtype:
    return np.dtype([(f"e{ie}", t) for ie, _, t in _layout(v6)])


def template_message(export_time: int, odid: int = 0) -> bytes:
    records = b""
    for tid, v6 in ((256, False), (258, True)):
        fields = b""
        for ie, pen, t in _layout(v6):
            size = np.dtype(t).itemsize
            fields += struct.pack(">HHI", ie | 0x8000, size, pen) if pen else struct.pack(">HH", ie, size)
        records += struct.pack(">HH", tid, len(_layout(v6))) + fields
    body = struct.pack(">HH", 2, 4 + len(records)) + records
    return struct.pack(">HHIII", 10, 16 + len(body), export_time, 0, odid) + body


def _ipv4_int(ips: pd.Series) -> np.ndarray:
    parts = ips.str.split(".", expand=True).astype(np.int64).to_numpy()
    return ((parts[:, 0] << 24) | (parts[:, 1] << 16) | (parts[:, 2] << 8) | parts[:, 3]).astype(np.uint32)


def _ipv6_bytes(ips: pd.Series) -> np.ndarray:
    import ipaddress
    codes, uniques = pd.factorize(ips.astype(object))   # each distinct address packed once
    table = np.array([ipaddress.IPv6Address(u).packed for u in uniques] + [b"\0" * 16], dtype="V16")
    return table[codes]


def flow_records(conns: pd.DataFrame, v6: bool) -> np.ndarray:
    """Structured big-endian records of `conns`, one per connection."""
    rec = np.zeros(len(conns), dtype=_record_dtype(v6))
    if not len(conns):
        return rec
    src, dst = conns["src_ip"].astype(str), conns["dst_ip"].astype(str)
    if v6:
        rec["e27"], rec["e28"] = _ipv6_bytes(src), _ipv6_bytes(dst)
    else:
        rec["e8"], rec["e12"] = _ipv4_int(src), _ipv4_int(dst)
    start = np.floor(conns["ts"].to_numpy(dtype=np.float64) * 1000.0 + 1e-6).astype(np.int64)
    end = start + np.round(conns["duration"].fillna(0).clip(lower=0).to_numpy(dtype=np.float64) * 1000.0).astype(np.int64)
    proto = conns["proto"].map(_PROTO).fillna(0).astype(np.int64).to_numpy()
    tcp = proto == 6
    state = conns["conn_state"].astype(str).to_numpy() if "conn_state" in conns else np.full(len(conns), "")
    rec["e1"] = conns["bytes_out"].fillna(0).clip(lower=0).to_numpy(dtype=np.float64).astype(np.uint64)
    rec["e2"] = np.maximum(conns["packets_out"].fillna(1).to_numpy(dtype=np.float64), 1).astype(np.uint64)
    rec["e152"], rec["e153"] = start, end
    rec["e7"], rec["e11"] = conns["src_port"].to_numpy(), conns["dst_port"].to_numpy()
    h = hash64(src + ">" + dst)
    rec["e10"] = 1 + (hash64(src) % np.uint64(48)).astype(np.uint32)        # the guest's vDS port
    rec["e14"] = 1 + (h % np.uint64(4)).astype(np.uint32)                    # an uplink
    rec["e351"] = 0
    rec["e4"] = proto
    # flowEndReason: end of flow detected (TCP FIN/RST), else idle timeout
    rec["e136"] = np.where(tcp & np.isin(state, ["SF", "RSTO", "RSTR", "RSTOS0", "RSTRH"]), 3, 1)
    rec["e6"] = np.where(tcp, np.where(state == "SF", 0x1B, np.where(np.char.startswith(state.astype(str), "RST"), 0x16, 0x02)), 0)
    rec["e53"] = np.where(hash64(src) % np.uint64(3) == 0, 128, 64)
    rec["e61"] = 0                                                           # ingress
    rec["e890"], rec["e888"], rec["e889"] = 1, 3, 0
    return rec


def data_messages(rec: np.ndarray, template_id: int, first_sequence: int, odid: int = 0) -> bytes:
    """`rec` (sorted by flow end) as IPFIX messages of at most RECORDS_PER_MESSAGE records."""
    out = b""
    n, k = len(rec), RECORDS_PER_MESSAGE
    for count, lo, hi in ((k, 0, n - n % k), (n % k, n - n % k, n)):   # the full messages, then the rest
        if hi <= lo:
            continue
        msgs = (hi - lo) // count
        body = rec[lo:hi].reshape(msgs, count)
        dtype = np.dtype([("ver", ">u2"), ("len", ">u2"), ("exp", ">u4"), ("seq", ">u4"), ("odid", ">u4"),
                          ("sid", ">u2"), ("slen", ">u2"), ("recs", rec.dtype, (count,))])
        m = np.zeros(msgs, dtype=dtype)
        m["ver"], m["len"], m["odid"], m["sid"] = 10, dtype.itemsize, odid, template_id
        m["slen"] = 4 + rec.dtype.itemsize * count
        m["exp"] = np.ceil(body["e153"].max(axis=1) / 1000.0).astype(np.uint32)
        m["seq"] = first_sequence + lo + np.arange(msgs, dtype=np.int64) * count
        m["recs"] = body
        out += m.tobytes()
    return out


def write_ipfix(ds, out_dir) -> list[Path]:
    """`<out_dir>/ipfix/<host>.ipfix` per ESXi host exporting any guest flow."""
    kind, host_of, _ = entity_maps(ds.inventory)
    c = ds.connections
    src_vm = c["src_ip"].map(kind).isin(VM_KINDS)
    dst_vm = c["dst_ip"].map(kind).isin(VM_KINDS)
    c = c.assign(_host=np.where(src_vm, c["src_ip"].map(host_of), c["dst_ip"].map(host_of)))[src_vm | dst_vm]
    out = Path(out_dir) / "ipfix"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for host, part in c.groupby("_host", sort=True):
        v6 = part["src_ip"].str.contains(":").to_numpy()
        blob, sequence = b"", 0
        start = int(np.floor(part["ts"].min()))
        for tid, rows in ((256, part[~v6]), (258, part[v6])):
            rec = flow_records(rows, tid == 258)
            rec = rec[np.argsort(rec["e153"], kind="stable")]
            blob += data_messages(rec, tid, sequence)
            sequence += len(rec)
        path = out / f"{host}.ipfix"
        path.write_bytes(template_message(start) + blob)
        written.append(path)
    return written


__all__ = ["write_ipfix", "flow_records", "template_message", "data_messages", "RECORDS_PER_MESSAGE"]
