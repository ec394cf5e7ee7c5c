"""CSV writers for ranked anomalies and the entity roll-up, safe to open in a spreadsheet.

Log text is attacker-controlled: a DNS name such as `=HYPERLINK("http://x")` would become a live
formula in Excel or LibreOffice. Every text cell starting with `=`, `+`, `-`, `@`, tab or CR gets
a leading single quote (OWASP "CSV injection"); numeric columns are written as numbers.
Rows end in CRLF (RFC 4180), so a CR or LF inside a cell is always quoted.

The bytes are those of `DataFrame.to_csv(index=False, lineterminator="\r\n")` (minimal quoting,
floats as numpy/Python repr, missing values empty, booleans True/False), but encoded with Arrow
string kernels (`write_arrow_csv`): pandas' writer formats cell by cell in Python and managed
about 30k rows/s on the ranked output. Each column's text comes from Arrow; the rows are joined
from it, quoted where needed, by the package's compiled routine (`_csv_rows.c`) when it was built,
else by Arrow's kernels: the same bytes. Column types Arrow cannot encode this way (datetimes,
mixed objects, ...) fall back to pandas.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from esxi_anomaly import compiled
from esxi_anomaly.atomic import atomic_path
from esxi_anomaly.compiled import POINTER, SIZE
from esxi_anomaly.report.layout import conform_ranked

FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def _neutralise_text(values: pd.Series) -> pd.Series:
    if isinstance(values.dtype, pd.CategoricalDtype):
        values = values.astype(object)
    if pd.api.types.is_string_dtype(values) and not pd.api.types.is_object_dtype(values):
        is_trigger = values.str.startswith(FORMULA_TRIGGERS)
    else:  # object or mixed columns: only real strings can carry a formula
        is_trigger = values.map(lambda v: isinstance(v, str) and v.startswith(FORMULA_TRIGGERS))
    is_trigger = is_trigger.fillna(False).astype(bool)
    if not is_trigger.any():
        return values
    return values.where(~is_trigger, "'" + values.astype(str))


def neutralise_formulas(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of `frame` whose text cells cannot start a spreadsheet formula; numeric columns untouched."""
    safe = frame.copy()
    for column in safe.columns:
        values = safe[column]
        if (pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values)
                or pd.api.types.is_datetime64_any_dtype(values)):
            continue
        safe[column] = _neutralise_text(values)
    return safe


def restore_formulas(values: pd.Series) -> pd.Series:
    """Text read back from a CSV written here, as it was before `neutralise_formulas`: the quote
    added before a formula trigger is removed. Non-text values are returned as they are. (A value
    that itself began with a quote and a trigger cannot be told apart; it loses its quote too.)"""
    if isinstance(values.dtype, pd.CategoricalDtype):
        values = values.astype(object)
    if not (pd.api.types.is_string_dtype(values) or pd.api.types.is_object_dtype(values)):
        return values
    try:
        escaped = values.str.match("'" + _TRIGGER[1:]).fillna(False).astype(bool)  # non-strings: kept
    except AttributeError:                                                     # no strings at all
        return values
    if not escaped.any():
        return values
    return values.where(~escaped, values.str.slice(1))


# -- Arrow encoder ----------------------------------------------------------------------------

_TEXT = pa.large_string()
_QUOTE_WHEN = ',"\r\n'                   # what makes Python's csv module (QUOTE_MINIMAL) quote a field
_QUOTE_BYTES = tuple(map(ord, _QUOTE_WHEN))
_TRIGGER = r"^[=+\-@\t\r]"              # FORMULA_TRIGGERS as a pattern


def _join(*parts) -> pa.Array:
    return pc.binary_join_element_wise(*(pa.scalar(p, _TEXT) if isinstance(p, str) else p for p in parts),
                                       pa.scalar("", _TEXT))


_TRIGGER_BYTE = np.zeros(256, dtype=bool)
_TRIGGER_BYTE[[ord(c) for c in FORMULA_TRIGGERS]] = True


def _offsets(text: pa.Array) -> np.ndarray:
    """The n+1 value offsets of a large_string array (into its data buffer)."""
    return np.frombuffer(text.buffers()[1], dtype=np.int64, count=len(text) + 1, offset=text.offset * 8)


def _data(text: pa.Array) -> memoryview:
    """The bytes of all values of a large_string array, back to back."""
    offsets = _offsets(text)
    buffer = text.buffers()[2]
    return memoryview(buffer)[offsets[0]:offsets[-1]] if buffer is not None else memoryview(b"")


def neutralise_arrow(text: pa.Array) -> pa.Array:
    """`text` (Arrow large_string) with a leading single quote on every value that starts a formula
    (decided on each value's first byte: all triggers are ASCII)."""
    if not len(text):
        return text
    offsets = _offsets(text)
    data = np.frombuffer(_data(text), dtype=np.uint8)
    starts, lengths = offsets[:-1] - offsets[0], np.diff(offsets)
    trigger = np.zeros(len(text), dtype=bool)
    nonempty = np.flatnonzero(lengths > 0)
    trigger[nonempty] = _TRIGGER_BYTE[data[starts[nonempty]]]
    if text.null_count:
        trigger &= pc.is_valid(text).to_numpy(zero_copy_only=False)
    if not trigger.any():
        return text
    return pc.if_else(pa.array(trigger), _join("'", text), text)


def _quoted(text: pa.Array) -> pa.Array:
    """Values holding a comma, quote, CR or LF in double quotes (quotes doubled), as the csv module
    does. The values that need it are found from where those bytes are in the column's data (numpy
    over the bytes, one pass per byte present: a regex match per value cost 4x more); a column where
    every value needs it (explanations) is quoted whole."""
    if not len(text):
        return text
    raw = _data(text)
    copy = raw.tobytes()
    present = [c for c in _QUOTE_BYTES if copy.find(c) >= 0]    # memchr: fast, and mostly just the comma
    if not present:
        return text
    data = np.frombuffer(raw, dtype=np.uint8)
    ends = _offsets(text)[1:] - _offsets(text)[0]
    needs = np.zeros(len(text), dtype=bool)
    for byte in present:   # the value holding each such byte
        needs[np.searchsorted(ends, np.flatnonzero(data == byte), side="right")] = True
    if text.null_count:
        needs &= pc.is_valid(text).to_numpy(zero_copy_only=False)
    doubled = _QUOTE_BYTES[1] in present
    if needs.all():
        return _join('"', pc.replace_substring(text, '"', '""') if doubled else text, '"')
    mask = pa.array(needs)
    chosen = text.filter(mask)
    return pc.replace_with_mask(text, mask, _join('"', pc.replace_substring(chosen, '"', '""') if doubled else chosen,
                                                  '"'))


# |v| where Arrow's shortest float text never uses an exponent and agrees with numpy's (`_float_text`)
_PLAIN_LOW, _PLAIN_HIGH = 1e-4, 1e10
_FEW_DISTINCT = 4    # a float column with at most 1/4 distinct values is formatted once per value
_SAMPLE = 1024


def _float_text(values: np.ndarray) -> pa.Array:
    """numpy's `astype(str)` of float64 (what pandas writes), NaN as "": Arrow's shortest round-trip
    digits, plus ".0" for integral values; values where numpy or Arrow write an exponent (outside
    1e-4 <= |v| < 1e10: tested over every magnitude) and infinities are formatted by numpy itself.
    A column of few distinct values (scores of rules, flags) is formatted once per value."""
    if len(values) > _SAMPLE:
        sample = values[:: len(values) // _SAMPLE]
        if len(np.unique(sample)) * _FEW_DISTINCT <= len(sample):
            encoded = pc.dictionary_encode(pa.array(values))     # NaN is one value: formatted as ""
            if len(encoded.dictionary) * _FEW_DISTINCT <= len(values):
                distinct = encoded.dictionary.to_numpy(zero_copy_only=False)
                return _float_text(distinct).take(encoded.indices)
    finite = np.isfinite(values)
    text = pc.cast(pa.array(values, from_pandas=True), _TEXT)       # NaN -> null -> ""
    integral = finite & (values == np.trunc(np.where(finite, values, 0.0)))
    if integral.any():
        text = _join(text, pc.if_else(pa.array(integral), pa.scalar(".0", _TEXT), pa.scalar("", _TEXT)))
    size = np.abs(values)
    slow = np.isinf(values) | ((size < _PLAIN_LOW) & (values != 0)) | (size >= _PLAIN_HIGH)
    if slow.any():
        text = pc.replace_with_mask(text, pa.array(slow), pa.array(values[slow].astype(str), _TEXT))
    return text


def _column_text(column: pa.Array | pa.ChunkedArray) -> pa.Array | None:
    """The CSV text of one column (before quoting), or None when this encoder does not know the type."""
    if isinstance(column, pa.ChunkedArray):   # one chunk (an output block): not copied
        column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    kind = column.type
    if pa.types.is_dictionary(kind):
        if not (pa.types.is_string(kind.value_type) or pa.types.is_large_string(kind.value_type)):
            return None
        column, kind = column.cast(_TEXT), _TEXT
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        text = column.cast(_TEXT)
    elif pa.types.is_boolean(kind):
        text = pc.if_else(column, pa.scalar("True", _TEXT), pa.scalar("False", _TEXT))
    elif pa.types.is_integer(kind):
        text = column.cast(_TEXT)
    elif pa.types.is_floating(kind):
        values = column.to_numpy(zero_copy_only=False)       # nulls come out as NaN, written ""
        if kind == pa.float64():
            text = _float_text(values)
        else:                                                # numpy's own rules for float32/16
            odd = values.astype(str)
            odd[np.isnan(values)] = ""
            text = pa.array(odd, _TEXT)
    elif pa.types.is_null(kind):
        text = pa.nulls(len(column), _TEXT)
    else:
        return None
    return pc.fill_null(text, "")


def _rows_routines():
    """The compiled `csv_rows_size` and `csv_rows_write` of `_csv_rows.c`, or None."""
    size = compiled.routine("esxi_anomaly.report._csv_rows", "csv_rows_size",
                            (SIZE, SIZE, POINTER, POINTER, POINTER, POINTER, POINTER))
    write = compiled.routine("esxi_anomaly.report._csv_rows", "csv_rows_write",
                             (SIZE, SIZE, POINTER, POINTER, POINTER, POINTER, POINTER, POINTER), SIZE)
    return (size, write) if size is not None and write is not None else None


_NO_TEXT = np.zeros(1, dtype=np.uint8)   # the data of a column whose buffer is absent (all values empty)


def _compiled_rows(columns: list, quote: list[bool], order: np.ndarray | None) -> np.ndarray | None:
    """The CSV rows of text `columns` (large_string, no nulls; `quote`: which may need quotes), in
    `order` (None: as they are), as one byte array built by the compiled routine; None without it,
    with nulls, or with a row twice in `order`."""
    routines = _rows_routines()
    if routines is None or any(c.null_count or c.type != _TEXT for c in columns):   # int64 offsets only
        return None
    size_rows, write_rows = routines
    n = len(columns[0])
    offsets = [_offsets(c) for c in columns]            # views of the Arrow buffers, kept alive here
    buffers = [c.buffers()[2] for c in columns]
    offset_at = np.array([o.ctypes.data for o in offsets], dtype=np.uint64)
    data_at = np.array([b.address if b is not None else _NO_TEXT.ctypes.data for b in buffers], dtype=np.uint64)
    quoted = np.array(quote, dtype=np.uint8)
    kinds = np.empty(n * len(columns), dtype=np.uint8)      # pass 1 writes every field of a quoted column
    row_bytes = np.empty(n, dtype=np.int64)
    size_rows(n, len(columns), offset_at.ctypes.data, data_at.ctypes.data, quoted.ctypes.data, kinds.ctypes.data,
              row_bytes.ctypes.data)
    if order is None:
        start = np.cumsum(row_bytes) - row_bytes
        size = int(row_bytes.sum())
    else:   # each row's place in the output: the rows of `order` one after another (others: -1, left out)
        positions = np.asarray(order, dtype=np.int64)
        if len(positions) and positions.min() < 0:   # as Arrow's take; past the end raises below
            raise IndexError(f"row positions below 0 in the order of {n} rows")
        placed = np.zeros(n, dtype=bool)
        placed[positions] = True
        if np.count_nonzero(placed) < len(positions):   # a row twice: Arrow's take writes that
            return None
        ends = np.cumsum(row_bytes[positions])
        start = np.full(n, -1, dtype=np.int64)
        start[positions] = ends - row_bytes[positions]
        size = int(ends[-1]) if len(ends) else 0
    out = np.empty(size, dtype=np.uint8)
    written = write_rows(n, len(columns), offset_at.ctypes.data, data_at.ctypes.data, quoted.ctypes.data,
                         kinds.ctypes.data, start.ctypes.data, out.ctypes.data)
    if written != len(out):
        raise RuntimeError(f"CSV rows: {written} bytes written, {len(out)} expected")
    return out


def arrow_csv_parts(table: pa.Table, header: bool = True, neutralise: bool = True,
                    order: np.ndarray | None = None) -> list | None:
    """`table` as CSV (CRLF rows): the bytes pandas' `to_csv` would write, as a list of byte
    buffers to write one after the other; text cells are formula-neutralised first unless
    `neutralise` is False. `order`: the rows in this order (positions), encoded first in the
    table's own order. None when a column type is not supported (use pandas then)."""
    columns, textual = [], []
    for name in table.column_names:
        text = _column_text(table[name])
        if text is None:
            return None
        kind = table[name].type
        is_text = pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_dictionary(kind)
        columns.append(neutralise_arrow(text) if neutralise and is_text else text)
        textual.append(is_text)          # numbers and booleans never need quotes
    single = len(columns) == 1           # the csv module quotes a lone empty field
    parts: list = []
    if header:
        names = _quoted(pa.array([str(n) for n in table.column_names], _TEXT))
        if single:
            names = pc.if_else(pc.equal(names, ""), pa.scalar('""', _TEXT), names)
        parts.append((",".join(names.to_pylist()) + "\r\n").encode("utf-8"))
    if not table.num_rows or not columns:
        return parts
    rows = None if single else _compiled_rows(columns, textual, order)
    if rows is not None:
        parts.append(memoryview(rows))
        return parts
    cells = [_quoted(c) if t else c for c, t in zip(columns, textual)]
    del columns   # each column's text is held once (a block's text is ~10x its rows' CSV otherwise)
    if single:
        cells[0] = pc.if_else(pc.equal(cells[0], ""), pa.scalar('""', _TEXT), cells[0])
    cells[-1] = _join(cells[-1], "\r\n")
    rows = pc.binary_join_element_wise(*cells, pa.scalar(",", _TEXT)) if len(cells) > 1 else cells[0]
    del cells
    if order is not None:
        rows = rows.take(pa.array(order))
    parts.append(_data(rows))
    return parts


def write_arrow_csv(table: pa.Table, fh: BinaryIO, header: bool = True, neutralise: bool = True,
                    order: np.ndarray | None = None) -> bool:
    """Append `arrow_csv_parts(...)` to the binary file `fh`; False (nothing written) when a
    column type is not supported."""
    parts = arrow_csv_parts(table, header, neutralise, order)
    if parts is None:
        return False
    for part in parts:
        fh.write(part)
    return True


def _arrow_table(frame: pd.DataFrame) -> pa.Table | None:
    """`frame` as an Arrow table whose columns this encoder handles, or None (then pandas writes)."""
    if not frame.columns.is_unique or any(not isinstance(c, str) for c in frame.columns):
        return None
    for column in frame.columns:
        dtype = frame[column].dtype
        if pd.api.types.is_object_dtype(dtype):
            if pd.api.types.infer_dtype(frame[column], skipna=True) not in ("string", "empty"):
                return None                                     # mixed objects: pandas formats them
        elif not (pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype)
                  or pd.api.types.is_string_dtype(dtype) or isinstance(dtype, pd.CategoricalDtype)):
            return None
    try:
        return pa.Table.from_pandas(frame, preserve_index=False)
    except (pa.ArrowException, ValueError, TypeError):
        return None


def write_frame_csv(frame: pd.DataFrame, fh: BinaryIO, header: bool = True) -> None:
    """Append `frame` to the binary file `fh` as formula-safe CSV (Arrow encoder, pandas fallback)."""
    table = _arrow_table(frame)
    if table is None or not write_arrow_csv(table, fh, header):
        fh.write(neutralise_formulas(frame).to_csv(index=False, header=header, lineterminator="\r\n")
                 .encode("utf-8"))


def _write(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    with atomic_path(path) as staging:
        with open(staging, "wb") as fh:
            write_frame_csv(frame, fh)
    return Path(path)


def write_csv(ranked: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the ranked anomalies to `path` as formula-safe CSV: the columns of `schema.RANKED` in
    its order and dtypes, extra columns after them (`layout.conform_ranked`); a frame that is not
    a ranked output is written as it is."""
    return _write(conform_ranked(ranked), path)


def write_entity_rollup_csv(rollup: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the per-entity roll-up (see `report.rollup.entity_rollup`) as formula-safe CSV."""
    return _write(rollup, path)
