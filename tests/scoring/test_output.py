"""One run per output (`<out>.lock`), outputs checked before any input is read, nothing left behind
by a failed run, and a quarantine message that matches its file."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
import time

import pandas as pd
import pytest

from esxi_anomaly import cli, ingest
from esxi_anomaly.scoring import local, output, write
from esxi_anomaly.console import EXIT_BUSY, EXIT_INPUT, EXIT_OK, EXIT_QUARANTINE


@pytest.fixture(scope="module")
def bundle(small_day, tmp_path_factory):
    from esxi_anomaly.registry import write_model
    from esxi_anomaly.training import TrainConfig

    model, _ = small_day
    return write_model(model, TrainConfig(env="t"), tmp_path_factory.mktemp("models"))


def score(bundle, folder, out, *extra) -> int:
    return cli.main(["score", "--model", str(bundle), "--conn", str(folder / "conn.log"), "--dns",
                     str(folder / "dns.log"), "--out", str(out), "--workers", "1", "--no-progress", *extra])


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".work", ".tmp", ".lock")))


def test_a_second_run_to_a_locked_output_exits_5_naming_the_owner(tmp_path, small_day, bundle, capsys):
    _, folder = small_day
    out = tmp_path / "ranked.csv"
    # another live run holds the lock: a process of its own (flock is per open file)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from esxi_anomaly.scoring import hold_output\n"
         f"with hold_output({str(out)!r}):\n    print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        t0 = time.perf_counter()
        assert score(bundle, folder, out) == EXIT_BUSY
        assert time.perf_counter() - t0 < 5   # at once, nothing read
        err = capsys.readouterr().err
        assert f"is being written by another run (pid {holder.pid} on " in err.splitlines()[-1]
        assert "Traceback" not in err
        assert not out.exists() and not (tmp_path / "ranked.csv.work").exists()
        assert json.loads((tmp_path / "ranked.csv.lock").read_text())["pid"] == holder.pid   # not taken
    finally:
        holder.communicate("")
    assert holder.returncode == 0 and not (tmp_path / "ranked.csv.lock").exists()
    assert score(bundle, folder, out) == EXIT_OK   # once it is gone, the output is ours
    assert len(pd.read_csv(out)) == sum(1 for line in open(folder / "conn.log") if not line.startswith("#"))
    assert leftovers(tmp_path) == []


def test_a_stale_lock_is_taken_over(tmp_path, small_day, bundle, capsys):
    _, folder = small_day
    out = tmp_path / "ranked.csv"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "ranked.csv.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": "h", "started": "then"}))
    (tmp_path / f".ranked.csv.{'a' * 32}.tmp").write_text("half an output of the killed run")
    assert score(bundle, folder, out) == EXIT_OK
    err = capsys.readouterr().err
    assert f"taking over the stale lock ranked.csv.lock (pid {int(dead.stdout)} on h, started then" in err
    assert out.exists() and leftovers(tmp_path) == []


def test_the_lock_is_flock_held_for_the_run(tmp_path):
    out = tmp_path / "x.csv"
    with output.hold_output(out):
        with output.hold_output(out):   # re-entrant in one process (cmd_score, then the engine)
            fd = os.open(tmp_path / "x.csv.lock", os.O_RDWR)
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.close(fd)
        assert (tmp_path / "x.csv.lock").exists()
    assert not (tmp_path / "x.csv.lock").exists()


@pytest.mark.parametrize("case", ["folder", "input", "hardlink", "rollup-is-input", "unwritable"])
def test_unusable_outputs_are_refused_before_reading(tmp_path, small_day, bundle, capsys, monkeypatch, case):
    _, folder = small_day
    logs = tmp_path / "logs"
    logs.mkdir()
    for name in ("conn.log", "dns.log"):
        (logs / name).write_bytes((folder / name).read_bytes())
    before = (logs / "conn.log").read_bytes()
    out = {"folder": tmp_path, "input": logs / "conn.log", "hardlink": tmp_path / "alias.log",
           "rollup-is-input": logs / "dns.csv", "unwritable": tmp_path / "ro" / "x.csv"}[case]
    if case == "hardlink":
        os.link(logs / "conn.log", out)
    if case == "rollup-is-input":   # dns.csv's roll-up would be dns.entities.csv: make that the input
        (logs / "dns.log").rename(logs / "dns.entities.csv")
    if case == "unwritable":
        (tmp_path / "ro").mkdir()
        monkeypatch.setattr(os, "access", lambda path, mode: False)
    monkeypatch.setattr(ingest, "iter_file", lambda *a, **k: pytest.fail("an input was read"))
    dns = logs / ("dns.entities.csv" if case == "rollup-is-input" else "dns.log")
    rc = cli.main(["score", "--model", str(bundle), "--conn", str(logs / "conn.log"), "--dns", str(dns),
                   "--out", str(out), "--workers", "1", "--no-progress"])
    assert rc == EXIT_INPUT
    err = capsys.readouterr().err
    assert {"folder": "is a folder", "input": "is one of the input files", "hardlink": "is one of the input files",
            "rollup-is-input": "dns.entities.csv is one of the input files",
            "unwritable": "not writable"}[case] in err
    assert (logs / "conn.log").read_bytes() == before
    assert not list(tmp_path.rglob("*.work")) and not list(tmp_path.rglob("*.lock"))


def test_disk_full_keeps_the_old_output_and_leaves_nothing(tmp_path, small_day, bundle, capsys, monkeypatch):
    _, folder = small_day
    out = tmp_path / "ranked.csv"
    out.write_text("the old output\n")
    output.rollup_path(out).write_text("the old roll-up\n")

    def full(self, parts):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(write.BlockWriter, "write_parts", full)
    assert score(bundle, folder, out) == EXIT_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("No space left on device") and "Traceback" not in "".join(err)
    assert out.read_text() == "the old output\n" and output.rollup_path(out).read_text() == "the old roll-up\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ranked.csv", "ranked.entities.csv"]


def test_a_run_missing_scored_rows_writes_nothing(tmp_path, small_day, monkeypatch):
    model, folder = small_day
    out = tmp_path / "ranked.csv"
    real = write.scored_paths
    monkeypatch.setattr(write, "scored_paths", lambda work: real(work)[1:])   # as when another run cleared them
    with pytest.raises(RuntimeError, match="the scored files hold .* rows, not the .* connections scored"):
        local.run(model, [folder / "conn.log"], [folder / "dns.log"], out, chunk_rows=700, bucket_s=1800,
                  progress=False)
    assert list(tmp_path.iterdir()) == []


def test_quarantine_message_matches_the_file_and_a_clean_run_removes_an_old_one(tmp_path, capsys):
    out = tmp_path / "ranked.csv"
    quarantine = ingest.Quarantine(max_records=2)
    for i in range(5):
        quarantine.add("a.log", i + 1, "bad", f"line {i}")
    assert cli.finish_quarantine(quarantine, out, strict=True) == EXIT_QUARANTINE
    path = tmp_path / "ranked.csv.quarantine.jsonl"
    assert f"5 records quarantined (2 with their text, 3 counted only) -> {path}" in capsys.readouterr().err
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["raw"] for r in records[:2]] == ["line 0", "line 1"]
    assert cli.finish_quarantine(ingest.Quarantine(), out, strict=True) == EXIT_OK
    assert not path.exists()   # it described another run
    small = ingest.Quarantine()
    small.add("a.log", 1, "bad", "x")
    cli.finish_quarantine(small, out, strict=False)
    assert f"1 records quarantined -> {path}" in capsys.readouterr().err


@pytest.mark.parametrize("stop, kept", [(RuntimeError("a bug"), False), (KeyboardInterrupt(), True)])
def test_a_failed_run_removes_its_work_an_interrupted_one_keeps_it(tmp_path, small_day, monkeypatch, capsys,
                                                                   stop, kept):
    model, folder = small_day
    out = tmp_path / "ranked.csv"
    calls = {"n": 0}
    real = local.write_scored

    def fail(*args):   # after some groups are scored and checkpointed
        calls["n"] += 1
        if calls["n"] == 3:
            raise stop
        real(*args)

    monkeypatch.setattr(local, "write_scored", fail)
    with pytest.raises(type(stop)):
        local.run(model, [folder / "conn.log"], [folder / "dns.log"], out, chunk_rows=700, bucket_s=1800,
                  progress=False)
    assert not out.exists() and not (tmp_path / "ranked.csv.lock").exists()
    assert (tmp_path / "ranked.csv.work").is_dir() == kept
    assert ("rerun with --resume" in capsys.readouterr().err) == kept
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_a_failed_run_removes_the_output_folders_it_created(tmp_path, small_day, bundle, capsys):
    _, folder = small_day
    out = tmp_path / "new" / "deeper" / "ranked.csv"
    rc = cli.main(["score", "--model", str(bundle), "--conn", str(folder / "dns.log"), "--dns",   # a DNS log as --conn
                   str(folder / "dns.log"), "--out", str(out), "--workers", "1", "--no-progress"])
    assert rc == EXIT_INPUT and "not connections" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert score(bundle, folder, out) == EXIT_OK and out.exists()   # a run that succeeds keeps them
