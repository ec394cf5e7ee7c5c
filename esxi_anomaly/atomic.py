"""Atomic file writes (outputs, roll-ups, verdicts, run records): a reader never sees a half-written file."""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success move it over `path` with os.replace,
    after flushing it to disk unless not `durable` (intermediate files checked by their reader:
    still whole after a killed process, only a machine crash can lose them)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    try:
        yield staging
        if durable:
            with open(staging, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)
