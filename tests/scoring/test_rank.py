"""The one ranking (`schema.RANK_ORDER`): alerts first, then score, then event id; the same in
`rank_order`, the running top rows (`core.merge_top`), the scored files (`core.write_scored`) and
`model.score` (`rank.ranked_frame`). Forest-only rows never alert and rank below every alert."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from esxi_anomaly import schema
from esxi_anomaly.detect.explain import NO_EVIDENCE, NO_EVIDENCE_WEAK
from esxi_anomaly.scoring import core
from esxi_anomaly.scoring.rank import rank_order, top_positions
from esxi_anomaly.report.incidents import NAME_NOTE

from ..estimator_contract import fitted_detector, small_estate


def rows(n=500, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"score": rng.integers(0, 50, n) / 50,    # many ties on score
                         "event_id": pd.array([f"C{rng.integers(0, 10**6):07d}" for _ in range(n)], "string[pyarrow]"),
                         "alert": rng.random(n) < 0.1, "x": np.arange(n)})


def expected_order(df: pd.DataFrame) -> np.ndarray:
    keys = df.assign(event_id=df["event_id"].astype(str)).reset_index(drop=True)
    return keys.sort_values(["alert", "score", "event_id"], ascending=[False, False, True], kind="stable").index.to_numpy()


def test_rank_order_is_alerts_first_then_score_then_event_id():
    assert schema.RANK_ORDER[0] == ("alert", "descending") and schema.RANK_KEYS == ("alert", "score", "event_id")
    df = rows()
    order = rank_order(df)
    np.testing.assert_array_equal(order, expected_order(df))
    np.testing.assert_array_equal(rank_order(pa.Table.from_pandas(df, preserve_index=False)), order)
    ranked = df.iloc[order]
    first_plain = np.argmax(~ranked["alert"].to_numpy())
    assert ranked["alert"].iloc[:first_plain].all() and not ranked["alert"].iloc[first_plain:].any()
    assert ranked["score"].iloc[first_plain:].max() > ranked["score"].iloc[:first_plain].min()  # a real test


@pytest.mark.parametrize("k", [1, 7, 49, 50, 51, 499, 500, 600])
def test_top_positions_hold_the_first_k_and_their_ties(k):
    df = rows(seed=k)
    df.loc[df.index[:40], ["score", "event_id", "alert"]] = [0.5, "Ctie", False]   # full-key ties
    keep = top_positions(df, k)
    order = rank_order(df)
    assert set(order[:k]) <= set(keep)
    assert len(keep) == min(k, len(df)) or (len(keep) > k and (df["event_id"].iloc[keep] == "Ctie").any())


def test_merge_top_keeps_the_first_rows_in_rank_order():
    df = rows()
    cp = core.Checkpoint()
    for lo in range(0, len(df), 120):   # block by block, as the engines do
        block = df.iloc[lo:lo + 120]
        core.merge_top(cp, block, block[["x"]], 30)
    top = df.iloc[expected_order(df)[:30]]
    assert cp.top_rows["x"].tolist() == top["x"].tolist() == cp.top_feats["x"].tolist()
    assert cp.top_rows["alert"].iloc[0] and cp.top_rows["alert"].sum() == min(30, df["alert"].sum())


def test_scored_files_are_written_in_rank_order(tmp_path):
    df = rows()
    core.write_scored(df, tmp_path / "0.scored.arrow")
    with pa.memory_map(str(tmp_path / "0.scored.arrow")) as source:
        table = pa.ipc.open_file(source).read_all()
    assert table["x"].to_pylist() == df["x"].iloc[expected_order(df)].tolist()


def test_model_score_puts_every_alert_above_forest_only_rows_which_say_so():
    model, prepared, feats = fitted_detector()
    scored = model.score_rows(prepared, feats)
    evidence = model.detector_.components(feats)["evidence"].to_numpy()
    assert scored["alert"].any() and not scored["alert"].to_numpy()[~evidence].any()   # forest-only: never
    plain = scored["score"].to_numpy()[~evidence]
    assert (plain >= model.threshold_).any()   # some forest-only rows reach the level: they still do not alert
    _, today = small_estate()
    ranked = model.score(today)
    n_alerts = int(ranked["alert"].sum())
    assert ranked["alert"].iloc[:n_alerts].all()
    # beyond the evidence-backed alerts, only rows raised by their source's alerts on the same name
    raised = ranked["explanation"].str.endswith(NAME_NOTE)
    assert n_alerts == int(scored["alert"].sum()) + int(raised.sum()) and ranked.loc[raised, "alert"].all()
    assert ranked["rank"].tolist() == list(range(1, len(ranked) + 1))
    below = ranked.iloc[n_alerts:]
    assert below["score"].is_monotonic_decreasing and ranked["score"].iloc[:n_alerts].is_monotonic_decreasing
    no_evidence = below["explanation"].str.endswith(NO_EVIDENCE) | below["explanation"].str.endswith(NO_EVIDENCE_WEAK)
    assert no_evidence.sum() + raised.sum() >= (~evidence).sum()
    assert not ranked["explanation"].iloc[:n_alerts].str.contains("no DNS-calculation evidence").any()


def test_run_summary_warns_when_the_level_is_above_every_score():
    assert core.RunSummary(max_score=0.7, alert_level=0.6).level_warnings() == []
    assert core.RunSummary().level_warnings() == []
    (warning,) = core.RunSummary(max_score=0.4, alert_level=0.6).level_warnings()
    assert "alert level 0.6000 is above every score of this run (top 0.4000)" in warning
    assert core.higher_score(None, np.array([0.2, np.nan, 0.5])) == 0.5
    assert core.higher_score(0.7, np.array([0.2])) == 0.7 and core.higher_score(0.7, None) == 0.7
    assert core.higher_score(None, np.array([])) is None and core.higher_score(0.1, 0.3) == 0.3
