"""Feature-extraction throughput: the DNS join plus every feature, without parsing or scoring.

    .venv/bin/python benchmarks/feature_throughput.py                  # ~1.1M connections, best of 3
    .venv/bin/python benchmarks/feature_throughput.py --days 8 --repeat 2

A generated "large" estate (`synth.generate`) is held in memory as canonical frames, exactly what the
readers hand to the scorer. The per-entity baseline and the management plane are fitted on the first
half of the days (not timed). Timed, on all connections and DNS answers:

  one process     `pipeline.prepare` (join, relationship, DNS-side and entity features) followed by
                  `pipeline.extract` (baseline and management-plane features): the work each batch
                  of the local engine does between reading and the ensemble.
  cut by source   not feature work, timed apart: the connections and DNS answers cut into P
                  partitions as the local engine cuts them (`scoring.core.source_slot`, slots dealt by
                  `core.assign_partitions` into P partitions of about equal rows), each
                  partition's frames taken in time order. The engines do this when they spill
                  their input, before any feature work.
  by source, P    P persistent worker processes, each already holding its own partition's frames
                  (as a worker that has read its spill files), start together on a barrier and run
                  the same `prepare` + `extract` on them. Wall = from the first worker's start to the
                  last worker's end; CPU = the sum of the workers' CPU time for that work. Nothing
                  is pickled or forked inside the timed part. After it (not timed) each worker sends
                  its matrix back and the benchmark checks that, put back in the original row order,
                  it equals the one-process matrix exactly.

connections/s = connections per wall second (best of --repeat). Writes
`benchmarks/results/feature_throughput.md` (git-ignored) and prints the same table.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from esxi_anomaly.scoring.core import N_SLOTS, assign_partitions, source_slot
from esxi_anomaly.features import pipeline
from esxi_anomaly.features.baseline import EntityBaseline
from esxi_anomaly.features.mgmt_plane import ManagementPlane
from esxi_anomaly.synth import generate
from esxi_anomaly.scoring.workers import tune_allocator

RESULTS = Path(__file__).resolve().parent / "results"
_JOB: dict = {}  # inherited by forked workers: the frames and fitted pieces, never pickled


def _features(conns: pd.DataFrame, dns: pd.DataFrame) -> pd.DataFrame:
    prepared = pipeline.prepare(conns, dns, _JOB["inventory"])
    return pipeline.extract(prepared, _JOB["baseline"], _JOB["mgmt"])


def time_one_process(repeat: int) -> tuple[float, float, pd.DataFrame]:
    best_wall, best_cpu, X = np.inf, np.inf, None
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        X = _features(_JOB["conns"], _JOB["dns"])
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return best_wall, best_cpu, X


def cut_by_source(processes: int) -> list[tuple[np.ndarray, pd.DataFrame, pd.DataFrame]]:
    """Per partition: its connection rows (positions in the whole frame) and its connection and DNS
    frames, cut as the local engine cuts them (`scoring.core.assign_partitions`)."""
    conns, dns = _JOB["conns"], _JOB["dns"]
    conn_slot, dns_slot = source_slot(conns["src_ip"]), source_slot(dns["client_ip"])
    part_of = assign_partitions(np.bincount(conn_slot, minlength=N_SLOTS), np.bincount(dns_slot, minlength=N_SLOTS),
                                processes)
    conn_part, dns_part = part_of[conn_slot], part_of[dns_slot]
    parts = []
    for p in range(processes):
        rows = np.flatnonzero(conn_part == p)
        parts.append((rows, conns.take(rows).reset_index(drop=True),
                      dns.take(np.flatnonzero(dns_part == p)).reset_index(drop=True)))
    return parts


def _worker(part: int, rounds: int, barrier, results) -> None:
    """Run `rounds` timed rounds on this worker's partition; send (start, end, CPU s) per round, and
    the first round's matrix after its timing."""
    _, conns, dns = _JOB["parts"][part]
    for round_ in range(rounds):
        barrier.wait()
        start, cpu = time.perf_counter(), time.process_time()
        X = _features(conns, dns)
        timing = (start, time.perf_counter(), time.process_time() - cpu)
        results.send((timing, X.to_numpy() if round_ == 0 else None))
        del X


def time_by_source(processes: int, repeat: int, expected: pd.DataFrame) -> tuple[float, float]:
    """Best wall and CPU seconds of P persistent workers; checks their matrices against `expected`."""
    context = multiprocessing.get_context("fork")  # workers inherit the frames: nothing is pickled in
    barrier = context.Barrier(processes)
    pipes = [context.Pipe(duplex=False) for _ in range(processes)]
    workers = [context.Process(target=_worker, args=(p, repeat, barrier, pipes[p][1])) for p in range(processes)]
    for w in workers:
        w.start()
    best_wall, best_cpu = np.inf, np.inf
    X = np.empty(expected.shape)
    for round_ in range(repeat):
        got = [pipe.recv() for pipe, _ in pipes]
        starts, ends, cpus = zip(*(timing for timing, _ in got))
        best_wall = min(best_wall, max(ends) - min(starts))
        best_cpu = min(best_cpu, sum(cpus))
        if round_ == 0:
            for p, (_, part) in enumerate(got):
                X[_JOB["parts"][p][0]] = part
    for w in workers:
        w.join()
    if not np.array_equal(X, expected.to_numpy(), equal_nan=True):
        raise SystemExit("partitioned features differ from the one-process features")
    return best_wall, best_cpu


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=int, default=4, help="days of the generated large estate (~275k connections/day)")
    ap.add_argument("--scale", type=float, default=1.0, help="benign traffic volume multiplier")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--processes", type=int, nargs="*", default=[2], help="process counts for the by-source mode")
    args = ap.parse_args(argv)
    tune_allocator()  # as the engine's processes do (the forked workers inherit it)

    t = time.perf_counter()
    ds = generate(days=args.days, seed=args.seed, scenario="large", scale=args.scale, attack_days=1)
    conns, dns = ds.connections.reset_index(drop=True), ds.dns_answers.reset_index(drop=True)
    history = conns["ts"].to_numpy() < ds.start + (ds.end - ds.start) / 2
    fitted = pipeline.prepare(conns[history], dns, ds.inventory)
    _JOB.update(conns=conns, dns=dns, inventory=ds.inventory,
                baseline=EntityBaseline().fit(fitted.baseline_input), mgmt=ManagementPlane().fit(ds.inventory))
    print(f"generated {len(conns):,} connections, {len(dns):,} DNS answer rows in {time.perf_counter() - t:.0f} s",
          file=sys.stderr)

    n = len(conns)
    wall, cpu, X = time_one_process(args.repeat)
    rows = [("one process", 1, wall, cpu)]
    for p in args.processes:
        wall, cpu = time.perf_counter(), time.process_time()
        _JOB["parts"] = cut_by_source(p)  # spill-time work, before the workers start
        rows.append((f"cut by source into {p} (spill-time, not feature work)", 1,
                     time.perf_counter() - wall, time.process_time() - cpu))
        rows.append((f"by source, {p} processes", p, *time_by_source(p, args.repeat, X)))

    load = os.getloadavg()
    lines = [
        f"# Feature extraction throughput ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"{n:,} connections, {len(dns):,} DNS answer rows ({args.days} days, large estate, scale {args.scale:g});"
        f" {X.shape[1]} features; {os.cpu_count()} CPUs; load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f};"
        f" Python {platform.python_version()}, pandas {pd.__version__}, numpy {np.__version__};"
        f" peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB.",
        "",
        "| mode | processes | wall s | CPU s | connections/s (wall) |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {name} | {p} | {w:.2f} | {c:.2f} | {'–' if name.startswith('cut') else f'{n / w:,.0f}'} |"
              for name, p, w, c in rows]
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "feature_throughput.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
