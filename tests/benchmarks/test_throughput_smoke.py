"""benchmarks/throughput.py end to end on a tiny estate: it scores what it generated and reports it."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "throughput.py"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("throughput_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.slow
def test_throughput_benchmark_smoke(tmp_path, capsys, monkeypatch):
    bench = _load_benchmark()
    results = tmp_path / "throughput.md"
    data = tmp_path / "data"
    argv = ["--connections", "6000", "--history-scale", "0.05", "--piece-rows", "4000", "--data", str(data),
            "--results", str(results), "--floor-repeat", "1"]
    psutil = pytest.importorskip("psutil", reason="the memory run samples the process tree with psutil")
    # the timed run must not sample memory (PSS makes the kernel walk every page); the second run does
    memory_samples, runs = [], []
    full_info, timed_score = psutil.Process.memory_full_info, bench.score
    monkeypatch.setattr(psutil.Process, "memory_full_info",
                        lambda self: memory_samples.append(self.pid) or full_info(self))

    def watched_score(*args, memory=False):
        before = len(memory_samples)
        result = timed_score(*args, memory=memory)
        runs.append((memory, len(memory_samples) - before))
        return result

    monkeypatch.setattr(bench, "score", watched_score)
    assert bench.main(argv) == 0
    assert [memory for memory, _ in runs] == [False, True]
    assert runs[0][1] == 0 and runs[1][1] > 0
    text = results.read_text()
    assert re.search(r"\| peak memory of the process tree: summed PSS, sampled every 0.2 s in a second run \| "
                     r"[0-9,]+ MB \|", text)
    assert "| wall time of the memory run" in text
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


def test_memory_run_must_reproduce_the_timed_outputs(monkeypatch):
    bench = _load_benchmark()
    pytest.importorskip("psutil", reason="the memory run samples the process tree with psutil")
    timed = {"sha256": {"ranked.csv": "a" * 64}}
    monkeypatch.setattr(bench, "score", lambda *args, memory: {"sha256": {"ranked.csv": "b" * 64}, "memory": memory})
    with pytest.raises(SystemExit, match="not deterministic"):
        bench.memory_run(Path("."), {}, None, timed)
    monkeypatch.setattr(bench, "score", lambda *args, memory: {"sha256": dict(timed["sha256"]), "memory": memory})
    assert bench.memory_run(Path("."), {}, None, timed)["memory"] is True
