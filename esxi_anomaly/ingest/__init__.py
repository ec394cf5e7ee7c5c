"""Read real logs into the canonical frames of `esxi_anomaly.schema`.

Formats are chosen by content, never by file name; gzip, bz2 and xz are decompressed on the fly,
UTF-16 text is transcoded. Every reader streams bounded chunks; bad records go to a `Quarantine`
with the reason. Every input file gets an outcome in the `ReadSummary` (read, partly read,
unreadable, other kind), and records whose time or address would break later stages are
quarantined in one place (`_validate`).

    from esxi_anomaly.ingest import read_connections, read_dns, read_inventory
    conns = read_connections(["logs/conn.*.log.gz"])
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Mapping

import numpy as np
import pandas as pd

from esxi_anomaly import schema
from esxi_anomaly.ingest.base import (
    DEFAULT_CHUNK_ROWS,
    EmptyInput,
    IngestError,
    Quarantine,
    SourceFormat,
    UnreadableError,
    detect_format,
    expand_paths,
    formats,
    stream_problem,
    track_streams,
)
from esxi_anomaly.ingest._validate import validate_chunk

__all__ = [
    "IngestError", "UnreadableError", "Quarantine", "ReadSummary", "SourceFormat", "detect_format", "expand_paths",
    "formats", "iter_frames", "iter_file", "list_files", "iter_connections", "iter_dns", "read_connections", "read_dns",
    "read_inventory", "read_context",
]


# outcomes of one input file in a read
READ, PARTLY_READ, UNREADABLE, OTHER_KIND = "read", "partly read", "unreadable", "other kind"


@dataclass
class FileStats:
    path: str
    format: str
    kept: int = 0
    quarantined: int = 0
    ts_min: float = float("nan")
    ts_max: float = float("nan")
    outcome: str = READ      # read | partly read | unreadable | other kind
    reason: str = ""         # why it was not read (wholly), or what else it holds


@dataclass
class ReadSummary:
    """Per-file outcome of one read: what was kept, what went to quarantine, what was not read."""

    files: list[FileStats] = field(default_factory=list)
    # what the DNS coverage needs: distinct connection sources, distinct clients per DNS source, inventory
    conn_sources: set = field(default_factory=set, repr=False)
    dns_clients: dict = field(default_factory=dict, repr=False)
    inventory: list = field(default_factory=list, repr=False)

    def note(self, frame: str, source: str, chunk: pd.DataFrame) -> None:
        """Keep the distinct values of a read chunk that `dns_coverage` needs."""
        from esxi_anomaly.features.identity import distinct

        if frame == "connections":
            self.conn_sources.update(distinct(chunk["src_ip"]))
        elif frame == "dns_answers":
            self.dns_clients.setdefault(source, set()).update(distinct(chunk["client_ip"]))
        elif frame == "inventory":
            self.inventory.append(chunk[["ip", "name"]])

    def merge_notes(self, other: "ReadSummary") -> None:
        self.conn_sources |= other.conn_sources
        for source, clients in other.dns_clients.items():
            self.dns_clients.setdefault(source, set()).update(clients)
        self.inventory += other.inventory

    def notes_record(self) -> dict:
        """The notes as plain JSON data (kept in a work folder for a resumed run: `add_notes`)."""
        inv = pd.concat(self.inventory, ignore_index=True) if self.inventory else pd.DataFrame(columns=["ip", "name"])
        return {"conn_sources": sorted(self.conn_sources, key=str),
                "dns_clients": {source: sorted(values, key=str) for source, values in self.dns_clients.items()},
                "inventory": {"ip": inv["ip"].tolist(), "name": inv["name"].tolist()}}

    def add_notes(self, record: Mapping) -> None:
        """Add the notes of a `notes_record`."""
        self.conn_sources.update(record.get("conn_sources", ()))
        for source, values in record.get("dns_clients", {}).items():
            self.dns_clients.setdefault(str(source), set()).update(values)
        inv = record.get("inventory") or {}
        if inv.get("ip"):
            self.inventory.append(pd.DataFrame({"ip": inv["ip"], "name": inv["name"]}))

    def dns_coverage(self) -> dict[str, tuple[int, int]]:
        """Per DNS source: (clients that resolve to a connection source, distinct clients)."""
        from esxi_anomaly.features.identity import coverage

        inv = pd.concat(self.inventory, ignore_index=True).drop_duplicates("ip", keep="last") if self.inventory else None
        return coverage(self.dns_clients, self.conn_sources, inv)

    @property
    def kept(self) -> int:
        return sum(f.kept for f in self.files)

    @property
    def quarantined(self) -> int:
        return sum(f.quarantined for f in self.files)

    def outcomes(self) -> list[FileStats]:
        """One entry per input file and outcome. A file met by two passes (a folder given to --conn
        and --dns) is listed once per distinct outcome; "other kind" is left out where another pass
        read the file."""
        read_elsewhere = {f.path for f in self.files if f.outcome != OTHER_KIND}
        out, seen = [], set()
        for f in self.files:
            key = (f.path, f.format, f.outcome, f.reason)
            if key in seen or (f.outcome == OTHER_KIND and f.path in read_elsewhere):
                continue
            seen.add(key)
            out.append(f)
        return out

    def coverage_lines(self) -> list[str]:
        """Per DNS source: the share of its clients resolved to a connection source (a warning under 90 %)."""
        from esxi_anomaly.features.identity import coverage_lines

        return coverage_lines(self.dns_coverage())

    def lines(self) -> list[str]:
        return [file_line(f) for f in self.outcomes()] + self.coverage_lines()


def file_line(f: FileStats) -> str:
    counts = f"{f.kept} kept, {f.quarantined} quarantined"
    if f.outcome == UNREADABLE:
        return f"{f.path}: unreadable ({f.reason})"
    if f.outcome == OTHER_KIND:
        return f"{f.path}: {f.format}, other kind ({f.reason})"
    if f.outcome == PARTLY_READ:
        return f"{f.path}: {f.format}, partly read ({f.reason}), {counts}"
    return f"{f.path}: {f.format}, {counts}" + (f" ({f.reason})" if f.reason else "")


def iter_frames(
    paths,
    frame: str,
    quarantine: Quarantine | None = None,
    summary: ReadSummary | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    options: Mapping | None = None,
) -> Iterator[pd.DataFrame]:
    """Yield canonical chunks of `frame` kind from every file in `paths` (files, globs, folders).

    A folder may mix kinds (a Zeek directory holds conn.log and dns.log): in a folder, a file of
    another frame kind is noted as such in `summary`, one that cannot be read or is of no known
    format is noted and quarantined; a file named explicitly must match (`iter_file`).
    """
    quarantine = quarantine if quarantine is not None else Quarantine()
    summary = summary if summary is not None else ReadSummary()
    for path, explicit in list_files(paths):
        yield from iter_file(path, frame, explicit, quarantine, summary, chunk_rows, options)


def list_files(paths) -> list[tuple[str, bool]]:
    """(file, named explicitly?) for every file in `paths` (files, globs, folders), in read order."""
    explicit = _explicit_files(paths)
    return [(path, path in explicit) for path in expand_paths(paths)]


def iter_file(path: str, frame: str, explicit: bool, quarantine: Quarantine, summary: ReadSummary,
              chunk_rows: int = DEFAULT_CHUNK_ROWS, options: Mapping | None = None) -> Iterator[pd.DataFrame]:
    """Chunks of one file of `list_files`, each record checked (`validate_chunk`); the file's
    outcome goes to `summary` whatever happens. `options`: read options (e.g. `snapshot_time`),
    passed to the formats that take them (`SourceFormat.takes_options`).

    A file named explicitly that cannot be used raises `IngestError`. In a folder, a file of
    another frame kind is noted as "other kind"; one that cannot be read, or is of no known
    format, is noted as unreadable and gets a quarantine record (line 0), as does one whose
    compressed stream is cut short (partly read: every complete record before the cut is kept).
    """
    try:
        fmt = detect_format(path, frame)
    except EmptyInput:
        summary.files.append(FileStats(path, "empty", reason="empty file"))
        return
    except UnreadableError as exc:
        if explicit:
            raise
        _refuse(path, exc.reason, quarantine, summary)
        return
    except IngestError:
        if explicit:
            raise IngestError(_mismatch_message(path, frame)) from None
        other = _other_kind(path)
        if other is not None:
            summary.files.append(FileStats(path, other.name, outcome=OTHER_KIND,
                                           reason=f"{other.frame}, not {frame}"))
        else:
            _refuse(path, "not a known format", quarantine, summary)
        return
    stats = FileStats(path, fmt.name)
    summary.files.append(stats)
    before = quarantine.counts.get(path, 0)
    reader = (fmt.read(path, quarantine, chunk_rows, options=dict(options or {})) if fmt.takes_options
              else fmt.read(path, quarantine, chunk_rows))
    opened: list = []
    failure = ""
    try:
        while True:
            with track_streams(opened):   # only while the reader runs: streams it opens are its file's
                try:
                    chunk = next(reader)
                except StopIteration:
                    break
                except IngestError as exc:   # the reader gave up on the file
                    if explicit:
                        raise
                    failure = exc.reason
                    break
            if not len(chunk):
                continue
            chunk = validate_chunk(chunk, frame, path, quarantine)
            if not len(chunk):
                continue
            stats.kept += len(chunk)
            summary.note(frame, fmt.name, chunk)
            if "ts" in chunk.columns:
                stats.ts_min = float(np.fmin(stats.ts_min, chunk["ts"].min()))
                stats.ts_max = float(np.fmax(stats.ts_max, chunk["ts"].max()))
            yield chunk
    finally:
        reader.close()
        records = stats.kept + quarantine.counts.get(path, 0) - before
        broken = [s for s in opened if s.error is not None and s.path == path]
        raw = b""
        if broken and not failure:
            failure, raw = stream_problem(broken[0], records), broken[0].dropped
        if failure:
            stats.outcome, stats.reason = (PARTLY_READ if records else UNREADABLE), failure
            quarantine.add_file(path, failure, raw)
        stats.quarantined = quarantine.counts.get(path, 0) - before
        warning = _time_warning(stats.ts_min, stats.ts_max)
        if warning:
            stats.reason = f"{stats.reason}; {warning}" if stats.reason else warning


EARLIEST_PLAUSIBLE_TS = 946_684_800.0   # 2000-01-01T00:00:00Z
FUTURE_SLACK_S = 86_400.0


def _time_warning(ts_min: float, ts_max: float, now: float | None = None) -> str:
    """A warning for a file whose times point at a broken clock, unit or snapshot time (they are
    still read: `train` refuses such a history, `score` ranks it)."""
    import time

    now = time.time() if now is None else now
    found = []
    if ts_min < EARLIEST_PLAUSIBLE_TS:
        found.append(f"times before 2000-01-01 (earliest {_utc(ts_min)} UTC)")
    if ts_max > now + FUTURE_SLACK_S:
        found.append(f"times in the future (latest {_utc(ts_max)} UTC)")
    return "warning: " + " and ".join(found) if found else ""


def _utc(ts: float) -> str:
    return pd.Timestamp(ts, unit="s").strftime("%Y-%m-%d %H:%M:%S")


def _refuse(path: str, reason: str, quarantine: Quarantine, summary: ReadSummary) -> None:
    """A folder's file that cannot be read: in the summary and (once) in the quarantine."""
    added = quarantine.add_file(path, reason)
    summary.files.append(FileStats(path, "unknown", quarantined=int(added), outcome=UNREADABLE, reason=reason))


def _other_kind(path: str) -> SourceFormat | None:
    try:
        return detect_format(path)
    except IngestError:
        return None


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


def _read_all(paths, frame: str, quarantine, summary, options: Mapping | None = None) -> pd.DataFrame:
    chunks = list(iter_frames(paths, frame, quarantine, summary, options=options))
    if not chunks:
        return schema.empty(frame)
    out = pd.concat(chunks, ignore_index=True)
    if "ts" in out.columns:
        out = out.sort_values("ts", kind="stable", ignore_index=True)
    return out


def iter_connections(paths, quarantine=None, summary=None, chunk_rows=DEFAULT_CHUNK_ROWS, options=None):
    return iter_frames(paths, "connections", quarantine, summary, chunk_rows, options)


def iter_dns(paths, quarantine=None, summary=None, chunk_rows=DEFAULT_CHUNK_ROWS, options=None):
    return iter_frames(paths, "dns_answers", quarantine, summary, chunk_rows, options)


def read_connections(paths, quarantine=None, summary=None, options=None) -> pd.DataFrame:
    """All connections in `paths`, canonical, sorted by `ts`. `options`: read options (`iter_file`)."""
    return _read_all(paths, "connections", quarantine, summary, options)


def read_dns(paths, quarantine=None, summary=None, options=None) -> pd.DataFrame:
    """All DNS answers in `paths`, canonical long form, sorted by `ts`."""
    return _read_all(paths, "dns_answers", quarantine, summary, options)


def read_context(paths, quarantine=None, summary=None) -> pd.DataFrame:
    return _read_all(paths, "context", quarantine, summary)


def read_inventory(paths, quarantine=None, summary=None) -> pd.DataFrame:
    """The inventory (IP -> name, kind, host, role), one row per IP (the last one wins)."""
    inv = _read_all(paths, "inventory", quarantine, summary)
    return inv.drop_duplicates("ip", keep="last").reset_index(drop=True)
