"""benchmarks/throughput.py end to end on a tiny estate: it scores what it generated and reports it."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "throughput.py"


@pytest.mark.slow
def test_throughput_benchmark_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("throughput_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = tmp_path / "throughput.md"
    data = tmp_path / "data"
    argv = ["--connections", "6000", "--history-scale", "0.05", "--piece-rows", "4000", "--data", str(data),
            "--results", str(results), "--floor-repeat", "1"]
    assert bench.main(argv) == 0
    text = results.read_text()
    assert text == capsys.readouterr().out.rstrip("\n") + "\n"
    conn_logs = sorted((data / "today").glob("conn.*.log"))
    assert len(conn_logs) == 2                                  # 6000 connections in pieces of at most 4000
    generated = sum(sum(1 for line in p.open() if not line.startswith("#")) for p in conn_logs)
    assert f"| connections scored | {generated:,} |" in text
    ranked = data / "out" / "ranked.csv"
    assert sum(1 for _ in ranked.open(newline="")) >= generated + 1   # header + one row per connection
    assert (data / "out" / "ranked.entities.csv").exists()
    floor = re.search(r"\| floor ratio \(end to end / floor\) \| ([0-9.]+)x \|", text)
    assert floor and float(floor.group(1)) > 1
    for stage in ("read+spill", "features", "forest+rules", "gather+explain+write csv"):
        assert f"| {stage} |" in text or f"&nbsp;&nbsp;{stage} |" in text
    # a second run with the same arguments reuses the estate and its model
    assert bench.main(argv) == 0
    assert "reusing the estate" in capsys.readouterr().err
