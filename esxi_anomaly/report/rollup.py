"""Per-entity roll-up of ranked anomalies: one row per source entity, worst first.

An analyst triages entities (a VM, an ESXi management interface), not single connections; this
says which entity to open first, how often it alerted, when, and why its worst row ranked high.
"""
from __future__ import annotations

import pandas as pd

ENTITY_KEYS = ("src_ip", "src_name", "src_kind", "esxi_host")

ROLLUP_COLUMNS = ["src_ip", "src_name", "src_kind", "esxi_host", "max_score", "connections", "alerts",
                  "first_seen", "last_seen", "transforms", "families", "top_event_id", "top_ts",
                  "top_explanation"]


def _distinct_joined(frame: pd.DataFrame, keys: list[str], column: str) -> pd.Series:
    values = frame[column].fillna("").astype(str)
    present = frame.loc[values != "", keys].assign(**{column: values[values != ""]})
    return present.groupby(keys, sort=False, dropna=False)[column].agg(lambda s: "; ".join(sorted(set(s))))


def entity_rollup(ranked: pd.DataFrame, threshold: float | None = None) -> pd.DataFrame:
    """One row per source entity (src_ip, src_name, src_kind, esxi_host), sorted by max_score descending.

    alerts counts rows with score >= threshold (0 when threshold is None); transforms and families
    are the distinct non-empty values, "; "-joined (families only when `ranked` has a family column);
    top_* describe the entity's highest-scoring row (lowest rank on ties).
    """
    keys = [k for k in ENTITY_KEYS if k in ranked.columns]
    if "src_ip" not in keys:
        raise ValueError("entity_rollup needs a src_ip column")
    columns = [c for c in ROLLUP_COLUMNS if c in keys or c not in ENTITY_KEYS]
    if "family" not in ranked.columns:
        columns.remove("families")
    if ranked.empty:
        return pd.DataFrame(columns=columns)

    frame = ranked.copy()
    frame["_alert"] = (frame["score"] >= threshold) if threshold is not None else False
    order = ["score", "rank"] if "rank" in frame.columns else ["score"]
    frame = frame.sort_values(order, ascending=[False] + [True] * (len(order) - 1), kind="stable",
                              na_position="last")
    grouped = frame.groupby(keys, sort=False, dropna=False)
    rollup = grouped.agg(max_score=("score", "max"), connections=("score", "size"),
                         alerts=("_alert", "sum"), first_seen=("ts", "min"), last_seen=("ts", "max"))
    top = frame.drop_duplicates(subset=keys, keep="first").set_index(keys)
    rollup["top_event_id"] = top["event_id"] if "event_id" in top.columns else ""
    rollup["top_ts"] = top["ts"]
    rollup["top_explanation"] = top["explanation"] if "explanation" in top.columns else ""
    for column, out in (("transform", "transforms"), ("family", "families")):
        if column in frame.columns:
            rollup[out] = _distinct_joined(frame, keys, column)
            rollup[out] = rollup[out].fillna("").astype("str")
        elif out in columns:
            rollup[out] = ""
    rollup["alerts"] = rollup["alerts"].astype("int64")
    rollup["connections"] = rollup["connections"].astype("int64")
    rollup = rollup.reset_index()
    rollup = rollup.sort_values(["max_score", "connections", "src_ip"], ascending=[False, False, True],
                                kind="stable", na_position="last")
    return rollup[columns].reset_index(drop=True)
