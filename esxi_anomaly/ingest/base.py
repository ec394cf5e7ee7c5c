"""The ingest contract: source formats, content sniffing, decompression, quarantine.

A source format lives in its own module under `esxi_anomaly.ingest` and exposes a module-level
`FORMATS` list of `SourceFormat`. The registry discovers them; nothing else needs editing to add one.
"""
from __future__ import annotations

import bz2
import csv
import gzip
import importlib
import io
import json
import lzma
import os
import pkgutil
from pathlib import Path
import stat
import threading
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import pandas as pd

from esxi_anomaly.input_paths import (  # noqa: F401  (IngestError, expand_paths: re-exported, the readers use them)
    BZIP2_MAGIC, GZIP_MAGIC, XZ_MAGIC, ZIP_MAGIC, IngestError, expand_paths)

SNIFF_BYTES = 64 * 1024
RAW_KEEP = 256            # characters of a bad record kept in the quarantine
DEFAULT_CHUNK_ROWS = 250_000


class UnreadableError(IngestError):
    """The bytes of a file cannot be read (permission denied, cut in its header, ...), as opposed
    to a file that reads fine but holds no known format."""


class EmptyInput(IngestError):
    """The file holds no byte (after decompression): nothing to read, nothing lost."""


@dataclass
class QuarantineRecord:
    path: str
    line: int        # 1-based line (or record) number; 0 when not applicable
    reason: str
    raw: str


@dataclass
class Quarantine:
    """Bad records with the reason, counted per source file. Nothing is dropped silently.

    A problem of a whole file (unreadable, cut short) is one record at line 0; the same file problem
    met twice (a folder given to both --conn and --dns) is recorded once.
    """

    records: list[QuarantineRecord] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    max_records: int = 100_000  # beyond this only counts are kept, to bound memory
    file_problems: set = field(default_factory=set)   # (path, reason) of the line-0 file records

    def add(self, path: str, line: int, reason: str, raw: str | bytes = "") -> None:
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", "backslashreplace")
        self.counts[path] = self.counts.get(path, 0) + 1
        if len(self.records) < self.max_records:
            self.records.append(QuarantineRecord(path, int(line), reason, raw[:RAW_KEEP]))

    def add_many(self, path: str, reasons, raws) -> None:
        """Records of one file without line numbers (rows refused after parsing), counted at once."""
        self.counts[path] = self.counts.get(path, 0) + len(reasons)
        room = max(0, self.max_records - len(self.records))
        for reason, raw in zip(reasons[:room], raws[:room]):
            self.records.append(QuarantineRecord(path, 0, str(reason), str(raw)[:RAW_KEEP]))

    def add_file(self, path: str, reason: str, raw: str | bytes = "") -> bool:
        """A problem of the whole file (line 0), once per (path, reason); kept even beyond
        `max_records` (one per file). False when it was already recorded."""
        if (path, reason) in self.file_problems:
            return False
        self.file_problems.add((path, reason))
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", "backslashreplace")
        self.counts[path] = self.counts.get(path, 0) + 1
        self.records.append(QuarantineRecord(path, 0, reason, raw[:RAW_KEEP]))
        return True

    def __len__(self) -> int:
        return sum(self.counts.values())

    def extend(self, other: "Quarantine") -> None:
        """Add the records and counts of `other` (a read done elsewhere, e.g. in a worker process)."""
        twice = other.file_problems & self.file_problems
        for path, n in other.counts.items():
            n -= sum(1 for p, _reason in twice if p == path)
            if n:
                self.counts[path] = self.counts.get(path, 0) + n
        self.file_problems |= other.file_problems
        room = max(0, self.max_records - len(self.records))
        for r in other.records:
            if r.line == 0 and (r.path, r.reason) in twice:
                continue
            if r.line == 0 and (r.path, r.reason) in self.file_problems:
                self.records.append(r)       # file records are kept beyond the cap
            elif room > 0:
                self.records.append(r)
                room -= 1

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            [(r.path, r.line, r.reason, r.raw) for r in self.records],
            columns=["path", "line", "reason", "raw"],
        )

    def omitted(self) -> dict[str, int]:
        """Per file, the quarantined records beyond `max_records` whose text was not kept."""
        held: dict[str, int] = {}
        for r in self.records:
            held[r.path] = held.get(r.path, 0) + 1
        return {p: n - held.get(p, 0) for p, n in self.counts.items() if n > held.get(p, 0)}

    def write(self, path: str) -> int:
        """Write the records as JSON lines (the raw text is attacker-controlled: JSON escapes it),
        then, per file whose records were cut by `max_records`, one line saying how many were not
        kept. Returns the number of lines written."""
        written = 0
        with open(path, "w", encoding="utf-8") as fh:
            for r in self.records:
                fh.write(json.dumps({"path": r.path, "line": r.line, "reason": r.reason, "raw": r.raw}) + "\n")
                written += 1
            for p, n in self.omitted().items():
                fh.write(json.dumps({"path": p, "line": 0, "reason": f"{n} further records quarantined, not kept "
                                     f"(limit {self.max_records})", "raw": "", "omitted": n}) + "\n")
                written += 1
        return written


@dataclass(frozen=True)
class SourceFormat:
    name: str                                   # e.g. "zeek_conn_tsv"
    frame: str                                  # connections | dns_answers | inventory | context
    sniff: Callable[[bytes], bool]              # decompressed head of the file -> is it mine?
    read: Callable[[str, Quarantine, int], Iterator[pd.DataFrame]]  # path, quarantine, chunk rows
    description: str = ""
    takes_options: bool = False   # read also takes `options=` (the read options mapping, e.g. snapshot_time)


# --- decompression --------------------------------------------------------------------------

_MAGIC = [(GZIP_MAGIC, gzip.open), (BZIP2_MAGIC, bz2.open), (XZ_MAGIC, lzma.open)]
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


_STREAM_ERRORS = (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError, zipfile.BadZipFile)
_TRACK = threading.local()


@contextmanager
def track_streams(opened: list | None = None):
    """Collect the decompressed streams `open_binary` opens in this thread meanwhile (to learn, once
    a reader is done, whether its file was cut short)."""
    opened = [] if opened is None else opened
    outer = getattr(_TRACK, "opened", None)
    _TRACK.opened = opened
    try:
        yield opened
    finally:
        _TRACK.opened = outer


def _last_break(view: memoryview, end: int) -> int:
    """Offset just after the last b"\\n" in view[:end] (0 if none), looking back from the end."""
    hi, step = end, 4096
    while hi > 0:
        lo = max(0, hi - step)
        i = bytes(view[lo:hi]).rfind(b"\n")
        if i >= 0:
            return lo + i + 1
        hi, step = lo, step * 4
    return 0


class _Guarded(io.RawIOBase):
    """A decompressed stream that never raises in the middle of a file.

    On a truncated or damaged stream, every complete line before the damage is delivered, the
    partial line being read when it broke is dropped, and the stream ends: `error` holds why,
    `delivered` how many bytes came before, `dropped` the bytes of the partial line (`iter_file`
    reports the file as partly read). Lines are held back only up to the caller's buffer (>= 1 MiB
    from `open_binary`); binary data without line breaks is passed on as it comes.
    """

    def __init__(self, step: Callable, source, path: str, kind: str):
        super().__init__()
        self._step, self._source = step, source    # step(memoryview) -> bytes written, one read
        self.path, self.kind = path, kind
        self.error: BaseException | None = None
        self.delivered = 0
        self.dropped = b""
        self._tail = b""                           # bytes after the last line break, not delivered
        self._done = False
        opened = getattr(_TRACK, "opened", None)
        if opened is not None:
            opened.append(self)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        n, k = len(view), len(self._tail)
        if not n:
            return 0
        if k >= n or (self._done and k):
            got = min(n, k)
            view[:got] = self._tail[:got]
            self._tail = self._tail[got:]
            self.delivered += got
            return got
        if self._done:
            return 0
        view[:k] = self._tail
        try:
            got = self._step(view[k:])
        except _STREAM_ERRORS as exc:
            self.error, self._done, self.dropped, self._tail = exc, True, self._tail, b""
            return 0
        if not got:                     # the clean end: the last line may lack its line break
            self._done = True
            self._tail = b""
            self.delivered += k
            return k
        end = k + got
        cut = _last_break(view, end) or end
        self._tail = bytes(view[cut:end])
        self.delivered += cut
        return cut

    def close(self) -> None:
        if not self.closed:
            self._source.close()
        super().close()


def _read1_step(source) -> Callable:
    def step(view: memoryview) -> int:
        data = source.read1(len(view))
        view[:len(data)] = data
        return len(data)
    return step


class _Transcoded(io.RawIOBase):
    """UTF-8 bytes of a UTF-16 text stream (the BOM gives the byte order): readers see UTF-8."""

    def __init__(self, source, encoding: str):
        super().__init__()
        import codecs

        self._source = source
        self._decoder = codecs.getincrementaldecoder(encoding)("replace")
        self._out = b""
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        while not self._out and not self._eof:
            data = self._source.read1(GZIP_BUFFER) if hasattr(self._source, "read1") else self._source.read(GZIP_BUFFER)
            self._eof = not data
            self._out = self._decoder.decode(data, final=self._eof).encode("utf-8")
        got = min(len(view), len(self._out))
        view[:got] = self._out[:got]
        self._out = self._out[got:]
        return got

    def close(self) -> None:
        if not self.closed:
            self._source.close()
        super().close()


def open_binary(path: str) -> io.BufferedIOBase:
    """Open a file for reading bytes, transparently decompressing gzip, bz2 or xz by content.

    gzip goes through Arrow's decompressor (with Python's `gzip` semantics on damaged files).
    A zip archive (as log exports often are) yields its first regular member, skipping
    `__MACOSX/` resource forks. A compressed stream cut short or damaged ends after its last
    complete line instead of raising (see `_Guarded`). UTF-16 text (with its BOM) is transcoded to
    UTF-8 and a UTF-8 BOM is skipped, so every reader and sniffer sees UTF-8.
    """
    with open(path, "rb") as fh:
        head = fh.read(6)
    if head.startswith(ZIP_MAGIC):
        archive = zipfile.ZipFile(path)
        members = [m for m in archive.infolist() if not m.is_dir() and not m.filename.startswith("__MACOSX/")]
        if not members:
            archive.close()
            raise IngestError(f"{path}: zip archive has no file", "zip archive has no file")
        member = archive.open(members[0])
        fh = io.BufferedReader(_Guarded(_read1_step(member), _Closing(member, archive), path, "zip member"),
                               GZIP_BUFFER)
    elif head.startswith(GZIP_MAGIC):   # before _MAGIC: Arrow's stream rather than gzip.open
        raw = _ArrowGzip(path)
        fh = io.BufferedReader(_Guarded(raw.readinto, raw, path, "gzip"), GZIP_BUFFER)
    else:
        for magic, opener in _MAGIC:
            if head.startswith(magic):
                source = opener(path, "rb")
                kind = "bz2" if opener is bz2.open else "xz"
                fh = io.BufferedReader(_Guarded(_read1_step(source), source, path, kind), GZIP_BUFFER)
                break
        else:
            fh = open(path, "rb")
    return _decoded(fh)


class _Closing:
    """Closes a zip member and then its archive."""

    def __init__(self, *streams):
        self._streams = streams

    def close(self) -> None:
        for stream in self._streams:
            stream.close()


def _decoded(fh: io.BufferedReader) -> io.BufferedIOBase:
    try:
        bom = fh.peek(3)[:3]
    except _STREAM_ERRORS:   # a plain file that cannot be read: the reader meets the error itself
        return fh
    if bom.startswith(b"\xef\xbb\xbf"):
        fh.read(3)
        return fh
    if bom.startswith((b"\xff\xfe", b"\xfe\xff")):
        return io.BufferedReader(_Transcoded(fh, "utf-16"), GZIP_BUFFER)
    return fh


def open_text(path: str) -> io.TextIOBase:
    """Text view of `path` (decompressed); undecodable bytes become U+FFFD, never an exception."""
    return io.TextIOWrapper(open_binary(path), encoding="utf-8", errors="replace", newline="")


def stream_problem(stream: "_Guarded", records: int | None = None) -> str:
    """Why a decompressed stream ended early, for the read summary and the quarantine."""
    exc = stream.error
    detail = f"{type(exc).__name__}: {exc}"
    if not stream.delivered:
        if isinstance(exc, EOFError):
            return f"truncated {stream.kind} stream, cut in its header or first block: no data ({detail})"
        return f"damaged {stream.kind} stream, no data ({detail})"
    what = "truncated" if isinstance(exc, EOFError) else "damaged"
    after = f" after {records} records" if records is not None else ""
    lost = f", the {len(stream.dropped)} bytes of the record it cut not read" if stream.dropped else ""
    return f"{what} {stream.kind} stream{after}{lost} ({detail})"


def read_head(path: str, n: int = SNIFF_BYTES) -> bytes:
    """The first `n` decompressed bytes. Raises UnreadableError when there are none to read and
    EmptyInput when the file is empty."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):   # a FIFO or device in a folder would block or never end
            raise UnreadableError(f"{path}: not a regular file", "not a regular file")
        with track_streams() as opened, open_binary(path) as fh:
            head = fh.read(n)
    except PermissionError as exc:
        raise UnreadableError(f"{path}: permission denied", "permission denied") from exc
    except IngestError as exc:
        raise UnreadableError(str(exc), exc.reason) from exc
    except (OSError, EOFError, lzma.LZMAError, zipfile.BadZipFile, zlib.error) as exc:
        raise UnreadableError(f"{path}: cannot read ({exc})", f"cannot read ({exc})") from exc
    if not head:
        broken = [s for s in opened if s.error is not None]
        if broken:
            reason = stream_problem(broken[0])
            raise UnreadableError(f"{path}: {reason}", reason)
        raise EmptyInput(f"{path}: empty file", "empty file")
    return head


# --- registry -------------------------------------------------------------------------------

_REGISTRY: list[SourceFormat] | None = None


def formats() -> list[SourceFormat]:
    """Every SourceFormat defined by a module of this package, in module-name order."""
    global _REGISTRY
    if _REGISTRY is None:
        found: list[SourceFormat] = []   # found by file, not by importing the package (no import cycle)
        for info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda m: m.name):
            if info.name in ("base",) or info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{__package__}.{info.name}")
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
