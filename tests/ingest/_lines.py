"""Shared by the parsers' property tests: read a list of lines through a reader, as a file."""
from __future__ import annotations

import os
import tempfile

import pandas as pd

from esxi_anomaly import schema
from esxi_anomaly.ingest import IngestError

# A file starting with one of these is opened as that container, whatever follows.
CONTAINER_MAGIC = (b"PK\x03\x04", b"\x1f\x8b", b"BZh", b"\xfd7zXZ")


def read_lines(lines: list[str], read_all, kind: str) -> pd.DataFrame:
    """Write `lines` to a temporary file and read it with `read_all(path)`; a file the format
    rejects as a whole reads as an empty canonical frame of `kind`."""
    fd, path = tempfile.mkstemp(suffix=".log")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogatepass") as fh:
            fh.write("\n".join(lines) + "\n")
        try:
            return read_all(path)
        except IngestError:
            return schema.empty(kind)
    finally:
        os.unlink(path)


def read_through(read, path, kind: str, quarantine=None, chunk_rows: int = 1000) -> pd.DataFrame:
    """All chunks a format's `read` yields for `path`, concatenated and validated as `kind`."""
    from esxi_anomaly.ingest import Quarantine

    quarantine = quarantine if quarantine is not None else Quarantine()
    chunks = list(read(str(path), quarantine, chunk_rows))
    out = pd.concat(chunks, ignore_index=True) if chunks else schema.empty(kind)
    schema.validate(out, kind)
    return out


def mutate(line: bytes, data, separator: bytes, max_pos: int) -> bytes:
    """Up to 4 random edits of `line` (hypothesis `data`): delete a byte, insert 1-3 random bytes,
    or insert the format's field `separator`."""
    from hypothesis import strategies as st

    ops = data.draw(st.lists(st.tuples(st.sampled_from(["del", "ins", "sep"]), st.integers(0, max_pos),
                                       st.binary(min_size=1, max_size=3)), min_size=1, max_size=4))
    out = bytearray(line)
    for op, pos, blob in ops:
        pos = pos % (len(out) + 1)
        if op == "del" and out:
            del out[pos % len(out)]
        elif op == "ins":
            out[pos:pos] = blob
        else:
            out[pos:pos] = separator
    return bytes(out)
