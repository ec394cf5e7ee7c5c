"""CSV writers: spreadsheet formulas in log text are neutralised, numbers stay numbers."""
from __future__ import annotations

import csv

import pandas as pd

from esxi_anomaly.report.csv import write_csv, write_entity_rollup_csv


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_formula_cells_neutralised(ranked, tmp_path):
    path = write_csv(ranked, tmp_path / "ranked.csv")
    rows = _rows(path)
    assert [r["query"] for r in rows] == [
        "'=HYPERLINK(\"http://x\")",
        "<script>window.__pwned=1</script>.evil.example",
        "'+cmd",
        "'-2+3",
        "'@SUM(1)",
    ]


def test_tab_and_carriage_return_neutralised(ranked, tmp_path):
    ranked["process"] = ["\tcmd", "\rcmd", "hostd", "x\ny\rz", "a=b"]
    rows = _rows(write_csv(ranked, tmp_path / "ranked.csv"))
    assert [r["process"] for r in rows] == ["'\tcmd", "'\rcmd", "hostd", "x\ny\rz", "a=b"]


def test_numeric_columns_unchanged_including_negatives(ranked, tmp_path):
    path = write_csv(ranked, tmp_path / "ranked.csv")
    rows = _rows(path)
    assert [r["port_delta"] for r in rows] == ["-2.5", "0.0", "-7.0", "3.25", "-1e-09"]
    assert [r["offset"] for r in rows] == ["-7", "0", "3", "-1", "2"]
    assert [r["src_port"] for r in rows] == ["50001", "50002", "-1", "40000", "40001"]
    assert [r["dns_delay"] for r in rows] == ["2.1", "1.5", "", "0.2", ""]
    back = pd.read_csv(path)
    assert list(back.columns) == list(ranked.columns)
    pd.testing.assert_series_equal(back["port_delta"], ranked["port_delta"])
    pd.testing.assert_series_equal(back["score"], ranked["score"])
    assert back["ts"].tolist() == ranked["ts"].tolist()


def test_input_frame_not_modified_and_no_temp_file_left(ranked, tmp_path):
    before = ranked.copy()
    write_csv(ranked, tmp_path / "out" / "ranked.csv")
    pd.testing.assert_frame_equal(ranked, before)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["ranked.csv"]


def test_rollup_csv_neutralised(tmp_path):
    rollup = pd.DataFrame({"src_name": ["=cmd|' /C calc'!A0", "vm-db-01"], "max_score": [0.9, -0.1]})
    rows = _rows(write_entity_rollup_csv(rollup, tmp_path / "rollup.csv"))
    assert rows == [{"src_name": "'=cmd|' /C calc'!A0", "max_score": "0.9"},
                    {"src_name": "vm-db-01", "max_score": "-0.1"}]
