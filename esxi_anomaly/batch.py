"""Batch scoring at scale: bounded memory, time-ordered chunks with carried state, resumable, on
every core.

1. **Spill**: inputs are streamed once (`ingest.iter_*`) into hourly buckets of Arrow IPC files
   under a work folder, each row tagged with its source *slot* (`source_slot`), so no input is ever
   held whole and later passes read in time order. The slots are then dealt into `workers`
   partitions of about equal rows (`assign_partitions`).
2. **Score**: each partition (in a worker process, `workers.WorkerPool`; in this process when
   there is one) walks the buckets in time order, split into chunks of at most `chunk_rows`
   connections. A chunk sees the DNS answers of its sources in its look-back window; the running
   counts (`StreamState`) and the candidates for per-row attribution are carried to the next
   chunk. Every feature is per source, so the result equals a one-shot run over everything. After
   each bucket group, a partition writes its scored rows and its checkpoint (plain files: JSON,
   Arrow, numpy; never a pickle) atomically; `--resume` continues each partition after its last
   completed group, with any number of workers and any chunk_rows, once the run's fingerprint
   (model, input files, options) matches the one the spill recorded.
3. **Rank and write**: scores alone are ranked globally, then rows are gathered in rank order,
   block by block (CSV blocks built by the workers), into the output (written to a temp file and
   renamed at the end, only when it holds every row).

A run holds `<out>.lock` throughout (a second run to the same output exits at once, `OutputBusy`),
checks its output paths before reading anything, and on failure removes its work folder and temp
files, unless it was interrupted after the spill (then: rerun with --resume).
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import json
import mmap
import os
import pickle
import re
import shutil
import socket
import sys
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from esxi_anomaly import ingest, schema
from esxi_anomaly.features import identity
from esxi_anomaly.features.merge import connection_groups
from esxi_anomaly.features.hashing import hash_column
from esxi_anomaly.report import csv as report_csv, ecs as report_ecs, format_for_path, html as report_html
from esxi_anomaly.detect import explain
from esxi_anomaly.detect.explain import context_clauses
from esxi_anomaly.feedback import FeedbackStore, apply_suppressions
from esxi_anomaly.console import EXIT_BUSY, EXIT_INPUT, log
from esxi_anomaly.features.stream_state import StreamState, read_frame, write_frame
from esxi_anomaly.atomic import atomic_path
from esxi_anomaly.report.rollup import StreamingRollup
from esxi_anomaly.schema import Frames
from esxi_anomaly.workers import WorkerError, WorkerPool, release_free_memory

try:
    import fcntl
except ImportError:   # not POSIX: the lock falls back to its owner's pid
    fcntl = None

BUCKET_S = 3600
WRITE_BLOCK = 100_000
KEEP_HEAP_BELOW = 640 << 20  # a scoring process keeps its freed heap between batches up to this size
WRITE_THREADS = 2              # output blocks prepared concurrently (2-core machines and up)
HTML_DEFAULT_TOP = 2000
CHECKPOINT_VERSION = 6            # 2: scored rows carry sentence inputs; 3: one checkpoint per partition;
                                  # 4: checkpoints as plain files (no pickles), run fingerprint;
                                  # 5: merged connections (`seen_by`, rows kept besides rows read);
                                  # 6: merge state keyed by the unordered endpoint pair (reversed twins)
SLOT_BITS = 16
N_SLOTS = 1 << SLOT_BITS
_SLOT = "_slot"                   # spill-only column: the row's source slot
SCORED_SUFFIX = ".scored.arrow"
ROLLUP_SUFFIX = ".entities.csv"
# what `explain.sentences` reads from a scored row; the sentence-only ones are not written out
SENTENCE_COLUMNS = ["dst_port", "dst_ip", "src_name", "rules", "query", "transform", "answer", "rtype", "dns_delay",
                    "seen_by", *explain.SENTENCE_ONLY]
DROPPED = {"bucket", "row", *explain.SENTENCE_ONLY}


def output_format(path: Path, fmt: str | None) -> str:
    """`fmt`, else the format the file name implies, else CSV."""
    if fmt:
        return fmt
    try:
        return format_for_path(path)
    except ValueError:
        return "csv"


def source_slot(ips) -> np.ndarray:
    """Slot (0..N_SLOTS-1) of each source IP: the top bits of a stable 64-bit hash (the same in
    every process and run, see `features.hashing`); a source's connections (`src_ip`) and DNS
    answers (`client_ip`) get the same slot. A Series of strings is hashed per distinct value."""
    values = ips if isinstance(ips, pd.Series) else np.asarray(ips, dtype=object)
    return (hash_column(values) >> np.uint64(64 - SLOT_BITS)).astype("int32")


# -- the output: one run at a time, checked before anything is read, nothing left behind ----------

class OutputBusy(RuntimeError):
    """Another run is writing the same output (it holds `<out>.lock`)."""
    exit_code = EXIT_BUSY


class OutputError(ValueError):
    """The output path cannot be used (a folder, an input file, not writable)."""
    exit_code = EXIT_INPUT


class ResumeRefused(ValueError):
    """`--resume` found a work folder made by another run (other inputs, model or options)."""
    exit_code = EXIT_INPUT


def lock_path(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".lock")


def quarantine_path(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".quarantine.jsonl")


def work_path(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".work")


_HELD: dict[str, list] = {}   # lock files this process holds: path -> [fd, depth] (re-entrant)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    return True


def _read_owner(fd: int) -> dict:
    try:
        owner = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "{}")
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe_owner(owner: dict) -> str:
    if not owner:
        return "owner unknown"
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, started {owner.get('started', '?')}"


def _acquire_lock(path: Path, out: Path) -> int:
    """Create or take `path` and hold it (flock, released by the kernel when the holder dies, even by
    SIGKILL); the file names its owner. Raises `OutputBusy` when another live run holds it."""
    host = socket.gethostname()
    for _attempt in range(20):
        try:
            fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            try:
                fd, created = os.open(path, os.O_RDWR), False
            except FileNotFoundError:   # its owner just finished
                continue
        owner = _read_owner(fd)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise OutputBusy(f"{out} is being written by another run ({_describe_owner(owner)}); "
                                     f"wait for it to end, or write to another --out") from None
                except OSError:   # no flock on this filesystem: trust the owner's pid instead
                    if owner.get("host") == host and _pid_alive(int(owner.get("pid", 0))):
                        raise OutputBusy(f"{out} is being written by another run ({_describe_owner(owner)})") from None
            try:   # the file we hold must still be the one at `path` (its owner may have removed it)
                here = os.stat(path)
                same = (here.st_ino, here.st_dev) == (os.fstat(fd).st_ino, os.fstat(fd).st_dev)
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if not same:
            os.close(fd)
            continue
        if not created:
            log(f"{out}: taking over the stale lock {path.name} ({_describe_owner(owner)}: that run is gone)")
        record = json.dumps({"pid": os.getpid(), "host": host,
                             "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        return fd
    raise OutputBusy(f"{out}: could not lock {path} (other runs keep taking it)")


@contextmanager
def hold_output(out: Path):
    """Hold `<out>.lock` while inside: a second run to the same output refuses at once (`OutputBusy`),
    a lock left by a run that is gone is taken over. Re-entrant within a process."""
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    _HELD[key] = [_acquire_lock(path, Path(out)), 1]
    try:
        yield
    finally:
        fd = _HELD.pop(key)[0]
        path.unlink(missing_ok=True)   # before releasing it: a waiting run then finds no file, or a new one
        os.close(fd)


def _input_files(*path_lists) -> list[Path]:
    files = []
    for paths in path_lists:
        if paths:
            paths = [paths] if isinstance(paths, (str, os.PathLike)) else paths
            files += [Path(p) for p in ingest.expand_paths([str(p) for p in paths])]
    return files


def check_output_paths(out: Path, inputs: list[Path], rollup: bool = True) -> None:
    """Refuse, before any input is read, an output that cannot be written or would destroy an
    input: `out`, its roll-up, quarantine, lock and work paths must not be folders (the work path:
    not a file), nor any input file (same resolved path or inode), and their folder must be writable."""
    out = Path(out)
    targets = [out, quarantine_path(out), lock_path(out)] + ([rollup_path(out)] if rollup else [])
    seen = set()
    for p in inputs:
        try:
            st = p.stat()
            seen.add((st.st_dev, st.st_ino))
        except OSError:
            pass
    resolved = {p.resolve() for p in inputs}
    for target in targets:
        if target.is_dir():
            raise OutputError(f"{target} is a folder: --out needs a file name")
        if target.resolve() in resolved or (target.exists() and (target.stat().st_dev, target.stat().st_ino) in seen):
            raise OutputError(f"{target} is one of the input files: writing it would destroy it; choose another --out")
    if work_path(out).exists() and not work_path(out).is_dir():
        raise OutputError(f"{work_path(out)} is a file: it is where the run keeps its work folder; move it away")
    folder = out.parent if str(out.parent) else Path(".")
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} is not a folder: cannot write {out.name} in it")
    if folder.exists() and not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{folder}: not writable: cannot write {out.name} there")


_STAGING = re.compile(r"\.[0-9a-f]{32}\.tmp$")


def _remove_stale_temps(out: Path, work: Path) -> None:
    """Temp files a killed run of this output left (`atomic_path` staging: `.<name>.<hex>.tmp`);
    only called while holding the output's lock, so none of them is being written."""
    out = Path(out)
    for name in (out.name, rollup_path(out).name, quarantine_path(out).name):
        for path in out.parent.glob(f".{glob.escape(name)}.*.tmp"):
            if _STAGING.search(path.name):
                path.unlink(missing_ok=True)
    for folder in (work, work / "scored"):
        if folder.is_dir():
            for path in folder.glob(".*.tmp"):
                if path.is_file():
                    path.unlink(missing_ok=True)


def _resumable(exc: BaseException, work: Path) -> bool:
    """Is the work folder worth keeping after `exc`: an interruption, a killed worker, or a refused
    --resume, once the inputs are spilled (a failure during the spill leaves nothing to continue)."""
    if isinstance(exc, ResumeRefused):
        return True
    if not (work / "spill.json").exists():
        return False
    if isinstance(exc, WorkerError):   # a worker that died (killed, out of memory), not a job that failed
        return getattr(exc, "original", None) is None
    return isinstance(exc, (KeyboardInterrupt, SystemExit)) or not isinstance(exc, Exception)


# -- the run's fingerprint: what --resume must find unchanged -------------------------------------

def _file_stats(paths, own: Path | None = None) -> list:
    """[resolved path, size, mtime_ns] of each input file, leaving out the run's own files (`own`:
    the output; an input folder may hold it, its lock and its work folder)."""
    out = []
    mine = set() if own is None else {str(p.resolve()) for p in (Path(own), rollup_path(own), lock_path(own),
                                                                  quarantine_path(own))}
    work = () if own is None else (str(work_path(own).resolve()) + os.sep,)
    for path, _explicit in ingest.list_files(paths) if paths else []:
        if str(Path(path).resolve()) in mine or (work and str(Path(path).resolve()).startswith(work)):
            continue
        try:
            st = os.stat(path)
        except OSError as exc:   # a dangling link, a file removed meanwhile: the read reports it
            out.append([str(Path(path).resolve()), exc.__class__.__name__, None])
            continue
        out.append([str(Path(path).resolve()), st.st_size, st.st_mtime_ns])
    return out


def _frame_digest(frame: pd.DataFrame | None) -> str:
    if frame is None or not len(frame):
        return ""
    digest = hashlib.sha256(json.dumps([list(map(str, frame.columns)), list(map(str, frame.dtypes))]).encode())
    digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return digest.hexdigest()


def run_fingerprint(model_id: str, conn_paths, dns_paths, inventory, context, suppressions, options: dict,
                    out: Path | None = None) -> dict:
    """What the output depends on, by option name: the model's identity, each input file's path,
    size and mtime, the content of the inventory, context and suppressions, the output options."""
    return {"--model": model_id, "--conn": _file_stats(conn_paths, out), "--dns": _file_stats(dns_paths, out),
            "--inventory": _frame_digest(inventory), "--context": _frame_digest(context),
            "suppressions (benign verdicts)": _frame_digest(suppressions), **options}


def _fingerprint_changes(old: dict, new: dict) -> list[str]:
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, list) and isinstance(b, list):
            before, after = {f[0]: f[1:] for f in a}, {f[0]: f[1:] for f in b}
            detail = [f"{p} added" for p in after if p not in before]
            detail += [f"{p} removed" for p in before if p not in after]
            detail += [f"{p} modified (size {before[p][0]} -> {after[p][0]})" for p in after
                       if p in before and before[p] != after[p]]
            changes.append(f"{key} changed: {', '.join(detail) or 'file order'}")
        elif key == "--model" or key.startswith(("--inventory", "--context", "supp")):
            changes.append(f"{key} changed")
        else:
            changes.append(f"{key} changed: {a!r} -> {b!r}")
    return changes


def _check_fingerprint(work: Path, fingerprint: dict) -> None:
    try:
        old = json.loads((work / "fingerprint.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ResumeRefused(f"{work}: no readable record of the interrupted run's inputs; rerun without --resume") \
            from None
    changes = _fingerprint_changes(old, fingerprint)
    if changes:
        raise ResumeRefused(f"cannot resume {work}: " + "; ".join(changes) + "; rerun without --resume")


# -- what the spill read, kept for a resumed run ---------------------------------------------

def _save_reads(path: Path, quarantine: ingest.Quarantine, files: list,
                summaries: list[ingest.ReadSummary] = ()) -> None:
    """The quarantine and read summary of the spill, with what `summaries` noted for the DNS coverage,
    as JSON: a resumed run reports them as the interrupted one would have."""
    notes = ingest.ReadSummary()
    for summary in summaries:
        notes.merge_notes(summary)
    record = {"counts": quarantine.counts,
              "records": [[r.path, r.line, r.reason, r.raw] for r in quarantine.records],
              "file_problems": sorted(map(list, quarantine.file_problems)),
              "files": [dataclasses.asdict(f) for f in files],
              "notes": notes.notes_record()}
    with atomic_path(path, durable=False) as tmp:
        Path(tmp).write_text(json.dumps(record), encoding="utf-8")


def _restore_reads(path: Path, quarantine: ingest.Quarantine, summary: ingest.ReadSummary | None) -> None:
    from esxi_anomaly.ingest.base import QuarantineRecord

    record = json.loads(path.read_text(encoding="utf-8"))
    spilled = ingest.Quarantine()
    spilled.counts = {str(k): int(v) for k, v in record["counts"].items()}
    spilled.records = [QuarantineRecord(str(p), int(n), str(reason), str(raw))
                       for p, n, reason, raw in record["records"]]
    spilled.file_problems = {tuple(x) for x in record.get("file_problems", [])}
    quarantine.extend(spilled)
    if summary is not None:
        summary.files.extend(ingest.FileStats(**f) for f in record["files"])
        summary.add_notes(record.get("notes", {}))


# -- progress ------------------------------------------------------------------------------

class Progress:
    """Records, rate and ETA: a live line on a terminal, plain log lines elsewhere."""

    def __init__(self, total: int, label: str, enabled: bool = True, stream=sys.stderr):
        self.total, self.label, self.enabled, self.stream = total, label, enabled, stream
        self.done = 0
        self.t0 = time.perf_counter()
        self.tty = enabled and stream.isatty()
        self.last = 0.0

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.perf_counter()
        if not self.tty and now - self.last < 5 and self.done < self.total:
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        line = (f"{self.label}: {self.done:,}/{self.total:,} records ({100 * self.done / max(self.total, 1):.0f}%), "
                f"{rate:,.0f}/s, ETA {eta:,.0f} s")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=self.stream, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=self.stream)


# -- pass 1: spill ------------------------------------------------------------------------

def _spill(chunks: Iterator[pd.DataFrame], folder: Path, bucket_s: int, key: str,
           file_index: int = 0) -> tuple[dict[int, int], np.ndarray]:
    """Write the chunks of input file `file_index` into folder/<bucket>/part-<file_index>-<n>.arrow
    (Arrow IPC: written and mapped back much faster than Parquet encodes), each row with its source
    `_slot`; returns rows per bucket and per slot."""
    folder.mkdir(parents=True, exist_ok=True)
    counts: dict[int, int] = {}
    slots = np.zeros(N_SLOTS, dtype="int64")
    part = 0
    for chunk in chunks:
        if not len(chunk):
            continue
        bucket = np.floor(chunk["ts"].to_numpy(dtype="float64") / bucket_s)
        bucket = np.nan_to_num(bucket, nan=-1).astype("int64")  # rows without time go first
        slot = source_slot(chunk[key])
        slots += np.bincount(slot, minlength=N_SLOTS)
        table = pa.Table.from_pandas(chunk, preserve_index=False).append_column(_SLOT, pa.array(slot))
        if (np.diff(bucket) < 0).any():   # logs are mostly in time order: then slices need no copy
            order = np.argsort(bucket, kind="stable")
            bucket, table = bucket[order], table.take(pa.array(order))
        cuts = np.flatnonzero(np.diff(bucket)) + 1
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(bucket)]):
            b, rows = int(bucket[lo]), table.slice(lo, hi - lo)
            target = folder / str(b)
            target.mkdir(exist_ok=True)
            with pa.OSFile(str(target / f"part-{file_index}-{part}.arrow"), "wb") as sink, \
                    pa.ipc.new_file(sink, rows.schema) as writer:
                writer.write_table(rows)
            part += 1
            counts[b] = counts.get(b, 0) + rows.num_rows
    return counts, slots


def _spill_file(env: dict, path: str, explicit: bool, frame: str, folder: Path, bucket_s: int, key: str,
                file_index: int, chunk_rows: int, options: dict | None = None, progress=None) -> dict:
    """Pass 1 for one input file, in a worker or here: its bucket and slot counts, quarantine and
    read summary, or the message of the `ingest.IngestError` that refused it."""
    quarantine, summary = ingest.Quarantine(), ingest.ReadSummary()
    try:
        chunks = ingest.iter_file(path, frame, explicit, quarantine, summary, chunk_rows, options)
        if frame == "dns_answers":   # named clients to their IPs before the slot is taken from them
            chunks = (identity.resolve_clients(c, env.get("inventory")) for c in chunks)
        counts, slots = _spill(chunks, folder, bucket_s, key, file_index)
    except ingest.IngestError as exc:
        return {"error": str(exc)}
    return {"counts": counts, "slots": slots, "quarantine": quarantine, "summary": summary}


def assign_partitions(conn_counts: np.ndarray, dns_counts: np.ndarray, n: int) -> np.ndarray:
    """Partition (0..n-1) of each source slot, from the rows per slot: the heaviest slot first to the
    lightest partition (longest-processing-time first), so partitions get about equal rows whatever
    the skew of the sources; unused slots go to partition 0. A slot weighs its connections plus its
    DNS answers when it has connections (answers to a source without connections cost nothing).
    Fewer than `n` partitions when fewer slots are used."""
    weight = conn_counts + np.where(conn_counts > 0, dns_counts, 0)
    part_of = np.zeros(len(weight), dtype="int32")
    used = np.flatnonzero(weight)
    n = max(1, min(n, len(used)))
    load = np.zeros(n)
    for slot in used[np.argsort(-weight[used], kind="stable")]:  # one step per used slot, not per row
        target = int(np.argmin(load))
        part_of[slot] = target
        load[target] += weight[slot]
    return part_of


def _read_bucket(folder: Path, b: int, part_of: np.ndarray | None, partition: int) -> pa.Table | None:
    """The rows of bucket `b` whose source slot belongs to `partition` (all rows when `part_of` is
    None: a single partition), in spill order."""
    target = folder / str(b)
    if not target.is_dir():
        return None
    parts = sorted(target.glob("part-*.arrow"), key=lambda p: tuple(int(n) for n in p.stem.split("-")[1:]))
    table = pa.concat_tables([pa.ipc.open_file(pa.memory_map(str(p))).read_all() for p in parts],
                             promote_options="default")
    if part_of is not None:
        table = table.filter(pa.array(part_of[table[_SLOT].to_numpy()] == partition))
    return table.drop_columns([_SLOT]) if table.num_rows else None


# -- pass 2: score -------------------------------------------------------------------------

@dataclass
class Checkpoint:
    """One partition's progress (or, merged, the run's): what a resumed run starts from."""
    version: int = CHECKPOINT_VERSION
    done_buckets: list[int] = field(default_factory=list)
    state: StreamState = field(default_factory=StreamState)
    top_rows: pd.DataFrame | None = None      # running top-K rows (score, event_id, bucket, row)
    top_feats: pd.DataFrame | None = None
    alerts: int = 0
    scored: int = 0                           # connections read and scored (before merging)
    kept: int = 0                             # rows written: one per connection (`features.merge`)
    files: dict[str, int] = field(default_factory=dict)   # scored file name -> rows, checked on resume

    def to_files(self, folder: Path) -> None:
        """Write into `folder` (created): JSON for the scalars, Arrow IPC for the top rows, and the
        state's own files (`StreamState.to_files`). Nothing of it is a pickle."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("top_rows", "top_feats"):
            if getattr(self, name) is not None:
                write_frame(getattr(self, name), folder / f"{name}.arrow")
        self.state.to_files(folder / "state")
        meta = {"version": self.version, "done_buckets": [int(b) for b in self.done_buckets],
                "alerts": int(self.alerts), "scored": int(self.scored), "kept": int(self.kept),
                "files": {str(k): int(v) for k, v in self.files.items()},
                "top": self.top_rows is not None}
        (folder / "checkpoint.json").write_text(json.dumps(meta), encoding="utf-8")   # last: the folder is whole

    @classmethod
    def from_files(cls, folder: Path, scalars_only: bool = False) -> "Checkpoint":
        """What `to_files` wrote (`scalars_only`: without the top rows and the state)."""
        folder = Path(folder)
        meta = json.loads((folder / "checkpoint.json").read_text(encoding="utf-8"))
        cp = cls(version=int(meta["version"]), done_buckets=[int(b) for b in meta["done_buckets"]],
                 alerts=int(meta["alerts"]), scored=int(meta["scored"]), kept=int(meta.get("kept", 0)),
                 files={str(k): int(v) for k, v in meta["files"].items()})
        if cp.version != CHECKPOINT_VERSION or scalars_only:
            return cp
        if meta["top"]:
            cp.top_rows, cp.top_feats = read_frame(folder / "top_rows.arrow"), read_frame(folder / "top_feats.arrow")
        cp.state = StreamState.from_files(folder / "state")
        return cp


def chunk_bounds(ts: np.ndarray, chunk_rows: int, group: np.ndarray | None = None) -> list[tuple[int, int]]:
    """Index ranges of at most ~chunk_rows rows of sorted `ts`, never splitting equal times, nor
    the rows of one connection (`group`: `merge.connection_groups`), so that a chunk merges them
    as the whole batch would."""
    n = len(ts)
    if n == 0:
        return []
    free = np.r_[False, ts[1:] != ts[:-1], True]         # free[hi]: a border may fall before row hi
    if group is not None:
        # ... when no connection of the rows before it has a row at hi or after
        last = np.full(int(group.max()) + 1, -1, dtype=np.int64)
        np.maximum.at(last, group, np.arange(n))
        free[1:n] &= np.maximum.accumulate(last[group])[:-1] < np.arange(1, n)
    borders = np.flatnonzero(free)
    bounds, lo = [], 0
    while lo < n:
        hi = int(borders[np.searchsorted(borders, min(lo + chunk_rows, n))])
        bounds.append((lo, hi))
        lo = hi
    return bounds


def rank_order(score: pa.Array | np.ndarray, event_id) -> np.ndarray:
    """Positions sorted by score descending, then event_id ascending (the ranking everywhere)."""
    keys = pa.table({"score": pa.array(score), "event_id": pa.array(event_id)})
    return pc.sort_indices(keys, sort_keys=[("score", "descending"), ("event_id", "ascending")]).to_numpy()


def _merge_top(cp: Checkpoint, rows: pd.DataFrame, feats: pd.DataFrame, k: int) -> None:
    """Keep the `k` best rows (and their features) of everything seen so far in `cp`."""
    score = rows["score"].to_numpy()
    if len(score) > k > 0:   # only rows scoring at least the k-th best can make it (ties kept)
        kth = -np.partition(-score, k - 1)[k - 1]
        keep = np.flatnonzero(score >= kth)
        rows, feats = rows.iloc[keep], feats.iloc[keep]
    rows = rows.reset_index(drop=True)
    feats = feats.reset_index(drop=True)
    if cp.top_rows is not None:
        rows = pd.concat([cp.top_rows, rows], ignore_index=True)
        feats = pd.concat([cp.top_feats, feats], ignore_index=True)
    order = np.lexsort((rows["event_id"].to_numpy(dtype=object).astype(str), -rows["score"].to_numpy()))[:k]
    cp.top_rows = rows.iloc[order].reset_index(drop=True)
    cp.top_feats = feats.iloc[order].reset_index(drop=True)


def bucket_groups(counts: dict[int, int], chunk_rows: int) -> list[list[int]]:
    """Consecutive buckets grouped until a group holds about `chunk_rows` connections."""
    groups, current, size = [], [], 0
    for b in sorted(counts):
        if current and size + counts[b] > chunk_rows:
            groups.append(current)
            current, size = [], 0
        current.append(b)
        size += counts[b]
    if current:
        groups.append(current)
    return groups


def _lap(stages: dict, name: str, t0: float) -> float:
    """Add the time since `t0` to stages[name]; returns now (the next lap's start)."""
    now = time.perf_counter()
    stages[name] = stages.get(name, 0.0) + now - t0
    return now


def checkpoint_path(work: Path, partition: int) -> Path:
    """The partition's checkpoint record: names the folder holding its latest checkpoint."""
    return work / f"checkpoint-{partition}.json"


def save_checkpoint(cp: Checkpoint, work: Path, partition: int) -> None:
    """Write `cp` into a new folder, then point `checkpoint_path` at it (an atomic rename): a run
    killed at any moment leaves the previous checkpoint or this one, whole. Not flushed to disk (each
    flush also forced out the scored file's 100+ MB): a killed run resumes from the page cache; after
    a machine crash `_check_checkpoints` refuses what is lost."""
    name = f"checkpoint-{partition}.{uuid.uuid4().hex}"
    cp.to_files(work / name)
    with atomic_path(checkpoint_path(work, partition), durable=False) as tmp:
        Path(tmp).write_text(json.dumps({"folder": name}), encoding="utf-8")
    _drop_old_checkpoints(work, partition, keep=name)


def _drop_old_checkpoints(work: Path, partition: int, keep: str | None) -> None:
    for old in work.glob(f"checkpoint-{partition}.*"):
        if old.is_dir() and old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(work: Path, partition: int, scalars_only: bool = False) -> Checkpoint | None:
    """The partition's last checkpoint (None when it has none). Plain data only: JSON, Arrow IPC and
    numpy arrays without pickles, so a file planted in the work folder runs no code."""
    record = checkpoint_path(work, partition)
    if not record.exists():
        return None
    try:
        name = json.loads(record.read_text(encoding="utf-8"))["folder"]
        if not re.fullmatch(rf"checkpoint-{partition}\.[0-9a-f]{{32}}", str(name)):
            raise ValueError(f"unexpected folder name {name!r}")
        return Checkpoint.from_files(work / name, scalars_only)
    except Exception as exc:   # truncated or garbled by a crash, or not ours
        raise ValueError(f"{work}: checkpoint {record.name} is damaged ({exc.__class__.__name__}: {exc}); "
                         "rerun without --resume") from None


def score_partition(env: dict, plan: dict, work: Path, partition: int, resume: bool,
                    progress=None) -> tuple[Checkpoint, dict]:
    """Score the connections of one partition of the sources, bucket group by bucket group in time
    order, carrying the partition's `StreamState`; after each group, its scored rows and the
    partition's checkpoint are written atomically. Runs in a worker process or in the parent
    (`env`: model and inventory; `plan`: see `_plan`). Returns the final checkpoint, without its
    state, and the seconds per stage."""
    model, inventory = env["model"], env["inventory"]
    bucket_s, chunk_rows, explain_top = plan["bucket_s"], plan["chunk_rows"], plan["explain_top"]
    n_parts = plan["partitions"]
    part_of = plan["part_of"] if n_parts > 1 else None
    suppressions = plan["suppressions"]
    progress = progress or (lambda n: None)
    if n_parts > 1 and env.get("worker"):  # one partition per core already: the forest scores on this thread only
        model.detector_.forest_.n_jobs = 1
    conn_dir, dns_dir, out_dir = work / "conn", work / "dns", work / "scored"
    out_dir.mkdir(exist_ok=True)
    cp = (load_checkpoint(work, partition) if resume else None) or Checkpoint()
    # scored files of this partition its checkpoint does not list were written after it (a run
    # killed in between): they are scored again, perhaps cut otherwise, so they must go
    for path in out_dir.glob(f"*{SCORED_SUFFIX}"):
        if int(path.name.split(".")[0]) % n_parts == partition and path.name not in cp.files:
            path.unlink()
    progress(cp.scored)
    stages: dict[str, float] = {}
    lookback = model.join_params().lookback_s
    dns_cache: dict[int, pd.DataFrame | None] = {}
    # the buckets after the last one done, grouped by this run's chunk_rows: the state carried is
    # that of a time, not of a grouping, so a resumed run may cut its groups otherwise
    last = max(cp.done_buckets) if cp.done_buckets else None
    todo = {b: n for b, n in plan["conn_buckets"].items() if last is None or b > last}
    for group in bucket_groups(todo, chunk_rows):
        t = time.perf_counter()
        frames = [_read_bucket(conn_dir, b, part_of, partition) for b in group]
        frames = [f for f in frames if f is not None]
        if not frames:
            cp.done_buckets.extend(group)
            continue
        table = pa.concat_tables(frames, promote_options="default")
        # stable sort by (ts, event_id), NaN times last, all in Arrow (pandas' take of its Arrow
        # string columns costs several times more)
        order = pc.sort_indices(table, sort_keys=[("ts", "ascending"), ("event_id", "ascending")])
        conns = table.take(order).to_pandas()
        ts = conns["ts"].to_numpy(dtype="float64")
        pieces = []
        bounds = chunk_bounds(ts, chunk_rows, connection_groups(conns) if len(conns) > chunk_rows else None)
        for i, (lo, hi) in enumerate(bounds):
            start = ts[lo]
            # the chunk counts the DNS rows from where the previous one stopped (everything, for
            # the first) to the next chunk's start, and sees its look-back window as well
            end = ts[bounds[i + 1][0]] if i + 1 < len(bounds) else (group[-1] + 1) * bucket_s
            counted_until = cp.state.dns_owned_until
            dns = _dns_window(dns_dir, dns_cache, min(counted_until, start - lookback), end, bucket_s,
                              part_of, partition)
            chunk = Frames(conns.iloc[lo:hi].reset_index(drop=True), dns, inventory)
            t = _lap(stages, "score: read buckets", t)
            prepared, feats = model.features(chunk, cp.state)
            cp.state.dns_owned_until = end
            t = _lap(stages, "score: features", t)
            components = model.detector_.components(feats)
            t = _lap(stages, "score: forest+rules", t)
            rows = apply_suppressions(model.score_rows(prepared, feats, components), suppressions)
            rows["bucket"] = group[0] * n_parts + partition
            t = _lap(stages, "score: rows", t)
            _merge_top(cp, rows, feats, explain_top)
            pieces.append(rows)
            cp.scored += hi - lo
            cp.kept += len(rows)
            progress(hi - lo)
            t = _lap(stages, "score: top merge", t)
        # a chunk whose rows all joined connections of earlier chunks scores none (and its empty
        # text columns have no string type): it adds nothing
        scored = pd.concat([p for p in pieces if len(p)] or pieces[:1], ignore_index=True)
        cp.alerts += int(scored["alert"].sum())
        name = f"{group[0] * n_parts + partition}{SCORED_SUFFIX}"
        write_scored(scored, out_dir / name)
        cp.files[name] = len(scored)
        cp.done_buckets.extend(group)
        save_checkpoint(cp, work, partition)
        t = _lap(stages, "score: write scored+checkpoint", t)
        horizon = np.floor((ts[-1] - lookback) / bucket_s) - 1
        for old in [k for k in dns_cache if 0 <= k < horizon]:
            dns_cache.pop(old)
        del conns, scored, pieces, prepared, feats, components, rows, chunk
        release_free_memory(above=KEEP_HEAP_BELOW)
    release_free_memory()
    cp.state = StreamState()  # the parent needs the counts and the top rows only
    return cp, stages


def _dns_window(dns_dir: Path, cache: dict, lo: float, hi: float, width: int, part_of: np.ndarray | None,
                partition: int) -> pd.DataFrame:
    """The partition's DNS rows with lo <= ts < hi, read from the (cached) buckets that cover them."""
    first = np.floor(lo / width) if np.isfinite(lo) else -np.inf
    last = np.floor((hi - 1e-9) / width) if np.isfinite(hi) else np.inf
    existing = sorted(int(p.name) for p in dns_dir.iterdir() if p.is_dir()) if dns_dir.is_dir() else []
    frames = []
    for b in existing:
        if b != -1 and not (first <= b <= last):  # bucket -1 holds answers without a time
            continue
        if b not in cache:
            table = _read_bucket(dns_dir, b, part_of, partition)
            cache[b] = table.to_pandas() if table is not None else None
        if cache[b] is not None:
            frames.append(cache[b])
    if not frames:
        return schema.empty("dns_answers")
    dns = pd.concat(frames, ignore_index=True)
    t = dns["ts"].to_numpy(dtype="float64")
    return dns[(t >= lo) & (t < hi)].sort_values("ts", kind="stable", ignore_index=True)


# -- pass 3: rank and write -----------------------------------------------------------------

def write_scored(rows: pd.DataFrame, path: Path) -> None:
    """Scored rows of one bucket group (or Dask partition), as an Arrow IPC file written atomically,
    in rank order with `row` = position in the file: an output block then takes one run of
    consecutive rows from each file (sequential reads of the memory map, each page once)."""
    table = pa.Table.from_pandas(rows.drop(columns=["row"], errors="ignore"), preserve_index=False)
    table = table.take(pa.array(rank_order(rows["score"].to_numpy(), rows["event_id"].array)))  # Arrow: 50x pandas here
    table = table.append_column("row", pa.array(np.arange(len(rows))))
    with atomic_path(path, durable=False) as tmp:   # a resumed run checks it (`_check_checkpoints`)
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)


class _ScoredFiles(dict):
    """The scored Arrow files, memory-mapped (zero-copy: pages load on use), by bucket.

    Ranking touches every page of them, and touched pages of a mapping count as this process's
    resident memory. `release()` drops them from it (they stay in the OS page cache and fault back
    in cheaply), so the resident memory of ranking stays bounded whatever the number of rows."""

    def __init__(self, paths: list[Path]):
        super().__init__()
        self._maps: dict[int, mmap.mmap] = {}
        for path in paths:
            bucket = int(path.name.split(".")[0])
            with open(path, "rb") as fh:
                self._maps[bucket] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            self[bucket] = pa.ipc.open_file(pa.BufferReader(pa.py_buffer(self._maps[bucket]))).read_all()

    def release(self, bucket: int | None = None) -> None:
        """Drop the pages of one file (all files when None) from the resident set."""
        if hasattr(mmap, "MADV_DONTNEED"):
            for mapped in self._maps.values() if bucket is None else [self._maps[bucket]]:
                mapped.madvise(mmap.MADV_DONTNEED)

    def take(self, bucket: int, rows: np.ndarray) -> pa.Table:
        """Rows of one file, copied out of the mapping, whose pages are then released. (Not a zero-copy
        slice even when the rows are consecutive: some kernels touch a sliced string column's whole
        buffer, faulting in the whole file.)"""
        out = self[bucket].take(pa.array(rows))
        self.release(bucket)
        return out

    def add_each_to(self, rollup) -> None:
        for bucket, table in self.items():
            rollup.add(table)
            self.release(bucket)


def rollup_path(out: Path) -> Path:
    """Where `score --out X.<ext>` writes its entity roll-up: X.entities.csv (any output format)."""
    out = Path(out)
    return out.with_name(out.stem + ROLLUP_SUFFIX)


def rank_and_write(model, work: Path, cp: Checkpoint, out: Path, fmt: str, top: int | None,
                   explain_top: int, html_extra: dict, context: pd.DataFrame | None = None, *,
                   rollup_out: Path | None = None, stages: dict | None = None,
                   pool: WorkerPool | None = None, expect_rows: int | None = None) -> tuple[int, int]:
    """Rank every scored row, write the first `top` (all when None) to `out`; with `rollup_out`, also
    the per-entity roll-up of *all* scored rows (not only the `top`) as formula-safe CSV there.
    Explanation sentences are built here, block by block, for the rows written only: by the
    `pool`'s workers for CSV when there is one, else on threads. Both files are written
    atomically, the output last, and only when it holds every row it should (`expect_rows`: the
    rows scored; the rows of the output blocks are counted). Returns (rows written, entities in the
    roll-up)."""
    stages = {} if stages is None else stages
    t = time.perf_counter()
    tables = _ScoredFiles(_scored_paths(work))
    keys = pa.concat_tables([tables[b].select(["score", "event_id", "bucket", "row"]) for b in tables])
    if expect_rows is not None and keys.num_rows != expect_rows:
        raise RuntimeError(f"{work}: the scored files hold {keys.num_rows:,} rows, not the {expect_rows:,} "
                           "connections scored; nothing was written")
    t = _lap(stages, "rank+write: read keys", t)
    threads = ThreadPoolExecutor(max_workers=WRITE_THREADS)   # Arrow kernels release the GIL
    try:
        rollup = StreamingRollup() if rollup_out is not None else None
        counted = threads.submit(tables.add_each_to, rollup) if rollup is not None else None
        attributed = threads.submit(model.detector_.attributions, cp.top_feats)   # while the rows are ranked
        full_order = rank_order(keys["score"].combine_chunks(), keys["event_id"].combine_chunks())
        bucket, row = (_narrow(keys[c].to_numpy()) for c in ("bucket", "row"))   # held to the end
        del keys
        if counted is not None:
            counted.result()  # the roll-up has read every file: their pages can go
        tables.release()
        release_free_memory()   # the sort's temporaries: this process holds the order alone from here
        if fmt == "html" and top is None:
            top = HTML_DEFAULT_TOP
        order = full_order[:top] if top is not None else full_order
        attribution = dict(zip(cp.top_rows["event_id"], attributed.result()))
        t = _lap(stages, "rank+write: rank + attributions", t)

        block_frames = []
        with atomic_path(out) as tmp:
            writer = _BlockWriter(tmp, fmt)

            flushing: list = []

            def write(output) -> None:
                result, rows = output
                writer.rows += rows
                if fmt == "csv":
                    writer.write_parts(result)
                    # the final flush to disk (atomic_path) then finds little left: written
                    # blocks go out on a thread while the next ones are built
                    if not flushing or flushing[-1].done():
                        writer.fh.flush()
                        flushing.append(threads.submit(os.fdatasync, writer.fh.fileno()))
                elif fmt == "html":
                    block_frames.append(result.to_pandas())
                else:
                    writer.write(result)
                tables.release()  # the block's gathered pages are written out

            def block(start: int) -> tuple:
                """Block `start`'s arguments: its first rank - 1 and the (file, row) of each of its rows."""
                idx = order[start:start + WRITE_BLOCK]
                return start, bucket[idx], row[idx]

            starts = range(0, len(order), WRITE_BLOCK)
            if fmt == "csv" and pool is not None and len(starts) > 1:
                _write_blocks_on_workers(pool, work, block, starts, explain_top, attribution, context, write)
            else:
                rank_env = {"model": model, "tables": tables, "explain_top": explain_top,
                            "attribution": attribution, "context": context}
                pending: deque = deque()
                for start in starts:
                    pending.append(threads.submit(_block_output, rank_env, fmt, *block(start)))
                    while len(pending) > WRITE_THREADS - 1:   # oldest first, the rest in flight
                        write(pending.popleft().result())
                while pending:
                    write(pending.popleft().result())
            for flush in flushing:
                flush.result()
            if fmt == "html":
                ranked = pd.concat(block_frames, ignore_index=True) if block_frames else pd.DataFrame()
                report_html.write_html(ranked, tmp, **html_extra)
            writer.close()
            if writer.rows != len(order):
                raise RuntimeError(f"{out}: {writer.rows:,} rows were written of {len(order):,}; "
                                   "the output was not replaced")
            written = len(order)
            tables.release()
            t = _lap(stages, f"rank+write: gather+explain+write {fmt}", t)
            entities = _write_rollup(model, tables, rollup, full_order, bucket, row, context, rollup_out)
            if rollup is not None:
                _lap(stages, "rank+write: entity roll-up", t)
    finally:
        threads.shutdown(wait=True, cancel_futures=True)
    return written, entities


def _write_rollup(model, tables, rollup, full_order: np.ndarray, bucket: np.ndarray, row: np.ndarray,
                  context: pd.DataFrame | None, rollup_out: Path | None) -> int:
    """Write the entity roll-up of every scored row (before the output is moved into place: a run
    that fails here leaves the old output whole); returns its rows (0: none asked for)."""
    if rollup is None:
        return 0

    def rows_at(idx: np.ndarray) -> pd.DataFrame:
        rows = _gather(tables, bucket[idx], row[idx]).to_pandas()
        rows["explanation"] = explain.sentences(rows, model.history_days_, model.detector_.rules_).array
        if context is not None:
            rows["explanation"] = (rows["explanation"] + context_clauses(rows, context)).array
        return rows

    entities = rollup.finish(full_order, rows_at)
    report_csv.write_entity_rollup_csv(entities, rollup_out)
    return len(entities)


def _narrow(values: np.ndarray) -> np.ndarray:
    """Non-negative integers as int32 when they fit: half the memory of the per-rank arrays."""
    return values.astype(np.int32) if not len(values) or values.max() < 2**31 else values


def _scored_paths(work: Path) -> list[Path]:
    return sorted((work / "scored").glob(f"*{SCORED_SUFFIX}"), key=lambda p: int(p.name.split(".")[0]))


def _block_output(rank_env: dict, fmt: str, start: int, bucket: np.ndarray, row: np.ndarray):
    """The output of rank positions start+1.. (rows (bucket[i], row[i])): for CSV its bytes (a list of
    buffers), else the ranked rows (Arrow), in rank order."""
    ranked, to_rank = _ranked_block(rank_env["model"], rank_env["tables"], bucket, row, start,
                                    rank_env["explain_top"], rank_env["attribution"], rank_env["context"])
    if fmt != "csv":
        return ranked.take(pa.array(to_rank)), ranked.num_rows
    parts = report_csv.arrow_csv_parts(ranked, header=start == 0, order=to_rank)
    if parts is None:   # a column type the Arrow encoder does not handle: pandas writes the block
        buffer = io.BytesIO()
        report_csv.write_frame_csv(ranked.take(pa.array(to_rank)).to_pandas(), buffer, header=start == 0)
        parts = [buffer.getbuffer()]
    return parts, ranked.num_rows


def _csv_block_job(env: dict, work: Path, start: int, bucket: np.ndarray, row: np.ndarray, progress=None) -> bytes:
    """Worker side of `_write_blocks_on_workers`: one CSV block, as bytes."""
    rank_env = env["rank"]
    if rank_env.get("work") != work:   # this run's scored files, opened once per worker
        rank_env.update(work=work, tables=_ScoredFiles(_scored_paths(work)))
    parts, rows = _block_output(rank_env, "csv", start, bucket, row)
    data = b"".join(parts)
    rank_env["tables"].release()
    release_free_memory()
    return data, rows


def _rank_setup_job(env: dict, explain_top: int, attribution: dict, context: pd.DataFrame | None,
                    progress=None) -> None:
    env["rank"] = {"model": env["model"], "explain_top": explain_top, "attribution": attribution, "context": context}


def _write_blocks_on_workers(pool: WorkerPool, work: Path, block, starts: range, explain_top: int,
                             attribution: dict, context: pd.DataFrame | None, write) -> None:
    """CSV blocks (`block(start)`: a block's arguments) built by the workers and written here in rank
    order; at most two blocks per worker in flight, so memory stays bounded."""
    pool.broadcast(_rank_setup_job, explain_top, attribution, context)
    done: dict[int, bytes] = {}
    block_of: dict[int, int] = {}
    next_submit = next_write = 0
    while next_write < len(starts):
        while next_submit < len(starts) and next_submit - next_write < 2 * len(pool):
            block_of[pool.submit(next_submit % len(pool), _csv_block_job, work, *block(starts[next_submit]))] = \
                next_submit
            next_submit += 1
        for _, job_id, data in pool.events():
            done[block_of.pop(job_id)] = data
            if next_write in done:
                break
        while next_write in done:
            data, rows = done.pop(next_write)
            write(([data], rows))
            next_write += 1


def _ranked_block(model, tables: dict[int, pa.Table], bucket: np.ndarray, row: np.ndarray, start: int,
                 explain_top: int, attribution: dict, context: pd.DataFrame | None) -> tuple[pa.Table, np.ndarray]:
    """The output rows for rank positions start+1.. (rows (bucket[i], row[i])): taken, explained and
    laid out in file order (sequential reads of the memory maps), and the positions that put them
    in rank order."""
    block, stored = _gather_stored(tables, bucket, row)
    to_rank = np.empty(len(stored), dtype=np.int64)
    to_rank[stored] = np.arange(len(stored))
    ranks = start + 1 + stored
    sentence = explain.sentences(block.select(SENTENCE_COLUMNS).to_pandas(), model.history_days_,
                                 model.detector_.rules_)
    if context is not None:
        sentence = sentence + context_clauses(block.select(["ts", "src_name", "esxi_host"]).to_pandas(), context)
    top_features = np.full(len(stored), "", dtype=object)
    first = np.flatnonzero(ranks <= explain_top)
    top_features[first] = [attribution.get(e, "") for e in block["event_id"].take(pa.array(first)).to_pylist()]
    columns = {"rank": pa.array(ranks)}
    columns.update({c: block[c] for c in block.column_names if c not in DROPPED and c != "alert"})
    columns["explanation"] = pa.array(sentence.array, pa.large_string())
    columns["top_features"] = pa.array(top_features, pa.large_string())
    columns["alert"] = block["alert"]
    return pa.table(columns), to_rank


def _gather_stored(tables: dict[int, pa.Table], bucket: np.ndarray, row: np.ndarray) -> tuple[pa.Table, np.ndarray]:
    """The rows (bucket[i], row[i]) of the memory-mapped tables in file order (sequential reads),
    score and event_id first, and `stored`: row j of the result is the pair stored[j]."""
    stored = np.lexsort((row, bucket))
    bucket, row = bucket[stored], row[stored]
    cuts = np.flatnonzero(np.diff(bucket)) + 1
    take = tables.take if isinstance(tables, _ScoredFiles) else lambda b, r: tables[b].take(pa.array(r))
    parts = [take(int(b[0]), r) for b, r in zip(np.split(bucket, cuts), np.split(row, cuts)) if len(b)]
    table = pa.concat_tables(parts, promote_options="default") if parts else \
        next(iter(tables.values())).slice(0, 0)
    cols = ["score", "event_id"] + [c for c in table.column_names if c not in ("score", "event_id")]
    return table.select(cols), stored


def _gather(tables: dict[int, pa.Table], bucket: np.ndarray, row: np.ndarray) -> pa.Table:
    """The rows (bucket[i], row[i]) of the memory-mapped tables, in that order, score and event_id first."""
    table, stored = _gather_stored(tables, bucket, row)
    to_order = np.empty(len(stored), dtype=np.int64)
    to_order[stored] = np.arange(len(stored))
    return table.take(pa.array(to_order))


class _BlockWriter:
    """Appends rank-ordered blocks (Arrow tables) to one CSV / JSON lines / Parquet file."""

    def __init__(self, path: Path, fmt: str):
        self.path, self.fmt = path, fmt
        self.first = True
        self.rows = 0            # rows of the blocks written (counted by the caller)
        self.parquet = None
        self.fh = open(path, "wb") if fmt == "csv" else open(path, "w", encoding="utf-8", newline="") \
            if fmt == "jsonl" else None

    def write(self, block: pa.Table, order: np.ndarray | None = None) -> None:
        """Append the rows of `block` (in `order`, when given)."""
        if self.fmt == "csv":
            if report_csv.write_arrow_csv(block, self.fh, header=self.first, order=order):
                self.first = False
                return
            block = block.take(pa.array(order)) if order is not None else block
            report_csv.write_frame_csv(block.to_pandas(), self.fh, header=self.first)
            self.first = False
            return
        block = block.take(pa.array(order)) if order is not None else block
        if self.fmt == "jsonl":
            for record in report_ecs.ecs_records(block.to_pandas()):
                self.fh.write(json.dumps(record, ensure_ascii=True) + "\n")
        elif self.fmt == "parquet":
            table = pa.Table.from_pandas(block.to_pandas(), preserve_index=False)
            if self.parquet is None:
                self.parquet = pq.ParquetWriter(self.path, table.schema)
            self.parquet.write_table(table.cast(self.parquet.schema))
        self.first = False

    def write_parts(self, parts) -> None:
        """Append encoded CSV bytes (a block's buffers)."""
        for part in parts:
            self.fh.write(part)

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
        if self.parquet is not None:
            self.parquet.close()


# -- the run -------------------------------------------------------------------------------

@dataclass
class RunSummary:
    connections: int = 0         # connection rows read
    connections_merged: int = 0  # connections scored: rows of one connection seen by several sources merged
    dns_records: int = 0
    written: int = 0
    alerts: int = 0
    quarantined: int = 0
    chunks_resumed: int = 0
    partitions: int = 0          # partitions of the sources scored (local: one per worker; Dask: tasks)
    entities: int = 0            # rows of the entity roll-up CSV (0: not written)
    stages_s: dict = field(default_factory=dict)


def run(model, conn_paths, dns_paths, inventory: pd.DataFrame | None, out: Path, fmt: str | None = None,
        top: int | None = None, chunk_rows: int = 500_000, explain_top: int = 200, work: Path | None = None,
        resume: bool = False, progress: bool = True, quarantine: ingest.Quarantine | None = None,
        summary: ingest.ReadSummary | None = None, html_extra: dict | None = None,
        bucket_s: int = BUCKET_S, suppressions: pd.DataFrame | None = None,
        context: pd.DataFrame | None = None, rollup: bool = True, workers: int = 1,
        pool: WorkerPool | None = None, model_id: str | None = None, read_options: dict | None = None) -> RunSummary:
    """Score `conn_paths` against `dns_paths` into `out` (ranked rows); with `rollup`, the per-entity
    roll-up of every scored connection goes to `rollup_path(out)` as well. `workers`: processes
    reading the inputs and scoring partitions of the sources (1: all in this process;
    `workers.default_workers()`: every usable core), or a started `pool` of them (the caller closes
    it); the output does not depend on either. A resumed run keeps its first run's partitions,
    whatever its workers or chunk_rows, and refuses a work folder of other inputs, model
    (`model_id`: the bundle's identity; else a digest of `model`) or options.

    The output is locked for the run (`hold_output`) and checked before any input is read; a
    failed run removes its work folder, unless it can be resumed (interrupted, a worker killed).
    Worker processes import the caller's main script: call from under `if __name__ == "__main__":`."""
    out = Path(out)
    fmt = output_format(out, fmt)
    work = Path(work) if work else work_path(out)
    quarantine = quarantine if quarantine is not None else ingest.Quarantine()
    with hold_output(out):
        check_output_paths(out, _input_files(conn_paths, dns_paths), rollup)
        _remove_stale_temps(out, work)
        try:
            result = _run(model, conn_paths, dns_paths, inventory, out, fmt, top, chunk_rows, explain_top, work,
                          resume, progress, quarantine, summary, html_extra, bucket_s, suppressions, context,
                          rollup, workers, pool, model_id, read_options or {})
        except BaseException as exc:
            if _resumable(exc, work):
                if not isinstance(exc, ResumeRefused):
                    log(f"the run stopped; its work folder {work} is kept: rerun with --resume to continue")
            else:
                shutil.rmtree(work, ignore_errors=True)
            raise
        shutil.rmtree(work, ignore_errors=True)
    return result


def _run(model, conn_paths, dns_paths, inventory, out: Path, fmt: str, top, chunk_rows: int, explain_top: int,
         work: Path, resume: bool, progress: bool, quarantine, summary, html_extra, bucket_s: int, suppressions,
         context, rollup: bool, workers: int, pool: WorkerPool | None, model_id: str | None,
         read_options: dict) -> RunSummary:
    run_summary = RunSummary()
    stages = run_summary.stages_s
    spilled = work / "spill.json"
    resuming = resume and spilled.exists()
    if resume and not resuming:
        log(f"nothing to resume in {work}: scoring from the start")
    model_id = model_id or hashlib.sha256(pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL)).hexdigest()
    fingerprint = run_fingerprint(model_id, conn_paths, dns_paths, inventory, context, suppressions,
                                  {"--top": top, "--format": fmt, "explain_top": explain_top, "bucket_s": bucket_s,
                                   "roll-up": rollup, **{f"--{k.replace('_', '-')}": v for k, v in read_options.items()}},
                                  out)
    if resuming:
        _check_fingerprint(work, fingerprint)
    own_pool = pool is None and workers > 1
    if own_pool:
        pool = WorkerPool(workers)
    workers = len(pool) if pool is not None else 1
    try:
        if pool is not None:
            pool.broadcast(_setup_worker, model, inventory)
        if resuming:
            meta = json.loads(spilled.read_text())
            run_summary.connections, run_summary.dns_records = meta["connections"], meta["dns_records"]
            _restore_reads(work / "reads.json", quarantine, summary)
        else:
            meta = _spill_inputs(conn_paths, dns_paths, work, bucket_s, chunk_rows, workers, quarantine, summary,
                                 stages, run_summary, pool, fingerprint, inventory, read_options)
        plan = _plan(meta, work, chunk_rows, explain_top, suppressions)
        if resuming:
            run_summary.chunks_resumed = _check_checkpoints(work, plan["partitions"])
        bar = Progress(run_summary.connections, "scoring", enabled=progress)
        t0 = time.perf_counter()
        if pool is None or plan["partitions"] == 1:   # here, one partition after the other
            env = {"model": model, "inventory": inventory}
            parts = [score_partition(env, plan, work, k, resuming, bar.update) for k in range(plan["partitions"])]
        else:   # a partition's scoring does not depend on the process: any number of workers will do
            for k in range(plan["partitions"]):
                pool.submit(k % len(pool), score_partition, plan, work, k, resuming)
            parts = [value for _, _, value in pool.events(bar.update)]
        bar.close()
        stages["score"] = time.perf_counter() - t0
        cp = Checkpoint()
        for part_cp, part_stages in parts:   # sub-stages: mean seconds per partition
            cp.alerts += part_cp.alerts
            cp.scored += part_cp.scored
            cp.kept += part_cp.kept
            if part_cp.top_rows is not None:
                _merge_top(cp, part_cp.top_rows, part_cp.top_feats, explain_top)
            for name, seconds in part_stages.items():
                stages[name] = stages.get(name, 0.0) + seconds / len(parts)
        if cp.scored != run_summary.connections:
            raise RuntimeError(f"scored {cp.scored} of {run_summary.connections} connections")
        run_summary.connections_merged = cp.kept
        t0 = time.perf_counter()
        if html_extra:
            html_extra = {**html_extra, "summary": {**html_extra.get("summary", {}),
                                                    "connections": run_summary.connections}}
        run_summary.written, run_summary.entities = rank_and_write(
            model, work, cp, out, fmt, top, explain_top, html_extra or {}, context,
            rollup_out=rollup_path(out) if rollup else None, stages=stages, pool=pool,
            expect_rows=cp.kept)
        stages["rank+write"] = time.perf_counter() - t0
    finally:
        if own_pool:
            pool.close()
    run_summary.alerts = cp.alerts
    run_summary.quarantined = len(quarantine)
    run_summary.partitions = plan["partitions"]
    return run_summary


def _setup_worker(env: dict, model, inventory: pd.DataFrame | None, progress=None) -> None:
    env.update(model=model, inventory=inventory, worker=True)


def _spill_inputs(conn_paths, dns_paths, work: Path, bucket_s: int, chunk_rows: int, partitions: int,
                  quarantine, summary, stages: dict, run_summary: RunSummary, pool: WorkerPool | None,
                  fingerprint: dict, inventory: pd.DataFrame | None = None, read_options: dict | None = None) -> dict:
    """Pass 1 into a fresh `work` folder, one job per input file (spread over the workers); returns
    (and writes, last, as work/spill.json) its record: rows per bucket and the partition of every
    source slot. The run's fingerprint, quarantine and read summary are kept beside it for --resume."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / "fingerprint.json").write_text(json.dumps(fingerprint), encoding="utf-8")
    t0 = time.perf_counter()
    files = [(path, explicit, "connections", work / "conn", "src_ip") for path, explicit in ingest.list_files(conn_paths)]
    files += [(path, explicit, "dns_answers", work / "dns", "client_ip") for path, explicit in ingest.list_files(dns_paths)]
    read_rows = max(10_000, chunk_rows // partitions)   # files are read side by side: chunk_rows in all
    jobs = [(path, explicit, frame, folder, bucket_s, key, index, read_rows, read_options)
            for index, (path, explicit, frame, folder, key) in enumerate(files)]
    results = (pool.map(_spill_file, jobs) if pool is not None
               else [_spill_file({"inventory": inventory}, *job) for job in jobs])
    stages["read+spill"] = time.perf_counter() - t0
    counts = {"connections": {}, "dns_answers": {}}
    slots = {"connections": np.zeros(N_SLOTS, dtype="int64"), "dns_answers": np.zeros(N_SLOTS, dtype="int64")}
    spill_quarantine, spill_files = ingest.Quarantine(), []
    for (_path, _explicit, frame, *_), result in zip(files, results):   # in file order, as one reader would
        if "error" in result:
            raise ingest.IngestError(result["error"])
        for b, n in result["counts"].items():
            counts[frame][b] = counts[frame].get(b, 0) + n
        slots[frame] += result["slots"]
        spill_quarantine.extend(result["quarantine"])
        spill_files.extend(result["summary"].files)
    quarantine.extend(spill_quarantine)
    if summary is not None:
        summary.files.extend(spill_files)
        for result in results:   # the DNS coverage's distinct clients and sources
            summary.merge_notes(result["summary"])
    run_summary.connections = sum(counts["connections"].values())
    run_summary.dns_records = sum(counts["dns_answers"].values())
    if not run_summary.connections:
        raise ingest.IngestError("no connection records were read from --conn")
    part_of = assign_partitions(slots["connections"], slots["dns_answers"], partitions)
    np.save(work / "partitions.npy", part_of, allow_pickle=False)
    _save_reads(work / "reads.json", spill_quarantine, spill_files, [result["summary"] for result in results])
    meta = {"version": CHECKPOINT_VERSION, "bucket_s": bucket_s, "connections": run_summary.connections,
            "dns_records": run_summary.dns_records, "partitions": int(part_of.max()) + 1,
            "conn_buckets": {str(k): v for k, v in counts["connections"].items()}}
    with atomic_path(work / "spill.json") as tmp:
        Path(tmp).write_text(json.dumps(meta))
    release_free_memory()   # this process only waits while the partitions are scored
    return meta


def _plan(meta: dict, work: Path, chunk_rows: int, explain_top: int, suppressions: pd.DataFrame | None) -> dict:
    """What every partition's `score_partition` needs to know of the run."""
    if meta.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{work}: work folder from another version; rerun without --resume")
    # bucket groups (`score_partition`) of about chunk_rows connections in all, whatever the
    # partitions: memory stays bounded by chunk_rows over all workers together
    return {"bucket_s": int(meta["bucket_s"]), "chunk_rows": chunk_rows, "explain_top": explain_top,
            "partitions": int(meta["partitions"]),
            "part_of": np.load(work / "partitions.npy", allow_pickle=False),
            "conn_buckets": {int(k): v for k, v in meta["conn_buckets"].items()},
            "suppressions": suppressions if suppressions is not None else pd.DataFrame()}


def _scored_rows(path: Path) -> int:
    """Rows of a scored file, -1 when it is missing or not a whole Arrow IPC file."""
    try:
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_file(source).read_all().num_rows
    except (OSError, pa.ArrowInvalid):
        return -1


def _check_checkpoints(work: Path, partitions: int) -> int:
    """Bucket groups already done over all partitions; refuses checkpoints of another version, or whose
    scored files are not whole."""
    done = 0
    for k in range(partitions):
        cp = load_checkpoint(work, k, scalars_only=True)
        if cp is None:
            continue
        if cp.version != CHECKPOINT_VERSION:
            raise ValueError(f"{work}: checkpoint from another version; rerun without --resume")
        for name, rows in cp.files.items():
            if _scored_rows(work / "scored" / name) != rows:
                raise ValueError(f"{work}: scored file {name} is missing or damaged (a machine crash?); "
                                 "rerun without --resume")
        done += len(cp.done_buckets)
    return done


def _file_records(summary: ingest.ReadSummary) -> list[dict]:
    """Each input file's outcome for the JSON run summary: its format's frame kind added, no NaN."""
    frame_of = {f.name: f.frame for f in ingest.formats()}
    records = []
    for stats in summary.outcomes():
        record = {k: (None if isinstance(v, float) and v != v else v) for k, v in dataclasses.asdict(stats).items()}
        records.append(record | {"frame": frame_of.get(stats.format, "")})
    return records


@contextmanager
def _output_folder(folder: Path):
    """Create `folder` (and its missing parents) for the run; on failure, remove those it created while
    they are still empty: a failed run leaves nothing behind."""
    created = []
    for parent in [folder, *folder.parents]:
        if parent.exists():
            break
        created.append(parent)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for made in created:   # deepest first
            try:
                made.rmdir()
            except OSError:   # not empty (the run wrote there) or already gone
                break
        raise


def score_command(args, model, manifest, directory, pool: WorkerPool | None = None) -> int:
    """`esxi-anomaly score`: the local engine streams (on `pool`'s workers when given); `--engine dask`
    partitions by entity. The output is checked, then locked, before any input is read."""
    from esxi_anomaly.cli import finish_quarantine, read_options

    out = Path(args.out)
    fmt = output_format(out, args.format)
    check_output_paths(out, _input_files(args.conn, args.dns, args.inventory, args.context))
    with _output_folder(out.parent), hold_output(out):
        quarantine, summary = ingest.Quarantine(), ingest.ReadSummary()
        inventory = ingest.read_inventory(args.inventory, quarantine, summary) if args.inventory else None
        context = ingest.read_context(args.context, quarantine, summary) if args.context else None
        html_extra = {"summary": {"model": str(directory), "env": manifest.get("env", ""),
                                  "threshold": manifest.get("threshold")}} if fmt == "html" else {}
        if args.engine == "dask":
            from esxi_anomaly.dask_engine import run as dask_run

            result = dask_run(model, args.conn, args.dns, inventory, out, fmt=fmt, top=args.top,
                              scheduler=args.scheduler, quarantine=quarantine, summary=summary,
                              html_extra=html_extra, context=context, read_options=read_options(args))
        else:
            # benign analyst verdicts of this environment (next to its bundles) become suppressions
            suppressions = FeedbackStore(Path(directory).parent.parent, Path(directory).parent.name).suppressions()
            # the bundle's identity: its manifest lists the sha256 of every file of it
            model_id = hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()
            result = run(model, args.conn, args.dns, inventory, out, fmt=fmt, top=args.top,
                         chunk_rows=args.chunk_rows, resume=args.resume, progress=not args.no_progress,
                         quarantine=quarantine, summary=summary, html_extra=html_extra, suppressions=suppressions,
                         context=context, pool=pool, model_id=model_id, read_options=read_options(args))
        for line in summary.lines():
            log(line)
        log(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in result.__dict__.items()
                        if k != "stages_s"} | {"stages_s": {k: round(v, 2) for k, v in result.stages_s.items()}}))
        log(f"wrote {result.written} rows to {out} ({fmt})")
        log(f"wrote {result.entities} entities to {rollup_path(out)} (entity roll-up of all scored connections, csv)")
        if getattr(args, "stats_json", None):
            stats = {**result.__dict__, "engine": args.engine, "out": str(out), "format": fmt,
                     "rollup": str(rollup_path(out)), "files": _file_records(summary)}
            with atomic_path(args.stats_json) as tmp:
                Path(tmp).write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")
        return finish_quarantine(quarantine, out, args.strict)
