"""Shared by the parsers' property tests: read a list of lines through a reader, as a file."""
from __future__ import annotations

import os
import tempfile

import pandas as pd

from esxi_anomaly import schema
from esxi_anomaly.ingest import IngestError


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
