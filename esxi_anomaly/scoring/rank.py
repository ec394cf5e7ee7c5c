"""The ranking and the ranked row: what `model.score` shares with both scoring engines.

`rank_order` is the one ranking (`schema.RANK_ORDER`); `ranked_block` the one place a scored row
becomes an output row (rank, explanation, attribution, the columns of `schema.RANKED`). The engines
write through it block by block (`write`), `model.score` through `ranked_frame`. It needs nothing
of the engines (no inputs, no verdicts, no files), so the estimator can use it.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from esxi_anomaly import schema
from esxi_anomaly.detect import explain
from esxi_anomaly.detect.explain import context_clauses
from esxi_anomaly.report.incidents import name_candidates, name_keys, raised_by_name, raised_explanation

# what `explain.sentences` reads from a scored row; the sentence-only ones are not written out
SENTENCE_COLUMNS = ["dst_port", "dst_ip", "src_name", "rules", "query", "transform", "answer", "rtype", "dns_delay",
                    "seen_by", *explain.SENTENCE_ONLY]


def rank_keys(rows) -> pa.Table:
    """The columns of `schema.RANK_KEYS` of `rows` (an Arrow table or a pandas frame) as a table."""
    if isinstance(rows, pa.Table):
        return rows.select(list(schema.RANK_KEYS))
    return pa.table({k: pa.array(rows[k].to_numpy() if k != "event_id" else rows[k].array)
                     for k in schema.RANK_KEYS})


def rank_order(rows) -> np.ndarray:
    """Positions in rank order (`schema.RANK_ORDER`: alerts first, then score descending, then
    event_id ascending) of `rows` (an Arrow table or a pandas frame holding `schema.RANK_KEYS`), the
    ranking everywhere. Stable: equal keys keep their order."""
    return pc.sort_indices(rank_keys(rows), sort_keys=list(schema.RANK_ORDER)).to_numpy()


def top_positions(rows, k: int) -> np.ndarray:
    """Positions (ascending) of the rows that can be among the first `k` in rank order, ties with the
    k-th kept: a selection in linear time (Arrow's select_k), not a sort of all rows."""
    keys = rank_keys(rows)
    if keys.num_rows <= k or k <= 0:
        return np.arange(keys.num_rows)
    chosen = pc.select_k_unstable(keys, k, sort_keys=list(schema.RANK_ORDER)).to_numpy()
    last = keys.take(pa.array(chosen[rank_order(keys.take(pa.array(chosen)))[-1:]]))   # the k-th row
    tied = np.ones(keys.num_rows, dtype=bool)
    for name in schema.RANK_KEYS:
        tied &= pc.fill_null(pc.equal(keys[name], last[name][0]), False).to_numpy(zero_copy_only=False)
    keep = np.zeros(keys.num_rows, dtype=bool)
    keep[chosen] = True
    return np.flatnonzero(keep | tied)


def ranked_block(model, block: pa.Table, ranks: np.ndarray, explain_top: int, attribution: Mapping[str, str],
                 context: pd.DataFrame | None = None) -> pa.Table:
    """The ranked output of scored rows (`block`, any order; `ranks`: their ranks, 1 = first): the
    columns of `schema.ranked_columns` in order, each row explained (`explain.sentences`, and the
    `context` clauses when given), the rows ranked up to `explain_top` attributed (`attribution`:
    event_id -> top features). The one place that does this, for both engines and `model.score`."""
    sentence = explanations(model, block, context)
    top_features = np.full(len(ranks), "", dtype=object)
    first = np.flatnonzero(ranks <= explain_top)
    top_features[first] = [attribution.get(e, "") for e in block["event_id"].take(pa.array(first)).to_pylist()]
    made = {"rank": pa.array(ranks), "explanation": pa.array(sentence.array, pa.large_string()),
            "top_features": pa.array(top_features, pa.large_string())}
    names = schema.ranked_columns(suppressed="suppressed" in block.column_names)
    return pa.table({c: made[c] if c in made else block[c] for c in names})


def explanations(model, rows: pa.Table, context: pd.DataFrame | None = None) -> pd.Series:
    """The explanation sentence of each scored row (`explain.sentences`), with the ESXi `context`
    clauses when given."""
    sentence = explain.sentences(rows.select(SENTENCE_COLUMNS).to_pandas(), model.history_days_,
                                 model.detector_.rules_)
    if context is not None:
        sentence = sentence + context_clauses(rows.select(["ts", "src_name", "esxi_host"]).to_pandas(), context)
    return sentence


def ranked_frame(model, rows: pd.DataFrame, feats: pd.DataFrame, top: int | None = None,
                 explain_top: int = 200, context: pd.DataFrame | None = None) -> pd.DataFrame:
    """Scored rows of one batch (`model.score_rows`; `feats` row-aligned) ranked in memory: sorted
    (`rank_order`), the first `top` kept (all when None), explained and attributed by
    `ranked_block`, as the engines write them, rows raised by their name's alerts included
    (`incidents.raised_by_name`, as `write.alert_changes` does)."""
    table = pa.Table.from_pandas(rows, preserve_index=False)
    alert = rows["alert"].to_numpy(dtype=bool)
    raised = raised_by_name(name_keys(table), alert, name_candidates(table)) if alert.any() else alert & False
    if raised.any():
        rows = rows.assign(alert=alert | raised)
    order = rank_order(rows)
    if top is not None:
        order = order[:top]
    first = order[:min(explain_top, len(order))]
    attribution = dict(zip(rows["event_id"].take(first), model.detector_.attributions(feats.iloc[first])))
    block = pa.Table.from_pandas(rows, preserve_index=False).take(pa.array(order))
    out = ranked_block(model, block, np.arange(1, len(order) + 1), explain_top, attribution, context).to_pandas()
    if raised.any():
        note = raised[order]
        out.loc[note, "explanation"] = raised_explanation(out.loc[note, "explanation"])
    return out
