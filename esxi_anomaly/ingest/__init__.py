"""Read real logs into the canonical frames of `esxi_anomaly.schema`.

Formats are chosen by content, never by file name; gzip, bz2 and xz are decompressed on the fly.
Every reader streams bounded chunks; bad records go to a `Quarantine` with the reason.

    from esxi_anomaly.ingest import read_connections, read_dns, read_inventory
    conns = read_connections(["logs/conn.*.log.gz"])
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pandas as pd

from esxi_anomaly import schema
from esxi_anomaly.ingest.base import (
    DEFAULT_CHUNK_ROWS,
    IngestError,
    Quarantine,
    SourceFormat,
    detect_format,
    expand_paths,
    formats,
)

__all__ = [
    "IngestError", "Quarantine", "ReadSummary", "SourceFormat", "detect_format", "expand_paths",
    "formats", "iter_frames", "iter_file", "list_files", "iter_connections", "iter_dns", "read_connections", "read_dns",
    "read_inventory", "read_context",
]


@dataclass
class FileStats:
    path: str
    format: str
    kept: int = 0
    quarantined: int = 0
    ts_min: float = float("nan")
    ts_max: float = float("nan")


@dataclass
class ReadSummary:
    """Per-file counts of one read: what was kept and what went to quarantine."""

    files: list[FileStats] = field(default_factory=list)

    @property
    def kept(self) -> int:
        return sum(f.kept for f in self.files)

    @property
    def quarantined(self) -> int:
        return sum(f.quarantined for f in self.files)

    def lines(self) -> list[str]:
        return [
            f"{f.path}: {f.format}, {f.kept} kept, {f.quarantined} quarantined" for f in self.files
        ]


def iter_frames(
    paths,
    frame: str,
    quarantine: Quarantine | None = None,
    summary: ReadSummary | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> Iterator[pd.DataFrame]:
    """Yield canonical chunks of `frame` kind from every file in `paths` (files, globs, folders).

    A folder may mix kinds (a Zeek directory holds conn.log and dns.log): in a folder, files of
    another frame kind, or of no known format, are skipped; a file named explicitly must match.
    """
    quarantine = quarantine if quarantine is not None else Quarantine()
    summary = summary if summary is not None else ReadSummary()
    for path, explicit in list_files(paths):
        yield from iter_file(path, frame, explicit, quarantine, summary, chunk_rows)


def list_files(paths) -> list[tuple[str, bool]]:
    """(file, named explicitly?) for every file in `paths` (files, globs, folders), in read order."""
    explicit = _explicit_files(paths)
    return [(path, path in explicit) for path in expand_paths(paths)]


def iter_file(path: str, frame: str, explicit: bool, quarantine: Quarantine, summary: ReadSummary,
              chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    """Chunks of one file of `list_files`: nothing when it holds another kind of records and was not
    named explicitly (else that is an `IngestError`)."""
    try:
        fmt = detect_format(path, frame)
    except IngestError:
        if explicit:
            raise IngestError(_mismatch_message(path, frame)) from None
        return
    stats = FileStats(path, fmt.name)
    summary.files.append(stats)
    before = quarantine.counts.get(path, 0)
    for chunk in fmt.read(path, quarantine, chunk_rows):
        if not len(chunk):
            continue
        stats.kept += len(chunk)
        if "ts" in chunk.columns:
            stats.ts_min = float(np.fmin(stats.ts_min, chunk["ts"].min()))
            stats.ts_max = float(np.fmax(stats.ts_max, chunk["ts"].max()))
        yield chunk
    stats.quarantined = quarantine.counts.get(path, 0) - before


def _explicit_files(paths) -> set[str]:
    import os

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    return {os.fspath(p) for p in paths if os.path.isfile(os.fspath(p))}


def _mismatch_message(path: str, frame: str) -> str:
    try:
        other = detect_format(path)
        return f"{path}: is {other.name} ({other.frame}), not {frame}"
    except IngestError:
        tried = ", ".join(f.name for f in formats() if f.frame == frame)
        return f"{path}: not a known {frame} format (tried: {tried})"


def _read_all(paths, frame: str, quarantine, summary) -> pd.DataFrame:
    chunks = list(iter_frames(paths, frame, quarantine, summary))
    if not chunks:
        return schema.empty(frame)
    out = pd.concat(chunks, ignore_index=True)
    if "ts" in out.columns:
        out = out.sort_values("ts", kind="stable", ignore_index=True)
    return out


def iter_connections(paths, quarantine=None, summary=None, chunk_rows=DEFAULT_CHUNK_ROWS):
    return iter_frames(paths, "connections", quarantine, summary, chunk_rows)


def iter_dns(paths, quarantine=None, summary=None, chunk_rows=DEFAULT_CHUNK_ROWS):
    return iter_frames(paths, "dns_answers", quarantine, summary, chunk_rows)


def read_connections(paths, quarantine=None, summary=None) -> pd.DataFrame:
    """All connections in `paths`, canonical, sorted by `ts`."""
    return _read_all(paths, "connections", quarantine, summary)


def read_dns(paths, quarantine=None, summary=None) -> pd.DataFrame:
    """All DNS answers in `paths`, canonical long form, sorted by `ts`."""
    return _read_all(paths, "dns_answers", quarantine, summary)


def read_context(paths, quarantine=None, summary=None) -> pd.DataFrame:
    return _read_all(paths, "context", quarantine, summary)


def read_inventory(paths, quarantine=None, summary=None) -> pd.DataFrame:
    """The inventory (IP -> name, kind, host, role), one row per IP (the last one wins)."""
    inv = _read_all(paths, "inventory", quarantine, summary)
    return inv.drop_duplicates("ip", keep="last").reset_index(drop=True)
