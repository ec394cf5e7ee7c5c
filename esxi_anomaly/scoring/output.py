"""The output of a scoring run, guarded: one run per output (`<out>.lock`), its paths checked
before any input is read, the files a run keeps beside it (work folder, roll-up, quarantine), the
fingerprint a resumed run must match, and the output folder a failed run does not leave behind.
Both engines use all of it."""
from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import re
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from esxi_anomaly import ingest
from esxi_anomaly.console import EXIT_BUSY, EXIT_INPUT, log
from esxi_anomaly.report import format_for_path

try:
    import fcntl
except ImportError:   # not POSIX: the lock falls back to its owner's pid
    fcntl = None

ROLLUP_SUFFIX = ".entities.csv"
INCIDENTS_SUFFIX = ".incidents.csv"


def output_format(path: Path, fmt: str | None) -> str:
    """`fmt`, else the format the file name implies, else CSV."""
    if fmt:
        return fmt
    try:
        return format_for_path(path)
    except ValueError:
        return "csv"


def rollup_path(out: Path) -> Path:
    """Where `score --out X.<ext>` writes its entity roll-up: X.entities.csv (any output format)."""
    out = Path(out)
    return out.with_name(out.stem + ROLLUP_SUFFIX)


def incidents_path(out: Path) -> Path:
    """Where `score --out X.<ext>` writes its incidents: X.incidents.csv (any output format)."""
    out = Path(out)
    return out.with_name(out.stem + INCIDENTS_SUFFIX)


class OutputBusy(RuntimeError):
    """Another run is writing the same output (it holds `<out>.lock`)."""
    exit_code = EXIT_BUSY


class OutputError(ValueError):
    """The output path cannot be used (a folder, an input file, not writable)."""
    exit_code = EXIT_INPUT


class ResumeRefused(ValueError):
    """`--resume` found a work folder made by another run (other inputs, model or options)."""
    exit_code = EXIT_INPUT


def lock_path(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".lock")


def quarantine_path(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".quarantine.jsonl")


def work_path(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".work")


_HELD: dict[str, list] = {}   # lock files this process holds: path -> [fd, depth] (re-entrant)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    return True


def _read_owner(fd: int) -> dict:
    try:
        owner = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "{}")
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe_owner(owner: dict) -> str:
    if not owner:
        return "owner unknown"
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, started {owner.get('started', '?')}"


def _acquire_lock(path: Path, out: Path) -> int:
    """Create or take `path` and hold it (flock, released by the kernel when the holder dies, even by
    SIGKILL); the file names its owner. Raises `OutputBusy` when another live run holds it."""
    host = socket.gethostname()
    for _attempt in range(20):
        try:
            fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            try:
                fd, created = os.open(path, os.O_RDWR), False
            except FileNotFoundError:   # its owner just finished
                continue
        owner = _read_owner(fd)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise OutputBusy(f"{out} is being written by another run ({_describe_owner(owner)}); "
                                     f"wait for it to end, or write to another --out") from None
                except OSError:   # no flock on this filesystem: trust the owner's pid instead
                    if owner.get("host") == host and _pid_alive(int(owner.get("pid", 0))):
                        raise OutputBusy(f"{out} is being written by another run ({_describe_owner(owner)})") from None
            try:   # the file we hold must still be the one at `path` (its owner may have removed it)
                here = os.stat(path)
                same = (here.st_ino, here.st_dev) == (os.fstat(fd).st_ino, os.fstat(fd).st_dev)
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if not same:
            os.close(fd)
            continue
        if not created:
            log(f"{out}: taking over the stale lock {path.name} ({_describe_owner(owner)}: that run is gone)")
        record = json.dumps({"pid": os.getpid(), "host": host,
                             "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        return fd
    raise OutputBusy(f"{out}: could not lock {path} (other runs keep taking it)")


@contextmanager
def hold_output(out: Path):
    """Hold `<out>.lock` while inside: a second run to the same output refuses at once (`OutputBusy`),
    a lock left by a run that is gone is taken over. Re-entrant within a process."""
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    _HELD[key] = [_acquire_lock(path, Path(out)), 1]
    try:
        yield
    finally:
        fd = _HELD.pop(key)[0]
        path.unlink(missing_ok=True)   # before releasing it: a waiting run then finds no file, or a new one
        os.close(fd)


def check_output_paths(out: Path, inputs: list[Path], rollup: bool = True) -> None:
    """Refuse, before any input is read, an output that cannot be written or would destroy an
    input: `out`, its roll-up and incidents, quarantine, lock and work paths must not be folders (the
    work path: not a file), nor any input file (same resolved path or inode), and their folder must
    be writable. `rollup`: the run writes the roll-up and incidents beside `out`."""
    out = Path(out)
    targets = [out, quarantine_path(out), lock_path(out)] + ([rollup_path(out), incidents_path(out)] if rollup else [])
    seen = set()
    for p in inputs:
        try:
            st = p.stat()
            seen.add((st.st_dev, st.st_ino))
        except OSError:
            pass
    resolved = {p.resolve() for p in inputs}
    for target in targets:
        if target.is_dir():
            raise OutputError(f"{target} is a folder: --out needs a file name")
        if target.resolve() in resolved or (target.exists() and (target.stat().st_dev, target.stat().st_ino) in seen):
            raise OutputError(f"{target} is one of the input files: writing it would destroy it; choose another --out")
    if work_path(out).exists() and not work_path(out).is_dir():
        raise OutputError(f"{work_path(out)} is a file: it is where the run keeps its work folder; move it away")
    folder = out.parent if str(out.parent) else Path(".")
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} is not a folder: cannot write {out.name} in it")
    if folder.exists() and not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{folder}: not writable: cannot write {out.name} there")


_STAGING = re.compile(r"\.[0-9a-f]{32}\.tmp$")


def remove_stale_temps(out: Path, work: Path) -> None:
    """Temp files a killed run of this output left (`atomic_path` staging: `.<name>.<hex>.tmp`);
    only called while holding the output's lock, so none of them is being written."""
    out = Path(out)
    for name in (out.name, rollup_path(out).name, incidents_path(out).name, quarantine_path(out).name):
        for path in out.parent.glob(f".{glob.escape(name)}.*.tmp"):
            if _STAGING.search(path.name):
                path.unlink(missing_ok=True)
    for folder in (work, work / "scored"):
        if folder.is_dir():
            for path in folder.glob(".*.tmp"):
                if path.is_file():
                    path.unlink(missing_ok=True)


# -- the run's fingerprint: what --resume must find unchanged -------------------------------------

def _file_stats(paths, own: Path | None = None) -> list:
    """[resolved path, size, mtime_ns] of each input file, leaving out the run's own files (`own`:
    the output; an input folder may hold it, its lock and its work folder)."""
    out = []
    mine = set() if own is None else {str(p.resolve()) for p in (Path(own), rollup_path(own), incidents_path(own),
                                                                  lock_path(own), quarantine_path(own))}
    work = () if own is None else (str(work_path(own).resolve()) + os.sep,)
    for path, _explicit in ingest.list_files(paths) if paths else []:
        if str(Path(path).resolve()) in mine or (work and str(Path(path).resolve()).startswith(work)):
            continue
        try:
            st = os.stat(path)
        except OSError as exc:   # a dangling link, a file removed meanwhile: the read reports it
            out.append([str(Path(path).resolve()), exc.__class__.__name__, None])
            continue
        out.append([str(Path(path).resolve()), st.st_size, st.st_mtime_ns])
    return out


def _frame_digest(frame: pd.DataFrame | None) -> str:
    if frame is None or not len(frame):
        return ""
    digest = hashlib.sha256(json.dumps([list(map(str, frame.columns)), list(map(str, frame.dtypes))]).encode())
    digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return digest.hexdigest()


def run_fingerprint(model_id: str, conn_paths, dns_paths, inventory, context, suppressions, options: dict,
                    out: Path | None = None) -> dict:
    """What the output depends on, by option name: the model's identity, each input file's path,
    size and mtime, the content of the inventory, context and suppressions, the output options."""
    return {"--model": model_id, "--conn": _file_stats(conn_paths, out), "--dns": _file_stats(dns_paths, out),
            "--inventory": _frame_digest(inventory), "--context": _frame_digest(context),
            "suppressions (benign verdicts)": _frame_digest(suppressions), **options}


def _fingerprint_changes(old: dict, new: dict) -> list[str]:
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, list) and isinstance(b, list):
            before, after = {f[0]: f[1:] for f in a}, {f[0]: f[1:] for f in b}
            detail = [f"{p} added" for p in after if p not in before]
            detail += [f"{p} removed" for p in before if p not in after]
            detail += [f"{p} modified (size {before[p][0]} -> {after[p][0]})" for p in after
                       if p in before and before[p] != after[p]]
            changes.append(f"{key} changed: {', '.join(detail) or 'file order'}")
        elif key == "--model" or key.startswith(("--inventory", "--context", "supp")):
            changes.append(f"{key} changed")
        else:
            changes.append(f"{key} changed: {a!r} -> {b!r}")
    return changes


def check_fingerprint(work: Path, fingerprint: dict) -> None:
    try:
        old = json.loads((work / "fingerprint.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ResumeRefused(f"{work}: no readable record of the interrupted run's inputs; rerun without --resume") \
            from None
    changes = _fingerprint_changes(old, fingerprint)
    if changes:
        raise ResumeRefused(f"cannot resume {work}: " + "; ".join(changes) + "; rerun without --resume")


# -- the output folder ---------------------------------------------------------------------------

def make_output_folder(path: Path) -> Path:
    """Create the output folder `path` (and its parents); OSError naming it when that is impossible
    or it is not writable."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot create the output folder: {exc.strerror}", str(path)) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "the output folder is not writable", str(path))
    return path


@contextmanager
def output_folder(folder: Path):
    """`make_output_folder(folder)` for a run; when the run fails, remove the folders it created while
    they are still empty: a failed run leaves nothing behind."""
    folder = Path(folder)
    created = []
    for parent in [folder, *folder.parents]:
        if parent.exists():
            break
        created.append(parent)
    make_output_folder(folder)
    try:
        yield folder
    except BaseException:
        for made in created:   # deepest first
            try:
                made.rmdir()
            except OSError:   # not empty (the run wrote there) or already gone
                break
        raise
