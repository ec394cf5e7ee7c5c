"""Parquet round trip, the per-entity roll-up on a small frame, and format dispatch."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from esxi_anomaly.report import format_for_path, write_outputs
from esxi_anomaly.report.parquet import write_parquet
from esxi_anomaly.report.rollup import DistinctPairs, entity_rollup

from .conftest import T0


def test_parquet_round_trip_keeps_columns_and_dtypes(ranked, tmp_path):
    path = write_parquet(ranked, tmp_path / "ranked.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(path), ranked)
    assert [p.name for p in tmp_path.iterdir()] == ["ranked.parquet"]


def test_rollup_exact_values(ranked):
    rollup = entity_rollup(ranked, threshold=0.6)
    assert rollup.to_dict("records") == [
        {"src_ip": "10.0.1.5", "src_name": "vm-web-03", "src_kind": "vm", "esxi_host": "esx01",
         "max_score": 0.97, "connections": 2, "alerts": 2, "first_seen": T0 + 10, "last_seen": T0 + 70,
         "transforms": "apt12_a*b+c", "families": "apt12", "top_event_id": "CxA1", "top_ts": T0 + 10,
         "top_explanation": "port 1117 = 19*57+34 (APT12 a*b+c) from A 19.57.34.8"},
        {"src_ip": "10.0.0.21", "src_name": "esx01-vmk0", "src_kind": "esxi_mgmt", "esxi_host": "esx01",
         "max_score": 0.64, "connections": 1, "alerts": 1, "first_seen": T0 + 30, "last_seen": T0 + 30,
         "transforms": "", "families": "mgmt_c2", "top_event_id": "CxB1", "top_ts": T0 + 30,
         "top_explanation": "unexpected management egress"},
        {"src_ip": "10.0.2.9", "src_name": "vm-db-01", "src_kind": "vm", "esxi_host": "esx02",
         "max_score": 0.40, "connections": 2, "alerts": 0, "first_seen": T0 + 50, "last_seen": T0 + 90,
         "transforms": "", "families": "benign", "top_event_id": "CxC1", "top_ts": T0 + 50,
         "top_explanation": ""},
    ]


def test_rollup_without_threshold_or_family(ranked):
    ranked.loc[1, "transform"] = "xor_key"
    rollup = entity_rollup(ranked.drop(columns="family"))
    assert "families" not in rollup.columns
    assert rollup["alerts"].tolist() == [0, 0, 0]
    assert rollup.loc[0, "transforms"] == "apt12_a*b+c; xor_key"


def test_rollup_of_empty_frame_has_columns(ranked):
    assert list(entity_rollup(ranked.iloc[:0]).columns)[:5] == ["src_ip", "src_name", "src_kind", "esxi_host",
                                                                 "max_score"]


def test_write_outputs_dispatches_by_format_and_suffix(ranked, tmp_path):
    write_outputs(ranked, tmp_path / "a.out", "csv")
    assert (tmp_path / "a.out").read_text().startswith("rank,score,event_id,ts")
    write_outputs(ranked, tmp_path / "b.jsonl")
    assert (tmp_path / "b.jsonl").read_text().count("\n") == 5
    assert format_for_path("x.PARQUET") == "parquet"
    with pytest.raises(ValueError, match="unknown output format 'xlsx'"):
        write_outputs(ranked, tmp_path / "c.xlsx", "xlsx")
    with pytest.raises(ValueError, match="cannot tell the output format"):
        write_outputs(ranked, tmp_path / "c.txt")
    with pytest.raises(TypeError, match="takes no options"):
        write_outputs(ranked, tmp_path / "d.csv", "csv", top=3)


def _streamed_rollup(frame: pd.DataFrame, cuts: list[int]) -> pd.DataFrame:
    """StreamingRollup over `frame` fed as Arrow tables split at `cuts`, ranked by its rank column."""
    import numpy as np
    import pyarrow as pa

    from esxi_anomaly.report.rollup import StreamingRollup

    streaming = StreamingRollup()
    for lo, hi in zip([0] + cuts, cuts + [len(frame)]):
        streaming.add(pa.Table.from_pandas(frame.iloc[lo:hi], preserve_index=False))
    order = np.argsort(frame["rank"].to_numpy(), kind="stable")
    return streaming.finish(order, lambda idx: frame.iloc[idx])


@pytest.mark.parametrize("cuts", [[], [1], [2, 3], [1, 2, 3, 4]])
def test_streaming_rollup_equals_rollup_of_the_whole_frame(ranked, cuts):
    ranked = ranked.sample(frac=1.0, random_state=3).reset_index(drop=True)  # arrival order != rank order
    ranked["alert"] = ranked["score"] >= 0.6
    ranked.loc[ranked["event_id"] == "CxA2", "transform"] = "xor_key"     # two distinct transforms
    ranked.loc[ranked["event_id"] == "CxC2", "ts"] = float("nan")         # a row without time
    got = _streamed_rollup(ranked, cuts)
    expected = entity_rollup(ranked, threshold=0.6)
    pd.testing.assert_frame_equal(got, expected, check_dtype=False)
    assert got.loc[0, "transforms"] == "apt12_a*b+c; xor_key"
    assert got["alerts"].tolist() == [2, 1, 0]
    assert got.loc[2, "last_seen"] == got.loc[2, "first_seen"]  # NaN time skipped, as in entity_rollup


def test_streaming_rollup_keeps_entities_apart_and_breaks_ties_by_rank(ranked):
    # same src_ip under two names is two entities; an empty name is not the same as a missing one
    ranked["alert"] = False
    ranked.loc[ranked["event_id"] == "CxC2", "src_name"] = "vm-db-01-renamed"
    ranked.loc[ranked["event_id"] == "CxA2", "score"] = 0.97  # tie with CxA1: the lower rank wins
    ranked.loc[ranked["event_id"] == "CxB1", "src_name"] = None
    ranked.loc[ranked["event_id"] == "CxB1", "transform"] = "xor_key"
    got = _streamed_rollup(ranked, [2])
    pd.testing.assert_frame_equal(got, entity_rollup(ranked), check_dtype=False)
    assert got["top_event_id"].tolist() == ["CxA1", "CxB1", "CxC1", "CxC2"]
    assert got["connections"].tolist() == [2, 1, 1, 1]
    assert got["src_name"].isna().tolist() == [False, True, False, False]
    assert got["transforms"].tolist() == ["apt12_a*b+c", "xor_key", "", ""]
    assert got["families"].tolist() == ["apt12", "mgmt_c2", "benign", "benign"]


def test_distinct_pairs_joins_each_groups_distinct_values_in_order_over_blocks():
    ports = DistinctPairs(skip=("", "-1"))
    ports.add(np.array([0, 0, 2, 2, 2]), 3, pa.array([443, 8080, -1, 80, 443]))
    ports.add(np.array([2, 0, 0]), 3, pa.array([80, 9, None]))          # repeats across blocks, a null
    assert list(ports.joined(np.array([2, 1, 0, 7]), " ", numeric=True)) == ["80 443", "", "9 443 8080", ""]
    assert list(ports.joined(np.array([0]), " ")) == ["443 8080 9"]    # as text: "443" < "8080" < "9"
    names = DistinctPairs()
    names.add(np.array([1, 1, 1]), 2, pa.array(["b", "", "a"]))
    assert list(names.joined(np.array([0, 1]), "; ")) == ["", "a; b"]
    assert list(DistinctPairs().joined(np.array([0, 1]), "; ")) == ["", ""]
    many = DistinctPairs()
    for block in range(3 * DistinctPairs.COMPACT_EVERY + 1):   # compacted on the way: the same pairs
        many.add(np.array([0, 1]), 2, pa.array([f"v{block % 5}", "w"]))
    assert list(many.joined(np.array([1, 0]), " ")) == ["w", "v0 v1 v2 v3 v4"]


@pytest.mark.parametrize("cuts", [[], [2, 3]])
def test_streaming_rollup_recounts_the_rows_whose_alert_changed_after_they_were_counted(ranked, cuts):
    """The run settles its alerts (name evidence, alert budget) while the roll-up counts the rows."""
    import numpy as np
    import pyarrow as pa

    from esxi_anomaly.report.rollup import StreamingRollup

    ranked = ranked.sample(frac=1.0, random_state=3).reset_index(drop=True)
    ranked["alert"] = ranked["score"] >= 0.6
    changed = np.array([0, len(ranked) - 1])          # in the first and the last table added
    final = ranked.copy()
    final.loc[changed, "alert"] = ~final.loc[changed, "alert"]
    streaming = StreamingRollup()
    for lo, hi in zip([0] + cuts, cuts + [len(ranked)]):
        streaming.add(pa.Table.from_pandas(ranked.iloc[lo:hi], preserve_index=False))
    streaming.flip(changed, final.loc[changed, "alert"].to_numpy())
    order = np.argsort(final["rank"].to_numpy(), kind="stable")
    got = streaming.finish(order, lambda idx: final.iloc[idx])
    assert got["alerts"].tolist() == _streamed_rollup(final, cuts)["alerts"].tolist()
    assert got["alerts"].sum() == final["alert"].sum()
    assert got["alerts"].tolist() != _streamed_rollup(ranked, cuts)["alerts"].tolist()   # as counted before
