"""CSV writers for ranked anomalies and the entity roll-up, safe to open in a spreadsheet.

Log text is attacker-controlled: a DNS name such as `=HYPERLINK("http://x")` would become a live
formula in Excel or LibreOffice. Every text cell starting with `=`, `+`, `-`, `@`, tab or CR gets
a leading single quote (OWASP "CSV injection"); numeric columns are written as numbers.
Rows end in CRLF (RFC 4180), so a CR or LF inside a cell is always quoted.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from esxi_anomaly.report._atomic import atomic_path

FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def _neutralise_text(values: pd.Series) -> pd.Series:
    if isinstance(values.dtype, pd.CategoricalDtype):
        values = values.astype(object)
    if pd.api.types.is_string_dtype(values) and not pd.api.types.is_object_dtype(values):
        is_trigger = values.str.startswith(FORMULA_TRIGGERS)
    else:  # object or mixed columns: only real strings can carry a formula
        is_trigger = values.map(lambda v: isinstance(v, str) and v.startswith(FORMULA_TRIGGERS))
    is_trigger = is_trigger.fillna(False).astype(bool)
    if not is_trigger.any():
        return values
    return values.where(~is_trigger, "'" + values.astype(str))


def neutralise_formulas(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of `frame` whose text cells cannot start a spreadsheet formula; numeric columns untouched."""
    safe = frame.copy()
    for column in safe.columns:
        values = safe[column]
        if (pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values)
                or pd.api.types.is_datetime64_any_dtype(values)):
            continue
        safe[column] = _neutralise_text(values)
    return safe


def _write(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    with atomic_path(path) as staging:
        neutralise_formulas(frame).to_csv(staging, index=False, encoding="utf-8", lineterminator="\r\n")
    return Path(path)


def write_csv(ranked: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the ranked anomalies (all columns, in order) to `path` as formula-safe CSV."""
    return _write(ranked, path)


def write_entity_rollup_csv(rollup: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the per-entity roll-up (see `report.rollup.entity_rollup`) as formula-safe CSV."""
    return _write(rollup, path)
