"""The ingest contract: source formats, content sniffing, decompression, quarantine.

A source format lives in its own module under `esxi_anomaly.ingest` and exposes a module-level
`FORMATS` list of `SourceFormat`. The registry discovers them; nothing else needs editing to add one.
"""
from __future__ import annotations

import bz2
import csv
import glob
import gzip
import importlib
import io
import json
import lzma
import os
import pkgutil
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Iterator

import pandas as pd

SNIFF_BYTES = 64 * 1024
RAW_KEEP = 256            # characters of a bad record kept in the quarantine
DEFAULT_CHUNK_ROWS = 250_000


class IngestError(Exception):
    """A file cannot be read at all (unknown format, unreadable). The message is one line."""


@dataclass
class QuarantineRecord:
    path: str
    line: int        # 1-based line (or record) number; 0 when not applicable
    reason: str
    raw: str


@dataclass
class Quarantine:
    """Bad records with the reason, counted per source file. Nothing is dropped silently."""

    records: list[QuarantineRecord] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    max_records: int = 100_000  # beyond this only counts are kept, to bound memory

    def add(self, path: str, line: int, reason: str, raw: str | bytes = "") -> None:
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", "backslashreplace")
        self.counts[path] = self.counts.get(path, 0) + 1
        if len(self.records) < self.max_records:
            self.records.append(QuarantineRecord(path, int(line), reason, raw[:RAW_KEEP]))

    def __len__(self) -> int:
        return sum(self.counts.values())

    def extend(self, other: "Quarantine") -> None:
        """Add the records and counts of `other` (a read done elsewhere, e.g. in a worker process)."""
        for path, n in other.counts.items():
            self.counts[path] = self.counts.get(path, 0) + n
        self.records.extend(other.records[:max(0, self.max_records - len(self.records))])

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            [(r.path, r.line, r.reason, r.raw) for r in self.records],
            columns=["path", "line", "reason", "raw"],
        )

    def write(self, path: str) -> None:
        """Write the records as JSON lines (the raw text is attacker-controlled: JSON escapes it)."""
        with open(path, "w", encoding="utf-8") as fh:
            for r in self.records:
                fh.write(json.dumps({"path": r.path, "line": r.line, "reason": r.reason, "raw": r.raw}) + "\n")


@dataclass(frozen=True)
class SourceFormat:
    name: str                                   # e.g. "zeek_conn_tsv"
    frame: str                                  # connections | dns_answers | inventory | context
    sniff: Callable[[bytes], bool]              # decompressed head of the file -> is it mine?
    read: Callable[[str, Quarantine, int], Iterator[pd.DataFrame]]  # path, quarantine, chunk rows
    description: str = ""


# --- decompression --------------------------------------------------------------------------

_MAGIC = [(b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open)]
GZIP_BUFFER = 1 << 20     # read size of the gzip stream (bigger reads bypass the buffer)
_FALLBACK_READ = 8192


class _ArrowGzip(io.RawIOBase):
    """gzip decompressed by Arrow's C++ stream (faster than Python's, outside the GIL).

    Arrow and Python disagree on damaged files (Arrow rejects the zero padding Python ignores, and
    raises other exception types), so on any error from Arrow the read continues with Python's
    `gzip` from the same decompressed offset: what a reader sees is exactly what `gzip.open`
    gives, including EOFError on a truncated file.
    """

    def __init__(self, path: str):
        super().__init__()
        self._path = path
        self._arrow = None
        self._python = None
        self._pos = 0
        try:
            import pyarrow as pa

            self._arrow = pa.CompressedInputStream(pa.OSFile(path), "gzip")
        except Exception:  # no pyarrow, or it cannot open the file: Python's gzip decides
            self._python = gzip.open(path, "rb")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._python is None:
            try:
                got = self._arrow.readinto(buffer)
                self._pos += got
                return got
            except Exception:
                self._arrow.close()
                self._python = gzip.open(self._path, "rb")
                self._python.seek(self._pos)     # decompresses and skips what was delivered
        # one decompression step at a time (read1): the data before a truncation is delivered
        data = self._python.read1(min(len(buffer), _FALLBACK_READ))
        got = len(data)
        memoryview(buffer)[:got] = data
        self._pos += got
        return got

    def close(self) -> None:
        if not self.closed:
            for stream in (self._arrow, self._python):
                if stream is not None:
                    stream.close()
        super().close()


def open_binary(path: str) -> io.BufferedIOBase:
    """Open a file for reading bytes, transparently decompressing gzip, bz2 or xz by content.

    gzip goes through Arrow's decompressor (with Python's `gzip` semantics on damaged files).
    A zip archive (as log exports often are) yields its first regular member, skipping
    `__MACOSX/` resource forks.
    """
    with open(path, "rb") as fh:
        head = fh.read(6)
    if head.startswith(b"PK\x03\x04"):
        archive = zipfile.ZipFile(path)
        members = [m for m in archive.infolist() if not m.is_dir() and not m.filename.startswith("__MACOSX/")]
        if not members:
            raise IngestError(f"{path}: zip archive has no file")
        return archive.open(members[0])
    if head.startswith(b"\x1f\x8b"):   # before _MAGIC: Arrow's stream rather than gzip.open
        return io.BufferedReader(_ArrowGzip(path), GZIP_BUFFER)
    for magic, opener in _MAGIC:
        if head.startswith(magic):
            return opener(path, "rb")
    return open(path, "rb")


def open_text(path: str) -> io.TextIOBase:
    """Text view of `path` (decompressed); undecodable bytes become U+FFFD, never an exception."""
    return io.TextIOWrapper(open_binary(path), encoding="utf-8", errors="replace", newline="")


def read_head(path: str, n: int = SNIFF_BYTES) -> bytes:
    try:
        with open_binary(path) as fh:
            return fh.read(n)
    except (OSError, EOFError, lzma.LZMAError, zipfile.BadZipFile) as exc:
        raise IngestError(f"{path}: cannot read ({exc})") from exc


# --- registry -------------------------------------------------------------------------------

_REGISTRY: list[SourceFormat] | None = None


def formats() -> list[SourceFormat]:
    """Every SourceFormat defined by a module of this package, in module-name order."""
    global _REGISTRY
    if _REGISTRY is None:
        import esxi_anomaly.ingest as pkg

        found: list[SourceFormat] = []
        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
            if info.name in ("base",) or info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{pkg.__name__}.{info.name}")
            found.extend(getattr(module, "FORMATS", []))
        _REGISTRY = found
    return _REGISTRY


def detect_format(path: str, frame: str | None = None) -> SourceFormat:
    """The format of `path` by content. Raises IngestError naming the formats tried."""
    head = read_head(path)
    candidates = [f for f in formats() if frame is None or f.frame == frame]
    for fmt in candidates:
        try:
            if fmt.sniff(head):
                return fmt
        except Exception:  # a sniffer must never take the run down; treat as "not mine"
            continue
    tried = ", ".join(f.name for f in candidates) or "none registered"
    what = f" {frame}" if frame else ""
    raise IngestError(f"{path}: not a known{what} format (tried: {tried})")


def expand_paths(paths: str | os.PathLike | list) -> list[str]:
    """Files from files, globs and folders (folders recursively), sorted, without duplicates."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[str] = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            for root, _dirs, files in os.walk(p):
                out.extend(os.path.join(root, f) for f in files if not f.startswith("."))
        elif any(ch in p for ch in "*?["):
            matched = [m for m in glob.glob(p, recursive=True) if os.path.isfile(m)]
            if not matched:
                raise IngestError(f"{p}: the pattern matches no file")
            out.extend(matched)
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise IngestError(f"{p}: no such file or folder")
    return sorted(dict.fromkeys(out))


def stable_event_id(prefix: str, path: str, line: int) -> str:
    """An id for records without one (non-Zeek sources), stable across runs of the same file."""
    import hashlib

    digest = hashlib.blake2b(f"{os.path.abspath(path)}".encode(), digest_size=4).hexdigest()
    return f"{prefix}-{digest}-{line}"


def csv_rows(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, row) of a CSV file with a header, decompressed."""
    with open_text(path) as fh:
        for i, row in enumerate(csv.DictReader(fh), start=2):
            yield i, row
