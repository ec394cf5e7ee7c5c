"""Worker processes for the local engine: each keeps a per-process `env` (the model and inventory,
given once by a `broadcast` job) and runs the jobs sent to it, reporting progress and results back.

Processes come from a *forkserver* (POSIX; *spawn* elsewhere): a clean server process imports the
package once and forks each worker from it, so workers inherit no threads of the parent, and the
parent may use threads freely. Like any spawned process, a worker imports the parent's main module:
a script that starts workers needs `if __name__ == "__main__":`.

The pool starts its processes on a background thread (the forkserver's first start waits for its
imports), so creating it costs the caller nothing: start it first, and the workers import while
the caller loads its model and reads its inputs.

A job is a module-level function `fn(env, *args, progress=callable)`; `env` is the worker's own dict
(a job may leave things in it for the next). A job that raises, or a worker that dies (killed, out of
memory), stops the run with the worker's own error text.

Workers never outlive the run: `close` stops them even with jobs still queued (and drops what the
queues still hold, which would otherwise keep the parent from exiting), and a worker exits by
itself the moment the pool's owner dies, even by SIGKILL (it watches a pipe only the owner writes
to). Workers ignore SIGINT: Ctrl-C in a terminal reaches the whole process group, and the parent,
not each worker, decides how the run ends.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import multiprocessing
import os
import pickle
import queue
import signal
import sys
import threading
import traceback
from typing import Any, Callable, Iterator

# The workers' forkserver imports the engine (and scikit-learn's trees where the package has no
# compiled forest walk of its own, `detect.forest`) once (`_forkserver_init`), while the parent still
# loads and reads.
_PRELOAD = ["esxi_anomaly.scoring._forkserver_init"]
_POLL_S = 0.5
_PR_SET_NAME, _PR_SET_PDEATHSIG = 15, 1   # Linux prctl options
WORKER_NAME = "esxi-worker-"     # a worker's process name (`comm`, at most 15 bytes): ps/top show it


class WorkerError(RuntimeError):
    """A job failed in a worker process (the message holds its traceback), or a worker died.
    `original`: the job's exception itself when it could be sent back (else None), so the caller can
    tell an unusable input from a bug."""

    def __init__(self, message: str, original: BaseException | None = None):
        super().__init__(message)
        self.original = original


def default_workers() -> int:
    """The usable cores."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


# Inputs smaller than this are scored in the calling process: starting workers (each imports the
# scoring stack: ~2 s on 2 cores) costs more than they save. Compressed files count as
# COMPRESSED_RATIO times their size (Zeek logs gzip about 4:1).
ONE_PROCESS_INPUT_BYTES = 32 << 20
COMPRESSED_RATIO = 4


def workers_for(files: list) -> int:
    """Worker processes for inputs `files` when the user did not say: one (no pool) for small
    inputs, else every usable core."""
    from esxi_anomaly.input_paths import is_compressed

    size = 0
    for path in files:
        try:
            bytes_on_disk = os.stat(path).st_size
        except OSError:        # reported by the run's own input checks
            continue
        size += bytes_on_disk * (COMPRESSED_RATIO if is_compressed(path) else 1)
    return 1 if size < ONE_PROCESS_INPUT_BYTES else default_workers()


# glibc `mallopt` parameters, and what `tune_allocator` sets them to
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
HEAP_ARRAYS_UP_TO = 256 << 20   # arrays up to this size come from the heap (glibc: 128 KB, rising to 32 MB)
KEEP_FREE_HEAP = 512 << 20      # free heap above this goes back to the OS at once


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def tune_allocator() -> None:
    """Serve numpy's large temporaries from the reused heap instead of fresh `mmap`s. By default glibc
    maps every large array anew and unmaps it on free, so the kernel zero-fills its pages again at first
    touch: ~15% of feature extraction's CPU time (`sys`), gone with this. `release_free_memory` still
    returns the free heap between batches."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):   # glibc only
        libc.mallopt(_M_MMAP_THRESHOLD, HEAP_ARRAYS_UP_TO)
        libc.mallopt(_M_TRIM_THRESHOLD, KEEP_FREE_HEAP)


def resident_bytes() -> int:
    """This process's resident memory (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def release_free_memory(above: int = 0) -> None:
    """Hand freed heap memory back to the OS (glibc's `malloc_trim`, Arrow's pool): after a large
    batch, the allocators keep it otherwise, and it would count against the run's resident memory.
    `above`: keep the heap while the process holds less than this many bytes (the next batch reuses
    it without the kernel zero-filling its pages again)."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    if above and resident_bytes() < above:
        return
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):   # glibc only
        libc.malloc_trim(0)


def _context():
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _bind_to_parent(index: int, lifeline, forkserver: bool) -> None:
    """Die with the pool's owner: `lifeline` is the read end of a pipe whose only write end the owner
    holds, so it reads EOF the moment the owner is gone (killed, even by SIGKILL, and even while
    nobody has reaped it yet); a watchdog thread then ends this worker. (The forkserver cannot be
    relied on for this: it waits for its children before it exits.) On Linux the kernel also kills the
    worker if its forkserver dies."""
    libc = _libc()
    if sys.platform.startswith("linux") and libc is not None and hasattr(libc, "prctl"):
        libc.prctl(_PR_SET_NAME, f"{WORKER_NAME}{index}".encode()[:15], 0, 0, 0)
        # the death signal follows the *thread* that forked us: only a (single-threaded) forkserver
        # qualifies, not the owner's short-lived starter thread
        if forkserver:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    def watch() -> None:
        try:
            lifeline.recv_bytes()   # the owner never writes: this returns only at EOF
        except (EOFError, OSError):
            pass
        os._exit(1)

    threading.Thread(target=watch, name="esxi-anomaly-parent-watch", daemon=True).start()


def _error(index: int, job_id, exc: BaseException):
    """The message a failed job sends back: its traceback, and the exception if it survives pickling."""
    try:
        original = pickle.dumps(exc)
        pickle.loads(original)
    except Exception:  # noqa: BLE001 - not every exception pickles; the traceback text always does
        original = None
    return ("error", index, job_id, (traceback.format_exc(), original))


def _serve(index: int, env: dict, inbox, outbox, lifeline=None, forkserver: bool = False) -> None:
    """A worker's loop: run jobs until told to stop (None)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if lifeline is not None:
        _bind_to_parent(index, lifeline, forkserver)
    tune_allocator()

    def progress(n: int) -> None:
        outbox.put(("progress", index, None, n))

    while True:
        job = inbox.get()
        if job is None:
            return
        job_id, fn, args = job
        try:
            outbox.put(("done", index, job_id, fn(env, *args, progress=progress)))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which stops the run
            outbox.put(_error(index, job_id, exc))
            return


class WorkerPool:
    """`n` worker processes, each with its own copy of `env`; close it (or use `with`) to stop them."""

    def __init__(self, n: int, env: dict | None = None):
        ctx = _context()
        self.outbox = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(n)]
        # workers hold the read end; only this process holds the write end: its death is their EOF
        self._lifeline_r, self._lifeline_w = ctx.Pipe(duplex=False)
        self.processes = [ctx.Process(target=_serve, args=(i, dict(env or {}), self.inboxes[i], self.outbox,
                                                           self._lifeline_r, ctx.get_start_method() == "forkserver"),
                                      daemon=True,
                                      name=f"esxi-anomaly-worker-{i}") for i in range(n)]
        self._start_error: BaseException | None = None
        self._starter = threading.Thread(target=self._start, name="esxi-anomaly-pool-start", daemon=True)
        self._starter.start()
        self.pending: set = set()
        self._started_work = False  # a worker has finished a job: the pool is up
        self._quiet: set = set()     # broadcast jobs: their results are not reported
        self._next_id = 0
        self._closed = False

    def _start(self) -> None:
        try:
            for process in self.processes:
                process.start()
        except BaseException as exc:  # noqa: BLE001 - re-raised by the first `events`
            self._start_error = exc

    def _started(self) -> None:
        self._starter.join()
        if self._start_error is not None:
            raise WorkerError(f"worker processes could not start: {self._start_error}") from self._start_error

    def __len__(self) -> int:
        return len(self.processes)

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def submit(self, worker: int, fn: Callable, *args) -> int:
        """Queue `fn(env, *args)` on worker `worker`; returns the job id."""
        job_id = self._next_id
        self._next_id += 1
        self.inboxes[worker].put((job_id, fn, args))
        self.pending.add(job_id)
        return job_id

    def events(self, on_progress: Callable[[int], None] | None = None) -> Iterator[tuple[int, int, Any]]:
        """Yield (worker, job id, result) as jobs finish, until none is pending; progress reports go to
        `on_progress` meanwhile. Raises `WorkerError` for a failed job or a dead worker."""
        self._started()
        while self.pending:
            event = self._poll(_POLL_S, on_progress)
            if event is not None:
                yield event

    def _poll(self, timeout: float, on_progress: Callable[[int], None] | None) -> tuple[int, int, Any] | None:
        """The next finished job's (worker, job id, result), waiting at most `timeout` s; None when
        none finished meanwhile (a broadcast job or a progress report counts as none)."""
        try:
            kind, worker, job_id, value = (self.outbox.get(timeout=timeout) if timeout > 0
                                           else self.outbox.get_nowait())
        except queue.Empty:
            if not self._starter.is_alive():
                self._started()
                dead = [p for p in self.processes if p.exitcode is not None]
                if dead:
                    raise WorkerError(f"worker process {dead[0].name} exited with code {dead[0].exitcode} before "
                                      "finishing its job: killed, out of memory, or it could not start (a script "
                                      "that starts workers needs `if __name__ == '__main__':`)") from None
            return None
        if kind == "progress":
            if on_progress is not None:
                on_progress(value)
            return None
        if kind == "error":
            text, original = value
            raise WorkerError(f"a job failed in worker {worker}:\n{text}",
                              pickle.loads(original) if original is not None else None)
        self.pending.discard(job_id)
        self._started_work = True
        if job_id in self._quiet:
            self._quiet.discard(job_id)
            return None
        return worker, job_id, value

    def broadcast(self, fn: Callable, *args) -> None:
        """Queue `fn(env, *args)` once on every worker (e.g. to give each the model), ahead of the jobs
        submitted after it; not waited for: its failure surfaces in the next `events`."""
        for worker in range(len(self)):
            self._quiet.add(self.submit(worker, fn, *args))

    def map(self, fn: Callable, jobs: list[tuple], on_progress: Callable[[int], None] | None = None,
            here: dict | None = None) -> list:
        """`fn(env, *args)` for each args tuple of `jobs`, in order, one job at a time per worker;
        results in the order of `jobs`. With `here` (an env for this process), this process runs the
        jobs itself while the pool still starts (its forkserver imports for ~2 s, then each worker
        takes its set-up job): the first jobs need not wait for it. Once a worker is up, the workers
        take the rest (this process working beside them would only add its memory)."""
        results: dict[int, Any] = {}
        index_of: dict[int, int] = {}
        running = [0] * len(self)      # jobs of this map on each worker
        todo = list(enumerate(jobs))
        progress = on_progress or (lambda n: None)
        while todo or index_of:
            if here is None:
                self._started()
            event = self._poll(0 if here is not None and todo else _POLL_S, on_progress)
            if event is not None:
                running[event[0]] -= 1
                results[index_of.pop(event[1])] = event[2]
            starting = here is not None and not self._started_work
            mine = todo.pop(0) if starting and todo and event is None else None
            for worker in range(len(self)):
                if todo and not running[worker] and not starting:
                    i, args = todo.pop(0)
                    index_of[self.submit(worker, fn, *args)] = i
                    running[worker] += 1
            if mine is not None:
                i, args = mine
                results[i] = fn(here, *args, progress=progress)
                release_free_memory()   # this process then waits for the workers: its heap goes back
        return [results[i] for i in range(len(jobs))]

    def close(self) -> None:
        """Stop the workers: politely when idle, else terminate them (and kill those that linger).
        Whatever the queues still hold is dropped: a queue's feeder thread would otherwise wait
        at exit, forever, to push a queued job (a model) into a pipe no worker reads any more."""
        if self._closed:
            return
        self._closed = True
        self._starter.join()
        idle = not self.pending
        for process, inbox in zip(self.processes, self.inboxes):
            if idle and process.is_alive():
                inbox.put(None)
        for process in self.processes:
            if process.pid is None:   # never started
                continue
            process.join(timeout=5 if idle else 0)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
        for q in (*self.inboxes, self.outbox):
            q.cancel_join_thread()
            q.close()
        self._lifeline_r.close()
        self._lifeline_w.close()
        self.pending.clear()
