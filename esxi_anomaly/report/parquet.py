"""Parquet writer for ranked anomalies: every column and dtype kept, for notebooks and data lakes."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from esxi_anomaly.atomic import atomic_path


def write_parquet(ranked: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write `ranked` (all columns, no index) to `path` with pyarrow, atomically."""
    with atomic_path(path) as staging:
        ranked.to_parquet(staging, engine="pyarrow", index=False)
    return Path(path)
