"""Rank and write: every scored row of a run ranked, the output written block by block in rank
order (CSV, JSON lines, Parquet, HTML through `report/`), the per-entity roll-up and the incidents
of all rows, and the alert budget (it sees every scored row before they are ranked).

Each block of output rows is made by `rank.ranked_block`, as `model.score` makes its rows. The
scored files (`core.write_scored`) are memory-mapped and read in file order, so ranking
millions of rows keeps its resident memory bounded.
"""
from __future__ import annotations

import io
import json
import mmap
import os
import shutil
import threading
import time
from collections import deque
from contextlib import ExitStack, suppress
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from esxi_anomaly import schema
from esxi_anomaly.atomic import atomic_path
from esxi_anomaly.console import log
from esxi_anomaly.report import csv as report_csv, ecs as report_ecs, html as report_html
from esxi_anomaly.report.incidents import (INCIDENTS, StreamingIncidents, name_candidates, name_keys,
                                           raised_by_name, raised_explanation)
from esxi_anomaly.report.rollup import StreamingRollup
from esxi_anomaly.scoring.core import Checkpoint, lap, scored_paths
from esxi_anomaly.scoring.output import incidents_path
from esxi_anomaly.scoring.rank import explanations, rank_order, ranked_block
from esxi_anomaly.scoring.workers import WorkerPool, release_free_memory

WRITE_BLOCK = 100_000
BLOCKS_FOLDER = "blocks"       # the work folder's CSV blocks, made by workers, moved into the output
WRITE_THREADS = 2              # output blocks prepared concurrently (2-core machines and up)
HTML_DEFAULT_TOP = 2000
HTML_INCIDENTS = 500           # incidents the HTML report's table holds (all are in the incidents CSV)
HISTOGRAM_BINS = 50            # the HTML report's score histogram, over every scored row
RANK_BAND_ROWS = 1 << 20       # rows whose event ids the ranking holds at a time (`rank_all`)



class ScoredFiles(dict):
    """The scored Arrow files, memory-mapped (zero-copy: pages load on use), by bucket.

    Ranking touches every page of them, and touched pages of a mapping count as this process's
    resident memory. `release()` drops them from it (they stay in the OS page cache and fault back
    in cheaply), so the resident memory of ranking stays bounded whatever the number of rows."""

    def __init__(self, paths: list[Path]):
        super().__init__()
        self._maps: dict[int, mmap.mmap] = {}
        self._base: dict[int, int] = {}      # each mapping's address, where its columns' buffers are
        self._pages: dict[tuple[int, str], tuple[int, int]] = {}   # `column_pages`, once per column
        for path in paths:
            bucket = int(path.name.split(".")[0])
            with open(path, "rb") as fh:
                self._maps[bucket] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            mapped = pa.py_buffer(self._maps[bucket])
            self._base[bucket] = mapped.address
            self[bucket] = pa.ipc.open_file(pa.BufferReader(mapped)).read_all()
        sizes = np.array([table.num_rows for table in self.values()], dtype=np.int64)
        self._starts = np.r_[0, np.cumsum(sizes)[:-1]]             # each file's first row, in file order
        self._buckets = _narrow(np.array(list(self), dtype=np.int64))

    def release(self, bucket: int | None = None) -> None:
        """Drop the pages of one file (all files when None) from the resident set."""
        if hasattr(mmap, "MADV_DONTNEED"):
            for mapped in self._maps.values() if bucket is None else [self._maps[bucket]]:
                mapped.madvise(mmap.MADV_DONTNEED)

    def column_pages(self, bucket: int, name: str) -> tuple[int, int]:
        """(offset, length) of the whole pages of file `bucket` that hold column `name`'s buffers."""
        if (bucket, name) not in self._pages:
            self._pages[bucket, name] = self._column_pages(bucket, name)
        return self._pages[bucket, name]

    def _column_pages(self, bucket: int, name: str) -> tuple[int, int]:
        buffers = [b for chunk in self[bucket][name].chunks for b in chunk.buffers() if b is not None and b.size]
        if not buffers:
            return 0, 0
        lo = min(b.address for b in buffers) - self._base[bucket]
        hi = max(b.address + b.size for b in buffers) - self._base[bucket]
        lo -= lo % mmap.PAGESIZE
        return lo, min(-(-hi // mmap.PAGESIZE) * mmap.PAGESIZE, len(self._maps[bucket])) - lo

    def release_column(self, bucket: int, name: str) -> None:
        """Drop the pages of one column of one file from the resident set (a whole file's release
        walks all its pages: for every column of an output block, 6 % of the block's time)."""
        offset, length = self.column_pages(bucket, name)
        if length and hasattr(mmap, "MADV_DONTNEED"):
            self._maps[bucket].madvise(mmap.MADV_DONTNEED, offset, length)

    def addresses(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(file, position in it) of rows at `positions` of all rows in file order: what `take` is
        asked for. Counted from the files' sizes, for the rows asked only (neither read from the files'
        `bucket` and `row` columns nor held for every row: at 10M rows, 77-150 MB less for the ranking
        process to hold)."""
        file = np.searchsorted(self._starts, positions, side="right") - 1
        return self._buckets[file], _narrow(positions - self._starts[file])

    def column_at(self, name: str, positions: np.ndarray) -> pa.ChunkedArray:
        """Column `name` at `positions` (ascending, of all rows in file order), file by file."""
        bucket, row = self.addresses(positions)
        chunks = []
        for b, r in _file_runs(bucket, row):
            chunks += self.take(b, r, [name])[name].chunks
        return pa.chunked_array(chunks, type=self[int(bucket[0])].schema.field(name).type if len(bucket) else pa.null())

    def take(self, bucket: int, rows: np.ndarray, columns: list[str] | None = None) -> pa.Table:
        """Rows of one file (only `columns` when given), copied out of the mapping, whose pages are then
        released (rows spread over a file touch all its pages)."""
        return self.take_runs([(bucket, rows)], columns)

    def take_runs(self, runs: list[tuple[int, np.ndarray]], columns: list[str] | None = None) -> pa.Table:
        """The rows of `runs` ((file, its rows), at least one) one after another, only `columns` when
        given: one table of single-chunk columns copied out of the mappings, whose pages are then
        released. A file's consecutive rows (an output block's share of it, in rank order) are sliced,
        then each column is copied once from all files together (a copy per file and one more to join
        them cost twice). Copied, not viewed: some kernels touch a sliced string column's whole buffer,
        faulting in the whole file."""
        parts, sliced = [], []
        for bucket, rows in runs:
            table = self[bucket] if columns is None else self[bucket].select(columns)
            if len(rows) and bool((np.diff(rows) == 1).all()):
                parts.append(table.slice(int(rows[0]), len(rows)))
                sliced.append(bucket)
            else:   # rows spread over the file touched all its pages: copied, they go at once
                parts.append(table.take(pa.array(rows)))
                self.release(bucket)
        schema, sliced = parts[0].schema, list(dict.fromkeys(sliced))
        if len(parts) == 1 and not sliced:
            return parts[0]                                      # taken: copied already
        if not all(part.schema.equals(schema) for part in parts[1:]):
            # a file whose text columns are all null, say: the types are unified
            out = pa.concat_tables(parts, promote_options="default").combine_chunks()
            self.release()
            return out
        # the sliced files' pages go a column at a time (copying a slice can fault in far more than its
        # rows: a 10M run's blocks held ~0.5-0.9 GB of them at once), then whatever else was touched
        copied = []
        for i, name in enumerate(schema.names):
            copied.append(pa.concat_arrays([chunk for part in parts for chunk in part.column(i).chunks]))
            for bucket in sliced:
                self.release_column(bucket, name)
        for bucket in sliced:
            self.release(bucket)
        return pa.table(copied, schema=schema)

    def add_each_to(self, sinks) -> None:
        """Each file's rows to every sink (`StreamingRollup`, `StreamingIncidents`), in file order."""
        for bucket, table in self.items():
            for sink in sinks:
                sink.add(table)
            self.release(bucket)
            release_free_memory()


def rank_all(tables: "ScoredFiles", alert: np.ndarray, score: np.ndarray) -> np.ndarray:
    """`rank.rank_order` of every row of `tables` (positions in file order; `alert`: the final alerts,
    `score`: the rows' scores) holding the event ids of about RANK_BAND_ROWS rows at a time: the rows
    are cut into bands of (alert, score) ranges in rank order, each band is ranked on its own (its
    rows' event ids taken from the files), and the bands follow one another. Equal (alert, score)
    fall in one band, whose rows stay in file order, so the order is the one stable sort's, to the
    row (at 10M rows, ~500 MB less than sorting all keys at once). NaN scores take the one sort."""
    n = len(score)
    if n <= RANK_BAND_ROWS or np.isnan(score).any():
        event_ids = pa.chunked_array([c for t in tables.values() for c in pc.cast(t["event_id"], pa.large_string()).chunks],
                                     type=pa.large_string())
        order = _narrow(rank_order(pa.table({"alert": alert, "score": score, "event_id": event_ids})))
        tables.release()
        return order
    band = np.empty(n, dtype=np.int32)
    bands = 0
    sample = slice(None, None, max(1, n // (64 * (-(-n // RANK_BAND_ROWS)))))   # enough to place the cuts
    for flag in (True, False):   # alerts first
        count, sampled = int(np.count_nonzero(alert == flag)), score[sample][alert[sample] == flag]
        cuts = np.unique(np.quantile(sampled, np.linspace(0.0, 1.0, -(-count // RANK_BAND_ROWS) + 1)[1:-1])) \
            if count > RANK_BAND_ROWS and len(sampled) else np.zeros(0)
        for lo in range(0, n, RANK_BAND_ROWS):   # higher scores, earlier bands; equal scores, one band
            part, here = slice(lo, lo + RANK_BAND_ROWS), alert[lo:lo + RANK_BAND_ROWS] == flag
            band[part][here] = bands + len(cuts) - np.searchsorted(cuts, score[part][here], side="left")
        bands += len(cuts) + 1
    order = np.empty(n, dtype=np.int32 if n < 2**31 else np.int64)   # as `_narrow` makes it
    filled = 0
    for b in range(bands):
        rows = np.flatnonzero(band == b)
        if not len(rows):
            continue
        keys = pa.table({"alert": alert[rows], "score": score[rows], "event_id": tables.column_at("event_id", rows)})
        order[filled:filled + len(rows)] = rows[rank_order(keys)]
        filled += len(rows)
        del keys
        tables.release()
        release_free_memory()   # a band's temporaries: the allocators would keep them all (`workers.tune_allocator`)
    return order


def alert_budget_held(keys: pa.Table, budget: int | None) -> np.ndarray | None:
    """The rows (positions of `keys`: `schema.RANK_KEYS` and `ts`) whose alert the budget holds back:
    per UTC day of `ts`, the alerts after the first `budget` in rank order. None without a budget."""
    if budget is None:
        return None
    alert = keys["alert"].to_numpy().astype(bool)
    held = np.zeros(len(alert), dtype=bool)
    if not alert.any():
        return held
    order = rank_order(keys)
    alerts = order[alert[order]]                      # the alerts, best first
    day = np.floor(keys["ts"].to_numpy()[alerts] / 86400.0)
    nth = pd.Series(np.nan_to_num(day, nan=-1.0)).groupby(np.nan_to_num(day, nan=-1.0)).cumcount().to_numpy()
    held[alerts[nth >= budget]] = True
    return held


def budget_note(budget: int | None) -> str:
    """What a held-back row's explanation says."""
    return "" if budget is None else f"; not an alert: over the alert budget of {budget:,} a day (--alert-budget)"


def name_promotions(tables: "ScoredFiles", alert: np.ndarray) -> np.ndarray:
    """Rows (positions in file order) that become alerts because the same source's connections to the
    same name alerted on evidence (`incidents.raised_by_name`), streamed over the scored files: only
    candidate rows are hashed."""
    promoted = np.zeros(len(alert), dtype=bool)
    if not alert.any():
        return promoted
    spans, start = [], 0
    for bucket, table in tables.items():
        spans.append((bucket, start, start + table.num_rows))
        start += table.num_rows
    candidate = np.zeros(len(alert), dtype=bool)
    for bucket, lo, hi in spans:
        candidate[lo:hi] = name_candidates(tables[bucket])
        tables.release(bucket)
    alerting = [name_keys(tables.take(b, np.flatnonzero(alert[lo:hi] & candidate[lo:hi]))) for b, lo, hi in spans
                if (alert[lo:hi] & candidate[lo:hi]).any()]
    if not alerting:
        return promoted
    alerting = np.unique(np.concatenate(alerting))
    for bucket, lo, hi in spans:
        rows = np.flatnonzero(candidate[lo:hi] & ~alert[lo:hi])
        if len(rows):
            n = len(rows)
            hit = raised_by_name(name_keys(tables.take(bucket, rows)), np.zeros(n, dtype=bool), np.ones(n, dtype=bool),
                                 alerting)
            promoted[lo + rows[hit]] = True
    return promoted


RAISED, HELD = 1, 2   # what `alert_changes` did to a row: raised by its name's evidence, held back by the budget


def alert_changes(tables: "ScoredFiles", keys: pa.Table, budget: int | None) -> tuple[pa.Table, np.ndarray | None,
                                                                                     int, int]:
    """The run's final alerts: first raised by their name's evidence (`name_promotions`), then
    capped by the alert budget (`alert_budget_held`). Returns `keys` with the final `alert`, the rows
    whose alert changed for the sinks (None: none), what happened to each row for its explanation
    (`RAISED`, `HELD`; None: nothing), and the numbers promoted and held back (a row raised, then held
    back by the budget, counts as held back and says so)."""
    alert = keys["alert"].to_numpy().astype(bool)
    promoted = name_promotions(tables, alert)
    keys = keys.set_column(keys.schema.get_field_index("alert"), "alert", pa.array(alert | promoted))
    held = alert_budget_held(keys, budget)
    held = np.zeros(len(alert), dtype=bool) if held is None else held
    final = (alert | promoted) & ~held
    flipped = final != alert
    change = np.where(held, HELD, np.where(promoted, RAISED, 0)).astype(np.int8)
    keys = keys.set_column(keys.schema.get_field_index("alert"), "alert", pa.array(final))
    return (keys, (flipped if flipped.any() else None), (change if change.any() else None), int(promoted.sum()),
            int(held.sum()))


def rank_and_write(model, work: Path, cp: Checkpoint, out: Path, fmt: str, top: int | None,
                   explain_top: int, html_extra: dict, context: pd.DataFrame | None = None, *,
                   rollup_out: Path | None = None, stages: dict | None = None,
                   pool: WorkerPool | None = None, expect_rows: int | None = None,
                   alerts_only: bool = False, alert_budget: int | None = None, incidents: bool = False,
                   summary=None) -> tuple[int, int]:
    """Rank every scored row, write the first `top` (all when None) to `out`; with `rollup_out`, also
    the per-entity roll-up of *all* scored rows (not only the `top`) as formula-safe CSV there, and
    their incidents (`report.incidents`) to `output.incidents_path(out)`.
    `alert_budget`: at most that many alerts a UTC day, the best ranked; the others stay in the
    ranking as non-alerts, saying so (`cp.alerts` is lowered). `alerts_only`: only alerts written
    (rows, or incidents). `incidents`: `out` holds one ECS document per incident instead of rows
    (`fmt` jsonl). `summary` (a `RunSummary`, optional) gets `incidents` and `alerts_held_back`.
    Explanation sentences are built here, block by block, for the rows written only: by the
    `pool`'s workers for CSV when there is one, else on threads. The files are written
    atomically, all or none, the output last, and only when it holds every row it should
    (`expect_rows`: the rows scored; the rows of the output blocks are counted). Returns (rows
    written (incidents with `incidents`), entities in the roll-up)."""
    if incidents and fmt != "jsonl":
        raise ValueError(f"incidents as the output are ECS documents (jsonl), not {fmt}")
    stages = {} if stages is None else stages
    t = time.perf_counter()
    tables = ScoredFiles(scored_paths(work))
    threads = ThreadPoolExecutor(max_workers=WRITE_THREADS)   # Arrow kernels release the GIL
    try:
        rollup = StreamingRollup() if rollup_out is not None else None
        grouped = StreamingIncidents() if rollup_out is not None or incidents else None
        sinks = [s for s in (rollup, grouped) if s is not None]
        # the roll-up and incidents count every row while the keys are read and the alerts settled
        # (~1.5 s of this process alone at 10M rows); the few rows whose alert changes are recounted
        counted = threads.submit(tables.add_each_to, sinks) if sinks else None
        attributed = threads.submit(model.detector_.attributions, cp.top_feats)   # while the rows are ranked
        # the budget ranks the alerts of each day; the ranking of all rows reads event ids band by band
        key_names = ["alert", "score"] + (["event_id", "ts"] if alert_budget is not None else [])
        keys = pa.concat_tables([tables[b].select(key_names) for b in tables])
        if expect_rows is not None and keys.num_rows != expect_rows:
            raise RuntimeError(f"{work}: the scored files hold {keys.num_rows:,} rows, not the {expect_rows:,} "
                               "connections scored; nothing was written")
        keys, flipped, change, promoted, held_back = alert_changes(tables, keys, alert_budget)
        if promoted:
            log(f"{promoted:,} connections are alerts because their source's connections to the same name alerted "
                "on evidence")
        if held_back:
            log(f"alert budget {alert_budget:,} a day: {held_back:,} alerts held back (ranked as non-alerts)")
        cp.alerts += promoted - held_back
        final_alert = keys["alert"].to_numpy().astype(bool)
        score = keys["score"].to_numpy()
        tables.release()   # the keys are copied out: their pages can go
        histogram = np.histogram(np.clip(score, 0.0, 1.0), bins=HISTOGRAM_BINS, range=(0.0, 1.0))[0]
        t = lap(stages, "rank+write: read keys", t)
        note = budget_note(alert_budget)   # what a row held back says (a raised one: `raised_explanation`)
        del keys
        full_order = rank_all(tables, final_alert, score)
        del score
        if counted is not None:
            counted.result()  # the summaries have read every file: their pages can go
            if flipped is not None:
                changed = np.flatnonzero(flipped)
                for sink in sinks:
                    sink.flip(changed, final_alert[changed])
        tables.release()
        release_free_memory()   # the sort's temporaries: this process holds the order alone from here
        if fmt == "html" and top is None:
            top = HTML_DEFAULT_TOP
        order = full_order[final_alert[full_order]] if alerts_only else full_order   # alerts rank first
        order = order[:top] if top is not None else order
        attribution = dict(zip(cp.top_rows["event_id"], attributed.result()))
        t = lap(stages, "rank+write: rank + attributions", t)

        def rows_at(idx: np.ndarray) -> pd.DataFrame:
            table = _gather(tables, *tables.addresses(idx))
            rows = table.to_pandas()
            rows["explanation"] = explanations(model, table, context).array
            if change is not None:
                _flip_frame(rows, change[idx], note)
            return rows

        def values_at(idx: np.ndarray) -> pa.Table:
            return _gather(tables, *tables.addresses(idx), ["event_id", "dst_port"])

        block_frames = []
        with ExitStack() as staged:   # every file staged; moved into place together, the output last
            tmp = staged.enter_context(atomic_path(out))
            rollup_tmp = staged.enter_context(atomic_path(rollup_out)) if rollup is not None else None
            incidents_tmp = staged.enter_context(atomic_path(incidents_path(out))) \
                if grouped is not None and rollup_out is not None else None
            html_extra = dict(html_extra)
            cancel = threading.Event()

            def summarise() -> tuple[int, int]:
                """The roll-up and the incidents of every scored row, written to their staged files
                (and the ECS incident documents to `tmp` with `incidents`; their count to `summary`);
                (entities, documents written). Stops between blocks of incidents once `cancel` is set."""
                t0 = time.perf_counter()
                entities, shown_incidents, counted_incidents, documents = 0, [], 0, 0
                if rollup is not None:
                    entity_frame = rollup.finish(full_order, rows_at)
                    with open(rollup_tmp, "wb") as fh:
                        report_csv.write_frame_csv(entity_frame, fh)
                    entities = len(entity_frame)
                    if fmt == "html":
                        html_extra["rollup"] = entity_frame
                    release_free_memory()   # glibc keeps freed heap up to `workers.KEEP_FREE_HEAP` otherwise
                    t0 = lap(stages, "rank+write: entity roll-up", t0)
                if grouped is None:
                    return entities, 0
                incidents_fh = open(incidents_tmp, "wb") if incidents_tmp is not None else None
                ecs_fh = open(tmp, "w", encoding="utf-8", newline="") if incidents else None
                try:
                    for block in grouped.finish(full_order, rows_at, values_at):
                        if cancel.is_set():
                            raise RuntimeError("the run stopped while its incidents were grouped")
                        if incidents_fh is not None:
                            report_csv.write_frame_csv(block[list(INCIDENTS)], incidents_fh,
                                                       header=counted_incidents == 0)
                        counted_incidents += len(block)
                        if ecs_fh is not None:
                            for record in report_ecs.incident_records(block[block["alert"]] if alerts_only else block):
                                ecs_fh.write(json.dumps(record, ensure_ascii=True) + "\n")
                                documents += 1
                        if fmt == "html" and sum(map(len, shown_incidents)) < HTML_INCIDENTS:
                            shown_incidents.append(block.head(HTML_INCIDENTS))
                    if incidents_fh is not None and not counted_incidents:
                        report_csv.write_frame_csv(pd.DataFrame(columns=list(INCIDENTS)), incidents_fh)
                finally:
                    for fh in (incidents_fh, ecs_fh):
                        if fh is not None:
                            fh.close()
                if fmt == "html":
                    html_extra["incidents"] = pd.concat(shown_incidents, ignore_index=True).head(HTML_INCIDENTS) \
                        if shown_incidents else None
                if summary is not None:
                    summary.incidents = counted_incidents if rollup_out is not None else 0
                release_free_memory()
                lap(stages, "rank+write: incidents", t0)
                return entities, documents

            def block(start: int) -> tuple:
                """Block `start`'s arguments: its first rank - 1, the (file, row) of each of its rows and
                which of them had their alert changed (None: none)."""
                idx = order[start:start + WRITE_BLOCK]
                return start, *tables.addresses(idx), None if change is None else change[idx]

            starts = range(0, len(order), WRITE_BLOCK)
            # CSV blocks built by workers: the roll-up and incidents are made here meanwhile (this
            # process would otherwise wait for the blocks, and the workers for it)
            beside_blocks = fmt == "csv" and pool is not None and len(starts) > 1 and not incidents
            summarised = threads.submit(summarise) if beside_blocks else None
            if summary is not None:
                summary.alerts_held_back = held_back
                summary.alerts_by_incident = promoted
            if summarised is None:
                entities, documents = summarise()
                t = time.perf_counter()
            if incidents:   # the output is the incidents: no rows
                return documents, entities
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

            if beside_blocks:
                try:
                    _write_blocks_on_workers(pool, work, block, starts, explain_top, attribution, context, write,
                                             note)
                except BaseException:
                    cancel.set()   # the incidents stop at their next block; the blocks' error is the run's
                    with suppress(Exception):
                        summarised.result()
                    raise
                entities, documents = summarised.result()
            else:
                rank_env = {"model": model, "tables": tables, "explain_top": explain_top,
                            "attribution": attribution, "context": context, "note": note}
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
                # a run with nothing in scope still gets a report: the spec's columns, no rows
                ranked = pd.concat(block_frames, ignore_index=True) if block_frames else \
                    pd.DataFrame({c: pd.Series([], dtype=d) for c, d in schema.RANKED.items()})
                report_html.write_html(ranked, tmp, score_histogram=histogram.tolist(),
                                       alert_level=float(model.threshold_), **html_extra)
            writer.close()
            if writer.rows != len(order):
                raise RuntimeError(f"{out}: {writer.rows:,} rows were written of {len(order):,}; "
                                   "the output was not replaced")
            written = len(order)
            tables.release()
            lap(stages, f"rank+write: gather+explain+write {fmt}", t)
    finally:
        threads.shutdown(wait=True, cancel_futures=True)
    return written, entities


def _flip_frame(rows: pd.DataFrame, change: np.ndarray, note: str) -> None:
    """Rows `alert_changes` changed (`change`: RAISED, HELD, row-aligned) get their final alert, and
    their explanation says why (`raised_explanation`; `note` for a row held back). In place."""
    held, raised = change == HELD, change == RAISED
    if not (held.any() or raised.any()):
        return
    rows.loc[held, "alert"] = False
    rows.loc[raised, "alert"] = True
    rows.loc[held, "explanation"] = rows.loc[held, "explanation"].astype(str) + note
    rows.loc[raised, "explanation"] = raised_explanation(rows.loc[raised, "explanation"])


def _flip(ranked: pa.Table, change: np.ndarray | None, note: str) -> pa.Table:
    """`_flip_frame` on an output block (Arrow; `change` row-aligned)."""
    if change is None or not change.any():
        return ranked
    rows = ranked.select(["alert", "explanation"]).to_pandas()
    _flip_frame(rows, change, note)
    alert = pa.array(rows["alert"].to_numpy(dtype=bool))
    explanation = pa.array(rows["explanation"].astype(str).to_numpy(dtype=object), pa.large_string())
    ranked = ranked.set_column(ranked.schema.get_field_index("alert"), "alert", alert)
    return ranked.set_column(ranked.schema.get_field_index("explanation"), "explanation", explanation)


def _narrow(values: np.ndarray) -> np.ndarray:
    """Non-negative integers as int32 when they fit: half the memory of the per-rank arrays."""
    return values.astype(np.int32) if not len(values) or values.max() < 2**31 else values


def _block_output(rank_env: dict, fmt: str, start: int, bucket: np.ndarray, row: np.ndarray,
                  change: np.ndarray | None = None):
    """The output of rank positions start+1.. (rows (bucket[i], row[i]); `change[i]`: what happened to it,
    `alert_changes`): for CSV its bytes (a list of buffers), else the ranked rows (Arrow), in rank order."""
    ranked, to_rank = _ranked_rows(rank_env["model"], rank_env["tables"], bucket, row, start,
                                   rank_env["explain_top"], rank_env["attribution"], rank_env["context"],
                                   change, rank_env.get("note", ""))
    if fmt != "csv":
        return ranked.take(pa.array(to_rank)), ranked.num_rows
    parts = report_csv.arrow_csv_parts(ranked, header=start == 0, order=to_rank)
    if parts is None:   # a column type the Arrow encoder does not handle: pandas writes the block
        buffer = io.BytesIO()
        report_csv.write_frame_csv(ranked.take(pa.array(to_rank)).to_pandas(), buffer, header=start == 0)
        parts = [buffer.getbuffer()]
    return parts, ranked.num_rows


def _csv_block_job(env: dict, work: Path, start: int, bucket: np.ndarray, row: np.ndarray,
                   change: np.ndarray | None = None, progress=None) -> tuple[Path, int]:
    """Worker side of `_write_blocks_on_workers`: one CSV block, written to a file of the work folder
    (a pipe moves bytes between processes at ~150 MB/s on 2 cores, the kernel's file-to-file copy at
    ~800 MB/s: 2.6 GB of CSV at 10M connections); its path and rows."""
    rank_env = env["rank"]
    if rank_env.get("work") != work:   # this run's scored files, opened once per worker
        rank_env.update(work=work, tables=ScoredFiles(scored_paths(work)))
    parts, rows = _block_output(rank_env, "csv", start, bucket, row, change)
    path = block_path(work, start)
    with open(path, "wb") as fh:
        for part in parts:
            fh.write(part)
    rank_env["tables"].release()
    release_free_memory()
    return path, rows


def block_path(work: Path, start: int) -> Path:
    """Where a worker leaves the CSV block starting at rank start+1."""
    return work / BLOCKS_FOLDER / f"{start}.csv"


def _rank_setup_job(env: dict, explain_top: int, attribution: dict, context: pd.DataFrame | None,
                    note: str = "", progress=None) -> None:
    env["rank"] = {"model": env["model"], "explain_top": explain_top, "attribution": attribution, "context": context,
                   "note": note}


def _write_blocks_on_workers(pool: WorkerPool, work: Path, block, starts: range, explain_top: int,
                             attribution: dict, context: pd.DataFrame | None, write, note: str = "") -> None:
    """CSV blocks (`block(start)`: a block's arguments) built by the workers and written here in rank
    order; at most two blocks per worker in flight, so memory stays bounded. `note`: what a row the
    alert budget held back says (`_flip`)."""
    (work / BLOCKS_FOLDER).mkdir(exist_ok=True)
    pool.broadcast(_rank_setup_job, explain_top, attribution, context, note)
    done: dict[int, tuple[Path, int]] = {}
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
            path, rows = done.pop(next_write)
            write(([path], rows))
            next_write += 1


def _ranked_rows(model, tables: dict[int, pa.Table], bucket: np.ndarray, row: np.ndarray, start: int,
                 explain_top: int, attribution: dict, context: pd.DataFrame | None,
                 change: np.ndarray | None = None, note: str = "") -> tuple[pa.Table, np.ndarray]:
    """The output rows for rank positions start+1.. (rows (bucket[i], row[i])): taken, explained and
    laid out in file order (sequential reads of the memory maps), and the positions that put them
    in rank order. `change[i]`: what `alert_changes` did to row i (a note added)."""
    block, stored = _gather_stored(tables, bucket, row)
    to_rank = np.empty(len(stored), dtype=np.int64)
    to_rank[stored] = np.arange(len(stored))
    ranked = ranked_block(model, block, start + 1 + stored, explain_top, attribution, context)
    return _flip(ranked, None if change is None else change[stored], note), to_rank


def _file_runs(bucket: np.ndarray, row: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(file, its rows) of each run of equal `bucket` (grouped: sorted by file)."""
    cuts = np.flatnonzero(np.diff(bucket)) + 1
    return ((int(b[0]), r) for b, r in zip(np.split(bucket, cuts), np.split(row, cuts)) if len(b))


def _file_order(bucket: np.ndarray, row: np.ndarray) -> np.ndarray:
    """`np.lexsort((row, bucket))`, faster for the two kinds of requests it gets. An output block's rows
    of each file come in the file's order (both are rank order): then a radix sort of the files alone
    is that order (a 10M run's 100k-row blocks: 0.8 against 4.4 ms); otherwise (an incident's rows, say)
    one stable sort of a combined key (113k rows: 8.4 against 11.4 ms)."""
    if not len(bucket):
        return np.zeros(0, dtype=np.int64)
    low = int(bucket.min())
    if int(bucket.max()) - low < 1 << 16:
        file = (bucket - low).astype(np.uint16)
        by_file = np.argsort(file, kind="stable")          # numpy's stable sort of 16-bit keys: radix
        f, r = file[by_file], row[by_file]
        if ((r[1:] >= r[:-1]) | (f[1:] != f[:-1])).all():  # rows ascending within each file: done
            return by_file
        if int(row.min()) >= 0 and int(row.max()) < 1 << 32:
            return np.argsort((file.astype(np.int64) << 32) | row.astype(np.int64), kind="stable")
    return np.lexsort((row, bucket))


def _gather_stored(tables: dict[int, pa.Table], bucket: np.ndarray, row: np.ndarray,
                   columns: list[str] | None = None) -> tuple[pa.Table, np.ndarray]:
    """The rows (bucket[i], row[i]) of the memory-mapped tables in file order (sequential reads),
    score and event_id first (only `columns`, in that order, when given), and `stored`: row j of
    the result is the pair stored[j]."""
    stored = _file_order(bucket, row)
    bucket, row = bucket[stored], row[stored]
    runs = list(_file_runs(bucket, row))
    if not runs:
        table = next(iter(tables.values())).slice(0, 0)
    elif isinstance(tables, ScoredFiles):
        table = tables.take_runs(runs, columns)
    else:
        table = pa.concat_tables([(tables[b] if columns is None else tables[b].select(columns)).take(pa.array(r))
                                  for b, r in runs], promote_options="default")
    if columns is not None:
        return table.select(columns), stored
    cols = ["score", "event_id"] + [c for c in table.column_names if c not in ("score", "event_id")]
    return table.select(cols), stored


def _gather(tables: dict[int, pa.Table], bucket: np.ndarray, row: np.ndarray,
            columns: list[str] | None = None) -> pa.Table:
    """The rows (bucket[i], row[i]) of the memory-mapped tables, in that order, score and event_id first
    (only `columns` when given)."""
    table, stored = _gather_stored(tables, bucket, row, columns)
    to_order = np.empty(len(stored), dtype=np.int64)
    to_order[stored] = np.arange(len(stored))
    return table.take(pa.array(to_order))


def append_file(path: Path, out) -> None:
    """Append the file at `path` to the open binary file `out` (flushed), by the kernel where it can."""
    with open(path, "rb") as src:
        left = os.fstat(src.fileno()).st_size
        try:
            while left > 0:
                copied = os.copy_file_range(src.fileno(), out.fileno(), left)
                if copied == 0:
                    break
                left -= copied
        except (AttributeError, OSError):   # not Linux, or file systems the call cannot span
            pass
        if left > 0:
            src.seek(os.fstat(src.fileno()).st_size - left)
            out.seek(0, os.SEEK_END)
            shutil.copyfileobj(src, out)
            out.flush()


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
        """Append encoded CSV: a block's buffers, or block files (`_csv_block_job`), which are moved:
        copied by the kernel (no pass through this process), then removed."""
        for part in parts:
            if isinstance(part, Path):
                self.fh.flush()
                append_file(part, self.fh)
                part.unlink()
            else:
                self.fh.write(part)

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
        if self.parquet is not None:
            self.parquet.close()


