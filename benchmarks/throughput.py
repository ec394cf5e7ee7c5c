"""End-to-end throughput of `esxi-anomaly score`: Zeek logs in, ranked CSV out, against pyarrow's floor.

    .venv/bin/python benchmarks/throughput.py [--connections 2000000] [--engine local|dask] [--workers N]
                                              [--scenario default] [--seed 1] [--keep] [--data DIR]

1. Generate (not timed) with `esxi_anomaly.synth`: a history of `--history-days` days at
   `--history-scale` (written as Zeek TSV and fitted with `esxi-anomaly train --trials 0`) and, on
   the days after it, the estate to score: about `--connections` connections, one generated day of
   the scenario per `--piece-rows` connections (benign volume scaled to fit; attacks on every
   day), each day written as its own Zeek conn/dns log, as a Zeek sensor rotates them.
2. Time the floor in this process: the bare `pyarrow.csv.read_csv` of every conn and dns log (all
   columns as text, threads on: `ingest_throughput.pyarrow_floor`), best of `--floor-repeat`.
3. Time `esxi-anomaly score ... --out ranked.csv --stats-json ...` as a subprocess, the command a
   user runs: wall time; CPU time and peak RSS of the score process (its VmHWM, followed in /proc);
   when psutil is installed, the CPU time of its process tree (the local engine's workers, or
   Dask's); and the per-stage seconds `score` reports (sub-stages of `score` are the mean over the
   partitions scored in parallel).
4. Measure memory in a second run of the same command (unless `--no-memory-run`; needs psutil): its
   process tree sampled every 0.2 s, the peak of the summed PSS (each shared page counted once: what
   the tree holds) and of the summed RSS. Not in the timed run: the kernel walks every page of every
   process for PSS, and at 10M connections that sampling took ~7 CPU-s and slowed the run by 4-7 s.
5. Digest (not timed) the outputs: the sha256 of the ranked CSV and of its entity roll-up and
   incidents, so two runs on the same `--data` (same estate and model) from two worktrees, before
   and after a change (the before run first: the model it trains is the one both score with),
   show whether the outputs stayed byte-identical (issue #17). The memory run's outputs must be
   the timed run's, byte for byte, or the benchmark fails.

Prints a Markdown table and writes it to `benchmarks/results/throughput.md` (git-ignored; `--results`). The data
goes to a temporary folder deleted at the end unless `--keep`; `--data DIR` generates into DIR and,
when DIR already holds an estate generated with the same arguments, reuses it (and its model).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

from esxi_anomaly.synth import generate, load_scenario, write_zeek  # noqa: E402
from ingest_throughput import pyarrow_floor  # noqa: E402

DAY = 86400.0
RESULTS = HERE / "results"
# what `score --out ranked.csv` writes (`scoring.output`: the roll-up and incidents beside the output),
# by name, so that a worktree of an older commit is measured by the same script
OUTPUTS = ("ranked.csv", "ranked.entities.csv", "ranked.incidents.csv")


# -- data ---------------------------------------------------------------------------------------

def _move_logs(src: Path, dst: Path, tag: str) -> list[Path]:
    dst.mkdir(parents=True, exist_ok=True)
    moved = []
    for kind in ("conn", "dns"):
        target = dst / f"{kind}.{tag}.log"
        (src / f"{kind}.log").replace(target)
        moved.append(target)
    return moved


def make_estate(data: Path, args) -> dict:
    """Write history/ (one Zeek conn+dns log, inventory) and today/ (one conn+dns log per piece);
    returns the estate's description (also stored as data/estate.json)."""
    spec = {k: getattr(args, k) for k in ("connections", "scenario", "seed", "history_days", "history_scale",
                                           "piece_rows")}
    meta_path = data / "estate.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("spec") == spec and (data / "model.txt").exists():
            print(f"reusing the estate in {data}", file=sys.stderr)
            return meta
    if data.exists():
        shutil.rmtree(data)
    data.mkdir(parents=True)
    t0 = time.perf_counter()
    sc = load_scenario(args.scenario)
    history = generate(days=args.history_days, seed=args.seed, scenario=sc, attack_days=0, scale=args.history_scale)
    write_zeek(history, data / "history")
    per_unit_day = len(history.connections) / args.history_days / args.history_scale  # connections/day at scale 1
    pieces = max(1, math.ceil(args.connections / args.piece_rows))
    scale = args.connections / pieces / per_unit_day
    today = data / "today"
    conns = dns_rows = 0
    for i in range(pieces):
        day = dataclasses.replace(sc, start=sc.start + (args.history_days + i) * DAY)
        ds = generate(days=1, seed=args.seed + 1 + i, scenario=day, attack_days=1, scale=scale)
        conns += len(ds.connections)
        dns_rows += int(ds.dns_answers["event_id"].nunique())
        staging = data / f"piece-{i}"
        write_zeek(ds, staging)
        _move_logs(staging, today, f"{i:03d}")
        if i == 0:
            (staging / "inventory.csv").replace(today / "inventory.csv")
        shutil.rmtree(staging)
        del ds
    meta = {"spec": spec, "history_connections": len(history.connections), "connections": conns,
            "dns_responses": dns_rows, "pieces": pieces, "scale": scale,
            "conn_logs": sorted(str(p) for p in today.glob("conn.*.log")),
            "dns_logs": sorted(str(p) for p in today.glob("dns.*.log")),
            "bytes": sum(p.stat().st_size for p in today.glob("*.log")), "generate_s": time.perf_counter() - t0}
    del history
    model = train(data, args)
    (data / "model.txt").write_text(str(model))
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta


def _cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "esxi_anomaly.cli", *argv]


def _env() -> dict:
    path = [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def train(data: Path, args) -> Path:
    h = data / "history"
    t0 = time.perf_counter()
    done = subprocess.run(_cli("train", "--env", "bench", "--conn", str(h / "conn.log"), "--dns", str(h / "dns.log"),
                               "--inventory", str(h / "inventory.csv"), "--models-dir", str(data / "models"),
                               "--trials", "0", "--seed", str(args.seed)),
                          env=_env(), check=True, capture_output=True, text=True)
    print(f"trained in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return Path(done.stdout.strip().splitlines()[-1])


# -- measurement ----------------------------------------------------------------------------------

def floor(meta: dict, repeat: int) -> dict:
    """Best-of-`repeat` wall of the bare pyarrow parse of every conn and dns log, summed per kind."""
    out = {}
    for kind in ("conn", "dns"):
        rows = wall = cpu = 0.0
        for path in meta[f"{kind}_logs"]:
            n, w, c = pyarrow_floor(path, repeat)
            rows, wall, cpu = rows + n, wall + w, cpu + c
        out[kind] = {"rows": int(rows), "wall_s": wall, "cpu_s": cpu}
    return out


def _high_water(pid: int, stop: threading.Event, peak: list) -> None:
    """Follow the kernel's resident high-water mark (VmHWM) of `pid` until it exits.

    `ru_maxrss` from wait4 is not used for the peak: the child is forked from this process, which
    holds the generated estate, and the forked copy's resident size counts in the child's maxrss
    before it execs `esxi-anomaly`. VmHWM is reset at exec and only grows, so its last reading is the
    peak up to the final poll (every 50 ms)."""
    status = Path(f"/proc/{pid}/status")
    while not stop.is_set():
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak[0] = max(peak[0], int(line.split()[1]) * 1024)
        except (OSError, ValueError):
            return
        stop.wait(0.05)


def _tree_usage(pid: int, stop: threading.Event, usage: dict, memory: bool) -> None:
    """Sample `pid` and its descendants (the local engine's worker processes) every 0.2 s (psutil):
    each process's last CPU time and, with `memory`, the peak of their summed RSS, the peak of their
    summed PSS (shared pages divided among the processes sharing them: what the tree really holds),
    when it came (seconds after `usage["t0"]`) and the score process's own share. Without `memory`
    the sampling costs next to nothing (/proc/<pid>/stat); with it, the kernel walks every page of
    every process each time."""
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    while not stop.is_set():
        rss = pss = own_pss = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    times = p.cpu_times()
                    if p.pid != pid:
                        usage["cpu"][p.pid] = times.user + times.system
                    if not memory:
                        continue
                    info = p.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                rss, pss = rss + info.rss, pss + getattr(info, "pss", info.rss)
                if p.pid == pid:
                    own_pss = getattr(info, "pss", info.rss)
        except psutil.NoSuchProcess:
            return
        usage["rss"] = max(usage["rss"], rss)
        if pss > usage["pss"]:
            usage.update(pss=pss, pss_at_s=time.perf_counter() - usage["t0"], pss_own=own_pss)
        stop.wait(0.2)


def sha256(path: Path) -> str | None:
    """The file's sha256 in hex (None when it is absent)."""
    if not path.exists():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def score(data: Path, meta: dict, args, memory: bool = False) -> dict:
    """Run `score` once on the estate into `data/out`: wall, CPU, the score process's VmHWM, the
    outputs' sha256 and what `score` reports; with `memory`, also the process tree's sampled memory
    (then the run is slower: `_tree_usage`)."""
    out = data / "out"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    stats = out / "stats.json"
    model = (data / "model.txt").read_text().strip()
    cmd = _cli("score", "--model", model, "--conn", *meta["conn_logs"], "--dns", *meta["dns_logs"],
               "--inventory", str(data / "today" / "inventory.csv"), "--out", str(out / "ranked.csv"),
               "--engine", args.engine, "--no-progress", "--stats-json", str(stats),
               *(["--workers", str(args.workers)] if args.workers else []))
    print(("$ (memory run) " if memory else "$ ") + " ".join(cmd), file=sys.stderr)
    log = open(out / "score.log", "w")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_before = before.ru_utime + before.ru_stime  # train and other earlier children
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    tree, stop, sampler = {"rss": 0, "pss": 0, "cpu": {}, "t0": t0}, threading.Event(), None
    hwm = [0]
    watcher = threading.Thread(target=_high_water, args=(proc.pid, stop, hwm), daemon=True)
    watcher.start()
    try:
        import psutil  # noqa: F401  (only if already installed)

        sampler = threading.Thread(target=_tree_usage, args=(proc.pid, stop, tree, memory), daemon=True)
        sampler.start()
    except ImportError:
        pass
    proc.wait()
    wall = time.perf_counter() - t0
    stop.set()
    watcher.join()
    if sampler is not None:
        sampler.join()
    log.close()
    if proc.returncode != 0:
        sys.exit(f"score failed with exit code {proc.returncode}; see {out / 'score.log'}\n"
                 + (out / "score.log").read_text()[-3000:])
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime - cpu_before
    result = {"wall_s": wall, "cpu_s": cpu, "max_rss_mb": hwm[0] / 2**20,
              "worker_cpu_s": sum(tree["cpu"].values()) if sampler is not None else None,
              "stats": json.loads(stats.read_text()), "csv_mb": (out / "ranked.csv").stat().st_size / 2**20,
              "sha256": {name: sha256(out / name) for name in OUTPUTS}}
    if memory and sampler is not None:
        result.update(tree_rss_mb=tree["rss"] / 2**20, tree_pss_mb=tree["pss"] / 2**20,
                      tree_pss_at_s=tree.get("pss_at_s"), tree_pss_own_mb=tree.get("pss_own", 0) / 2**20)
    return result


def memory_run(data: Path, meta: dict, args, timed: dict) -> dict | None:
    """The second run, whose process tree is sampled for memory (None without psutil): its outputs
    must be the timed run's, byte for byte."""
    try:
        import psutil  # noqa: F401
    except ImportError:
        print("no psutil: the process tree's memory is not measured (pip install psutil)", file=sys.stderr)
        return None
    mem = score(data, meta, args, memory=True)
    if mem["sha256"] != timed["sha256"]:
        sys.exit("the memory run's outputs differ from the timed run's (score is not deterministic): "
                 f"{timed['sha256']} against {mem['sha256']}")
    return mem


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def report(meta: dict, fl: dict, sc: dict, mem: dict | None, args, load_before: str, load_after: str) -> str:
    n = sc["stats"]["connections"]
    floor_s = fl["conn"]["wall_s"] + fl["dns"]["wall_s"]
    lines = [
        f"# esxi-anomaly score throughput ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
        f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"load average (1/5/15 min) before {load_before}, after {load_after}.", "",
        f"Estate: scenario `{args.scenario}`, seed {args.seed}, {meta['pieces']} generated day(s) at volume "
        f"x{meta['scale']:.2f}: {meta['connections']:,} connections, {meta['dns_responses']:,} DNS responses, "
        f"{meta['bytes'] / 2**20:,.0f} MB of Zeek TSV; model trained on {meta['history_connections']:,} connections "
        f"({args.history_days} days at x{args.history_scale:g}, `train --trials 0`).", "",
        f"Command: `esxi-anomaly score --engine {args.engine}{f' --workers {args.workers}' if args.workers else ''} --conn <{len(meta['conn_logs'])} conn logs> "
        f"--dns <{len(meta['dns_logs'])} dns logs> --inventory ... --out ranked.csv` "
        f"({sc['stats']['written']:,} rows, {sc['csv_mb']:,.0f} MB CSV, {sc['stats'].get('entities', 0):,} entities "
        f"in the roll-up; {sc['stats'].get('partitions', 0)} partitions of the sources scored in parallel).", "",
        "| measure | value |", "|---|---:|",
        f"| connections scored | {n:,} |",
        f"| wall time, end to end | {sc['wall_s']:.1f} s |",
        f"| connections / min | {n / sc['wall_s'] * 60:,.0f} |",
        f"| rows / s | {n / sc['wall_s']:,.0f} |",
        f"| CPU time of the score process (all threads) | {sc['cpu_s']:.1f} s |",
        f"| peak RSS (VmHWM of the score process) | {sc['max_rss_mb']:,.0f} MB |",
    ]
    if sc["worker_cpu_s"] is not None:
        lines.append(f"| CPU time of its worker processes (sampled) | {sc['worker_cpu_s']:.1f} s |")
    if mem is not None:
        lines += [
            f"| peak memory of the process tree: summed PSS, sampled every 0.2 s in a second run | "
            f"{mem['tree_pss_mb']:,.0f} MB |",
            f"| &nbsp;&nbsp;when: seconds after start; the score process's own part | "
            f"{mem['tree_pss_at_s'] or 0:.0f} s; {mem['tree_pss_own_mb']:,.0f} MB |",
            f"| peak summed RSS of the process tree, sampled (shared pages counted per process) | "
            f"{mem['tree_rss_mb']:,.0f} MB |",
            f"| wall time of the memory run (slowed by its sampling; outputs identical) | {mem['wall_s']:.1f} s |",
        ]
    lines += [f"| sha256 of {name} (first 16 hex digits) | {f'`{digest[:16]}`' if digest else 'absent'} |"
              for name, digest in sc["sha256"].items()]
    lines += [
        f"| floor: pyarrow read_csv conn + dns | {floor_s:.2f} s ({fl['conn']['wall_s']:.2f} + "
        f"{fl['dns']['wall_s']:.2f}) |",
        f"| floor ratio (end to end / floor) | {sc['wall_s'] / floor_s:.1f}x |",
        "", "Stages as `score` reports them (`--stats-json`; indented rows are parts of the row above them):", "",
        "| stage | s | share of wall |", "|---|---:|---:|",
    ]
    stages = sc["stats"]["stages_s"]
    for stage in [k for k in stages if ": " not in k]:
        lines.append(f"| {stage} | {stages[stage]:.2f} | {100 * stages[stage] / sc['wall_s']:.0f}% |")
        for part in [k for k in stages if k.startswith(stage + ": ")]:
            lines.append(f"| &nbsp;&nbsp;{part.split(': ', 1)[1]} | {stages[part]:.2f} | "
                         f"{100 * stages[part] / sc['wall_s']:.0f}% |")
    other = sc["wall_s"] - sum(v for k, v in sc["stats"]["stages_s"].items() if ": " not in k
                               and k != "score (sum of tasks)")
    lines.append(f"| start-up, model load, inventory, summary | {other:.2f} | {100 * other / sc['wall_s']:.0f}% |")
    lines += ["", "Outputs' sha256 (`sha256sum` lines: the same in two runs on the same `--data` = byte-identical "
              "outputs):", "", "```"]
    lines += [f"{digest or 'absent'}  {name}" for name, digest in sc["sha256"].items()]
    lines.append("```")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, default=2_000_000, help="connections to score (default 2M)")
    p.add_argument("--engine", choices=["local", "dask"], default="local", help="passed to `score --engine`")
    p.add_argument("--workers", type=int, help="passed to `score --workers` (default: score's, the usable cores)")
    p.add_argument("--scenario", default="default")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--history-days", type=int, default=2)
    p.add_argument("--history-scale", type=float, default=1.0)
    p.add_argument("--piece-rows", type=int, default=2_500_000, help="connections per generated day / log file")
    p.add_argument("--floor-repeat", type=int, default=2)
    p.add_argument("--no-memory-run", action="store_true",
                   help="skip the second run that samples the process tree's memory (no PSS figures)")
    p.add_argument("--data", type=Path, help="generate into (or reuse) this folder instead of a temporary one")
    p.add_argument("--keep", action="store_true", help="keep the data folder (with the model and outputs)")
    p.add_argument("--results", type=Path, default=RESULTS / "throughput.md", help="where the Markdown goes")
    args = p.parse_args(argv)
    data = args.data.resolve() if args.data else Path(tempfile.mkdtemp(prefix="esxi-throughput-"))
    try:
        meta = make_estate(data, args)
        print(f"estate: {meta['connections']:,} connections in {len(meta['conn_logs'])} conn log(s), "
              f"{meta['bytes'] / 2**20:,.0f} MB", file=sys.stderr)
        load_before = _load()
        fl = floor(meta, args.floor_repeat)
        sc = score(data, meta, args)
        load_after = _load()
        mem = None if args.no_memory_run else memory_run(data, meta, args, sc)
        text = report(meta, fl, sc, mem, args, load_before, load_after)
        print(text)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(text)
        print(f"written to {args.results}", file=sys.stderr)
    finally:
        if args.keep or args.data:
            print(f"data kept in {data}", file=sys.stderr)
        else:
            shutil.rmtree(data, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
