"""Parquet writer for ranked anomalies, for notebooks and data lakes: the columns and dtypes of
`schema.RANKED` (extra columns kept after them, with their own dtypes)."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from esxi_anomaly.atomic import atomic_path
from esxi_anomaly.report.layout import conform_ranked


def write_parquet(ranked: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write `ranked` (all columns, no index; a ranked output laid out and typed by the spec,
    `layout.conform_ranked`) to `path` with pyarrow, atomically."""
    ranked = conform_ranked(ranked)
    with atomic_path(path) as staging:
        ranked.to_parquet(staging, engine="pyarrow", index=False)
    return Path(path)
