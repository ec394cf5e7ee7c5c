"""Scale-out scoring on Dask: partitions by source entity, the same pandas code in every task.

Every feature is computed per source (client): the DNS join links a connection to answers its own
source received, running counts are keyed per client, baselines per entity. So the connections of
a set of sources, scored together with *all* DNS answers of those sources, get exactly the scores of
a one-shot run over everything. The engine therefore:

1. **Spill** (client process): streams the inputs once (`ingest.iter_connections/iter_dns`) into
   Parquet files under `<out>.work/`, each chunk sorted by a *slot*: the top 16 bits of a stable
   64-bit hash of the source IP (`src_ip` for connections, `client_ip` for DNS; same function, so a
   source's connections and answers get the same slot). DNS clients logged by host name are first
   resolved to their entity's IPs (`features.identity`), as in the local engine. Row groups are
   small, so a reader asking for a slot range skips the rest by the Parquet statistics.
2. **Partition**: the per-slot row counts (known exactly after the spill) are cut into contiguous
   slot ranges of about `PARTITION_ROWS` rows (connections + DNS answers), at least two per worker
   thread; `partitions=` fixes the number instead.
3. **Score** (workers): one task per partition loads its slot range (connections in (ts, event_id)
   order, DNS in time order) and scores it with `core.score_block`, as the local engine does, with
   the same suppressions (the model, inventory and suppressions are scattered to every worker
   once), writes `<work>/scored/<partition>.scored.arrow` (`bucket` =
   partition, `row` = row in the partition) and returns its top `explain_top` rows and features.
4. **Rank and write** (client process): `write.rank_and_write`, as the local engine does.

The work folder is written by the client and read/written by the workers: on a remote cluster it
must be on a filesystem they share (see docs/dask.md).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from esxi_anomaly import ingest, schema
from esxi_anomaly.console import EXIT_INPUT
from esxi_anomaly.features import identity
from esxi_anomaly.features.scope import Scope, add_counts, initiators, resolvers_seen
from esxi_anomaly.input_paths import input_files
from esxi_anomaly.schema import Frames
from esxi_anomaly.scoring.core import (N_SLOTS, SCORED_SUFFIX, SLOT_COLUMN, Checkpoint, RunSummary, higher_score,
                                       merge_top, model_scope, score_block, source_slot, write_scored)
from esxi_anomaly.scoring.output import check_output_paths, hold_output, output_format, rollup_path, work_path
from esxi_anomaly.scoring.write import rank_and_write

PARTITION_ROWS = 500_000       # connections + DNS answer rows per task (bounds a worker's memory)
ROW_GROUP_ROWS = 16_384        # small row groups: a slot-range read skips most of each spill file
SPILL_CHUNK_ROWS = 500_000
_SEQ = "_seq"                  # spill-only column (besides `core.SLOT_COLUMN`): global read order


class DaskMissing(ImportError):
    """`distributed` is not installed: the message says which extra to install."""
    exit_code = EXIT_INPUT


def require_distributed() -> None:
    """Fail at once, before any input is read, when the Dask extra is missing."""
    try:
        import distributed  # noqa: F401
    except ImportError as exc:
        raise DaskMissing(f"--engine dask needs Dask's `distributed`, which is not installed ({exc}); install the "
                          "extra with: pip install 'esxi-anomaly[dask]'") from None


# -- spill ----------------------------------------------------------------------------------

def _spill(chunks: Iterator[pd.DataFrame], folder: Path, key: str, scope: Scope | None = None) -> np.ndarray:
    """Write each chunk, sorted by slot (stable), to folder/part-N.parquet; rows per slot. With
    `scope` (connections), the slot is that of the address each row is scored from
    (`scope.initiators`), as in the local engine."""
    folder.mkdir(parents=True, exist_ok=True)
    counts = np.zeros(N_SLOTS, dtype="int64")
    seq = 0
    for part, chunk in enumerate(chunks):
        if not len(chunk):
            continue
        slot = source_slot(chunk[key] if scope is None else initiators(chunk, scope))
        order = np.argsort(slot, kind="stable")
        rows = chunk.iloc[order].reset_index(drop=True)
        rows[SLOT_COLUMN] = slot[order]
        rows[_SEQ] = seq + order.astype("int64")
        seq += len(chunk)
        counts += np.bincount(slot, minlength=N_SLOTS)
        pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), folder / f"part-{part}.parquet",
                       row_group_size=ROW_GROUP_ROWS)
    return counts


def _resolved(chunks: Iterator[pd.DataFrame], inventory: pd.DataFrame | None) -> Iterator[pd.DataFrame]:
    """DNS chunks with host-named clients replaced by their entity's IPs (`identity.resolve_clients`)."""
    lookup = identity.Identity.from_inventory(inventory)   # built once, not per chunk
    return (identity.resolve_clients(chunk, inventory, lookup) for chunk in chunks)


def _noting_resolvers(chunks: Iterator[pd.DataFrame], resolvers: set) -> Iterator[pd.DataFrame]:
    for chunk in chunks:
        resolvers.update(resolvers_seen(chunk))
        yield chunk


def choose_partitions(conn_counts: np.ndarray, dns_counts: np.ndarray, partitions: int | None,
                      min_partitions: int = 1, partition_rows: int = PARTITION_ROWS) -> list[tuple[int, int]]:
    """Contiguous slot ranges [lo, hi) of about equal rows, only those holding connections.

    `partitions` fixes the number of cuts; otherwise enough to keep each near `partition_rows`
    rows (connections + DNS), and at least `min_partitions`."""
    weight = conn_counts + dns_counts
    total = int(weight.sum())
    if partitions is None:
        partitions = max(min_partitions, -(-total // partition_rows))
    partitions = max(1, min(int(partitions), int(np.count_nonzero(conn_counts)) or 1))
    cum = np.cumsum(weight)
    cuts = np.searchsorted(cum, total * np.arange(1, partitions) / partitions, side="left") + 1
    edges = np.unique(np.concatenate([[0], cuts, [N_SLOTS]]))
    ranges = [(int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:])]
    return [(lo, hi) for lo, hi in ranges if conn_counts[lo:hi].any()]


# -- one task -------------------------------------------------------------------------------

def _read_range(folder: Path, lo: int, hi: int) -> pd.DataFrame | None:
    parts = sorted(folder.glob("part-*.parquet"), key=lambda p: int(p.stem.split("-")[1]))
    filters = [(SLOT_COLUMN, ">=", lo), (SLOT_COLUMN, "<", hi)]
    frames = [t.to_pandas() for t in (pq.read_table(p, filters=filters) for p in parts) if t.num_rows]
    if not frames:
        return None
    return pd.concat(frames, ignore_index=True)


def score_partition(model, inventory: pd.DataFrame | None, suppressions: pd.DataFrame | None, work: str,
                    partition: int, lo: int, hi: int, explain_top: int, scope: Scope | None = None) -> dict:
    """Score the sources of slots [lo, hi) in one block (`core.score_block`, as the local engine),
    the connections of `scope` (the run's: the same resolvers in every task)."""
    t0 = time.perf_counter()
    work = Path(work)
    if not (work / "conn").is_dir():
        raise FileNotFoundError(f"{work}: the work folder is not visible on this Dask worker; with a remote "
                                "cluster it must be on a filesystem the workers mount at the same path")
    conns = _read_range(work / "conn", lo, hi)
    if conns is None:
        return {"partition": partition, "rows": 0, "read": 0, "alerts": 0, "max_score": None, "top_rows": None,
                "top_feats": None, "seconds": 0.0, "counts": {}}
    conns = conns.sort_values(["ts", "event_id", _SEQ], kind="stable", ignore_index=True)
    conns = conns.drop(columns=[SLOT_COLUMN, _SEQ])
    dns = _read_range(work / "dns", lo, hi)
    if dns is None:
        dns = schema.empty("dns_answers")
    else:
        dns = dns.sort_values(["ts", _SEQ], kind="stable", ignore_index=True).drop(columns=[SLOT_COLUMN, _SEQ])
    # Dask already runs one task per worker core: the forest scores on this task's thread only
    # (scores do not depend on the thread count)
    counts: dict = {}
    rows, feats = score_block(model, Frames(conns, dns, inventory), None, suppressions, n_jobs=1, scope=scope,
                              counts=counts)
    rows["bucket"] = partition
    top = Checkpoint()
    merge_top(top, rows, feats, explain_top)
    out_dir = work / "scored"
    out_dir.mkdir(exist_ok=True)
    write_scored(rows, out_dir / f"{partition}{SCORED_SUFFIX}")
    return {"partition": partition, "rows": len(rows), "read": len(conns), "alerts": int(rows["alert"].sum()),
            "max_score": higher_score(None, rows["score"].to_numpy()),
            "top_rows": top.top_rows, "top_feats": top.top_feats, "seconds": time.perf_counter() - t0,
            "counts": counts}


# -- the run --------------------------------------------------------------------------------

def _connect(scheduler):
    """(client, cluster we started or None): an address, an existing `distributed.Client`, or None
    for a LocalCluster of 2 single-threaded worker processes."""
    from distributed import Client, LocalCluster

    if isinstance(scheduler, Client):
        return scheduler, None, False
    if scheduler:
        return Client(scheduler), None, True
    # the scheduler's HTTP server on a free port: with None it still takes 8787, and warns when another
    # run (or cluster) holds it
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    return Client(cluster), cluster, True


def run(model, conn_paths, dns_paths, out: Path, *, inventory: pd.DataFrame | None = None, fmt: str | None = None,
        top: int | None = None, explain_top: int = 200, suppressions: pd.DataFrame | None = None,
        context: pd.DataFrame | None = None, rollup: bool = True, quarantine: ingest.Quarantine | None = None,
        summary: ingest.ReadSummary | None = None, html_extra: dict | None = None, read_options: dict | None = None,
        progress: bool = True, scheduler=None, partitions: int | None = None, partition_rows: int = PARTITION_ROWS,
        work: Path | None = None, output_options: dict | None = None, scope: Scope | None = None) -> RunSummary:
    """Score like `local.run` (the same arguments, the same outputs), with the per-partition work on
    a Dask cluster. `scheduler`: a scheduler address (``tcp://host:8786``), a `distributed.Client`,
    or None for a LocalCluster started (and closed) here. `partitions`: number of tasks (default: by
    size, `partition_rows`). `progress`: unused (the Dask dashboard shows the tasks). Like
    `local.run`, the output is locked for the run and checked before any input is read."""
    out = Path(out)
    with hold_output(out):   # one run per output: its work folder is the output's
        check_output_paths(out, input_files(conn_paths, dns_paths), rollup)
        return _run(model, conn_paths, dns_paths, out, inventory, fmt, top, explain_top, suppressions, context,
                    rollup, quarantine, summary, html_extra, read_options, scheduler, partitions, partition_rows, work,
                    output_options or {}, scope)


def _run(model, conn_paths, dns_paths, out: Path, inventory, fmt, top, explain_top, suppressions, context, rollup,
         quarantine, summary, html_extra, read_options, scheduler, partitions, partition_rows, work,
         output_options: dict | None = None, scope: Scope | None = None) -> RunSummary:
    require_distributed()
    fmt = output_format(out, fmt)
    work = (Path(work) if work else work_path(out)).resolve()
    quarantine = quarantine if quarantine is not None else ingest.Quarantine()
    result = RunSummary()
    stages = result.stages_s
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    client = cluster = None
    close = False
    try:
        t0 = time.perf_counter()
        scope = scope if scope is not None else model_scope(model)
        c_counts = _spill(ingest.iter_connections(conn_paths, quarantine, summary, SPILL_CHUNK_ROWS, read_options),
                          work / "conn", "src_ip", scope)
        stages["read+spill connections"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        # named clients (Sysmon EID 22) to their IPs before the slot is taken from them, as the local engine does
        resolvers: set[str] = set()   # the resolvers all the answers name, for every task's scope
        d_counts = _spill(_noting_resolvers(_resolved(ingest.iter_dns(dns_paths, quarantine, summary, SPILL_CHUNK_ROWS),
                                                      inventory), resolvers), work / "dns", "client_ip")
        scope = scope.with_resolvers(sorted(resolvers))
        stages["read+spill dns"] = time.perf_counter() - t0
        result.connections, result.dns_records = int(c_counts.sum()), int(d_counts.sum())
        if not result.connections:
            raise ingest.IngestError("no connection records were read from --conn")

        t0 = time.perf_counter()
        client, cluster, close = _connect(scheduler)
        threads = sum(client.nthreads().values()) or 1
        ranges = choose_partitions(c_counts, d_counts, partitions, 2 * threads, partition_rows)
        model_f = client.scatter(model, broadcast=True)
        inventory_f = client.scatter(inventory, broadcast=True) if inventory is not None else None
        suppressions_f = client.scatter(suppressions, broadcast=True) if suppressions is not None else None
        stages["cluster+broadcast"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        from distributed import as_completed

        futures = [client.submit(score_partition, model_f, inventory_f, suppressions_f, str(work), p, lo, hi,
                                 explain_top, scope, pure=False)
                   for p, (lo, hi) in enumerate(ranges)]
        cp = Checkpoint()
        task_s = 0.0
        for future in as_completed(futures):
            part = future.result()
            future.release()
            cp.alerts += part["alerts"]
            cp.max_score = higher_score(cp.max_score, part["max_score"])
            cp.scored += part["read"]     # rows read; `rows`: one per connection (`features.merge`)
            cp.kept += part["rows"]
            add_counts(cp.counts, part["counts"])
            task_s += part["seconds"]
            if part["top_rows"] is not None:
                merge_top(cp, part["top_rows"], part["top_feats"], explain_top)
        cp.done_buckets = list(range(len(ranges)))
        stages["score"] = time.perf_counter() - t0
        stages["score (sum of tasks)"] = task_s
        if cp.scored != result.connections:
            raise RuntimeError(f"scored {cp.scored} of {result.connections} connections")
        result.connections_merged = cp.kept
        result.add_scope(cp.counts, model.history_days_)
        result.scope = scope.record()
        if html_extra:   # as the local engine gives it
            html_extra = {**html_extra, "summary": {**html_extra.get("summary", {}), **result.report_summary()}}

        t0 = time.perf_counter()
        result.written, result.entities = rank_and_write(
            model, work, cp, out, fmt, top, explain_top, html_extra or {}, context,
            rollup_out=rollup_path(out) if rollup else None, stages=stages, expect_rows=cp.kept, summary=result,
            **(output_options or {}))
        stages["rank+write"] = time.perf_counter() - t0
        result.alerts = cp.alerts
        result.max_score, result.alert_level = cp.max_score, model.threshold_
        result.quarantined = len(quarantine)
        result.partitions = len(ranges)
        return result
    finally:
        if close and client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
        shutil.rmtree(work, ignore_errors=True)
