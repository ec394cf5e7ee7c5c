"""Detection quality against the forest's size: the same estates scored with models that differ only in
`n_estimators` (the evidence behind the 100-tree default).

    .venv/bin/python benchmarks/forest_size_quality.py                       # seeds 11 1 2, 200 vs 100 trees (~4 min)
    .venv/bin/python benchmarks/forest_size_quality.py --trees 300 100 50 --seeds 11

Per seed, a "default" estate at full volume and a "large" one at half volume: 3 days of history and a 4th
with attacks, fitted on the history and scored on the 4th day (as `generated_estate_quality.py` does).
Prints AP over all connections and the worst family's recall in the top 1%.
"""
from __future__ import annotations

import argparse
import sys

from esxi_anomaly.evaluate import evaluate
from esxi_anomaly.model import DnsCalcDetector
from esxi_anomaly.schema import Frames
from esxi_anomaly.synth import generate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[11, 1, 2])
    ap.add_argument("--trees", type=int, nargs="+", default=[200, 100])
    args = ap.parse_args(argv)
    print("| seed | scenario | trees | AP | worst family: recall in the top 1% |\n|---:|---|---:|---:|---|")
    for seed in args.seeds:
        for scenario, scale in (("default", 1.0), ("large", 0.5)):
            ds = generate(days=4, seed=seed, scenario=scenario, attack_days=1, scale=scale)
            c, d = ds.connections, ds.dns_answers
            history = Frames(c[c["ts"] < ds.train_end], d[d["ts"] < ds.train_end], ds.inventory)
            today = Frames(c[c["ts"] >= ds.train_end], d[d["ts"] >= ds.train_end - 3600], ds.inventory)
            for trees in args.trees:
                model = DnsCalcDetector(random_state=seed, n_estimators=trees).fit(history)
                m = evaluate(model.score(today), ds.labels)
                recall, family = min((v["recall_top_0.01"], k) for k, v in m["families"].items())
                print(f"| {seed} | {scenario} | {trees} | {m['average_precision']:.4f} | {recall:.3f} ({family}) |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
