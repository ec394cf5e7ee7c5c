"""The local engine's worker processes: results, progress, and a clear error for a failed job or a dead worker."""
from __future__ import annotations

import os
import sys

import pytest

from esxi_anomaly.detect.forest import heap_walk_routine
from esxi_anomaly.scoring import workers
from esxi_anomaly.scoring.workers import WorkerError, WorkerPool, default_workers


def add(env, a, b, progress=None):
    progress(a)
    env["calls"] = env.get("calls", 0) + 1   # a worker's env persists from job to job
    return env["base"] + a + b, env["calls"]


def fail(env, progress=None):
    raise ValueError("bad record in partition 1")


def die(env, progress=None):
    os._exit(3)


def test_jobs_run_on_their_worker_with_its_env_and_report_progress():
    with WorkerPool(2, {"base": 100}) as pool:
        jobs = {pool.submit(i % 2, add, i, 1): i for i in range(4)}
        seen = []
        results = {jobs[job]: value for _, job, value in pool.events(seen.append)}
    assert results == {0: (101, 1), 1: (102, 1), 2: (103, 2), 3: (104, 2)}
    assert sorted(seen) == [0, 1, 2, 3]


def test_a_failing_job_stops_the_run_with_its_traceback():
    with WorkerPool(2, {}) as pool:
        pool.submit(1, fail)
        with pytest.raises(WorkerError, match="bad record in partition 1"):
            list(pool.events())


def test_a_dead_worker_is_reported_not_waited_for():
    with WorkerPool(1, {}) as pool:
        pool.submit(0, die)
        with pytest.raises(WorkerError, match="exited with code 3"):
            list(pool.events())


def test_default_workers_is_the_usable_cores():
    assert default_workers() == len(os.sched_getaffinity(0))


def loaded(env, names, progress=None):
    return {name: name in sys.modules for name in names}


def test_workers_import_scikit_learn_only_without_the_packages_compiled_forest_walk():
    """The forkserver preloads the engine for every worker, and scikit-learn's trees (0.7 s, ~80 MB)
    only where the forest's heap walk was not compiled at install."""
    with WorkerPool(1) as pool:
        [modules] = pool.map(loaded, [(["esxi_anomaly.scoring.local", "sklearn"],)])
    assert modules == {"esxi_anomaly.scoring.local": True, "sklearn": heap_walk_routine() is None}


def test_map_returns_results_in_job_order_whatever_worker_ran_them():
    with WorkerPool(2, {"base": 0}) as pool:
        assert [value for value, _calls in pool.map(add, [(i, 10) for i in range(7)])] == [i + 10 for i in range(7)]


def where(env, i, delay=0.0, progress=None):
    import time

    time.sleep(delay)
    progress(1)
    return i, os.getpid()


def test_map_with_here_runs_jobs_in_this_process_only_while_the_pool_starts():
    """A fresh pool's workers are not free before their start and set-up: with `here`, the caller runs
    the first jobs itself, and none once a worker is up; every result comes back in job order, and
    every progress report too."""
    seen = []
    with WorkerPool(2, {}) as pool:
        pool.broadcast(set_base, 0)
        results = pool.map(where, [(i, 0.05) for i in range(20)], seen.append, here={})
        later = pool.map(where, [(i,) for i in range(10)], here={})
        worker_pids = {p.pid for p in pool.processes}
    assert [i for i, _pid in results] == list(range(20)) and [i for i, _pid in later] == list(range(10))
    here = [pid == os.getpid() for _i, pid in results]
    assert here[0]                                # the first job cannot wait for a pool still starting
    assert here == sorted(here, reverse=True)     # ... and once a worker is up, the workers take the rest
    assert {pid for _i, pid in results} <= worker_pids | {os.getpid()}
    assert {pid for _i, pid in later} <= worker_pids
    assert len(seen) == 20


def test_map_with_here_reports_a_job_failing_in_this_process_as_it_is():
    with WorkerPool(1, {}) as pool:
        pool.broadcast(set_base, 0)     # the worker is busy until set up: this process takes the job
        with pytest.raises(ValueError, match="bad record in partition 1"):
            pool.map(fail, [()], here={})


def set_base(env, base, progress=None):
    env["base"] = base


def test_broadcast_reaches_every_worker_before_later_jobs_and_reports_nothing():
    with WorkerPool(2) as pool:
        pool.broadcast(set_base, 1000)
        assert sorted(value for value, _calls in pool.map(add, [(i, 0) for i in range(4)])) == [1000, 1001, 1002, 1003]
        pool.broadcast(fail)
        with pytest.raises(WorkerError, match="bad record"):
            list(pool.events())


CLOSE_WITH_QUEUED_JOBS = """
import os, sys, time
from esxi_anomaly.scoring.workers import WorkerError, WorkerPool


def slow(env, seconds, payload=None, progress=None):
    time.sleep(seconds)


def quit_now(env, progress=None):
    os._exit(7)


if __name__ == "__main__":
    big = b"x" * (8 << 20)   # far more than a pipe holds
    busy = WorkerPool(2)     # workers busy, more jobs queued behind: close() stops them
    for worker in range(2):
        busy.submit(worker, slow, 60)
        busy.submit(worker, slow, 0, big)
    dead = WorkerPool(1)     # the worker died with a job still queued for it
    dead.submit(0, quit_now)
    dead.submit(0, slow, 0, big)
    try:
        list(dead.events())
    except WorkerError:
        pass
    t0 = time.monotonic()
    busy.close()
    dead.close()
    print(round(time.monotonic() - t0, 1), [p.exitcode for p in busy.processes + dead.processes], flush=True)
"""


def test_close_with_jobs_still_queued_stops_the_workers_and_lets_the_process_exit(tmp_path):
    # before: close() terminated the workers, then the interpreter waited forever at exit for the
    # queues' feeder threads to push the queued jobs into pipes no worker read
    import signal
    import subprocess
    import sys

    from tests.test_cli_lifecycle import TAG, kill_tree, tree, wait_for

    script = tmp_path / "close_queued.py"
    script.write_text(CLOSE_WITH_QUEUED_JOBS)
    tag = f"close-{os.getpid()}"
    proc = subprocess.Popen([sys.executable, str(script)], env={**os.environ, TAG: tag}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        kill_tree(tag)
        pytest.fail("the process did not exit after close()")
    assert proc.returncode == 0, err
    seconds, exitcodes = out.split(" ", 1)
    assert float(seconds) < 5 and exitcodes.strip() == f"[{-signal.SIGTERM}, {-signal.SIGTERM}, 7]"
    assert wait_for(lambda: not tree(tag), 5)


def test_small_inputs_are_scored_without_workers_compressed_ones_by_content(tmp_path, monkeypatch):
    import gzip

    monkeypatch.setattr(workers, "ONE_PROCESS_INPUT_BYTES", 4000)
    monkeypatch.setattr(workers, "default_workers", lambda: 2)
    plain = tmp_path / "conn.log"
    plain.write_bytes(b"x" * 1500)
    packed = tmp_path / "dns.log"                    # gzip without the suffix: the readers decide by content
    packed.write_bytes(gzip.compress(bytes(range(256)) * 40, compresslevel=0)[:800])
    assert workers.workers_for([plain]) == 1
    assert workers.workers_for([plain, packed]) == 2  # 1,500 + 4 x 800 bytes
    assert workers.workers_for([plain, tmp_path / "missing.log"]) == 1
