"""Batch scoring at scale: bounded memory, time-ordered chunks with carried state, resumable.

1. **Spill**: inputs are streamed once (`ingest.iter_*`) into hourly Parquet buckets under a work
   folder, so no input is ever held whole and later passes read in time order.
2. **Score**: buckets are processed in time order, each split into chunks of at most `chunk_rows`
   connections. A chunk sees the DNS answers of its look-back window; the running counts
   (`StreamState`) and the candidates for per-row attribution are carried to the next chunk, so
   the result equals a one-shot run. After each bucket, its scored rows and a checkpoint are
   written atomically; `--resume` continues after the last completed bucket.
3. **Rank and write**: scores alone are ranked globally, then rows are gathered in rank order,
   block by block, into the output (written to a temp file and renamed at the end).
"""
from __future__ import annotations

import io
import json
import mmap
import pickle
import shutil
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from esxi_anomaly import ingest, schema
from esxi_anomaly.report import csv as report_csv, ecs as report_ecs, format_for_path, html as report_html
from esxi_anomaly.detect import explain
from esxi_anomaly.detect.explain import context_clauses
from esxi_anomaly.feedback import FeedbackStore, apply_suppressions
from esxi_anomaly.features.stream_state import StreamState
from esxi_anomaly.report._atomic import atomic_path
from esxi_anomaly.report.rollup import StreamingRollup
from esxi_anomaly.schema import Frames

BUCKET_S = 3600
WRITE_BLOCK = 100_000
WRITE_THREADS = 2              # output blocks prepared concurrently (2-core machines and up)
HTML_DEFAULT_TOP = 2000
CHECKPOINT_VERSION = 2            # 2: scored rows carry sentence inputs, not sentences
SCORED_SUFFIX = ".scored.arrow"
ROLLUP_SUFFIX = ".entities.csv"
# what `explain.sentences` reads from a scored row; the sentence-only ones are not written out
SENTENCE_COLUMNS = ["dst_port", "dst_ip", "src_name", "rules", "query", "transform", "answer", "rtype", "dns_delay",
                    *explain.SENTENCE_ONLY]
DROPPED = {"bucket", "row", *explain.SENTENCE_ONLY}


def output_format(path: Path, fmt: str | None) -> str:
    """`fmt`, else the format the file name implies, else CSV."""
    if fmt:
        return fmt
    try:
        return format_for_path(path)
    except ValueError:
        return "csv"


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

def _spill(chunks: Iterator[pd.DataFrame], folder: Path, bucket_s: int) -> dict[int, int]:
    """Write chunks into folder/<bucket>/part-N.parquet; returns rows per bucket."""
    folder.mkdir(parents=True, exist_ok=True)
    counts: dict[int, int] = {}
    part = 0
    for chunk in chunks:
        bucket = np.floor(chunk["ts"].to_numpy(dtype="float64") / bucket_s)
        bucket = np.nan_to_num(bucket, nan=-1).astype("int64")  # rows without time go first
        for b in np.unique(bucket):
            rows = chunk[bucket == b]
            target = folder / str(int(b))
            target.mkdir(exist_ok=True)
            pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), target / f"part-{part}.parquet")
            part += 1
            counts[int(b)] = counts.get(int(b), 0) + len(rows)
    return counts


def _read_bucket(folder: Path, b: int) -> pd.DataFrame | None:
    target = folder / str(b)
    if not target.is_dir():
        return None
    parts = sorted(target.glob("part-*.parquet"), key=lambda p: int(p.stem.split("-")[1]))
    return pa.concat_tables([pq.read_table(p) for p in parts], promote_options="default").to_pandas()


# -- pass 2: score -------------------------------------------------------------------------

@dataclass
class Checkpoint:
    version: int = CHECKPOINT_VERSION
    done_buckets: list[int] = field(default_factory=list)
    state: StreamState = field(default_factory=StreamState)
    top_rows: pd.DataFrame | None = None      # running top-K rows (score, event_id, bucket, row)
    top_feats: pd.DataFrame | None = None
    alerts: int = 0
    scored: int = 0


def chunk_bounds(ts: np.ndarray, chunk_rows: int) -> list[tuple[int, int]]:
    """Index ranges of at most ~chunk_rows rows of sorted `ts`, never splitting equal times."""
    bounds, lo, n = [], 0, len(ts)
    while lo < n:
        hi = min(lo + chunk_rows, n)
        while hi < n and ts[hi] == ts[hi - 1]:
            hi += 1
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


def score_buckets(model, work: Path, bucket_s: int, counts: dict[int, int], inventory: pd.DataFrame | None,
                  chunk_rows: int, explain_top: int, cp: Checkpoint, progress: Progress, stages: dict,
                  suppressions: pd.DataFrame | None = None) -> Checkpoint:
    conn_dir, dns_dir, out_dir = work / "conn", work / "dns", work / "scored"
    out_dir.mkdir(exist_ok=True)
    lookback = model.join_params().lookback_s
    dns_cache: dict[int, pd.DataFrame | None] = {}
    for group in bucket_groups(counts, chunk_rows):
        if group[0] in cp.done_buckets:
            continue
        t0 = t = time.perf_counter()
        conns = pd.concat([_read_bucket(conn_dir, b) for b in group], ignore_index=True)
        # stable sort by (ts, event_id), NaN times last: Arrow's multi-key sort, 3-4x pandas' here
        by = pa.table({"ts": conns["ts"].to_numpy(dtype="float64"), "event_id": pa.array(conns["event_id"].array)})
        order = pc.sort_indices(by, sort_keys=[("ts", "ascending"), ("event_id", "ascending")]).to_numpy()
        conns = conns.take(order).reset_index(drop=True)
        ts = conns["ts"].to_numpy(dtype="float64")
        pieces = []
        bounds = chunk_bounds(ts, chunk_rows)
        for i, (lo, hi) in enumerate(bounds):
            start = ts[lo]
            # the chunk counts the DNS rows from where the previous one stopped (everything, for
            # the first) to the next chunk's start, and sees its look-back window as well
            end = ts[bounds[i + 1][0]] if i + 1 < len(bounds) else (group[-1] + 1) * bucket_s
            counted_until = cp.state.dns_owned_until
            dns = _dns_window(dns_dir, dns_cache, min(counted_until, start - lookback), end, bucket_s)
            chunk = Frames(conns.iloc[lo:hi].reset_index(drop=True), dns, inventory)
            t = _lap(stages, "score: read buckets", t)
            prepared, feats = model.features(chunk, cp.state)
            cp.state.dns_owned_until = end
            t = _lap(stages, "score: features", t)
            components = model.detector_.components(feats)
            t = _lap(stages, "score: forest+rules", t)
            rows = apply_suppressions(model.score_rows(prepared, feats, components), suppressions)
            rows["bucket"], rows["row"] = group[0], np.arange(lo, hi)
            t = _lap(stages, "score: rows", t)
            _merge_top(cp, rows, feats, explain_top)
            pieces.append(rows)
            cp.scored += hi - lo
            progress.update(hi - lo)
            t = _lap(stages, "score: top merge", t)
        scored = pd.concat(pieces, ignore_index=True)
        cp.alerts += int(scored["alert"].sum())
        write_scored(scored, out_dir / f"{group[0]}{SCORED_SUFFIX}")
        cp.done_buckets.extend(group)
        with atomic_path(work / "checkpoint.pkl") as tmp:
            with open(tmp, "wb") as fh:
                pickle.dump(cp, fh, protocol=pickle.HIGHEST_PROTOCOL)
        t = _lap(stages, "score: write scored+checkpoint", t)
        stages["score"] = stages.get("score", 0.0) + time.perf_counter() - t0
        horizon = np.floor((ts[-1] - lookback) / bucket_s) - 1
        for old in [k for k in dns_cache if 0 <= k < horizon]:
            dns_cache.pop(old)
    return cp


def _dns_window(dns_dir: Path, cache: dict, lo: float, hi: float, width: int) -> pd.DataFrame:
    """DNS rows with lo <= ts < hi, read from the (cached) buckets that cover them."""
    first = np.floor(lo / width) if np.isfinite(lo) else -np.inf
    last = np.floor((hi - 1e-9) / width) if np.isfinite(hi) else np.inf
    existing = sorted(int(p.name) for p in dns_dir.iterdir() if p.is_dir()) if dns_dir.is_dir() else []
    frames = []
    for b in existing:
        if b != -1 and not (first <= b <= last):  # bucket -1 holds answers without a time
            continue
        if b not in cache:
            cache[b] = _read_bucket(dns_dir, b)
        if cache[b] is not None:
            frames.append(cache[b])
    if not frames:
        return schema.empty("dns_answers")
    dns = pd.concat(frames, ignore_index=True)
    t = dns["ts"].to_numpy(dtype="float64")
    return dns[(t >= lo) & (t < hi)].sort_values("ts", kind="stable", ignore_index=True)


# -- pass 3: rank and write -----------------------------------------------------------------

def write_scored(rows: pd.DataFrame, path: Path) -> None:
    """Scored rows of one bucket group (or Dask partition), as an Arrow IPC file written atomically.
    `row` must be the position in the file: ranking then takes rows from a memory map directly."""
    table = pa.Table.from_pandas(rows, preserve_index=False)
    with atomic_path(path) as tmp:
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
        """Rows of one file, copied out of the mapping, whose pages are then released."""
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
                   rollup_out: Path | None = None, stages: dict | None = None) -> tuple[int, int]:
    """Rank every scored row, write the first `top` (all when None) to `out`; with `rollup_out`, also
    the per-entity roll-up of *all* scored rows (not only the `top`) as formula-safe CSV there.
    Explanation sentences are built here, block by block, for the rows written only.
    Both files are written atomically. Returns (rows written, entities in the roll-up)."""
    stages = {} if stages is None else stages
    t = time.perf_counter()
    paths = sorted((work / "scored").glob(f"*{SCORED_SUFFIX}"), key=lambda p: int(p.name.split(".")[0]))
    tables = _ScoredFiles(paths)
    keys = pa.concat_tables([tables[b].select(["score", "event_id", "bucket", "row"]) for b in tables])
    t = _lap(stages, "rank+write: read keys", t)
    pool = ThreadPoolExecutor(max_workers=WRITE_THREADS)   # Arrow kernels release the GIL
    try:
        rollup = StreamingRollup() if rollup_out is not None else None
        counted = pool.submit(tables.add_each_to, rollup) if rollup is not None else None
        attributed = pool.submit(model.detector_.attributions, cp.top_feats)   # while the rows are ranked
        full_order = rank_order(keys["score"].combine_chunks(), keys["event_id"].combine_chunks())
        bucket, row = keys["bucket"].to_numpy(), keys["row"].to_numpy()
        if counted is not None:
            counted.result()  # the roll-up has read every file: their pages can go
        tables.release()
        if fmt == "html" and top is None:
            top = HTML_DEFAULT_TOP
        order = full_order[:top] if top is not None else full_order
        attribution = dict(zip(cp.top_rows["event_id"], attributed.result()))
        t = _lap(stages, "rank+write: rank + attributions", t)

        def block_job(start: int):
            """Block `start`: for CSV its bytes, else the ranked rows (Arrow), in rank order."""
            idx = order[start:start + WRITE_BLOCK]
            ranked, to_rank = _ranked_block(model, tables, bucket[idx], row[idx], start, explain_top, attribution,
                                            context)
            if fmt != "csv":
                return ranked.take(pa.array(to_rank))
            parts = report_csv.arrow_csv_parts(ranked, header=start == 0, order=to_rank)
            if parts is None:   # a column type the Arrow encoder does not handle: pandas writes the block
                buffer = io.BytesIO()
                report_csv.write_frame_csv(ranked.take(pa.array(to_rank)).to_pandas(), buffer, header=start == 0)
                parts = [buffer.getbuffer()]
            return parts

        block_frames = []
        with atomic_path(out) as tmp:
            writer = _BlockWriter(tmp, fmt)
            pending: deque = deque()

            def write_done(keep: int) -> None:
                """Write finished blocks, oldest first, until at most `keep` are in flight."""
                while len(pending) > keep:
                    result = pending.popleft().result()
                    if fmt == "csv":
                        for part in result:
                            writer.fh.write(part)
                    elif fmt == "html":
                        block_frames.append(result.to_pandas())
                    else:
                        writer.write(result)
                    tables.release()  # the block's gathered pages are written out

            for start in range(0, len(order), WRITE_BLOCK):
                pending.append(pool.submit(block_job, start))
                write_done(WRITE_THREADS - 1)
            write_done(0)
            if fmt == "html":
                ranked = pd.concat(block_frames, ignore_index=True) if block_frames else pd.DataFrame()
                report_html.write_html(ranked, tmp, **html_extra)
            writer.close()
        written = len(order)
        tables.release()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    t = _lap(stages, f"rank+write: gather+explain+write {fmt}", t)
    if rollup is None:
        return written, 0

    def rows_at(idx: np.ndarray) -> pd.DataFrame:
        rows = _gather(tables, bucket[idx], row[idx]).to_pandas()
        rows["explanation"] = explain.sentences(rows, model.history_days_, model.detector_.rules_).array
        if context is not None:
            rows["explanation"] = (rows["explanation"] + context_clauses(rows, context)).array
        return rows

    entities = rollup.finish(full_order, rows_at)
    report_csv.write_entity_rollup_csv(entities, rollup_out)
    _lap(stages, "rank+write: entity roll-up", t)
    return written, len(entities)


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

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
        if self.parquet is not None:
            self.parquet.close()


# -- the run -------------------------------------------------------------------------------

@dataclass
class RunSummary:
    connections: int = 0
    dns_records: int = 0
    written: int = 0
    alerts: int = 0
    quarantined: int = 0
    chunks_resumed: int = 0
    partitions: int = 0          # Dask engine: partitions scored
    entities: int = 0            # rows of the entity roll-up CSV (0: not written)
    stages_s: dict = field(default_factory=dict)


def run(model, conn_paths, dns_paths, inventory: pd.DataFrame | None, out: Path, fmt: str | None = None,
        top: int | None = None, chunk_rows: int = 500_000, explain_top: int = 200, work: Path | None = None,
        resume: bool = False, progress: bool = True, quarantine: ingest.Quarantine | None = None,
        summary: ingest.ReadSummary | None = None, html_extra: dict | None = None,
        bucket_s: int = BUCKET_S, suppressions: pd.DataFrame | None = None,
        context: pd.DataFrame | None = None, rollup: bool = True) -> RunSummary:
    """Score `conn_paths` against `dns_paths` into `out` (ranked rows); with `rollup`, the per-entity
    roll-up of every scored connection goes to `rollup_path(out)` as well."""
    out = Path(out)
    fmt = output_format(out, fmt)
    work = Path(work) if work else out.with_name(out.name + ".work")
    quarantine = quarantine if quarantine is not None else ingest.Quarantine()
    run_summary = RunSummary()
    stages = run_summary.stages_s
    cp = Checkpoint()
    spilled = work / "spill.json"
    if resume and spilled.exists() and (work / "checkpoint.pkl").exists():
        cp = pickle.loads((work / "checkpoint.pkl").read_bytes())
        if cp.version != CHECKPOINT_VERSION:
            raise ValueError(f"{work}: checkpoint from another version; rerun without --resume")
        meta = json.loads(spilled.read_text())
        run_summary.connections, run_summary.dns_records = meta["connections"], meta["dns_records"]
        run_summary.chunks_resumed = len(cp.done_buckets)
    else:
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        t0 = time.perf_counter()
        c_counts = _spill(ingest.iter_connections(conn_paths, quarantine, summary, chunk_rows), work / "conn", bucket_s)
        stages["read+spill connections"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        d_counts = _spill(ingest.iter_dns(dns_paths, quarantine, summary, chunk_rows), work / "dns", bucket_s)
        stages["read+spill dns"] = time.perf_counter() - t0
        run_summary.connections, run_summary.dns_records = sum(c_counts.values()), sum(d_counts.values())
        if not run_summary.connections:
            raise ingest.IngestError("no connection records were read from --conn")
        meta = {"bucket_s": bucket_s, "connections": run_summary.connections, "dns_records": run_summary.dns_records,
                "conn_buckets": {str(k): v for k, v in c_counts.items()}}
        with atomic_path(spilled) as tmp:
            Path(tmp).write_text(json.dumps(meta))
    bar = Progress(run_summary.connections, "scoring", enabled=progress)
    bar.update(cp.scored)
    meta = json.loads(spilled.read_text())
    counts = {int(k): v for k, v in meta["conn_buckets"].items()}
    cp = score_buckets(model, work, int(meta["bucket_s"]), counts, inventory, chunk_rows, explain_top, cp, bar, stages,
                       suppressions if suppressions is not None else pd.DataFrame())
    bar.close()
    t0 = time.perf_counter()
    if html_extra:
        html_extra = {**html_extra, "summary": {**html_extra.get("summary", {}), "connections": run_summary.connections}}
    run_summary.written, run_summary.entities = rank_and_write(
        model, work, cp, out, fmt, top, explain_top, html_extra or {}, context,
        rollup_out=rollup_path(out) if rollup else None, stages=stages)
    stages["rank+write"] = time.perf_counter() - t0
    run_summary.alerts = cp.alerts
    run_summary.quarantined = len(quarantine)
    shutil.rmtree(work, ignore_errors=True)
    return run_summary


def score_command(args, model, manifest, directory) -> int:
    """`esxi-anomaly score`: the local engine streams; `--engine dask` partitions by entity."""
    from esxi_anomaly.cli import finish_quarantine, log

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    quarantine, summary = ingest.Quarantine(), ingest.ReadSummary()
    inventory = ingest.read_inventory(args.inventory, quarantine, summary) if args.inventory else None
    context = ingest.read_context(args.context, quarantine, summary) if args.context else None
    fmt = output_format(out, args.format)
    html_extra = {"summary": {"model": str(directory), "env": manifest.get("env", ""),
                              "threshold": manifest.get("threshold")}} if fmt == "html" else {}
    if args.engine == "dask":
        from esxi_anomaly.dask_engine import run as dask_run

        result = dask_run(model, args.conn, args.dns, inventory, out, fmt=fmt, top=args.top,
                          scheduler=args.scheduler, quarantine=quarantine, summary=summary, html_extra=html_extra,
                          context=context)
    else:
        # benign analyst verdicts of this environment (next to its bundles) become suppressions
        suppressions = FeedbackStore(Path(directory).parent.parent, Path(directory).parent.name).suppressions()
        result = run(model, args.conn, args.dns, inventory, out, fmt=fmt, top=args.top, chunk_rows=args.chunk_rows,
                     resume=args.resume, progress=not args.no_progress, quarantine=quarantine, summary=summary,
                     html_extra=html_extra, suppressions=suppressions, context=context)
    for line in summary.lines():
        log(line)
    log(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in result.__dict__.items()
                    if k != "stages_s"} | {"stages_s": {k: round(v, 2) for k, v in result.stages_s.items()}}))
    log(f"wrote {result.written} rows to {out} ({fmt})")
    log(f"wrote {result.entities} entities to {rollup_path(out)} (entity roll-up of all scored connections, csv)")
    if getattr(args, "stats_json", None):
        stats = {**result.__dict__, "engine": args.engine, "out": str(out), "format": fmt,
                 "rollup": str(rollup_path(out))}
        with atomic_path(args.stats_json) as tmp:
            Path(tmp).write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")
    return finish_quarantine(quarantine, out, args.strict)
