"""The ranked output's layout, as every writer applies it: columns, order and dtypes from
`schema.RANKED` (`suppressed` only when present), nothing spelt here.

A frame holding every column of `schema.ranked_columns()` is a ranked output: writers lay it out
by the spec (its columns in spec order, extra columns such as an evaluation's `family` after them)
and typed formats cast it to the spec's dtypes. Any other frame (a roll-up, a hand-made table) is
written as it is. The output of `model.score` and of the engines is already laid out, so this
costs a column comparison and changes no byte.
"""
from __future__ import annotations

import pandas as pd

from esxi_anomaly import schema


def is_ranked(columns) -> bool:
    """Whether a frame with these columns is a ranked output (every required spec column)."""
    return set(schema.ranked_columns()) <= set(columns)


def ranked_layout(columns) -> list[str]:
    """The column order a writer uses: for a ranked output the spec's columns in order
    (`suppressed` when present), then the extra ones as given; other frames' columns as given."""
    columns = list(columns)
    if not is_ranked(columns):
        return columns
    spec = schema.ranked_columns(suppressed="suppressed" in columns)
    return spec + [c for c in columns if c not in spec]


def conform_ranked(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` in `ranked_layout` order, a ranked output's spec columns in the spec's dtypes;
    `frame` itself when nothing changes. SchemaError naming the columns that cannot be cast."""
    layout = ranked_layout(frame.columns)
    out = frame if layout == list(frame.columns) else frame[layout]
    if not is_ranked(layout):
        return out
    wrong = {c: d for c, d in schema.RANKED.items() if c in out.columns and str(out[c].dtype) != d}
    if not wrong:
        return out
    try:
        return out.astype(wrong)
    except (TypeError, ValueError) as exc:
        raise schema.SchemaError(f"ranked output: a column of {sorted(wrong)} cannot be cast to the spec's "
                                 f"dtype: {exc}") from exc


def check_names(names, where: str, extras=()) -> None:
    """Refuse (at import) a writer's table of ranked columns naming a column that is neither in
    `schema.RANKED` nor one of its declared display-only `extras`."""
    unknown = [n for n in names if n not in schema.RANKED and n not in extras]
    if unknown:
        raise RuntimeError(f"{where} names {unknown}, which schema.RANKED does not define "
                           "(add them to the spec, or declare them as extras there)")
