"""Rank and write: every scored row of a run ranked, the output written block by block in rank
order (CSV, JSON lines, Parquet, HTML through `report/`), and the per-entity roll-up of all rows.

Each block of output rows is made by `rank.ranked_block`, as `model.score` makes its rows. The
scored files (`core.write_scored`) are memory-mapped and read in file order, so ranking
millions of rows keeps its resident memory bounded.
"""
from __future__ import annotations

import io
import json
import mmap
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from esxi_anomaly.atomic import atomic_path
from esxi_anomaly.report import csv as report_csv, ecs as report_ecs, html as report_html
from esxi_anomaly.report.rollup import StreamingRollup
from esxi_anomaly.scoring.core import Checkpoint, lap, scored_paths
from esxi_anomaly.scoring.rank import explanations, rank_order, ranked_block
from esxi_anomaly.scoring.workers import WorkerPool, release_free_memory

WRITE_BLOCK = 100_000
WRITE_THREADS = 2              # output blocks prepared concurrently (2-core machines and up)
HTML_DEFAULT_TOP = 2000



class ScoredFiles(dict):
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
    tables = ScoredFiles(scored_paths(work))
    keys = pa.concat_tables([tables[b].select(["score", "event_id", "bucket", "row"]) for b in tables])
    if expect_rows is not None and keys.num_rows != expect_rows:
        raise RuntimeError(f"{work}: the scored files hold {keys.num_rows:,} rows, not the {expect_rows:,} "
                           "connections scored; nothing was written")
    t = lap(stages, "rank+write: read keys", t)
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
        t = lap(stages, "rank+write: rank + attributions", t)

        block_frames = []
        with atomic_path(out) as tmp:
            writer = BlockWriter(tmp, fmt)

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
            t = lap(stages, f"rank+write: gather+explain+write {fmt}", t)
            entities = _write_rollup(model, tables, rollup, full_order, bucket, row, context, rollup_out)
            if rollup is not None:
                lap(stages, "rank+write: entity roll-up", t)
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
        table = _gather(tables, bucket[idx], row[idx])
        rows = table.to_pandas()
        rows["explanation"] = explanations(model, table, context).array
        return rows

    entities = rollup.finish(full_order, rows_at)
    report_csv.write_entity_rollup_csv(entities, rollup_out)
    return len(entities)


def _narrow(values: np.ndarray) -> np.ndarray:
    """Non-negative integers as int32 when they fit: half the memory of the per-rank arrays."""
    return values.astype(np.int32) if not len(values) or values.max() < 2**31 else values


def _block_output(rank_env: dict, fmt: str, start: int, bucket: np.ndarray, row: np.ndarray):
    """The output of rank positions start+1.. (rows (bucket[i], row[i])): for CSV its bytes (a list of
    buffers), else the ranked rows (Arrow), in rank order."""
    ranked, to_rank = _ranked_rows(rank_env["model"], rank_env["tables"], bucket, row, start,
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
        rank_env.update(work=work, tables=ScoredFiles(scored_paths(work)))
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


def _ranked_rows(model, tables: dict[int, pa.Table], bucket: np.ndarray, row: np.ndarray, start: int,
                 explain_top: int, attribution: dict, context: pd.DataFrame | None) -> tuple[pa.Table, np.ndarray]:
    """The output rows for rank positions start+1.. (rows (bucket[i], row[i])): taken, explained and
    laid out in file order (sequential reads of the memory maps), and the positions that put them
    in rank order."""
    block, stored = _gather_stored(tables, bucket, row)
    to_rank = np.empty(len(stored), dtype=np.int64)
    to_rank[stored] = np.arange(len(stored))
    return ranked_block(model, block, start + 1 + stored, explain_top, attribution, context), to_rank


def _gather_stored(tables: dict[int, pa.Table], bucket: np.ndarray, row: np.ndarray) -> tuple[pa.Table, np.ndarray]:
    """The rows (bucket[i], row[i]) of the memory-mapped tables in file order (sequential reads),
    score and event_id first, and `stored`: row j of the result is the pair stored[j]."""
    stored = np.lexsort((row, bucket))
    bucket, row = bucket[stored], row[stored]
    cuts = np.flatnonzero(np.diff(bucket)) + 1
    take = tables.take if isinstance(tables, ScoredFiles) else lambda b, r: tables[b].take(pa.array(r))
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


class BlockWriter:
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


