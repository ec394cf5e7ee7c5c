"""Zeek conn.log and dns.log readers (TSV "ASCII" and JSON lines) producing canonical frames.

conn.log -> `connections` (one row per connection, `event_id` = Zeek uid).
dns.log  -> `dns_answers` in long form (one row per answer record; a response without answers keeps
one row with `answer == ""` and `answer_index == -1`). `ts` of a DNS row is the time of the
response: Zeek's `ts` (query) plus `rtt` when the response was seen.

TSV files are read header-driven (`#fields`, any column order, extra columns ignored, a new
`#fields` block mid-file is honoured) in byte pieces that end on a line break, read into reused
buffers and handed on as memoryviews (no copy); each piece is parsed by `pyarrow.csv` with native
types on Arrow's threads (the fast path) and, only when that fails, re-parsed as text with per-row
conversion so that each bad line goes to the quarantine with its line number and the rest of the
piece is kept. Pieces are parsed on two threads (pyarrow releases the GIL); a connection chunk
goes to pandas without copying its text (Arrow-backed `str` columns over the parsed buffers).
"""
from __future__ import annotations

import json
import lzma
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from esxi_anomaly import schema
from esxi_anomaly.ingest.base import RAW_KEEP, Quarantine, SourceFormat, open_binary, stable_event_id

MAX_LINE_BYTES = 16 << 20      # a longer line is quarantined unread (memory bound)
EST_LINE_BYTES = 128           # piece size = chunk_rows * this (for TSV)
PARSE_THREADS = 2

# Zeek field -> value kind. "time"/"float" -> float64, "port" -> int32 in 0..65535, "str" -> text.
CONN_SPEC = {
    "ts": "time", "uid": "str", "id.orig_h": "str", "id.orig_p": "port", "id.resp_h": "str",
    "id.resp_p": "port", "proto": "str", "duration": "float", "orig_bytes": "float",
    "resp_bytes": "float", "orig_pkts": "float", "resp_pkts": "float", "conn_state": "str",
    "local_orig": "str", "local_resp": "str", "history": "str",
}
_FLAGS = ("local_orig", "local_resp")   # JSON writes them as true/false, TSV as T/F
CONN_REQUIRED = ("ts", "id.orig_h", "id.resp_h")
DNS_SPEC = {
    "ts": "time", "uid": "str", "id.orig_h": "str", "id.orig_p": "port", "id.resp_h": "str",
    "id.resp_p": "port", "rtt": "float", "query": "str", "qtype_name": "str", "rcode_name": "str",
    "answers": "vec_str", "TTLs": "vec_float",
}
DNS_REQUIRED = ("ts", "id.orig_h")

_CONN_RENAME = {
    "uid": "event_id", "id.orig_h": "src_ip", "id.orig_p": "src_port", "id.resp_h": "dst_ip",
    "id.resp_p": "dst_port", "orig_bytes": "bytes_out", "resp_bytes": "bytes_in",
    "orig_pkts": "packets_out", "resp_pkts": "packets_in",
}
# Field sets that identify a log by its columns (the #path line is unreliable: the Slips labelled
# dns.log says "#path conn").
_CONN_MARKERS = {"conn_state", "orig_bytes", "resp_bytes", "history", "orig_pkts"}
_DNS_MARKERS = {"qtype_name", "answers", "rcode_name", "trans_id", "qtype", "TTLs"}
# qtypes whose non-address answers are records of that type (a name in an A response is a CNAME).
_NOT_PASSTHROUGH_QTYPES = ["A", "AAAA", "A6", "TXT", "*", "ANY", "CNAME", ""]
_ESCAPE = re.compile(r"\\x([0-9a-fA-F]{2})")
_ARROW_TYPE = {"time": pa.float64(), "float": pa.float64(), "port": pa.int32(), "str": pa.string(),
               "vec_str": pa.string(), "vec_float": pa.string()}


# --- sniffing -------------------------------------------------------------------------------

def _classify_fields(fields) -> str | None:
    keys = set(fields)
    if "ts" not in keys or "id.orig_h" not in keys:
        return None
    if "query" in keys and keys & _DNS_MARKERS:
        return "dns"
    if "id.resp_p" in keys and keys & _CONN_MARKERS and "query" not in keys:
        return "conn"
    return None


def _tsv_kind(head: bytes) -> str | None:
    header = _parse_header_lines(head.split(b"\n")[:64])
    return _classify_fields(header.fields) if header.fields else None


def _json_kind(head: bytes) -> str | None:
    lines = head.split(b"\n")
    if len(head) >= 4096 and not head.endswith(b"\n"):
        lines = lines[:-1]   # the last line of a full head is probably cut
    for raw in lines[:50]:
        raw = raw.strip()
        if not raw.startswith(b"{"):
            continue   # blank, or junk (NUL padding after a crash) that the reader quarantines
        try:
            obj = json.loads(raw)
        except ValueError:
            continue
        if isinstance(obj, dict):
            kind = _classify_fields(_flatten_id(obj).keys())
            if kind:
                return kind
    return None


def _sniffer(kind: str, style: str) -> Callable[[bytes], bool]:
    probe = _tsv_kind if style == "tsv" else _json_kind
    return lambda head: probe(head) == kind


# --- TSV header -----------------------------------------------------------------------------

@dataclass
class _Header:
    separator: bytes = b"\t"
    set_separator: str = ","
    empty_field: str = "(empty)"
    unset_field: str = "-"
    path: str = ""
    fields: list[str] = field(default_factory=list)


_KNOWN_DIRECTIVES = {"separator", "set_separator", "empty_field", "unset_field", "path", "open", "close",
                     "fields", "types"}


def _unescape_directive(value: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), value)


def _apply_directive(header: _Header, line: bytes) -> bool:
    """Update `header` from one '#' line; False if it is not a Zeek directive."""
    text = line.rstrip(b"\r\n").lstrip().decode("utf-8", "replace")
    if text.startswith("#separator "):
        sep = _unescape_directive(text[len("#separator "):])
        if len(sep) != 1:
            return False
        header.separator = sep.encode("latin-1", "replace")
        return True
    sep = header.separator.decode("latin-1")
    name, _, rest = text[1:].partition(sep)
    if name not in _KNOWN_DIRECTIVES:
        return False
    if name == "fields":
        header.fields = rest.split(sep) if rest else []
    elif name == "set_separator":
        header.set_separator = _unescape_directive(rest)
    elif name == "empty_field":
        header.empty_field = rest
    elif name == "unset_field":
        header.unset_field = rest
    elif name == "path":
        header.path = rest
    return True


def _parse_header_lines(lines: list[bytes]) -> _Header:
    """The header from the '#' lines among `lines` (a stray line before the header is tolerated)."""
    header = _Header()
    for line in lines:
        if line.lstrip().startswith(b"#"):
            _apply_directive(header, line)
    return header


# --- byte pieces ----------------------------------------------------------------------------

_READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError)


def _pieces(fh, block_bytes: int, path: str, spare: list) -> Iterator[tuple[int, bytes, int, int, list]]:
    """(first line number, buffer, start, end, quarantine entries): pieces of the file, each
    `buffer[start:end]` ending on a line break.

    Blocks are read straight into bytearrays taken from `spare` (the caller puts a buffer back
    once nothing refers to it any more), so a large file costs no allocation per block; the
    partial last line of a block is copied to the front of the next one. Lines longer than
    MAX_LINE_BYTES are quarantined without being held in memory; a read error (truncated gzip,
    ...) is quarantined and ends the file. Entries travel with the piece so that the quarantine
    stays in file order.
    """
    carry = b""
    line = 1
    skipping = False          # inside an over-long line
    bad: list = []
    while True:
        # a long partial line grows the read geometrically: linear cost, not quadratic
        size = len(carry) + max(block_bytes, len(carry))
        buf = _take_buffer(spare, size)
        kept = len(carry)
        buf[:kept] = carry
        try:
            got = fh.readinto(memoryview(buf)[kept:size])
        except _READ_ERRORS as exc:
            spare.append(buf)
            reason = f"file unreadable from here on ({type(exc).__name__}: {exc})"
            if carry:
                yield line, carry + b"\n", 0, len(carry) + 1, bad
                line, bad = line + 1, []
            yield line, b"", 0, 0, bad + [(line, reason, b"")]
            return
        if not got:
            spare.append(buf)
            break
        end = kept + got
        start = 0
        if skipping:
            nl = buf.find(b"\n", 0, end)
            if nl < 0:
                spare.append(buf)
                continue
            start = nl + 1
            line += 1
            skipping = False
        cut = buf.rfind(b"\n", start, end)
        if cut < 0:
            carry = bytes(buf[start:end])
            spare.append(buf)
            if len(carry) > MAX_LINE_BYTES:
                bad.append((line, f"line longer than {MAX_LINE_BYTES} bytes", carry[:RAW_KEEP]))
                skipping, carry = True, b""
            continue
        carry = bytes(buf[cut + 1:end])
        yield line, buf, start, cut + 1, bad
        bad = []
        line += buf.count(b"\n", start, cut + 1)
    if carry and not skipping:
        yield line, carry + b"\n", 0, len(carry) + 1, bad
    elif bad:
        yield line, b"", 0, 0, bad


def _take_buffer(spare: list, size: int) -> bytearray:
    """A free buffer of at least `size` bytes (never resized: memoryviews of it may live on)."""
    while spare:
        buf = spare.pop()
        if len(buf) >= size:
            return buf
    return bytearray(size)


_NOT_BLANK = re.compile(rb"[^ \t\r\n\x0b\x0c]")


def _is_blank(buf: bytes, start: int, end: int) -> bool:
    """`not buf[start:end].strip()` without the copy."""
    return _NOT_BLANK.search(buf, start, end) is None


def _directive_starts(buf: bytes, start: int, end: int) -> list[int]:
    """Offsets of the lines of `buf[start:end]` that start with '#' (after optional blanks)."""
    starts = []
    pos = buf.find(b"#", start, end)
    while pos >= 0:
        line_start = max(buf.rfind(b"\n", start, pos) + 1, start)
        if not buf[line_start:pos].strip(b" \t"):
            starts.append(line_start)
            nl = buf.find(b"\n", pos, end)
            if nl < 0:
                break
            pos = buf.find(b"#", nl, end)
        else:
            pos = buf.find(b"#", pos + 1, end)
    return starts


def _split_directives(buf: bytes, start: int, end: int) -> list[tuple[int, int, int, bool]]:
    """Split `buf[start:end]` at '#' lines: [(line offset, start, end, is_directive)]."""
    starts = _directive_starts(buf, start, end)
    if not starts:
        return [(0, start, end, False)]
    out: list[tuple[int, int, int, bool]] = []
    offset, pos = 0, start
    for first in starts:
        if first > pos:
            out.append((offset, pos, first, False))
            offset += buf.count(b"\n", pos, first)
        stop = buf.find(b"\n", first, end)
        stop = end if stop < 0 else stop + 1
        out.append((offset, first, stop, True))
        offset += 1
        pos = stop
    if pos < end:
        out.append((offset, pos, end, False))
    return out


def _normalise_line_ends(buf: bytes, start: int, end: int) -> tuple[bytes, int, int]:
    # pyarrow ends a row at a lone CR too, which would shift line numbers; Zeek itself writes a
    # CR inside a value as \x0d, so a lone CR becomes exactly that.
    if buf.find(b"\r", start, end) < 0:
        return buf, start, end
    piece = buf[start:end].replace(b"\r\n", b"\n").replace(b"\r", b"\\x0d")
    return piece, 0, len(piece)


# --- parsing one segment --------------------------------------------------------------------

@dataclass
class _Parsed:
    """Typed columns of the kept rows of one segment, their line numbers, and quarantine entries."""

    table: pa.Table
    lines: np.ndarray
    bad: list[tuple[int, str, bytes]]


PARSE_BLOCK_BYTES = 1 << 20   # pyarrow parses far faster in cache-sized blocks than in one


def _read_segment(seg: bytes, header: _Header, columns: list[str], types: dict, threads: bool, handler):
    try:
        return _read_blocks(seg, header, columns, types, threads, handler, PARSE_BLOCK_BYTES)
    except pa.ArrowInvalid as exc:
        if "straddl" not in str(exc):
            raise
        # a line longer than a block: parse the segment as one block
        return _read_blocks(seg, header, columns, types, threads, handler, len(seg) + 1)


def _read_blocks(seg, header, columns, types, threads, handler, block_size):
    return pacsv.read_csv(
        pa.BufferReader(seg),
        read_options=pacsv.ReadOptions(column_names=header.fields, use_threads=threads, block_size=block_size),
        parse_options=pacsv.ParseOptions(delimiter=header.separator.decode("latin-1"), quote_char=False,
                                         escape_char=False, ignore_empty_lines=False,
                                         invalid_row_handler=handler),
        convert_options=pacsv.ConvertOptions(column_types=types, include_columns=columns,
                                             null_values=[header.unset_field], strings_can_be_null=True,
                                             quoted_strings_can_be_null=False),
    )


def _parse_segment(seg, first_line: int, header: _Header, spec: dict, required: tuple,
                   text_type: pa.DataType = pa.string()) -> _Parsed:
    """Typed table of one segment (bytes or a memoryview, not copied on the fast path)."""
    columns = [c for c in spec if c in header.fields]
    fast_types = {c: text_type if _ARROW_TYPE[spec[c]] == pa.string() else _ARROW_TYPE[spec[c]] for c in columns}
    invalid: list = []

    def collect(row):
        invalid.append(row)
        return "skip"

    data = pa.py_buffer(seg)
    table = None
    if _is_utf8(data):   # undecodable bytes: straight to the careful path
        try:
            table = _read_segment(data, header, columns, fast_types, True, collect)
        except Exception:  # any parse/convert failure: the careful path finds the culprit rows
            table = None
    if table is not None and not invalid and _fast_path_clean(table, spec, required):
        return _Parsed(_blank_empty_strings(table, spec, header), first_line + np.arange(table.num_rows), [])
    return _parse_segment_carefully(bytes(seg), first_line, header, spec, required, columns, text_type)


def _is_utf8(data: pa.Buffer) -> bool:
    """Whether the bytes are valid UTF-8 (Arrow's validator: no copy, outside the GIL)."""
    offsets = pa.py_buffer(np.array([0, data.size], np.int64))
    try:
        pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, data]).cast(pa.large_string())
    except pa.ArrowInvalid:
        return False
    return True


def _fast_path_clean(table: pa.Table, spec: dict, required: tuple) -> bool:
    for col in required:
        if col not in table.column_names or table[col].null_count:
            return False
        if spec[col] == "str" and table.num_rows and pc.any(pc.equal(table[col], "")).as_py():
            return False
    for col in table.column_names:
        if spec[col] == "port" and table.num_rows:
            lo_hi = pc.min_max(table[col])
            if lo_hi["min"].as_py() is not None and (lo_hi["min"].as_py() < 0 or lo_hi["max"].as_py() > 65535):
                return False
        if spec[col] == "time" and table.num_rows and not pc.all(pc.is_finite(table[col])).as_py():
            return False
    return True


def _blank_empty_strings(table: pa.Table, spec: dict, header: _Header) -> pa.Table:
    """Zeek writes an empty string as the empty-field marker: make it ""."""
    for i, col in enumerate(table.column_names):
        if spec[col] == "str":
            arr = table[col]
            hit = pc.equal(arr, header.empty_field)
            if pc.any(hit).as_py():
                table = table.set_column(i, col, pc.if_else(hit, "", arr))
    return table


def _parse_segment_carefully(seg, first_line, header, spec, required, columns,
                             text_type: pa.DataType = pa.string()) -> _Parsed:
    """Text parse of a segment that failed the fast path: per-row conversion, per-row quarantine.

    Blank (whitespace-only) lines carry no record and are skipped; every other line is either
    kept or quarantined with its line number and reason.
    """
    bad: list[tuple[int, str, bytes]] = []
    seg = _blank_undecodable_lines(seg, first_line, bad)
    invalid: list = []

    def collect(row):
        invalid.append((row.number, row.actual_columns, row.expected_columns, row.text))
        return "skip"

    table = _read_segment(seg, header, columns, {c: pa.binary() for c in columns}, False, collect)
    n = table.num_rows
    skipped = []
    for number, actual, expected, text in invalid:
        skipped.append(number)
        if text.strip(" \t\r\n\x0b\x0c"):   # ASCII blanks only, as bytes.strip()
            bad.append((first_line + number - 1, f"{actual} fields, expected {expected}",
                        text.encode("utf-8", "surrogateescape")))
    lines = first_line + _kept_row_lines(np.asarray(sorted(skipped), dtype=np.int64), n)

    reason = np.full(n, "", dtype=object)
    out = {}
    for col in columns:
        raw = table[col].combine_chunks() if n else pa.array([], pa.binary())
        text = _to_utf8(raw, reason, col)
        kind = spec[col]
        if kind in ("time", "float", "port"):
            values, failed = _to_number(text, kind)
            _note(reason, failed, f"{col} is not a {'port number' if kind == 'port' else 'number'}")
            out[col] = values
        else:
            out[col] = text.cast(text_type)
    for col in required:
        if col not in out:
            _note(reason, np.ones(n, bool), f"{col} is not in #fields")
            continue
        missing = pc.is_null(out[col]).to_numpy(zero_copy_only=False)
        if spec[col] == "str":
            missing |= pc.fill_null(pc.equal(out[col], ""), True).to_numpy(zero_copy_only=False)
        _note(reason, missing, f"{col} is unset")
    failed_rows = np.flatnonzero(reason != "")
    if len(failed_rows):
        texts = seg.split(b"\n")
        for row in failed_rows:
            line_no = int(lines[row])
            raw_line = texts[line_no - first_line]
            if raw_line.strip():
                bad.append((line_no, str(reason[row]), raw_line))
    keep = reason == ""
    table = pa.table(out) if out else pa.table({})
    if n:
        table = _blank_empty_strings(table.filter(pa.array(keep)), spec, header)
    return _Parsed(table, lines[keep], bad)


def _blank_undecodable_lines(seg: bytes, first_line: int, bad: list) -> bytes:
    """Quarantine lines that are not UTF-8 and blank them (keeping the line count)."""
    try:
        seg.decode("utf-8")
        return seg
    except UnicodeDecodeError:
        pass
    lines = seg.split(b"\n")
    for i, line in enumerate(lines):   # only for a segment that holds undecodable bytes
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            bad.append((first_line + i, "line is not valid UTF-8", line))
            lines[i] = b""
    return b"\n".join(lines)


def _kept_row_lines(skipped_sorted: np.ndarray, n_kept: int) -> np.ndarray:
    """0-based line offsets of the kept rows, given the 1-based row numbers pyarrow skipped."""
    k = np.arange(n_kept, dtype=np.int64)
    if not len(skipped_sorted):
        return k
    # kept row k sits after every skipped row s_i with (s_i - 1) - i <= k
    adjusted = (skipped_sorted - 1) - np.arange(len(skipped_sorted))
    return k + np.searchsorted(adjusted, k, side="right")


def _note(reason: np.ndarray, mask: np.ndarray, text: str) -> None:
    reason[mask & (reason == "")] = text


def _to_utf8(raw: pa.Array, reason: np.ndarray, col: str) -> pa.Array:
    try:
        return raw.cast(pa.string())
    except pa.ArrowInvalid:
        values = raw.to_pylist()
        fixed = []
        for i, v in enumerate(values):      # only for a segment that holds undecodable bytes
            if v is None:
                fixed.append(None)
                continue
            try:
                fixed.append(v.decode("utf-8"))
            except UnicodeDecodeError:
                fixed.append(None)
                if not reason[i]:
                    reason[i] = f"{col} is not valid UTF-8"
        return pa.array(fixed, pa.string())


def _to_number(text: pa.Array, kind: str) -> tuple[pa.Array, np.ndarray]:
    """Numbers from text (nulls stay null) and the mask of values that are not valid numbers."""
    series = pd.Series(text.to_pandas(), dtype="str") if len(text) else pd.Series([], dtype="str")
    numbers = pd.to_numeric(series.str.strip().where(series.str.strip() != "", "x"), errors="coerce")
    given = series.notna().to_numpy()
    values = numbers.to_numpy(dtype="float64", na_value=np.nan)
    failed = given & ~np.isfinite(values)
    if kind == "port":
        failed |= given & np.isfinite(values) & ((values < 0) | (values > 65535) | (values != np.floor(values)))
        values = np.where(given & ~failed, values, np.nan)
        return pa.array(values, pa.float64(), from_pandas=True).cast(pa.int32()), failed
    values = np.where(given & ~failed, values, np.nan)
    return pa.array(values, pa.float64(), from_pandas=True), failed


# --- canonical conversion -------------------------------------------------------------------

def _unescape_one(value: str) -> str:
    out = bytearray()
    pos = 0
    for m in _ESCAPE.finditer(value):
        out += value[pos:m.start()].encode("utf-8", "surrogatepass")
        out.append(int(m.group(1), 16))
        pos = m.end()
    out += value[pos:].encode("utf-8", "surrogatepass")
    return out.decode("utf-8", "backslashreplace")


def _unescape(arr: pa.Array) -> pa.Array:
    """Decode Zeek's \\xNN escapes (only the few values that hold one are touched in Python)."""
    if len(arr) == 0:
        return arr
    mask = pc.fill_null(pc.match_substring(arr, "\\x"), False)
    if not pc.any(mask).as_py():
        return arr
    idx = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
    decoded = [_unescape_one(v) for v in arr.take(pa.array(idx)).to_pylist()]
    return pc.replace_with_mask(arr, mask, pa.array(decoded, pa.string()))


def _column(table: pa.Table, name: str, kind: str, n: int) -> pa.Array:
    if name in table.column_names:
        arr = table[name]
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.chunk(0) if arr.num_chunks == 1 else arr.combine_chunks()
        if kind == "str" and arr.null_count:
            return pc.fill_null(arr, "")
        return arr
    if kind == "str":
        return _const(n, "")
    if kind == "port":
        return pa.array(np.full(n, -1, np.int32))
    return pa.array(np.full(n, np.nan))


def _const(n: int, value: str, type_: pa.DataType = pa.string()) -> pa.Array:
    return pc.fill_null(pa.nulls(n, type_), pa.scalar(value, type_))


def _event_ids(uid: pa.Array, lines: np.ndarray, path: str) -> pa.Array:
    """The Zeek uid, or a stable id from file + line where the uid is unset."""
    missing = pc.equal(uid, "")
    if not pc.any(missing).as_py():
        return uid
    if isinstance(uid, pa.ChunkedArray):
        uid, missing = uid.combine_chunks(), missing.combine_chunks()
    idx = np.flatnonzero(missing.to_numpy(zero_copy_only=False))
    made = [stable_event_id("zeek", path, int(ln)) for ln in lines[idx]]
    return pc.replace_with_mask(uid, missing, pa.array(made, uid.type))


def _to_pandas(columns: dict[str, pa.Array], kind: str) -> pd.DataFrame:
    df = pa.table(columns).to_pandas()
    return schema.conform(df, kind)


_STR_DTYPE = pd.StringDtype("pyarrow", na_value=np.nan)   # pandas' "str" (schema.STR)
_STR_MAPPER = {pa.large_string(): _STR_DTYPE, pa.string(): _STR_DTYPE}.get


def _arrow_to_canonical(columns: dict, kind: str) -> pd.DataFrame:
    """Canonical frame straight from Arrow columns that already hold canonical values (no nulls in
    text or ints): text stays in its Arrow buffers (large_string, not copied), numbers become numpy
    columns without consolidation. Falls back to `schema.conform` if a dtype is not canonical."""
    df = pa.table(columns).to_pandas(types_mapper=_STR_MAPPER, split_blocks=True, self_destruct=True)
    spec = schema.FRAMES[kind]
    if list(df.columns) != list(spec) or any(str(df[c].dtype) != d for c, d in spec.items()):
        return schema.conform(df, kind)
    return df


def _text(table: pa.Table, name: str, n: int):
    """A text column with unset values as "" (Arrow chunks kept)."""
    if name not in table.column_names:
        return _const(n, "", pa.large_string())
    arr = table[name]
    return pc.fill_null(arr, pa.scalar("", arr.type)) if arr.null_count else arr


def _conn_frame(parsed: _Parsed, source: str, path: str) -> pd.DataFrame:
    t, n = parsed.table, parsed.table.num_rows

    def number(name: str):
        return t[name] if name in t.column_names else pa.array(np.full(n, np.nan))

    def port(name: str):
        if name not in t.column_names:
            return pa.array(np.full(n, -1, np.int32))
        arr = t[name]
        return pc.fill_null(arr, -1) if arr.null_count else arr

    cols = {
        "event_id": _event_ids(_text(t, "uid", n), parsed.lines, path),
        "ts": number("ts"),
        "src_ip": _text(t, "id.orig_h", n),
        "src_port": port("id.orig_p"),
        "dst_ip": _text(t, "id.resp_h", n),
        "dst_port": port("id.resp_p"),
        "proto": _text(t, "proto", n),
    }
    for zeek_name in ("duration", "orig_bytes", "resp_bytes", "orig_pkts", "resp_pkts"):
        cols[_CONN_RENAME.get(zeek_name, zeek_name)] = number(zeek_name)
    cols["conn_state"] = _text(t, "conn_state", n)
    for flag in _FLAGS:
        cols[flag] = _text(t, flag, n)
    cols["history"] = _text(t, "history", n)
    blank = _const(n, "", pa.large_string())
    cols["process"] = blank
    cols["esxi_host"] = blank
    cols["source"] = _const(n, source, pa.large_string())
    return _arrow_to_canonical(cols, "connections")


def _split_vectors(parsed: _Parsed, header: _Header, path: str) -> tuple[_Parsed, pa.Array, pa.Array]:
    """TSV answers/TTLs text -> list arrays; rows whose TTLs are not numbers are quarantined."""
    t, n = parsed.table, parsed.table.num_rows

    def as_list(name: str) -> pa.Array:
        arr = _column(t, name, "vec", n) if name in t.column_names else pa.nulls(n, pa.string())
        arr = pc.if_else(pc.equal(arr, header.empty_field), pa.scalar(None, pa.string()), arr)
        return pc.split_pattern(arr, header.set_separator) if len(header.set_separator) else \
            pc.split_pattern(arr, ",")

    answers = as_list("answers")
    ttl_text = as_list("TTLs")
    flat = pc.list_flatten(ttl_text)
    try:
        ttl_values = flat.cast(pa.float64())
        bad_rows = np.zeros(n, bool)
    except pa.ArrowInvalid:
        values, failed = _to_number(flat, "float")
        ttl_values = values
        bad_rows = np.zeros(n, bool)
        parents = pc.list_parent_indices(ttl_text).to_numpy()
        bad_rows[parents[failed]] = True
    ttls = pa.ListArray.from_arrays(_offsets(ttl_text), ttl_values)
    if bad_rows.any():
        idx = np.flatnonzero(bad_rows)
        for i in idx:
            parsed.bad.append((int(parsed.lines[i]), "TTLs are not numbers",
                               str(ttl_text[int(i)].as_py()).encode()))
        keep = pa.array(~bad_rows)
        parsed = _Parsed(t.filter(keep), parsed.lines[~bad_rows], parsed.bad)
        answers, ttls = answers.filter(keep), ttls.filter(keep)
    return parsed, answers, ttls


def _offsets(lists: pa.Array) -> pa.Array:
    """Offsets of a list array with nulls turned into empty lists."""
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False).astype(np.int32)
    return pa.array(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32))


def _dns_frame(parsed: _Parsed, answers: pa.Array, ttls: pa.Array, source: str, path: str) -> pd.DataFrame:
    """Explode one row per response into one row per answer record (vectorised)."""
    t, n = parsed.table, parsed.table.num_rows
    lengths = pc.fill_null(pc.list_value_length(answers), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(answers)
    parent = np.repeat(np.arange(n, dtype=np.int64), lengths)
    starts = np.cumsum(lengths) - lengths
    index = np.arange(len(parent), dtype=np.int64) - starts[parent]

    ttl_len = pc.fill_null(pc.list_value_length(ttls), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    ttl_flat = pc.list_flatten(ttls).to_numpy(zero_copy_only=False).astype(np.float64)
    ttl_start = np.cumsum(ttl_len) - ttl_len
    aligned = index < ttl_len[parent]
    pos = np.where(aligned, ttl_start[parent] + index, 0)
    ttl = np.where(aligned, ttl_flat[pos] if len(ttl_flat) else np.nan, np.nan)

    qtype = _column(t, "qtype_name", "str", n)
    flat = _unescape(pc.fill_null(flat, ""))
    q_parent = qtype.take(pa.array(parent))
    is_v4 = pc.match_substring_regex(flat, r"^\d{1,3}(\.\d{1,3}){3}$")
    is_v6 = pc.match_substring_regex(flat, r"^[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*$")
    is_txt = pc.starts_with(flat, "TXT ")
    passthrough = pc.invert(pc.is_in(q_parent, value_set=pa.array(_NOT_PASSTHROUGH_QTYPES)))
    rtype = pc.if_else(is_v4, "A", pc.if_else(is_v6, "AAAA", pc.if_else(
        is_txt, "TXT", pc.if_else(passthrough, q_parent, "CNAME"))))
    answer = pc.if_else(is_txt, pc.replace_substring_regex(flat, r"^TXT \d+ ?", "", max_replacements=1), flat)

    no_answer = np.flatnonzero(lengths == 0)
    rows = np.concatenate([parent, no_answer])
    order = np.argsort(rows, kind="stable")
    rows = rows[order]
    take = pa.array(rows)
    k = len(no_answer)

    ts = _column(t, "ts", "time", n).to_numpy(zero_copy_only=False)
    rtt = _column(t, "rtt", "float", n).to_numpy(zero_copy_only=False)
    response_ts = ts + np.nan_to_num(rtt, nan=0.0)
    cols = {
        "event_id": _event_ids(_column(t, "uid", "str", n), parsed.lines, path).take(take),
        "ts": response_ts[rows],
        "client_ip": _column(t, "id.orig_h", "str", n).take(take),
        "resolver_ip": _column(t, "id.resp_h", "str", n).take(take),
        "query": _unescape(_column(t, "query", "str", n)).take(take),
        "rtype": pa.concat_arrays([rtype.cast(pa.string()), qtype.take(pa.array(no_answer, pa.int64()))]).take(
            pa.array(order)),
        "answer": pa.concat_arrays([answer.cast(pa.string()), _const(k, "")]).take(pa.array(order)),
        "answer_index": np.minimum(np.concatenate([index, np.full(k, -1)])[order], 32767).astype(np.int16),
        "ttl": np.concatenate([ttl, np.full(k, np.nan)])[order],
        "rcode": _column(t, "rcode_name", "str", n).take(take),
        "source": _const(len(rows), source),
    }
    return _to_pandas(cols, "dns_answers")


# --- TSV reader -----------------------------------------------------------------------------

def _tsv_reader(kind: str, source: str):
    spec, required = (CONN_SPEC, CONN_REQUIRED) if kind == "conn" else (DNS_SPEC, DNS_REQUIRED)
    text_type = pa.large_string() if kind == "conn" else pa.string()

    def convert(segments, path):
        """Parse and convert the segments of one piece (runs on a worker thread)."""
        frames, bad = [], list(segments[0])
        runs: list[tuple[_Header, list[_Parsed]]] = []     # consecutive segments of one header
        for first_line, seg, header in segments[1:]:
            try:
                parsed = _parse_segment(seg, first_line, header, spec, required, text_type)
                bad.extend(parsed.bad)
                parsed.bad = []
                if runs and runs[-1][0] == header:
                    runs[-1][1].append(parsed)
                else:
                    runs.append((header, [parsed]))
            except Exception as exc:  # never lose a piece silently, never take the run down
                _unreadable(bad, first_line, seg, exc)
        for header, parts in runs:
            try:
                parsed = _concat_parsed(parts)
                if kind == "conn":
                    frame = _conn_frame(parsed, source, path)
                else:
                    parsed, answers, ttls = _split_vectors(parsed, header, path)
                    frame = _dns_frame(parsed, answers, ttls, source, path)
                bad.extend(parsed.bad)
                frames.append(frame)
            except Exception as exc:
                first = int(parts[0].lines[0]) if len(parts[0].lines) else 0
                bad.append((first, f"rows from line {first} unreadable ({type(exc).__name__}: {exc})", b""))
        bad.sort(key=lambda entry: entry[0])
        return frames, bad

    def read(path: str, quarantine: Quarantine, chunk_rows: int) -> Iterator[pd.DataFrame]:
        block_bytes = max(4096, int(chunk_rows) * EST_LINE_BYTES)
        header = _Header()
        spare: list = []          # read buffers nothing refers to any more
        with open_binary(path) as fh, ThreadPoolExecutor(PARSE_THREADS) as pool:
            pending = []
            for first_line, buf, start, end, bad in _pieces(fh, block_bytes, path, spare):
                block = buf
                segments: list = [bad]
                buf, start, end = _normalise_line_ends(buf, start, end)
                view = memoryview(buf)
                for offset, a, b, is_directive in _split_directives(buf, start, end):
                    if is_directive:
                        line = bytes(view[a:b])
                        if line.strip() and not _apply_directive(header, line):
                            bad.append((first_line + offset, "unknown '#' line", line))
                        continue
                    if _is_blank(buf, a, b):
                        continue
                    if not header.fields:
                        _quarantine_lines(bad, first_line + offset, bytes(view[a:b]), "data before the #fields header")
                        continue
                    segments.append((first_line + offset, view[a:b], replace(header, fields=list(header.fields))))
                del view
                pending.append((pool.submit(convert, segments, path), block))
                del segments
                while len(pending) > PARSE_THREADS:
                    yield from _drain(*pending.pop(0), path, quarantine, spare)
            while pending:
                yield from _drain(*pending.pop(0), path, quarantine, spare)

    return read


def _unreadable(bad: list, first_line: int, seg, exc: Exception) -> None:
    seg = bytes(seg)
    last = first_line + seg.count(b"\n") - 1
    bad.append((first_line, f"lines {first_line}..{last} unreadable ({type(exc).__name__}: {exc})", seg[:RAW_KEEP]))


def _concat_parsed(parts: list[_Parsed]) -> _Parsed:
    """One _Parsed from consecutive ones of the same header (Arrow chunks, not copied)."""
    if len(parts) == 1:
        return parts[0]
    tables = [p.table for p in parts]
    target = tables[0].schema
    if any(t.schema != target for t in tables[1:]):
        target = pa.unify_schemas([t.schema for t in tables], promote_options="permissive")
        tables = [t.cast(target) for t in tables]
    return _Parsed(pa.concat_tables(tables), np.concatenate([p.lines for p in parts]),
                   [e for p in parts for e in p.bad])


def _quarantine_lines(bad: list, first_line: int, seg: bytes, reason: str) -> None:
    for i, line in enumerate(seg.split(b"\n")):
        if line.strip():
            bad.append((first_line + i, reason, line))


def _drain(future, block, path: str, quarantine: Quarantine, spare: list) -> Iterator[pd.DataFrame]:
    frames, bad = future.result()
    # the worker is done with the block (Arrow copied what it kept): its buffer can be reused
    if isinstance(block, bytearray):
        spare.append(block)
    for line, reason, raw in bad:
        quarantine.add(path, line, reason, raw)
    for frame in frames:
        if len(frame):
            yield frame


# --- JSON reader ----------------------------------------------------------------------------

def _flatten_id(obj: dict) -> dict:
    """Nested {"id": {"orig_h": ...}} (some exporters) -> dotted keys as Zeek writes them."""
    ident = obj.get("id")
    if isinstance(ident, dict):
        obj = dict(obj)
        del obj["id"]
        for key, value in ident.items():
            obj[f"id.{key}"] = value
    return obj


def _json_lines(fh, path: str, quarantine: Quarantine) -> Iterator[tuple[int, bytes]]:
    """(line number, line) with over-long lines quarantined and read errors ending the file."""
    number = 0
    while True:
        try:
            raw = fh.readline(MAX_LINE_BYTES + 1)
        except _READ_ERRORS as exc:
            quarantine.add(path, number + 1, f"file unreadable from here on ({type(exc).__name__}: {exc})", b"")
            return
        if not raw:
            return
        number += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            quarantine.add(path, number, f"line longer than {MAX_LINE_BYTES} bytes", raw[:RAW_KEEP])
            try:
                while raw and not raw.endswith(b"\n"):
                    raw = fh.readline(MAX_LINE_BYTES + 1)
            except _READ_ERRORS:
                return
            continue
        yield number, raw


def _json_values(records: list[dict], name: str, kind: str) -> tuple[pa.Array, np.ndarray]:
    """Typed column from JSON values and the mask of values of the wrong type."""
    values = [r.get(name) for r in records]
    n = len(values)
    bad = np.zeros(n, bool)
    if kind in ("time", "float", "port"):
        out = np.full(n, np.nan)
        iso = []
        for i, v in enumerate(values):
            tv = type(v)
            if tv is float or tv is int:
                out[i] = v
            elif v is None:
                continue
            elif kind == "time" and tv is str:
                iso.append(i)
            else:
                bad[i] = True
        if iso:
            stamps = pd.to_datetime(pd.Series([values[i] for i in iso], dtype="str"), format="ISO8601",
                                    utc=True, errors="coerce")
            secs = (stamps - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy()
            out[iso] = secs
            bad[np.asarray(iso)[np.isnan(secs)]] = True
        given = np.array([v is not None for v in values], bool) & ~bad
        bad |= given & ~np.isfinite(out)
        if kind == "port":
            bad |= given & np.isfinite(out) & ((out < 0) | (out > 65535) | (out != np.floor(out)))
            out = np.where(bad, np.nan, out)
            return pa.array(out, pa.float64(), from_pandas=True).cast(pa.int32()), bad
        return pa.array(np.where(bad, np.nan, out), pa.float64(), from_pandas=True), bad
    if kind == "flag":   # a bool as Zeek's TSV writes it (T/F); T/F text kept
        flags = {True: "T", False: "F", "T": "T", "F": "F", None: None}
        clean = [flags.get(v) if type(v) in (bool, str) or v is None else None for v in values]
        bad = np.array([v is not None and c is None for v, c in zip(values, clean)], bool)
        return pa.array(clean, pa.string()), bad
    if kind == "str":
        clean = []
        for i, v in enumerate(values):
            if v is None or type(v) is str:
                clean.append(v)
            else:
                clean.append(None)
                bad[i] = True
        return pa.array(clean, pa.string()), bad
    element = str if kind == "vec_str" else (int, float)
    clean = []
    for i, v in enumerate(values):
        if v is None:
            clean.append(None)
        elif type(v) is list and all(type(x) in (element if isinstance(element, tuple) else (element,))
                                     for x in v):
            clean.append(v)
        else:
            clean.append(None)
            bad[i] = True
    arrow_type = pa.list_(pa.string()) if kind == "vec_str" else pa.list_(pa.float64())
    return pa.array(clean, arrow_type), bad


def _json_reader(kind: str, source: str):
    spec, required = (CONN_SPEC, CONN_REQUIRED) if kind == "conn" else (DNS_SPEC, DNS_REQUIRED)

    def convert(records, lines, raws, path, quarantine):
        n = len(records)
        reason = np.full(n, "", dtype=object)
        cols = {}
        for name, vkind in spec.items():
            values, bad = _json_values(records, name, "flag" if name in _FLAGS else vkind)
            _note(reason, bad, f"{name} has the wrong type")
            cols[name] = values
        for name in required:
            _note(reason, pc.is_null(cols[name]).to_numpy(zero_copy_only=False), f"{name} is unset")
        for i in np.flatnonzero(reason != ""):
            quarantine.add(path, int(lines[i]), str(reason[i]), raws[i])
        keep = reason == ""
        mask = pa.array(keep)
        table = pa.table({k: v for k, v in cols.items() if not k.startswith(("answers", "TTLs"))}).filter(mask)
        parsed = _Parsed(table, np.asarray(lines, np.int64)[keep], [])
        if kind == "conn":
            return _conn_frame(parsed, source, path)
        return _dns_frame(parsed, cols["answers"].filter(mask), cols["TTLs"].filter(mask), source, path)

    def read(path: str, quarantine: Quarantine, chunk_rows: int) -> Iterator[pd.DataFrame]:
        records, lines, raws = [], [], []
        with open_binary(path) as fh:
            for number, raw in _json_lines(fh, path, quarantine):
                text = raw.strip()
                if not text:
                    continue
                try:
                    obj = json.loads(text)
                except (ValueError, RecursionError):
                    quarantine.add(path, number, "invalid JSON", text)
                    continue
                if not isinstance(obj, dict):
                    quarantine.add(path, number, "not a JSON object", text)
                    continue
                records.append(_flatten_id(obj))
                lines.append(number)
                raws.append(text)
                if len(records) >= chunk_rows:
                    yield convert(records, lines, raws, path, quarantine)
                    records, lines, raws = [], [], []
        if records:
            yield convert(records, lines, raws, path, quarantine)

    return read


FORMATS = [
    SourceFormat("zeek_conn_tsv", "connections", _sniffer("conn", "tsv"), _tsv_reader("conn", "zeek_conn_tsv"),
                 "Zeek conn.log, TSV (ASCII) with #fields header"),
    SourceFormat("zeek_conn_json", "connections", _sniffer("conn", "json"),
                 _json_reader("conn", "zeek_conn_json"), "Zeek conn.log, JSON lines"),
    SourceFormat("zeek_dns_tsv", "dns_answers", _sniffer("dns", "tsv"), _tsv_reader("dns", "zeek_dns_tsv"),
                 "Zeek dns.log, TSV (ASCII) with #fields header"),
    SourceFormat("zeek_dns_json", "dns_answers", _sniffer("dns", "json"), _json_reader("dns", "zeek_dns_json"),
                 "Zeek dns.log, JSON lines"),
]
