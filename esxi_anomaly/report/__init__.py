"""Writers for the ranked output of `esxi-anomaly score`: CSV, Parquet, ECS JSON lines and HTML.

The ranked output's columns, order and dtypes are `schema.RANKED`; every writer takes them from
there (`report.layout`), and the ECS and HTML tables of ranked columns are checked against it
at import.
Every writer writes atomically (temporary file in the target folder, then os.replace) and
treats log-derived text as hostile: formulas are neutralised in CSV, text is escaped in HTML.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

FORMATS = ("csv", "parquet", "jsonl", "html")
_SUFFIX_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl",
                   ".ndjson": "jsonl", ".json": "jsonl", ".html": "html", ".htm": "html"}


def format_for_path(path: str | os.PathLike) -> str:
    """The output format implied by a file name's suffix; ValueError if there is none."""
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIX_FORMATS:
        raise ValueError(f"cannot tell the output format from {Path(path).name!r}; "
                         f"pass a format, one of {', '.join(FORMATS)}")
    return _SUFFIX_FORMATS[suffix]


def write_outputs(ranked: pd.DataFrame, path: str | os.PathLike, fmt: str | None = None, **kw) -> Path:
    """Write `ranked` to `path` as fmt ("csv", "parquet", "jsonl" or "html"; None: from the suffix).

    Keyword arguments go to the writer; only the HTML writer takes any (dns_answers,
    connections, summary, top).
    """
    fmt = format_for_path(path) if fmt is None else fmt
    if fmt == "html":
        from esxi_anomaly.report.html import write_html
        return write_html(ranked, path, **kw)
    if kw:
        raise TypeError(f"the {fmt} writer takes no options, got {', '.join(sorted(kw))}")
    if fmt == "csv":
        from esxi_anomaly.report.csv import write_csv
        return write_csv(ranked, path)
    if fmt == "parquet":
        from esxi_anomaly.report.parquet import write_parquet
        return write_parquet(ranked, path)
    if fmt == "jsonl":
        from esxi_anomaly.report.ecs import write_jsonl
        return write_jsonl(ranked, path)
    raise ValueError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
