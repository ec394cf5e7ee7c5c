"""Isolation-forest scoring throughput: sklearn `score_samples` vs `ForestScorer` and `HeapTrees`
(detect/forest.py).

Scores --rows rows x 33 features with a 200-tree, 256-sample IsolationForest: sklearn single-threaded,
sklearn with joblib's threading backend (n_jobs=2, as its docs suggest), `ForestScorer` (scikit-learn's
compiled walk, what `CalibratedForest.raw_score` uses without the package's own) and `HeapTrees` (the
package's compiled heap walk, when it was built at install), each with 1 and 2 threads. The scorers take turns, --repeat
rounds; prints a markdown table per scorer: best wall time and rows/s from it, best CPU time
(process, all threads) and rows per CPU-second, speed-ups over sklearn single-threaded, and the
largest absolute difference from sklearn's single-threaded scores. Writes nothing.

    PYTHONPATH=. .venv/bin/python benchmarks/forest_scoring.py [--rows 1000000] [--repeat 3] \\
        [--data normal mixed estate]

Data sets (the forest is fitted on 100k rows of the same kind, except `estate`):
  normal  33 i.i.d. standard-normal features: no structure, every branch a coin flip;
  mixed   i.i.d. connection-like columns: 11 binary flags, 11 Poisson counts, 11 log-normal sizes;
  estate  the real features of a generated 2-day estate (`synth.generate(days=2, seed=7)`,
          ~350k connections, repeated to --rows) scored by the forest `DnsCalcDetector` fits on
          it (its own trees and features, not the 200 x 33 above). Building it takes ~1 minute.
Wall time depends on what else runs on the machine: the load average is printed before and after.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from joblib import parallel_backend
from sklearn.ensemble import IsolationForest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from esxi_anomaly.detect.forest import FlatTrees, ForestScorer, HeapTrees, heap_walk_routine  # noqa: E402

N_FEATURES = 33


def synthetic(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "normal":
        return rng.standard_normal((n, N_FEATURES))
    third = N_FEATURES // 3
    return np.hstack([rng.random((n, third)) < 0.1, rng.poisson(1.0, (n, third)),
                      rng.lognormal(0.0, 2.0, (n, N_FEATURES - 2 * third))]).astype(np.float64)


def estate(rows: int) -> tuple[IsolationForest, np.ndarray]:
    from esxi_anomaly.model import DnsCalcDetector
    from esxi_anomaly.schema import Frames
    from esxi_anomaly.synth.dataset import generate

    ds = generate(days=2, seed=7)
    frames = Frames(ds.connections, ds.dns_answers, ds.inventory)
    model = DnsCalcDetector().fit(frames)
    feats = model.features(frames)[1]
    X = feats[list(model.detector_.feature_names_in_)].to_numpy(dtype="float64")
    return model.detector_.forest_.forest_, np.resize(X, (rows, X.shape[1]))


def sklearn_threads(forest, X, n_jobs):
    with parallel_backend("threading", n_jobs=n_jobs):
        return forest.score_samples(X)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--data", nargs="+", default=["normal", "mixed", "estate"],
                    choices=["normal", "mixed", "estate"])
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"rows={args.rows:,} features={N_FEATURES} n_estimators=200 max_samples=256 "
          f"cpus={os.cpu_count()} repeat={args.repeat} (best of the repeats)")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print()
    print("| data | scorer | threads | wall s | rows/s | cpu s | rows/cpu-s | speed-up wall | speed-up cpu "
          "| max abs diff |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind in args.data:
        if kind == "estate":
            forest, X = estate(args.rows)
        else:
            forest = IsolationForest(n_estimators=200, max_samples=256, random_state=0).fit(
                synthetic(kind, 100_000, rng))
            X = synthetic(kind, args.rows, rng)
        if kind != "estate":   # the estate's forest is the model's own: its trees, its features
            assert X.shape[1] == N_FEATURES and len(forest.estimators_) == 200
        scorer = ForestScorer(forest)
        runs = [
            ("sklearn", 1, lambda: forest.score_samples(X)),
            ("sklearn threading", 2, lambda: sklearn_threads(forest, X, 2)),
            ("ForestScorer", 1, lambda: scorer.score_samples(X, n_threads=1)),
            ("ForestScorer", 2, lambda: scorer.score_samples(X, n_threads=2)),
        ]
        if heap_walk_routine() is not None:
            heap = HeapTrees(FlatTrees(scorer))
            runs += [("HeapTrees", 1, lambda: -heap.raw_score(X, n_threads=1)),
                     ("HeapTrees", 2, lambda: -heap.raw_score(X, n_threads=2))]
        # Round-robin repeats, so a burst of load from other jobs hits every scorer alike.
        best: dict[int, list] = {}
        for _ in range(args.repeat):
            for i, (_, _, fn) in enumerate(runs):
                wall, cpu = time.perf_counter(), time.process_time()
                scores = fn()
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                old = best.setdefault(i, [np.inf, np.inf, scores])
                old[0], old[1] = min(old[0], wall), min(old[1], cpu)
        reference, base_wall, base_cpu = best[0][2], best[0][0], best[0][1]
        for i, (name, threads, _) in enumerate(runs):
            wall, cpu, scores = best[i]
            diff = float(np.max(np.abs(scores - reference)))
            print(f"| {kind} | {name} | {threads} | {wall:.2f} | {args.rows / wall:,.0f} | {cpu:.2f} "
                  f"| {args.rows / cpu:,.0f} | {base_wall / wall:.2f}x | {base_cpu / cpu:.2f}x | {diff:.1e} |",
                  flush=True)
    print()
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
