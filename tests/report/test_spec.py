"""Every writer against the ranked-output spec (`schema.RANKED`, `schema.ranked_columns`): CSV header,
Parquet columns and dtypes, ECS mapping of every column, HTML table columns; with and without
the optional `suppressed` column."""
from __future__ import annotations

import csv
import json
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from esxi_anomaly import schema
from esxi_anomaly.report import ecs, html, write_outputs
from esxi_anomaly.report.layout import conform_ranked, ranked_layout

from .conftest import T0

N = 4


def spec_frame(suppressed: bool) -> pd.DataFrame:
    """A small ranked output built from the spec alone: every column, in order, in its dtype."""
    rng = np.random.default_rng(0)
    columns = {}
    for name in schema.ranked_columns(suppressed):
        dtype = schema.RANKED[name]
        if name == "rank":
            values = np.arange(1, N + 1)
        elif name == "ts":
            values = T0 + np.arange(N) * 10.0
        elif name.endswith("_ip"):
            values = [f"10.0.0.{i + 1}" for i in range(N)]
        elif dtype == schema.STR:
            values = [f"{name}-{i}" for i in range(N)]
        elif dtype == "bool":
            values = [True, False, True, False]
        elif dtype.startswith("int"):
            values = rng.integers(1, 65_535, N)
        else:
            values = np.sort(rng.random(N))[::-1]
        columns[name] = pd.Series(values, dtype=dtype)
    return pd.DataFrame(columns)


def expected_dtypes(suppressed: bool) -> list[str]:
    return [schema.RANKED[c] for c in schema.ranked_columns(suppressed)]


@pytest.fixture(params=[False, True], ids=["plain", "suppressed"])
def suppressed(request) -> bool:
    return request.param


def test_spec_frame_matches_the_spec(suppressed):
    frame = spec_frame(suppressed)
    assert list(frame.columns) == schema.ranked_columns(suppressed)
    assert ("suppressed" in frame.columns) == suppressed
    assert [str(d) for d in frame.dtypes] == expected_dtypes(suppressed)
    assert conform_ranked(frame) is frame                      # already laid out: nothing to do


def test_csv_header_is_the_spec_in_order(suppressed, tmp_path):
    frame = spec_frame(suppressed)
    for name, given in (("ordered", frame), ("shuffled", frame[frame.columns[::-1]])):
        path = write_outputs(given, tmp_path / f"{name}.csv")
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
        assert rows[0] == schema.ranked_columns(suppressed), name
        assert len(rows) == N + 1
        assert rows[1][rows[0].index("alert")] == "True"


def test_parquet_columns_order_and_dtypes_are_the_spec(suppressed, tmp_path):
    frame = spec_frame(suppressed)
    loose = frame[frame.columns[::-1]].astype({"src_port": "int64", "dst_port": "int64", "event_id": object})
    for name, given in (("ordered", frame), ("shuffled_loose", loose)):
        path = write_outputs(given, tmp_path / f"{name}.parquet")
        arrow = pq.read_schema(path)
        assert arrow.names == schema.ranked_columns(suppressed), name
        back = pd.read_parquet(path)
        assert [str(d) for d in back.dtypes] == expected_dtypes(suppressed), name
        assert arrow.field("dst_port").type == pa.int32() and arrow.field("alert").type == pa.bool_()
        pd.testing.assert_frame_equal(back, frame)


def test_extra_columns_follow_the_spec_columns():
    frame = spec_frame(True).assign(family="apt12")
    shuffled = frame[["family"] + list(frame.columns[::-1][1:])]
    assert ranked_layout(shuffled.columns) == schema.ranked_columns(True) + ["family"]
    partial = frame[["score", "rank"]]                        # not a ranked output: left as given
    assert ranked_layout(partial.columns) == ["score", "rank"]


def test_ecs_maps_every_spec_column(suppressed, tmp_path):
    frame = spec_frame(suppressed)
    documents = [json.loads(line) for line in
                 write_outputs(frame, tmp_path / "r.jsonl").read_text(encoding="ascii").splitlines()]
    assert len(documents) == N
    first = documents[0]
    leaves = set(ecs.validate_ecs_record(first))
    direct = {field for column, field, _ in ecs.DIRECT if column in frame.columns}
    assert direct <= leaves                                   # every one-to-one column is there
    assert {"@timestamp", "event.risk_score", "dns.answers", "rule.name", "esxi_anomaly.seen_by"} <= leaves
    assert first["esxi_anomaly"]["rank"] == 1 and first["destination"]["port"] == int(frame["dst_port"][0])
    assert ecs.unmapped_columns() == []


def test_a_column_added_to_the_spec_needs_an_ecs_mapping():
    grown = {**schema.RANKED, "beacon_period": "float64"}
    assert ecs.unmapped_columns(grown) == ["beacon_period"]
    declared = {**ecs.NOT_EXPORTED, "beacon_period": "not exported yet"}
    assert set(declared) | {c for c, _, _ in ecs.DIRECT} | set(ecs.COMPOSED) >= set(grown)
    assert set(ecs.NOT_EXPORTED) | set(ecs.COMPOSED) <= set(schema.RANKED)


def _html_columns(page: str) -> list[str]:
    match = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S)
    return [c["key"] for c in json.loads(match.group(1))["ranked"]["columns"]]


def test_html_shows_spec_columns_or_declared_extras(suppressed, tmp_path):
    frame = spec_frame(suppressed).assign(family="apt12")
    path = write_outputs(frame, tmp_path / "r.html")
    shown = _html_columns(path.read_text(encoding="utf-8"))
    assert all(c in schema.RANKED or c in html.DISPLAY_EXTRAS for c in shown)
    assert shown == [c for c in html.RANKED_DISPLAY if c in frame.columns]
    assert set(schema.ranked_columns(suppressed)) <= set(shown) | set(html.NOT_SHOWN)
    assert html.display_problems() == []


def test_html_display_table_is_checked_against_the_spec():
    assert html.display_problems({**schema.RANKED, "beacon_period": "float64"}) == \
        ["'beacon_period' is neither shown nor in NOT_SHOWN"]
    assert html.display_problems({**schema.RANKED, "dst_port": schema.STR}) == \
        ["'dst_port' is shown as 'int', which dtype str does not allow"]
    renamed = {("destination_port" if c == "dst_port" else c): d for c, d in schema.RANKED.items()}
    assert "'dst_port' is not a ranked column" in html.display_problems(renamed)
