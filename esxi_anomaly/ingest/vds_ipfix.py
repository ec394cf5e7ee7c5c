"""vSphere Distributed Switch IPFIX (RFC 7011, NetFlow v10) capture files -> connections.

A file holds one or more IPFIX messages back to back (raw UDP payloads as saved by a collector
or test harness). Template sets (2) define record layouts; data sets (id >= 256) are decoded
with numpy structured arrays (one `frombuffer` per set for fixed-length templates).

Template cache: data sets usually arrive in files that do not repeat their templates (the vDS
re-sends templates periodically), and the ingest API reads one file at a time. So templates live
in a module-level cache `TEMPLATES[observation_domain_id][template_id]` that persists across
files for the life of the process (later definitions replace earlier ones; a withdrawal, i.e. a
template record with no fields, removes one). Within a file, data sets are decoded after the
whole file has been scanned, so a template anywhere in the file applies to all of it. When a data
set's template is still unknown, the other IPFIX files of the same folder are scanned once for
template sets (a capture folder is one exporter's stream, and name order puts `*_tpl.dat` after
`*_data*.dat`). If it is still unknown the data set is quarantined ("template N not seen").
`clear_template_cache()` resets this state (tests, or reading unrelated exporters in sequence).
Exporter addresses are not in the files, so exporters sharing an observation domain id share
templates; vDS hosts of one switch export the same layouts, so this is safe for vDS data.

Mapping: src/dst from sourceIPv4/IPv6Address and ports (as exported: one row per unidirectional
flow record, emitted at the switch's egress port); when VXLAN tenant (inner) fields
(VMware PEN 6876, IEs 880-887) are present and non-zero they replace the outer addresses, because
the inner packet is the VM's own traffic. bytes_out/packets_out = octet/packetDeltaCount
(falling back to the Total counts); ts = flowStart (ms, s, us or ns IEs), else the message
export time; duration = flowEnd - flowStart. conn_state is "" (IPFIX has no session state),
process and esxi_host are "" (the exporter is not identified in a capture file).
Bad bytes never raise: a broken header, set or record goes to the quarantine with its byte
offset in the file as the line number, and the reader resynchronises on the next header.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import struct
import zlib
import lzma
import zipfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd

from esxi_anomaly import schema
from esxi_anomaly.ingest.base import (
    SNIFF_BYTES, IngestError, Quarantine, SourceFormat, open_binary, stable_event_id,
)

log = logging.getLogger(__name__)

NAME = "vds_ipfix"
VMWARE_PEN = 6876
_HEADER = struct.Struct(">HHIII")   # version, length, export time, sequence, observation domain
_SET = struct.Struct(">HH")
_READ_BLOCK = 1 << 20
_MAX_DEFERRED_BYTES = 64 << 20      # data sets waiting for a template, per file
_NTP_EPOCH_OFFSET = 2208988800      # seconds from 1900-01-01 to 1970-01-01


@dataclass(frozen=True)
class Template:
    fields: tuple[tuple[int, int, int], ...]   # (information element id, enterprise number, length)
    is_options: bool = False

    @property
    def fixed_length(self) -> int | None:
        if any(length == 0xFFFF for _, _, length in self.fields):
            return None
        return sum(length for _, _, length in self.fields)


TEMPLATES: dict[int, dict[int, Template]] = {}
_SCANNED_FILES: set[tuple[str, float, int]] = set()


def clear_template_cache() -> None:
    """Forget every template and every folder scan of this process."""
    TEMPLATES.clear()
    _SCANNED_FILES.clear()


def sniff(head: bytes) -> bool:
    """An IPFIX v10 header whose sets tile the first message exactly.

    Walking the sets matters: text that starts with NUL + newline (a log padded by a crash) reads
    as version 10, and only the set lengths tell it apart. A first message cut short by the end
    of the file is accepted when at least its first set is whole.
    """
    if len(head) < 20:
        return False
    version, length, _export, _seq, _odid = _HEADER.unpack_from(head)
    if version != 10 or length < 20:
        return False
    end, pos = min(length, len(head)), 16
    while pos + 4 <= end:
        set_id, set_length = _SET.unpack_from(head, pos)
        if not (set_id in (2, 3) or set_id >= 256) or set_length < 4 or pos + set_length > length:
            return False
        if pos + set_length > end:
            break   # cut by the end of the file
        pos += set_length
    return pos == length or (length > len(head) and pos > 16)


# --- message walking ------------------------------------------------------------------------

def _iter_messages(path: str, quarantine: Quarantine | None) -> Iterator[tuple[int, bytes]]:
    """(file offset, message bytes) of each IPFIX message; junk is quarantined and skipped."""
    def report(offset: int, reason: str, raw: bytes = b"") -> None:
        if quarantine is not None:
            quarantine.add(path, offset, reason, raw)

    try:
        fh = open_binary(path)
    except (OSError, EOFError, IngestError, lzma.LZMAError, zipfile.BadZipFile, zlib.error) as exc:
        report(0, f"cannot open: {exc}")
        return
    buf, base, eof = b"", 0, False   # base = file offset of buf[0]
    junk_start = None
    with fh:
        while True:
            # keep more than one maximal message buffered, so a short buffer means end of file
            while not eof and len(buf) < 2 * 65536:
                try:
                    block = fh.read(_READ_BLOCK)
                except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
                    report(base + len(buf), f"truncated or corrupt stream: {exc}")
                    block = b""
                eof = not block
                buf += block
            if not buf:
                break
            length = _message_length(buf)
            if length is not None and junk_start is not None:
                report(junk_start, f"{base - junk_start} bytes that are not an IPFIX message")
                junk_start = None
            if length is not None and length <= len(buf):
                yield base, buf[:length]
                buf, base = buf[length:], base + length
            elif length is not None:
                report(base, f"truncated message: header says {length} bytes, {len(buf)} left", buf[:64])
                break
            else:  # resynchronise on the next byte pair that could start a header
                if junk_start is None:
                    junk_start = base
                nxt = buf.find(b"\x00\x0a", 1)
                if nxt < 0:
                    nxt = len(buf) - 1 if (buf.endswith(b"\x00") and not eof) else len(buf)
                buf, base = buf[nxt:], base + nxt
    if junk_start is not None:
        report(junk_start, f"{base + len(buf) - junk_start} bytes that are not an IPFIX message")


def _message_length(buf: bytes) -> int | None:
    """The length of the message starting at buf[0], None if buf does not start with a header."""
    if len(buf) < 4:
        return None
    version, length = struct.unpack_from(">HH", buf)
    if version != 10 or length < 16:
        return None
    if length > len(buf):
        return length  # only possible at end of file: a truncated message
    # the set headers must tile the message exactly; bytes found while resynchronising rarely do
    pos = 16
    while pos + 4 <= length:
        set_id, set_length = _SET.unpack_from(buf, pos)
        if set_length < 4 or not (set_id in (2, 3) or set_id >= 256):
            return None
        pos += set_length
    return length if pos == length else None


def _iter_sets(message: bytes):
    """(set offset in message, set id, set body) for each set; ('bad', offset) on a broken header."""
    pos = 16
    end = len(message)
    while pos + 4 <= end:
        set_id, set_length = _SET.unpack_from(message, pos)
        if set_length < 4 or pos + set_length > end:
            yield pos, -1, message[pos:pos + 64]
            return
        yield pos, set_id, message[pos + 4:pos + set_length]
        pos += set_length


def _parse_templates(body: bytes, is_options: bool) -> tuple[list[tuple[int, Template | None]], str | None]:
    """Template records of a template (2) or options template (3) set; (records, error)."""
    out: list[tuple[int, Template | None]] = []
    pos = 0
    while len(body) - pos >= 4:
        template_id, field_count = struct.unpack_from(">HH", body, pos)
        pos += 4
        if template_id < 256:
            if template_id == 0 and field_count == 0:
                break  # padding
            return out, f"template id {template_id} below 256"
        if field_count == 0:
            out.append((template_id, None))  # withdrawal
            continue
        if is_options:
            if len(body) - pos < 2:
                return out, "truncated options template"
            pos += 2  # scope field count: scope fields are listed first, like the others
        fields = []
        for _ in range(field_count):
            if len(body) - pos < 4:
                return out, f"template {template_id} truncated"
            element, length = struct.unpack_from(">HH", body, pos)
            pos += 4
            enterprise = 0
            if element & 0x8000:
                if len(body) - pos < 4:
                    return out, f"template {template_id} truncated"
                enterprise = struct.unpack_from(">I", body, pos)[0]
                pos += 4
                element &= 0x7FFF
            if length == 0:
                return out, f"template {template_id} has a zero-length field"
            fields.append((element, enterprise, length))
        out.append((template_id, Template(tuple(fields), is_options)))
    return out, None


# --- decoding ---------------------------------------------------------------------------------

# (element, enterprise) -> role
_ROLES = {
    (8, 0): "src4", (12, 0): "dst4", (27, 0): "src6", (28, 0): "dst6",
    (7, 0): "sport", (11, 0): "dport", (4, 0): "proto",
    (1, 0): "bytes", (2, 0): "packets", (85, 0): "bytes_total", (86, 0): "packets_total",
    (150, 0): "start_s", (151, 0): "end_s", (152, 0): "start_ms", (153, 0): "end_ms",
    (154, 0): "start_us", (155, 0): "end_us", (156, 0): "start_ns", (157, 0): "end_ns",
    (881, VMWARE_PEN): "tsrc4", (882, VMWARE_PEN): "tdst4", (883, VMWARE_PEN): "tsrc6",
    (884, VMWARE_PEN): "tdst6", (880, VMWARE_PEN): "tproto", (886, VMWARE_PEN): "tsport",
    (887, VMWARE_PEN): "tdport",
}
_PROTO_NAMES = {1: "icmp", 2: "igmp", 6: "tcp", 17: "udp", 47: "gre", 50: "esp", 58: "icmp", 132: "sctp"}


def _record_arrays(template: Template, body: bytes) -> tuple[dict[str, np.ndarray], np.ndarray, str | None]:
    """Per-role (n, length) uint8 arrays, record offsets within body, and an error if any."""
    fixed = template.fixed_length
    wanted = {}
    if fixed is not None:
        n = len(body) // fixed if fixed else 0
        if n == 0:
            return {}, np.empty(0, dtype=np.int64), None if len(body) < 4 else "set shorter than one record"
        dtype = np.dtype([(f"f{i}", np.uint8, (length,)) for i, (_, _, length) in enumerate(template.fields)])
        records = np.frombuffer(body, dtype=dtype, count=n)
        for i, (element, enterprise, _length) in enumerate(template.fields):
            role = _ROLES.get((element, enterprise))
            if role is not None and role not in wanted:
                wanted[role] = records[f"f{i}"].reshape(n, -1)
        return wanted, np.arange(n, dtype=np.int64) * fixed, None
    # variable-length fields: walk record by record (RFC 7011 section 7)
    columns: dict[str, list[bytes]] = {}
    offsets = []
    pos = 0
    error = None
    while pos < len(body):
        start = pos
        values = {}
        ok = True
        for element, enterprise, length in template.fields:
            if length == 0xFFFF:
                if pos >= len(body):
                    ok = False
                    break
                length = body[pos]
                pos += 1
                if length == 255:
                    if pos + 2 > len(body):
                        ok = False
                        break
                    length = struct.unpack_from(">H", body, pos)[0]
                    pos += 2
            if pos + length > len(body):
                ok = False
                break
            role = _ROLES.get((element, enterprise))
            if role is not None and role not in values:
                values[role] = body[pos:pos + length]
            pos += length
        if not ok:
            if any(body[start:]):  # trailing zero bytes are padding
                error = f"record truncated at set byte {start}"
            break
        offsets.append(start)
        for role, value in values.items():
            columns.setdefault(role, []).append(value)
    n = len(offsets)
    for role, values in columns.items():
        width = len(values[0])
        if len(values) == n and all(len(v) == width for v in values):
            wanted[role] = np.frombuffer(b"".join(values), dtype=np.uint8).reshape(n, width)
    return wanted, np.asarray(offsets, dtype=np.int64), error


def _uint(arr: np.ndarray) -> np.ndarray:
    """Big-endian unsigned integers (reduced-size encoding allowed) from (n, k) bytes -> float64."""
    n, k = arr.shape
    if k in (1, 2, 4, 8):
        return np.ascontiguousarray(arr).view(f">u{k}").reshape(n).astype(np.float64)
    weights = 256.0 ** np.arange(k - 1, -1, -1)
    return arr.astype(np.float64) @ weights


def _ipv4(arr: np.ndarray) -> np.ndarray:
    parts = [arr[:, i].astype(str) for i in range(4)]
    return np.char.add(np.char.add(np.char.add(np.char.add(np.char.add(np.char.add(
        parts[0], "."), parts[1]), "."), parts[2]), "."), parts[3])


def _ipv6(arr: np.ndarray) -> np.ndarray:
    return np.array([str(ipaddress.IPv6Address(bytes(row))) for row in arr], dtype=object)


def _address(cols, v4: str, v6: str, n: int) -> np.ndarray:
    if v4 in cols and cols[v4].shape[1] == 4:
        return _ipv4(cols[v4]).astype(object)
    if v6 in cols and cols[v6].shape[1] == 16:
        return _ipv6(cols[v6])
    return np.full(n, "", dtype=object)


def _times(cols, which: str, export_time: float, n: int) -> np.ndarray:
    if f"{which}_ms" in cols:
        return _uint(cols[f"{which}_ms"]) / 1000.0
    if f"{which}_s" in cols:
        return _uint(cols[f"{which}_s"])
    for unit in ("us", "ns"):  # NTP 64-bit timestamps (RFC 7011 section 6.1.9/6.1.10)
        key = f"{which}_{unit}"
        if key in cols and cols[key].shape[1] == 8:
            raw = np.ascontiguousarray(cols[key])
            seconds = raw[:, :4].copy().view(">u4").reshape(n).astype(np.float64)
            fraction = raw[:, 4:].copy().view(">u4").reshape(n).astype(np.float64) / 2.0**32
            return seconds - _NTP_EPOCH_OFFSET + fraction
    return np.full(n, export_time if which == "start" else np.nan)


def decode_data_set(template: Template, body: bytes, export_time: float):
    """(frame of canonical columns without event_id/source, record offsets in body, error)."""
    cols, offsets, error = _record_arrays(template, body)
    n = len(offsets)
    if n == 0:
        return None, offsets, error
    src = _address(cols, "src4", "src6", n)
    dst = _address(cols, "dst4", "dst6", n)
    sport = _uint(cols["sport"]) if "sport" in cols else np.full(n, -1.0)
    dport = _uint(cols["dport"]) if "dport" in cols else np.full(n, -1.0)
    proto = _uint(cols["proto"]) if "proto" in cols else np.full(n, np.nan)
    tenant_src = _address(cols, "tsrc4", "tsrc6", n)
    tenant_dst = _address(cols, "tdst4", "tdst6", n)
    inner = (tenant_src != "") & (tenant_src != "0.0.0.0") & (tenant_src != "::")
    if inner.any():
        src = np.where(inner, tenant_src, src)
        dst = np.where(inner, tenant_dst, dst)
        if "tproto" in cols:
            proto = np.where(inner, _uint(cols["tproto"]), proto)
        sport = np.where(inner, _uint(cols["tsport"]) if "tsport" in cols else -1.0, sport)
        dport = np.where(inner, _uint(cols["tdport"]) if "tdport" in cols else -1.0, dport)
    start = _times(cols, "start", export_time, n)
    end = _times(cols, "end", export_time, n)
    proto_names = pd.Series(proto).map(lambda p: "" if np.isnan(p) else _PROTO_NAMES.get(int(p), str(int(p))))
    frame = pd.DataFrame({
        "ts": start,
        "src_ip": src, "src_port": sport, "dst_ip": dst, "dst_port": dport,
        "proto": proto_names.to_numpy(),
        "duration": end - start,
        "bytes_out": _uint(cols["bytes"]) if "bytes" in cols else (
            _uint(cols["bytes_total"]) if "bytes_total" in cols else np.full(n, np.nan)),
        "packets_out": _uint(cols["packets"]) if "packets" in cols else (
            _uint(cols["packets_total"]) if "packets_total" in cols else np.full(n, np.nan)),
    })
    return frame, offsets, error


# --- reading ----------------------------------------------------------------------------------

def _learn_templates(odid: int, set_body: bytes, set_id: int) -> str | None:
    records, error = _parse_templates(set_body, set_id == 3)
    domain = TEMPLATES.setdefault(odid, {})
    for template_id, template in records:
        if template is None:
            domain.pop(template_id, None)
        else:
            domain[template_id] = template
    return error


def _scan_folder_templates(path: str) -> None:
    """Learn the template sets of the other IPFIX files in `path`'s folder (once per file)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return
    for name in names:
        other = os.path.join(folder, name)
        if name.startswith(".") or os.path.abspath(other) == os.path.abspath(path) or not os.path.isfile(other):
            continue
        try:
            stat = os.stat(other)
            key = (other, stat.st_mtime, stat.st_size)
            if key in _SCANNED_FILES:
                continue
            _SCANNED_FILES.add(key)
            with open_binary(other) as fh:
                if not sniff(fh.read(SNIFF_BYTES)):   # whole first message: sniff walks its sets
                    continue
        except (OSError, EOFError, IngestError, lzma.LZMAError, zipfile.BadZipFile, zlib.error):
            continue
        for _offset, message in _iter_messages(other, None):
            odid = _HEADER.unpack_from(message)[4]
            for _pos, set_id, body in _iter_sets(message):
                if set_id in (2, 3):
                    _learn_templates(odid, body, set_id)


def read(path: str, quarantine: Quarantine, chunk_rows: int) -> Iterator[pd.DataFrame]:
    pending: list[tuple[int, int, int, float, bytes]] = []  # offset, odid, set id, export time, body
    pending_bytes = 0
    for offset, message in _iter_messages(path, quarantine):
        _version, _length, export_time, _seq, odid = _HEADER.unpack_from(message)
        for pos, set_id, body in _iter_sets(message):
            where = offset + pos
            if set_id == -1:
                quarantine.add(path, where, "set header runs past the end of its message", body)
            elif set_id in (2, 3):
                error = _learn_templates(odid, body, set_id)
                if error:
                    quarantine.add(path, where, error, body[:64])
            elif set_id >= 256:
                if pending_bytes + len(body) > _MAX_DEFERRED_BYTES:
                    yield from _decode_pending(path, quarantine, pending, chunk_rows, scan=False)
                    pending, pending_bytes = [], 0
                pending.append((where, odid, set_id, float(export_time), body))
                pending_bytes += len(body)
            else:
                quarantine.add(path, where, f"reserved set id {set_id}", body[:64])
    yield from _decode_pending(path, quarantine, pending, chunk_rows, scan=True)


def _decode_pending(path, quarantine, pending, chunk_rows, scan: bool) -> Iterator[pd.DataFrame]:
    if scan and any(set_id not in TEMPLATES.get(odid, {}) for _w, odid, set_id, _e, _b in pending):
        _scan_folder_templates(path)
    frames, rows = [], 0
    for where, odid, set_id, export_time, body in pending:
        template = TEMPLATES.get(odid, {}).get(set_id)
        if template is None:
            quarantine.add(path, where, f"template {set_id} not seen (observation domain {odid})", body[:64])
            continue
        if template.is_options:
            continue  # exporter metadata, not flows
        frame, offsets, error = decode_data_set(template, body, export_time)
        if error:
            quarantine.add(path, where, f"data set {set_id}: {error}", body[:64])
        if frame is None:
            continue
        record_offsets = where + 4 + offsets
        frame.insert(0, "event_id", [stable_event_id("ipfix", path, int(o)) for o in record_offsets])
        frames.append(frame)
        rows += len(frame)
        if rows >= chunk_rows:
            yield _conform(frames)
            frames, rows = [], 0
    if frames:
        yield _conform(frames)


def _conform(frames: list[pd.DataFrame]) -> pd.DataFrame:
    df = pd.concat(frames, ignore_index=True)
    df["source"] = NAME
    return schema.conform(df, "connections")


FORMATS = [
    SourceFormat(NAME, "connections", sniff, read,
                 "vSphere Distributed Switch IPFIX (v10) capture files; templates cached per domain"),
]
