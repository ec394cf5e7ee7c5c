"""Detection quality on the generated estate, as the end-to-end test checks it, with every number.

Default scenario, 3 days of history and a 4th day with attacks; fit on the history, score the 4th day,
evaluate against the generator's labels. Usage: `.venv/bin/python benchmarks/generated_estate_quality.py [SEED]`
(the test and the README use seed 11).
"""
from __future__ import annotations

import json
import sys
import time

from esxi_anomaly.evaluate import evaluate
from esxi_anomaly.model import DnsCalcDetector
from esxi_anomaly.schema import Frames
from esxi_anomaly.synth import generate


def main(seed: int) -> None:
    ds = generate(days=4, seed=seed, scenario="default", attack_days=1)
    c, d = ds.connections, ds.dns_answers
    history = Frames(c[c["ts"] < ds.train_end], d[d["ts"] < ds.train_end], ds.inventory)
    today = Frames(c[c["ts"] >= ds.train_end], d[d["ts"] >= ds.train_end - 3600], ds.inventory)
    t0 = time.perf_counter()
    model = DnsCalcDetector(random_state=seed).fit(history)
    t1 = time.perf_counter()
    ranked = model.score(today)
    t2 = time.perf_counter()
    print(json.dumps(evaluate(ranked, ds.labels), indent=1))
    print(f"fit {t1 - t0:.1f} s on {len(history.connections):,} connections; "
          f"score {t2 - t1:.1f} s on {len(today.connections):,}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 11)
