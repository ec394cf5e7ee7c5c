"""`esxi-anomaly score` as a process tree: a failed start ends the process and its workers at once, and
SIGTERM/SIGINT/SIGKILL to the parent take the whole tree with it (issue #13 item 1).

Every process the command starts (forkserver, resource tracker, workers) inherits its environment, so
a unique variable marks the tree: after the run, no process may carry it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from esxi_anomaly.console import EXIT_INPUT

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

TAG = "ESXI_ANOMALY_TEST_TREE"
CLI = Path(sys.executable).with_name("esxi-anomaly")


def tree(tag: str) -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, name, command line) of every live process whose environment holds TAG=tag."""
    needle = f"{TAG}={tag}".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if needle not in fh.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rpartition(")")[2].split()[1])
            with open(f"/proc/{entry}/comm") as fh:
                name = fh.read().strip()
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                command = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):   # gone meanwhile, or not ours
            continue
        found[int(entry)] = (ppid, name, command)
    return found


def workers_of(tag: str) -> dict[int, str]:
    """pid -> name of the worker processes: the children of the tree's forkserver."""
    procs = tree(tag)
    servers = {pid for pid, (_, _, command) in procs.items() if "multiprocessing.forkserver" in command}
    return {pid: name for pid, (ppid, name, _) in procs.items() if ppid in servers}


def wait_for(condition, seconds: float):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    return condition()


def start(args: list[str], tag: str) -> subprocess.Popen:
    command = [str(CLI)] if CLI.exists() else [sys.executable, "-m", "esxi_anomaly.cli"]
    return subprocess.Popen(command + args, env={**os.environ, TAG: tag}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)


def kill_tree(tag: str) -> None:
    for pid in tree(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def tag():
    value = uuid.uuid4().hex
    yield value
    kill_tree(value)   # a failing test leaves nothing running


@pytest.fixture(scope="module")
def bundle(small_day, tmp_path_factory):
    from esxi_anomaly.registry import write_model
    from esxi_anomaly.training import TrainConfig

    return write_model(small_day[0], TrainConfig(env="t"), tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def big_day(tmp_path_factory):
    """~175,000 connections: scoring them takes long enough to be interrupted."""
    from esxi_anomaly.synth import generate, write_zeek

    folder = tmp_path_factory.mktemp("big")
    write_zeek(generate(days=1, seed=11, scenario="default", attack_days=1), folder)
    return folder


def score_args(bundle, conn, dns, out) -> list[str]:
    return ["score", "--model", str(bundle), "--conn", str(conn), "--dns", str(dns), "--out", str(out),
            "--workers", "2", "--no-progress"]


@pytest.mark.parametrize("variant", ["missing conn", "conn glob matches nothing", "dns glob matches nothing",
                                     "dns log given as conn"])
def test_a_failed_start_exits_at_once_and_leaves_no_process(variant, small_day, bundle, tmp_path, tag):
    _, folder = small_day
    conn, dns = {
        "missing conn": (tmp_path / "nonexistent" / "conn.log", folder / "dns.log"),
        "conn glob matches nothing": (tmp_path / "nothing*.log", folder / "dns.log"),
        "dns glob matches nothing": (folder / "conn.log", tmp_path / "nothing*.log"),
        "dns log given as conn": (folder / "dns.log", folder / "dns.log"),
    }[variant]
    proc = start(score_args(bundle, conn, dns, tmp_path / "ranked.csv"), tag)
    try:
        _, err = proc.communicate(timeout=20)   # before the fix: no exit at all
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{variant}: score did not exit within 20 s")
    assert proc.returncode == EXIT_INPUT, err.decode()
    lines = [line for line in err.decode().splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("esxi-anomaly score: error: ")
    assert "Traceback" not in err.decode()
    assert wait_for(lambda: not tree(tag), 5), f"left running: {tree(tag)}"


def _interrupt(bundle, big_day, tmp_path, tag, send) -> tuple[int, str, float]:
    proc = start(score_args(bundle, big_day / "conn.log", big_day / "dns.log", tmp_path / "ranked.csv"), tag)
    assert wait_for(lambda: len(workers_of(tag)) == 2, 60), f"workers never appeared: {tree(tag)}"
    assert proc.poll() is None
    t0 = time.monotonic()
    send(proc)
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("score did not end within 20 s of the signal")
    seconds = time.monotonic() - t0
    assert wait_for(lambda: not tree(tag), 5), f"left running: {tree(tag)}"
    return proc.returncode, err.decode(), seconds


def test_sigterm_stops_the_workers_then_exits_143(bundle, big_day, tmp_path, tag):
    names = []

    def send(proc):   # a worker names itself first thing after its fork
        wait_for(lambda: all(name.startswith("esxi-worker-") for name in workers_of(tag).values()), 10)
        names.extend(sorted(workers_of(tag).values()))
        proc.send_signal(signal.SIGTERM)

    rc, err, seconds = _interrupt(bundle, big_day, tmp_path, tag, send)
    assert names == ["esxi-worker-0", "esxi-worker-1"]   # what ps and top show
    assert rc == 143, err
    assert "interrupted (SIGTERM)" in err and "Traceback" not in err
    assert seconds < 10


def test_ctrl_c_to_the_process_group_stops_the_tree_and_exits_130(bundle, big_day, tmp_path, tag):
    # a terminal's Ctrl-C reaches every process of the group: workers must leave the ending to the parent
    rc, err, seconds = _interrupt(bundle, big_day, tmp_path, tag, lambda p: os.killpg(p.pid, signal.SIGINT))
    assert rc == 130, err
    assert "interrupted (SIGINT)" in err and "Traceback" not in err
    assert seconds < 10


def test_workers_die_with_a_killed_parent(bundle, big_day, tmp_path, tag):
    rc, _, _ = _interrupt(bundle, big_day, tmp_path, tag, lambda p: p.send_signal(signal.SIGKILL))
    assert rc == -signal.SIGKILL
