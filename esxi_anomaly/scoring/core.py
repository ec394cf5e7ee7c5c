"""What both engines share: source slots, the one path from features to scored rows (`score_block`),
the running top rows, checkpoints, the scored files, the ranking order and the run summary.

Every feature is per source (client), so an engine may cut the sources into partitions as it likes:
a source's connections and DNS answers get the same *slot* (`source_slot`), and slots are dealt into
partitions. Each engine then scores its partitions through `score_block` and writes its scored rows
with `write_scored`; `write.rank_and_write` ranks them all (`rank.rank_order`). Nothing here knows which engine runs.
"""
from __future__ import annotations

import json
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from esxi_anomaly import schema
from esxi_anomaly.atomic import atomic_path
from esxi_anomaly.features.hashing import hash_column
from esxi_anomaly.features.merge import duplicate_records
from esxi_anomaly.features.scope import (Scope, add_counts, apply_scope, coverage, diagnostic_lines, out_of_scope,
                                         resolvers_seen, scope_line)
from esxi_anomaly.features.stream_state import StreamState, read_frame, write_frame
from esxi_anomaly.feedback import apply_suppressions
from esxi_anomaly.scoring.rank import rank_order, top_positions

CHECKPOINT_VERSION = 7            # 2: scored rows carry sentence inputs; 3: one checkpoint per partition;
                                  # 4: checkpoints as plain files (no pickles), run fingerprint;
                                  # 5: merged connections (`seen_by`, rows kept besides rows read);
                                  # 6: merge state keyed by the unordered endpoint pair (reversed twins)
                                  # 7: scope and coverage counts (`counts`)
SLOT_BITS = 16
N_SLOTS = 1 << SLOT_BITS
SLOT_COLUMN = "_slot"             # spill-only column (both engines): the row's source slot
SCORED_SUFFIX = ".scored.arrow"


def source_slot(ips) -> np.ndarray:
    """Slot (0..N_SLOTS-1) of each source IP: the top bits of a stable 64-bit hash (the same in
    every process and run, see `features.hashing`); a source's connections (`src_ip`) and DNS
    answers (`client_ip`) get the same slot. A Series of strings is hashed per distinct value."""
    values = ips if isinstance(ips, pd.Series) else np.asarray(ips, dtype=object)
    return (hash_column(values) >> np.uint64(64 - SLOT_BITS)).astype("int32")


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


# -- features to scored rows ------------------------------------------------------------------

def score_block(model, frames: schema.Frames, state: StreamState | None, suppressions: pd.DataFrame | None,
                n_jobs: int | None = None, stages: dict | None = None, scope: Scope | None = None,
                counts: dict | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Scored rows (`model.score_rows`, analysts' benign verdicts applied) and the feature matrix of
    the connections in `scope` of one block of `frames`: the one path from inputs to scored rows,
    whatever the engine. `scope`: what is scored (`features.scope`; None: the model's, with the
    resolvers the block's DNS answers name; the engines pass the run's, whose resolvers are those of
    all its answers, so that a row's scope does not depend on the block it falls in). Rows out of
    scope and duplicate records are counted into `counts` (`features.scope.COUNTS`), as are the
    scored rows and those joined to a DNS answer. `state`: the stream state carried from the
    previous block (None: the block is everything). `n_jobs`: the forest's scoring threads for this
    call (1 where each core already scores a partition); the fitted model is not changed. `stages`:
    seconds per step are added to it."""
    stages = {} if stages is None else stages
    t = time.perf_counter()
    if scope is None:
        scope = model_scope(model).with_resolvers(resolvers_seen(frames.dns_answers))
    scoped = apply_scope(frames.connections, frames.inventory, scope)
    conns = scoped.connections
    duplicate = duplicate_records(conns)
    if duplicate.any():   # one connection: the row of the lowest event_id is kept
        conns = conns[~duplicate].reset_index(drop=True)
    t = lap(stages, "score: scope", t)
    prepared, feats = model.features(schema.Frames(conns, frames.dns_answers, frames.inventory), state)
    t = lap(stages, "score: features", t)
    components = model.detector_.components(feats, n_jobs=n_jobs)
    t = lap(stages, "score: forest+rules", t)
    rows = model.score_rows(prepared, feats, components)
    if suppressions is not None:
        rows = apply_suppressions(rows, suppressions)
    if counts is not None:
        add_counts(counts, scoped)
        add_counts(counts, {"duplicates": int(duplicate.sum()), "scored": len(rows),
                            "joined_dns": int((rows["query"] != "").sum())})
    lap(stages, "score: rows", t)
    return rows, feats


def model_scope(model) -> Scope:
    """The scope `model` was trained on (`DnsCalcDetector.scope_`), the default for its scoring;
    `Scope()` for a model fitted before scopes were recorded."""
    recorded = getattr(model, "scope_", None)
    return recorded if isinstance(recorded, Scope) else Scope()


def lap(stages: dict, name: str, t0: float) -> float:
    """Add the time since `t0` to stages[name]; returns now (the next lap's start)."""
    now = time.perf_counter()
    stages[name] = stages.get(name, 0.0) + now - t0
    return now


# -- the running top rows --------------------------------------------------------------------------

def merge_top(cp: "Checkpoint", rows: pd.DataFrame, feats: pd.DataFrame, k: int) -> None:
    """Keep the `k` best rows in rank order (`rank.rank_order`) and their features of everything
    seen so far in `cp`."""
    if len(rows) > k > 0:   # only rows ranking at least as the k-th can make it (ties kept)
        keep = top_positions(rows, k)
        rows, feats = rows.iloc[keep], feats.iloc[keep]
    rows = rows.reset_index(drop=True)
    feats = feats.reset_index(drop=True)
    if cp.top_rows is not None:
        rows = pd.concat([cp.top_rows, rows], ignore_index=True)
        feats = pd.concat([cp.top_feats, feats], ignore_index=True)
    order = rank_order(rows)[:k]
    cp.top_rows = rows.iloc[order].reset_index(drop=True)
    cp.top_feats = feats.iloc[order].reset_index(drop=True)


# -- time order ----------------------------------------------------------------------------------

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


# -- the scored files ----------------------------------------------------------------------------

def write_scored(rows: pd.DataFrame, path: Path) -> None:
    """Scored rows of one bucket group (or Dask partition), as an Arrow IPC file written atomically,
    in rank order with `row` = position in the file: an output block then takes one run of
    consecutive rows from each file (sequential reads of the memory map, each page once)."""
    table = pa.Table.from_pandas(rows.drop(columns=["row"], errors="ignore"), preserve_index=False)
    table = table.take(pa.array(rank_order(table)))  # Arrow: 50x pandas here
    table = table.append_column("row", pa.array(np.arange(len(rows))))
    with atomic_path(path, durable=False) as tmp:   # a resumed run checks it is whole
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)


def scored_paths(work: Path) -> list[Path]:
    """The scored files of a work folder, by their bucket number (`<bucket>.scored.arrow`)."""
    return sorted((work / "scored").glob(f"*{SCORED_SUFFIX}"), key=lambda p: int(p.name.split(".")[0]))


# -- checkpoints -------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    """One partition's progress (or, merged, the run's): what a resumed run starts from."""
    version: int = CHECKPOINT_VERSION
    done_buckets: list[int] = field(default_factory=list)
    state: StreamState = field(default_factory=StreamState)
    top_rows: pd.DataFrame | None = None      # running top-K rows (score, event_id, bucket, row)
    top_feats: pd.DataFrame | None = None
    alerts: int = 0
    max_score: float | None = None            # the highest score of the rows scored (None: no rows yet)
    scored: int = 0                           # connections read and scored (before merging)
    kept: int = 0                             # rows written: one per connection (`features.merge`)
    files: dict[str, int] = field(default_factory=dict)   # scored file name -> rows, checked on resume
    counts: dict[str, int] = field(default_factory=dict)  # out of scope per reason, coverage (`score_block`)

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
                "alerts": int(self.alerts), "max_score": self.max_score,
                "scored": int(self.scored), "kept": int(self.kept),
                "files": {str(k): int(v) for k, v in self.files.items()},
                "counts": {str(k): int(v) for k, v in self.counts.items()},
                "top": self.top_rows is not None}
        (folder / "checkpoint.json").write_text(json.dumps(meta), encoding="utf-8")   # last: the folder is whole

    @classmethod
    def from_files(cls, folder: Path, scalars_only: bool = False) -> "Checkpoint":
        """What `to_files` wrote (`scalars_only`: without the top rows and the state)."""
        folder = Path(folder)
        meta = json.loads((folder / "checkpoint.json").read_text(encoding="utf-8"))
        cp = cls(version=int(meta["version"]), done_buckets=[int(b) for b in meta["done_buckets"]],
                 alerts=int(meta["alerts"]), max_score=meta.get("max_score"), scored=int(meta["scored"]),
                 kept=int(meta.get("kept", 0)),
                 files={str(k): int(v) for k, v in meta["files"].items()},
                 counts={str(k): int(v) for k, v in meta.get("counts", {}).items()})
        if cp.version != CHECKPOINT_VERSION or scalars_only:
            return cp
        if meta["top"]:
            cp.top_rows, cp.top_feats = read_frame(folder / "top_rows.arrow"), read_frame(folder / "top_feats.arrow")
        cp.state = StreamState.from_files(folder / "state")
        return cp


def checkpoint_path(work: Path, partition: int) -> Path:
    """The partition's checkpoint record: names the folder holding its latest checkpoint."""
    return work / f"checkpoint-{partition}.json"


def save_checkpoint(cp: Checkpoint, work: Path, partition: int) -> None:
    """Write `cp` into a new folder, then point `checkpoint_path` at it (an atomic rename): a run
    killed at any moment leaves the previous checkpoint or this one, whole. Not flushed to disk (each
    flush also forced out the scored file's 100+ MB): a killed run resumes from the page cache; after
    a machine crash a resumed run refuses what is lost (the local engine checks the scored files)."""
    name = f"checkpoint-{partition}.{uuid.uuid4().hex}"
    cp.to_files(work / name)
    with atomic_path(checkpoint_path(work, partition), durable=False) as tmp:
        Path(tmp).write_text(json.dumps({"folder": name}), encoding="utf-8")
    for old in work.glob(f"checkpoint-{partition}.*"):
        if old.is_dir() and old.name != name:
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


# -- the run's summary ---------------------------------------------------------------------------

def higher_score(best: float | None, scores) -> float | None:
    """The highest of `best` (None: none yet) and `scores` (an array of scores, or one score or None)."""
    values = np.asarray([] if scores is None else scores, dtype="float64").ravel()
    if not len(values):
        return best
    top = float(np.nanmax(values)) if not np.isnan(values).all() else None
    return top if best is None or (top is not None and top > best) else best


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
    incidents: int = 0           # rows of the incidents CSV (0: not written)
    alerts_held_back: int = 0    # alerts the alert budget (`--alert-budget`) turned into non-alerts
    alerts_by_incident: int = 0  # connections that are alerts because their incident alerted on evidence
    max_score: float | None = None   # the highest score of the connections scored (None: none scored)
    in_scope: int = 0            # connection rows in scope (`features.scope`): connections = in_scope + out of scope
    out_of_scope: dict = field(default_factory=dict)   # rows out of scope per reason (`scope.REASONS`)
    coverage: dict = field(default_factory=dict)       # `scope.coverage`: DNS share, encrypted DNS, duplicates, ...
    diagnostics: list = field(default_factory=list)    # the blind spots in plain words (`--strict` fails on any)
    scope: dict = field(default_factory=dict)          # the scope applied (`Scope.record`, resolvers included)
    alert_level: float | None = None  # the model's alert level (`threshold_`)
    stages_s: dict = field(default_factory=dict)

    def add_scope(self, counts: dict, history_days: float | None = None) -> None:
        """Fill the scope and coverage fields from the run's `counts` (`score_block`); RuntimeError
        when rows read are not all accounted for (in scope or out of it, by reason)."""
        self.out_of_scope = out_of_scope(counts)
        self.coverage = coverage(counts)
        self.in_scope = self.coverage["in_scope"]
        if self.in_scope + sum(self.out_of_scope.values()) != self.connections:
            raise RuntimeError(f"{self.connections} connections read, {self.in_scope} in scope and "
                               f"{sum(self.out_of_scope.values())} out of scope")
        self.diagnostics = diagnostic_lines(counts, self.dns_records, history_days)

    def scope_lines(self) -> list[str]:
        """The run's scope and diagnostics, as log lines."""
        counts = {**self.out_of_scope, "read": self.connections, "in_scope": self.in_scope,
                  "reoriented": self.coverage.get("reoriented", 0)}
        cov = self.coverage
        share = "" if cov.get("dns_share") is None else (
            f"; {100 * cov['dns_share']:.0f} % of the connections scored were joined to a DNS answer")
        return [scope_line(counts) + share] + [f"warning: {line}" for line in self.diagnostics]

    def report_summary(self) -> dict:
        """The numbers the HTML report's header shows (`html_extra["summary"]`): `connections` scored
        (one per connection), rows read, in scope and out of scope per reason, the DNS coverage."""
        return {"connections": self.connections_merged, "connections_read": self.connections, "in_scope": self.in_scope,
                "out_of_scope": dict(self.out_of_scope),
                "dns_share": self.coverage.get("dns_share"), "encrypted_dns": self.coverage.get("dns_over_tls", 0)
                + self.coverage.get("doh", 0), "duplicates": self.coverage.get("duplicates", 0),
                "diagnostics": list(self.diagnostics)}

    def level_warnings(self) -> list[str]:
        """A warning when the alert level is above every score of the run: no row could alert."""
        if self.alert_level is None or self.max_score is None or not self.alert_level > self.max_score:
            return []
        return [f"the alert level {self.alert_level:.4f} is above every score of this run (top "
                f"{self.max_score:.4f}): no connection could alert, whatever its evidence. Check that the "
                "model was trained on this environment's traffic"]
