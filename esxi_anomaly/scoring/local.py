"""The local engine: bounded memory, time-ordered chunks with carried state, resumable, on every core.

1. **Spill**: inputs are streamed once (`ingest.iter_*`) into hourly buckets of Arrow IPC files
   under a work folder, each row tagged with its source *slot* (`core.source_slot`), so no input is
   ever held whole and later passes read in time order. The slots are then dealt into `workers`
   partitions of about equal rows (`core.assign_partitions`).
2. **Score**: each partition (in a worker process, `workers.WorkerPool`; in this process when
   there is one) walks the buckets in time order, split into chunks of at most `chunk_rows`
   connections, each scored by `core.score_block`. A chunk sees the DNS answers of its sources in
   its look-back window; the running counts (`StreamState`) and the candidates for per-row
   attribution are carried to the next chunk. Every feature is per source, so the result equals a
   one-shot run over everything. After each bucket group, a partition writes its scored rows and
   its checkpoint (plain files: JSON, Arrow, numpy; never a pickle) atomically; `--resume`
   continues each partition after its last completed group, with any number of workers and any
   chunk_rows, once the run's fingerprint (model, input files, options) matches the one the spill
   recorded.
3. **Rank and write** (`write.rank_and_write`): scores alone are ranked globally, then rows are
   gathered in rank order, block by block (CSV blocks built by the workers), into the output
   (written to a temp file and renamed at the end, only when it holds every row).

A run holds `<out>.lock` throughout (a second run to the same output exits at once, `OutputBusy`),
checks its output paths before reading anything, and on failure removes its work folder and temp
files, unless it was interrupted after the spill (then: rerun with --resume).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from esxi_anomaly import ingest, schema
from esxi_anomaly.atomic import atomic_path
from esxi_anomaly.console import log
from esxi_anomaly.features import identity
from esxi_anomaly.features.merge import connection_groups
from esxi_anomaly.features.scope import Scope, add_counts, initiators, resolvers_seen
from esxi_anomaly.features.stream_state import StreamState
from esxi_anomaly.input_paths import input_files
from esxi_anomaly.schema import Frames
from esxi_anomaly.scoring.core import (CHECKPOINT_VERSION, N_SLOTS, SCORED_SUFFIX, SLOT_COLUMN, Checkpoint,
                                       RunSummary, assign_partitions, bucket_groups, chunk_bounds, higher_score, lap,
                                       load_checkpoint, merge_top, model_scope, save_checkpoint, score_block,
                                       source_slot, write_scored)
from esxi_anomaly.scoring.output import (ResumeRefused, check_fingerprint, check_output_paths, hold_output,
                                         output_format, remove_stale_temps, rollup_path, run_fingerprint, work_path)
from esxi_anomaly.scoring.workers import WorkerError, WorkerPool, release_free_memory
from esxi_anomaly.scoring.write import rank_and_write

BUCKET_S = 3600
KEEP_HEAP_BELOW = 640 << 20  # a scoring process keeps its freed heap between batches up to this size


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
           file_index: int = 0, scope: Scope | None = None) -> tuple[dict[int, int], np.ndarray]:
    """Write the chunks of input file `file_index` into folder/<bucket>/part-<file_index>-<n>.arrow
    (Arrow IPC: written and mapped back much faster than Parquet encodes), each row with its source
    slot (`core.SLOT_COLUMN`); returns rows per bucket and per slot."""
    folder.mkdir(parents=True, exist_ok=True)
    counts: dict[int, int] = {}
    slots = np.zeros(N_SLOTS, dtype="int64")
    part = 0
    for chunk in chunks:
        if not len(chunk):
            continue
        bucket = np.floor(chunk["ts"].to_numpy(dtype="float64") / bucket_s)
        bucket = np.nan_to_num(bucket, nan=-1).astype("int64")  # rows without time go first
        # connections: the slot of the address each is scored from (`scope.initiators`: a flow recorded
        # backwards goes with its initiator's other connections and DNS answers)
        slot = source_slot(chunk[key] if scope is None else initiators(chunk, scope))
        slots += np.bincount(slot, minlength=N_SLOTS)
        table = pa.Table.from_pandas(chunk, preserve_index=False).append_column(SLOT_COLUMN, pa.array(slot))
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


def spill_file(env: dict, path: str, explicit: bool, frame: str, folder: Path, bucket_s: int, key: str,
                file_index: int, chunk_rows: int, options: dict | None = None, progress=None) -> dict:
    """Pass 1 for one input file, in a worker or here: its bucket and slot counts, quarantine and
    read summary, or the message of the `ingest.IngestError` that refused it."""
    quarantine, summary = ingest.Quarantine(), ingest.ReadSummary()
    try:
        chunks = ingest.iter_file(path, frame, explicit, quarantine, summary, chunk_rows, options)
        if frame == "dns_answers":   # named clients to their IPs before the slot is taken from them
            chunks = (identity.resolve_clients(c, env.get("inventory")) for c in chunks)
        resolvers: set[str] = set()
        if frame == "dns_answers":   # the resolvers the answers name: lookups to them are out of scope
            chunks = (_noting_resolvers(c, resolvers) for c in chunks)
        counts, slots = _spill(chunks, folder, bucket_s, key, file_index,
                               env.get("scope") if frame == "connections" else None)
    except ingest.IngestError as exc:
        return {"error": str(exc)}
    return {"counts": counts, "slots": slots, "quarantine": quarantine, "summary": summary,
            "resolvers": sorted(resolvers)}


def _noting_resolvers(chunk: pd.DataFrame, resolvers: set) -> pd.DataFrame:
    resolvers.update(resolvers_seen(chunk))
    return chunk


def _spilled(folder: Path, buckets: list[int]) -> pa.Table | None:
    """Every spilled row of `buckets` (all partitions, with their slot), in spill order: memory-mapped,
    nothing copied; None when there is none."""
    parts = [part for b in buckets if (folder / str(b)).is_dir()
             for part in sorted((folder / str(b)).glob("part-*.arrow"),
                                key=lambda p: tuple(int(n) for n in p.stem.split("-")[1:]))]
    table = pa.concat_tables([pa.ipc.open_file(pa.memory_map(str(p))).read_all() for p in parts],
                             promote_options="default") if parts else None
    return table if table is not None and table.num_rows else None


def _partition_rows(table: pa.Table, part_of: np.ndarray | None, partition: int) -> np.ndarray | None:
    """Positions of `table`'s rows whose source slot belongs to `partition` (None: all rows, a single
    partition)."""
    return None if part_of is None else np.flatnonzero(part_of[table[SLOT_COLUMN].to_numpy()] == partition)


def _read_bucket(folder: Path, b: int, part_of: np.ndarray | None, partition: int) -> pa.Table | None:
    """The rows of bucket `b` whose source slot belongs to `partition` (all rows when `part_of` is
    None: a single partition), in spill order."""
    table = _spilled(folder, [b])
    if table is None:
        return None
    rows = _partition_rows(table, part_of, partition)
    if rows is not None:
        table = table.take(pa.array(rows))
    return table.drop_columns([SLOT_COLUMN]) if table.num_rows else None


def _read_group(folder: Path, group: list[int], part_of: np.ndarray | None, partition: int) -> pd.DataFrame | None:
    """The partition's connections of the buckets of `group`, sorted by (ts, event_id) (stable, NaN
    times last), as one frame: the keys of the partition's rows sorted, then all columns taken once
    from the memory maps (a filter, then a take of its copy, cost twice the copying)."""
    table = _spilled(folder, group)
    if table is None:
        return None
    rows = _partition_rows(table, part_of, partition)
    if rows is not None and not len(rows):
        return None
    keys = table.select(["ts", "event_id"])
    if rows is not None:
        keys = keys.take(pa.array(rows))
    order = pc.sort_indices(keys, sort_keys=[("ts", "ascending"), ("event_id", "ascending")]).to_numpy()
    # Arrow's take, not pandas' (several times slower on its Arrow string columns)
    return table.drop_columns([SLOT_COLUMN]).take(pa.array(order if rows is None else rows[order])).to_pandas()


# -- pass 2: score -------------------------------------------------------------------------

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
    # one partition per core already: the forest scores on this thread only (the model stays as it is)
    n_jobs = 1 if n_parts > 1 and env.get("worker") else None
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
        conns = _read_group(conn_dir, group, part_of, partition)   # held once while the group is scored
        if conns is None:
            cp.done_buckets.extend(group)
            continue
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
            t = lap(stages, "score: read buckets", t)
            rows, feats = score_block(model, chunk, cp.state, suppressions, n_jobs, stages, plan["scope"], cp.counts)
            cp.state.dns_owned_until = end
            rows["bucket"] = group[0] * n_parts + partition
            t = time.perf_counter()
            merge_top(cp, rows, feats, explain_top)
            pieces.append(rows)
            cp.scored += hi - lo
            cp.kept += len(rows)
            progress(hi - lo)
            t = lap(stages, "score: top merge", t)
        # a chunk whose rows all joined connections of earlier chunks scores none (and its empty
        # text columns have no string type): it adds nothing
        scored = pd.concat([p for p in pieces if len(p)] or pieces[:1], ignore_index=True)
        pieces.clear()   # held once, as `scored`, while it is written
        cp.alerts += int(scored["alert"].sum())
        cp.max_score = higher_score(cp.max_score, scored["score"].to_numpy())
        name = f"{group[0] * n_parts + partition}{SCORED_SUFFIX}"
        write_scored(scored, out_dir / name)
        cp.files[name] = len(scored)
        cp.done_buckets.extend(group)
        save_checkpoint(cp, work, partition)
        t = lap(stages, "score: write scored+checkpoint", t)
        horizon = np.floor((ts[-1] - lookback) / bucket_s) - 1
        for old in [k for k in dns_cache if 0 <= k < horizon]:
            dns_cache.pop(old)
        del conns, scored, pieces, feats, rows, chunk
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


# -- the run -------------------------------------------------------------------------------

def run(model, conn_paths, dns_paths, out: Path, *, inventory: pd.DataFrame | None = None, fmt: str | None = None,
        top: int | None = None, explain_top: int = 200, suppressions: pd.DataFrame | None = None,
        context: pd.DataFrame | None = None, rollup: bool = True, quarantine: ingest.Quarantine | None = None,
        summary: ingest.ReadSummary | None = None, html_extra: dict | None = None, read_options: dict | None = None,
        progress: bool = True, chunk_rows: int = 500_000, work: Path | None = None, resume: bool = False,
        bucket_s: int = BUCKET_S, workers: int = 1, pool: WorkerPool | None = None,
        model_id: str | None = None, scope: Scope | None = None, output_options: dict | None = None) -> RunSummary:
    """Score `conn_paths` against `dns_paths` into `out` (ranked rows); with `rollup`, the per-entity
    roll-up of every scored connection goes to `rollup_path(out)` as well. `workers`: processes
    reading the inputs and scoring partitions of the sources (1: all in this process;
    `workers.default_workers()`: every usable core), or a started `pool` of them (the caller closes
    it); the output does not depend on either. A resumed run keeps its first run's partitions,
    whatever its workers or chunk_rows, and refuses a work folder of other inputs, model
    (`model_id`: the bundle's identity; else a digest of `model`) or options. `scope`: the
    connections scored (`features.scope`; None: the model's), with the resolvers all the DNS answers
    name.

    The output is locked for the run (`hold_output`) and checked before any input is read; a
    failed run removes its work folder, unless it can be resumed (interrupted, a worker killed).
    Worker processes import the caller's main script: call from under `if __name__ == "__main__":`."""
    out = Path(out)
    fmt = output_format(out, fmt)
    work = Path(work) if work else work_path(out)
    quarantine = quarantine if quarantine is not None else ingest.Quarantine()
    with hold_output(out):
        check_output_paths(out, input_files(conn_paths, dns_paths), rollup)
        remove_stale_temps(out, work)
        try:
            result = _run(model, conn_paths, dns_paths, inventory, out, fmt, top, chunk_rows, explain_top, work,
                          resume, progress, quarantine, summary, html_extra, bucket_s, suppressions, context,
                          rollup, workers, pool, model_id, read_options or {}, scope, output_options or {})
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
         read_options: dict, scope: Scope | None = None, output_options: dict | None = None) -> RunSummary:
    run_summary = RunSummary()
    stages = run_summary.stages_s
    spilled = work / "spill.json"
    resuming = resume and spilled.exists()
    if resume and not resuming:
        log(f"nothing to resume in {work}: scoring from the start")
    model_id = model_id or hashlib.sha256(pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL)).hexdigest()
    scope = scope if scope is not None else model_scope(model)
    fingerprint = run_fingerprint(model_id, conn_paths, dns_paths, inventory, context, suppressions,
                                  {"--top": top, "--format": fmt, "explain_top": explain_top, "bucket_s": bucket_s,
                                   "roll-up": rollup, "scope": scope.record(),
                                   **{f"--{k.replace('_', '-')}": v for k, v in read_options.items()}},
                                  out)
    if resuming:
        check_fingerprint(work, fingerprint)
    own_pool = pool is None and workers > 1
    if own_pool:
        pool = WorkerPool(workers)
    workers = len(pool) if pool is not None else 1
    try:
        if pool is not None:
            pool.broadcast(_setup_worker, model, inventory, scope)
        if resuming:
            meta = json.loads(spilled.read_text())
            run_summary.connections, run_summary.dns_records = meta["connections"], meta["dns_records"]
            _restore_reads(work / "reads.json", quarantine, summary)
        else:
            meta = _spill_inputs(conn_paths, dns_paths, work, bucket_s, chunk_rows, workers, quarantine, summary,
                                 stages, run_summary, pool, fingerprint, inventory, read_options, scope)
        plan = _plan(meta, work, chunk_rows, explain_top, suppressions, scope)
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
            cp.max_score = higher_score(cp.max_score, part_cp.max_score)
            cp.scored += part_cp.scored
            cp.kept += part_cp.kept
            add_counts(cp.counts, part_cp.counts)
            if part_cp.top_rows is not None:
                merge_top(cp, part_cp.top_rows, part_cp.top_feats, explain_top)
            for name, seconds in part_stages.items():
                stages[name] = stages.get(name, 0.0) + seconds / len(parts)
        if cp.scored != run_summary.connections:
            raise RuntimeError(f"scored {cp.scored} of {run_summary.connections} connections")
        run_summary.connections_merged = cp.kept
        run_summary.add_scope(cp.counts, model.history_days_)
        run_summary.scope = plan["scope"].record()
        t0 = time.perf_counter()
        if html_extra:
            html_extra = {**html_extra, "summary": {**html_extra.get("summary", {}), **run_summary.report_summary()}}
        run_summary.written, run_summary.entities = rank_and_write(
            model, work, cp, out, fmt, top, explain_top, html_extra or {}, context,
            rollup_out=rollup_path(out) if rollup else None, stages=stages, pool=pool,
            expect_rows=cp.kept, summary=run_summary, **(output_options or {}))
        stages["rank+write"] = time.perf_counter() - t0
    finally:
        if own_pool:
            pool.close()
    run_summary.alerts = cp.alerts
    run_summary.max_score, run_summary.alert_level = cp.max_score, model.threshold_
    run_summary.quarantined = len(quarantine)
    run_summary.partitions = plan["partitions"]
    return run_summary


def _setup_worker(env: dict, model, inventory: pd.DataFrame | None, scope: Scope | None = None,
                  progress=None) -> None:
    env.update(model=model, inventory=inventory, scope=scope, worker=True)


def _spill_inputs(conn_paths, dns_paths, work: Path, bucket_s: int, chunk_rows: int, partitions: int,
                  quarantine, summary, stages: dict, run_summary: RunSummary, pool: WorkerPool | None,
                  fingerprint: dict, inventory: pd.DataFrame | None = None, read_options: dict | None = None,
                  scope: Scope | None = None) -> dict:
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
    # files are read side by side, each in pieces of a quarter of chunk_rows at 2 workers: the reading
    # workers' memory (~2.5 KB a row at its peak) stays under that of the scoring, at the same speed
    read_rows = max(10_000, chunk_rows // (2 * partitions))
    jobs = [(path, explicit, frame, folder, bucket_s, key, index, read_rows, read_options)
            for index, (path, explicit, frame, folder, key) in enumerate(files)]
    here = {"inventory": inventory, "scope": scope}
    if pool is None:
        results = [spill_file(here, *job) for job in jobs]
    else:
        # With no more files than workers, this process reads them until the pool is up (~2 s: a fifth
        # of the run at 0.86M connections); with more, the workers read for long after it is up, and a
        # third reader beside them added only memory (`WorkerPool.map`).
        results = pool.map(spill_file, jobs, here=here if len(jobs) <= len(pool) else None)
    stages["read+spill"] = time.perf_counter() - t0
    counts = {"connections": {}, "dns_answers": {}}
    resolvers = sorted({ip for result in results if "error" not in result for ip in result["resolvers"]})
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
            "dns_records": run_summary.dns_records, "partitions": int(part_of.max()) + 1, "resolvers": resolvers,
            "conn_buckets": {str(k): v for k, v in counts["connections"].items()}}
    with atomic_path(work / "spill.json") as tmp:
        Path(tmp).write_text(json.dumps(meta))
    release_free_memory()   # this process only waits while the partitions are scored
    return meta


def _plan(meta: dict, work: Path, chunk_rows: int, explain_top: int, suppressions: pd.DataFrame | None,
          scope: Scope) -> dict:
    """What every partition's `score_partition` needs to know of the run: `scope` with the resolvers
    the spill found in the DNS answers, the same for every chunk."""
    if meta.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{work}: work folder from another version; rerun without --resume")
    # bucket groups (`score_partition`) of about chunk_rows connections in all, whatever the
    # partitions: memory stays bounded by chunk_rows over all workers together
    return {"bucket_s": int(meta["bucket_s"]), "chunk_rows": chunk_rows, "explain_top": explain_top,
            "partitions": int(meta["partitions"]),
            "part_of": np.load(work / "partitions.npy", allow_pickle=False),
            "conn_buckets": {int(k): v for k, v in meta["conn_buckets"].items()},
            "suppressions": suppressions, "scope": scope.with_resolvers(meta["resolvers"])}


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


