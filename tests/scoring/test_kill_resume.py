"""The Done-when of issue #13: `score` killed with SIGKILL (the whole process tree) at random points and
resumed, also with other --workers, ends with the same bytes as an uninterrupted run (ranked output,
roll-up, quarantine file) and leaves nothing behind; a second run to the same output meanwhile is
refused (exit 5) without harming the first."""
from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from esxi_anomaly.console import EXIT_BUSY, EXIT_QUARANTINE

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals")]

CLI = Path(sys.executable).with_name("esxi-anomaly")
DAYS = 6   # ~1.06M connections


@pytest.fixture(scope="module")
def million(tmp_path_factory):
    """One generated day repeated DAYS times (shifted by a day, new uids): ~1M connections, and three
    bad lines in conn.log for the quarantine."""
    from esxi_anomaly.synth import generate, write_zeek

    ds = generate(days=1, seed=11, scenario="default", attack_days=1)

    def repeat(frame):
        copies = []
        for k in range(DAYS):
            copy = frame.copy()
            copy["ts"] = copy["ts"] + k * 86400
            copy["event_id"] = copy["event_id"].astype(str) + f"x{k}"
            copies.append(copy)
        return pd.concat(copies, ignore_index=True)

    big = dataclasses.replace(ds, connections=repeat(ds.connections), dns_answers=repeat(ds.dns_answers))
    folder = tmp_path_factory.mktemp("million")
    write_zeek(big, folder)
    conn = folder / "conn.log"
    lines = conn.read_text().splitlines(keepends=True)
    for at in (20, 400_000, 900_000):
        lines.insert(at, "not\ta\tconnection\n")
    conn.write_text("".join(lines))
    assert len(big.connections) > 1_000_000
    return folder


@pytest.fixture(scope="module")
def bundle(small_day, tmp_path_factory):
    from esxi_anomaly.registry import write_model
    from esxi_anomaly.training import TrainConfig

    return write_model(small_day[0], TrainConfig(env="t"), tmp_path_factory.mktemp("models"))


def start(bundle, folder, out, *extra) -> subprocess.Popen:
    command = [str(CLI)] if CLI.exists() else [sys.executable, "-m", "esxi_anomaly.cli"]
    return subprocess.Popen(command + ["score", "--model", str(bundle), "--conn", str(folder / "conn.log"),
                                       "--dns", str(folder / "dns.log"), "--out", str(out), "--no-progress",
                                       "--strict", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def kill_tree_after(process: subprocess.Popen, seconds: float) -> bool:
    """SIGKILL the process group after `seconds` (True), unless the run ended first (False)."""
    try:
        process.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return True


def test_killed_runs_resume_to_the_same_bytes_and_leave_nothing(tmp_path, million, bundle):
    base = tmp_path / "base" / "ranked.csv"
    t0 = time.monotonic()
    first = start(bundle, million, base, "--workers", "2")
    _, err = first.communicate(timeout=300)
    took = time.monotonic() - t0
    assert first.returncode == EXIT_QUARANTINE, err   # --strict: 3 bad lines
    assert "3 records quarantined" in err
    expected = {name: (base.parent / name).read_bytes()
                for name in ("ranked.csv", "ranked.entities.csv", "ranked.incidents.csv", "ranked.csv.quarantine.jsonl")}

    rng = random.Random(13)
    out = tmp_path / "run" / "ranked.csv"
    # 1: killed while a second run to the same output is refused at once
    run = start(bundle, million, out, "--workers", "2")
    lock = out.with_name("ranked.csv.lock")
    deadline = time.monotonic() + 60
    while not lock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    second = start(bundle, million, out, "--workers", "1")
    _, second_err = second.communicate(timeout=60)
    assert second.returncode == EXIT_BUSY, second_err
    assert f"is being written by another run (pid {run.pid} on " in second_err
    killed = [kill_tree_after(run, rng.uniform(0.25, 0.6) * took)]
    # 2, 3: resumed with other workers, killed again; 4: resumed to the end
    for workers, chunk in (("1", "500000"), ("2", "150000"), ("3", "500000")):
        stale = lock.exists()   # left by a run killed with the lock held
        run = start(bundle, million, out, "--workers", workers, "--chunk-rows", chunk, "--resume")
        if workers != "3":
            killed.append(kill_tree_after(run, rng.uniform(0.15, 0.35) * took))
    _, err = run.communicate(timeout=300)
    assert run.returncode == EXIT_QUARANTINE, err
    assert killed[0]   # (a resume may end before its kill time: the next one then starts afresh)
    assert ("taking over the stale lock" in err) == stale
    got = {p.name: p.read_bytes() for p in out.parent.iterdir()}
    assert sorted(got) == sorted(expected)   # no .work, no .tmp, no .lock
    for name in expected:
        assert got[name] == expected[name], name
