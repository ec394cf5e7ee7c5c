"""`esxi-anomaly demo`: generate an estate, train on its history, score its last day, report.

It goes through the same files and Python API a user's own job would (the commands call the same
functions): Zeek logs on disk, read back by the ingest layer, a bundle written and verified, ranked
CSV and HTML written.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pandas as pd

from esxi_anomaly import registry, scoring, training
from esxi_anomaly.console import log, printable
from esxi_anomaly.evaluate import evaluate, read_labels
from esxi_anomaly.ingest import read_connections, read_dns, read_inventory
from esxi_anomaly.report import write_outputs
from esxi_anomaly.schema import Frames
from esxi_anomaly.scoring import make_output_folder
from esxi_anomaly.scoring.workers import default_workers
from esxi_anomaly.training import TrainConfig


def _slice(ds, lo: float, hi: float):
    c, d = ds.connections, ds.dns_answers
    keep = c[(c["ts"] >= lo) & (c["ts"] < hi)]
    return dataclasses.replace(
        ds, connections=keep, dns_answers=d[(d["ts"] >= lo - 3600) & (d["ts"] < hi)],
        labels=ds.labels[ds.labels["event_id"].isin(keep["event_id"])],
    )


def run(out: Path, seed: int = 7, days: int = 4) -> int:
    from esxi_anomaly.synth import generate, write_zeek

    t0 = time.perf_counter()
    make_output_folder(out)
    ds = generate(days=days, seed=seed, scenario="default", attack_days=1)
    history, today = out / "history", out / "today"
    write_zeek(_slice(ds, ds.start, ds.train_end), history)
    write_zeek(_slice(ds, ds.train_end, ds.end + 1), today)
    log(f"generated {len(ds.connections):,} connections over {days} days "
        f"({len(ds.inventory)} inventory entries) in {time.perf_counter() - t0:.0f} s")
    models = out / "models"
    frames = Frames(read_connections(history / "conn.log"), read_dns(history / "dns.log"),
                    read_inventory(history / "inventory.csv"))
    config = TrainConfig().replace(env="demo", seed=seed, feedback_path=str(registry.feedback_path(models, "demo")))
    trained = training.train_environment(frames, config)
    bundle = registry.write_model(trained.model, trained.config, models, trained.metrics, trained.tuning)
    log(f"bundle written: {bundle}")
    model, _ = registry.load_model(bundle)   # verified, then loaded, as a scoring job does
    ranked_csv, report_html = out / "ranked.csv", out / "report.html"
    result = scoring.score(model, [today / "conn.log"], [today / "dns.log"], ranked_csv,
                           inventory=read_inventory(today / "inventory.csv"),
                           suppressions=registry.bundle_feedback(bundle).suppressions(),
                           progress=False, workers=default_workers())
    log(f"scored {result.connections:,} connections: {result.alerts:,} alerts; wrote {ranked_csv}")
    ranked = pd.read_csv(ranked_csv, dtype="str", keep_default_na=False, low_memory=False)
    for col in ("rank", "score", "ts", "src_port", "dst_port", "dns_delay", "forest_score", "rule_score"):
        ranked[col] = pd.to_numeric(ranked[col], errors="coerce")
    # the analyst's report for the same run: the top 2000 rows with timelines from today's logs
    write_outputs(ranked.head(2000), report_html, "html", connections=read_connections(today / "conn.log"),
                  dns_answers=read_dns(today / "dns.log"),
                  summary={"env": "demo", "model": str(models), "connections": len(ranked)})
    print("\nTop 10 anomalies (higher score = more anomalous):")
    for row in ranked.head(10).itertuples():   # names and explanations come from the logs: escaped
        print(printable(f"{row.rank:>3}  {row.score:.3f}  {row.src_name} -> {row.dst_ip}:{row.dst_port}/{row.proto}"))
        print(printable(f"       {row.explanation}"))
    metrics = evaluate(ranked, read_labels(str(today / "labels.csv")))
    print("\nAgainst the generator's labels: " + json.dumps(
        {k: v for k, v in metrics.items() if k in ("attacks", "average_precision", "precision_at_10", "entity_recall")}))
    print(printable(f"\nRanked CSV: {ranked_csv}\nHTML report: {report_html}\nDone in {time.perf_counter() - t0:.0f} s"))
    return 0
