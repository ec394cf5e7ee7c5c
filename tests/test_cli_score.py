"""`esxi-anomaly score` on the command line: the entity roll-up next to --out, --stats-json."""
from __future__ import annotations

import csv
import json

import pandas as pd
import pytest

from esxi_anomaly import cli

HOSTILE = "=HYPERLINK(\"http://x\")"


@pytest.fixture(scope="module")
def bundle(small_day, tmp_path_factory):
    from esxi_anomaly.registry import write_model
    from esxi_anomaly.training import TrainConfig

    model, _ = small_day
    return write_model(model, TrainConfig(env="t"), tmp_path_factory.mktemp("models"))


def test_score_writes_rollup_next_to_any_output_and_stats_json(tmp_path, small_day, bundle, capsys):
    _, folder = small_day
    inventory = pd.read_csv(folder / "inventory.csv", dtype="str", keep_default_na=False)
    victim = inventory.loc[inventory["kind"] == "vm", "ip"].iloc[0]
    inventory.loc[inventory["ip"] == victim, "name"] = HOSTILE  # an attacker-chosen VM name
    inventory.to_csv(tmp_path / "inventory.csv", index=False)
    out = tmp_path / "out" / "ranked.parquet"
    stats = tmp_path / "stats.json"
    rc = cli.main(["score", "--model", str(bundle), "--conn", str(folder / "conn.log"),
                   "--dns", str(folder / "dns.log"),
                   "--inventory", str(tmp_path / "inventory.csv"), "--out", str(out), "--top", "10",
                   "--no-progress", "--stats-json", str(stats)])
    assert rc == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["ranked.entities.csv", "ranked.incidents.csv",
                                                             "ranked.parquet"]
    assert len(pd.read_parquet(out)) == 10
    with open(out.parent / "ranked.entities.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    n_sources = pd.read_csv(folder / "conn.log", sep="\t", comment="#", header=None)[2].nunique()
    assert len(rows) == n_sources > 10  # every entity, not only those of the top 10 rows
    assert [float(r["max_score"]) for r in rows] == sorted((float(r["max_score"]) for r in rows), reverse=True)
    names = {r["src_ip"]: r["src_name"] for r in rows}
    assert names[victim] == "'" + HOSTILE  # formula neutralised
    err = capsys.readouterr().err
    assert f"wrote {len(rows)} entities to {out.parent / 'ranked.entities.csv'}" in err
    summary = json.loads(stats.read_text())
    assert summary["entities"] == len(rows) and summary["written"] == 10
    assert summary["connections"] == sum(int(r["connections"]) for r in rows)
    assert summary["engine"] == "local" and summary["format"] == "parquet"
    assert {"read+spill", "score", "score: features", "score: forest+rules", "score: rows",
            "rank+write", "rank+write: entity roll-up"} <= set(summary["stages_s"])
    assert all(v >= 0 for v in summary["stages_s"].values())


def test_score_help_mentions_the_rollup(capsys):
    with pytest.raises(SystemExit):
        cli.main(["score", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "<out stem>.entities.csv" in text and "--stats-json" in text


def test_a_small_score_runs_in_one_process_without_importing_scikit_learn(tmp_path, small_day, bundle):
    """Importing scikit-learn takes longer than scoring a small file: a loaded model scores with the
    flat forest walk, and a small input starts no worker processes (`workers_for`)."""
    import subprocess
    import sys

    _, folder = small_day
    out, stats = tmp_path / "ranked.csv", tmp_path / "stats.json"
    probe = ("import sys; from esxi_anomaly import cli; rc = cli.main(sys.argv[1:]); "
             "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy', 'optuna')); "
             "print(' '.join(heavy) or 'none'); sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", probe, "score", "--model", str(bundle),
                           "--conn", str(folder / "conn.log"), "--dns", str(folder / "dns.log"),
                           "--inventory", str(folder / "inventory.csv"), "--out", str(out), "--no-progress",
                           "--stats-json", str(stats)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "none"
    assert json.loads(stats.read_text())["partitions"] == 1
    assert len(pd.read_csv(out)) > 1000
