"""`DnsCalcDetector`: the whole fitted model, from canonical frames to ranked, explained rows.

A scikit-learn estimator whose X is a `schema.Frames` (connections, dns_answers, inventory):
params-only `__init__`, `fit` returns self, learned attributes end in `_`, seeded by `random_state`,
`NotFittedError` before `fit`. The entry points taking `Frames` (`fit`, `features`, `refit_baseline`)
check them against `schema.FRAMES` (`schema.check_frames`: a missing or uncastable column is refused
by name, castable dtypes are cast). Engine choices (threads, workers) are arguments of the calls
that use them, never parameters of the fitted model.

Fitting avoids judging history by itself: the baseline used to build the forest's training features
is fitted on the older part of the history (`baseline_split`), so novelty looks in training as it
will at scoring time; the baseline kept for scoring is then refitted on all of it.
"""
from __future__ import annotations

import copy

import numpy as np
import pandas as pd

from esxi_anomaly.detect import rules as R
from esxi_anomaly.detect.ensemble import EnsembleDetector
from esxi_anomaly.estimator import Estimator, check_fitted
from esxi_anomaly.features import dns_join, pipeline
from esxi_anomaly.features.baseline import EntityBaseline
from esxi_anomaly.features.scope import Scope, diagnostic_lines, resolvers_seen, scope_line, scoped_history
from esxi_anomaly.features.stream_state import StreamState
from esxi_anomaly.features.mgmt_plane import ManagementPlane
from esxi_anomaly.schema import Frames, check_frames

EARLIEST_PLAUSIBLE_TS = 946_684_800.0  # 2000-01-01 UTC
MAX_HISTORY_DAYS = 400.0
FUTURE_SLACK_S = 86_400.0              # clocks a little ahead are normal; a day ahead is not


def _utc_text(ts: float) -> str:
    """A POSIX time as UTC text; times pandas cannot represent as seconds since 1970."""
    try:
        return pd.Timestamp(ts, unit="s").strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, ValueError):
        return f"{ts:.0f} s after 1970"


def history_findings(ts: np.ndarray, now: float | None = None) -> tuple[list[str], list[str]]:
    """What is wrong with a training history's timestamps: (odd, thin). `odd` (times before 2000,
    more than a day in the future, a span over MAX_HISTORY_DAYS) points at broken clocks or units
    and is refused by training unless allowed; `thin` (a span under a day) is only warned about."""
    import time

    ts = np.asarray(ts, dtype="float64")
    ts = ts[np.isfinite(ts)]
    if not len(ts):
        return [], []
    now = time.time() if now is None else now
    lo, hi = float(ts.min()), float(ts.max())
    span = (hi - lo) / 86_400.0
    odd, thin = [], []
    if lo < EARLIEST_PLAUSIBLE_TS:
        odd.append(f"{int((ts < EARLIEST_PLAUSIBLE_TS).sum()):,} connections before 2000-01-01 "
                   f"(earliest {_utc_text(lo)} UTC)")
    if hi > now + FUTURE_SLACK_S:
        odd.append(f"{int((ts > now + FUTURE_SLACK_S).sum()):,} connections more than a day in the future "
                   f"(latest {_utc_text(hi)} UTC, now {_utc_text(now)} UTC)")
    if span > MAX_HISTORY_DAYS:
        odd.append(f"the history spans {span:,.1f} days ({_utc_text(lo)} .. {_utc_text(hi)} UTC), "
                   f"more than {MAX_HISTORY_DAYS:.0f}")
    if span < 1.0:
        length = f"{span * 24:.1f} hours" if span * 24 >= 1 else f"{span * 24 * 60:.1f} minutes"
        thin.append(f"the history spans only {length} ({_utc_text(lo)} .. {_utc_text(hi)} UTC), "
                    "under a day: the per-entity baselines have seen too little, so most normal traffic "
                    "will look new; train on a few days at least")
    return odd, thin


def level_findings(level: float, top_score: float) -> list[str]:
    """A warning when the alert level is above the top training score (no training row can alert)."""
    if not level > top_score:
        return []
    return [f"the alert level {level:.4f} is above the top training score {top_score:.4f}: no training row "
            "can alert. Check the history (mostly one kind of traffic?) and the rule overrides"]


class DnsCalcDetector(Estimator):
    def __init__(self, min_window_s: float = 300.0, grace_s: float = 60.0, recent_responses: int = 4,
                 baseline_alpha: float = 5.0, baseline_split: float = 0.67, forest_weight: float = 0.6,
                 forest_floor: float = 0.9, n_estimators: int = 100, max_samples: int = 256,
                 threshold_quantile: float = 0.999, rule_overrides: dict | None = None,
                 mgmt_allow: tuple = (), max_forest_rows: int = 400_000, max_window_s: float = 3600.0,
                 random_state=0):
        self.min_window_s = min_window_s
        self.grace_s = grace_s
        self.recent_responses = recent_responses
        self.baseline_alpha = baseline_alpha
        self.baseline_split = baseline_split
        self.forest_weight = forest_weight
        self.forest_floor = forest_floor
        self.n_estimators = n_estimators
        self.max_samples = max_samples
        self.threshold_quantile = threshold_quantile
        self.rule_overrides = rule_overrides
        self.mgmt_allow = mgmt_allow
        self.max_forest_rows = max_forest_rows
        self.max_window_s = max_window_s
        self.random_state = random_state

    # -- fitting ---------------------------------------------------------------------------
    def join_params(self) -> dns_join.JoinParams:
        return dns_join.JoinParams(self.min_window_s, self.grace_s, self.recent_responses, self.max_window_s)

    def fit(self, X: Frames, y=None, scope: Scope | None = None):
        """Fit on the history `X` cut to `scope` (`features.scope`; None: `Scope()`), as scoring cuts
        each day. The scope is kept (`scope_`: the default of this model's scoring); the rows out of
        scope and the history's coverage are counted (`scope_counts_`), and its blind spots (few
        connections joined to a DNS answer, encrypted DNS, duplicates) join its warnings."""
        X = check_frames(X, "DnsCalcDetector.fit")
        scope = Scope() if scope is None else scope
        X, counts = scoped_history(X, scope)
        if not len(X.connections):
            raise ValueError(f"no connection of the history is in scope ({scope_line(counts)}): name the monitored "
                             "networks (--local-nets, [scope] local_nets) or keep every row (--all-directions)")
        prepared = pipeline.prepare(X.connections, X.dns_answers, X.inventory, self.join_params())
        self.fit_prepared(prepared, X.inventory)
        counts.update(scored=len(prepared.conns), joined_dns=int((prepared.evidence["query"] != "").sum()))
        # the resolvers of this history stay known: a day scored without its DNS log still leaves their lookups out
        self.scope_, self.scope_counts_ = scope.with_resolvers(resolvers_seen(X.dns_answers)), counts
        # the history's own span is among its warnings already (`history_findings`)
        self.history_warnings_ = [*self.history_warnings_,
                                  *diagnostic_lines(counts, len(X.dns_answers), times=False)]
        return self

    def fitted_baselines(self, prepared: pipeline.Prepared) -> tuple[EntityBaseline, EntityBaseline]:
        """The baseline of the older history (for the forest's training features) and of all of it."""
        early = self._early_mask(prepared)
        return (EntityBaseline(alpha=self.baseline_alpha).fit(prepared.baseline_input[early]),
                EntityBaseline(alpha=self.baseline_alpha).fit(prepared.baseline_input))

    def _early_mask(self, prepared: pipeline.Prepared) -> np.ndarray:
        ts = prepared.conns["ts"].to_numpy()
        cut = np.quantile(ts, self.baseline_split) if len(ts) else 0.0
        return ts < cut

    def fit_prepared(self, prepared: pipeline.Prepared, inventory: pd.DataFrame | None, baselines=None):
        """Fit from an already prepared batch. Tuning re-uses one preparation, and the fitted
        `baselines` (their fit does not depend on `alpha`, which only enters at transform time)."""
        self.mgmt_ = ManagementPlane(extra_allow=tuple(self.mgmt_allow)).fit(inventory)
        ts = prepared.conns["ts"].to_numpy()
        late_idx = np.flatnonzero(~self._early_mask(prepared))
        if baselines is None:
            baselines = self.fitted_baselines(prepared)
        early_baseline, full_baseline = (copy.copy(b).set_params(alpha=self.baseline_alpha) for b in baselines)
        features = pipeline.extract(take_rows(prepared, late_idx), early_baseline, self.mgmt_)
        late_rows = len(features)
        if len(features) > self.max_forest_rows:
            rng = np.random.default_rng(self.random_state)
            features = features.iloc[np.sort(rng.choice(len(features), self.max_forest_rows, replace=False))]
        rules = R.apply_overrides(R.default_rules(), self.rule_overrides)
        self.detector_ = EnsembleDetector(
            forest_weight=self.forest_weight, forest_floor=self.forest_floor, rules=rules,
            n_estimators=self.n_estimators, max_samples=self.max_samples,
            threshold_quantile=self.threshold_quantile, random_state=self.random_state,
        ).fit(features.reset_index(drop=True))
        # alerts a day on the history the detector was fitted on (the later part, judged by the older
        # part's baseline, as scoring judges a new day), scaled up when the forest rows were sampled
        late_days = (ts.max() - ts[late_idx].min()) / 86_400.0 if len(late_idx) else 0.0
        self.training_alerts_per_day_ = (self.detector_.train_alerts_ * late_rows / max(len(features), 1)
                                         / late_days if late_days > 0 else float("nan"))
        self.baseline_ = full_baseline
        self.history_days_ = self.baseline_.history_days_
        self.training_window_ = (float(ts.min()), float(ts.max())) if len(ts) else (0.0, 0.0)
        self.history_warnings_ = [w for part in history_findings(ts) for w in part]  # for the model card
        self.level_warnings_ = level_findings(self.detector_.threshold_, self.detector_.train_max_score_)
        self.feature_names_ = list(pipeline.FEATURES)
        return self

    def refit_baseline(self, X: Frames):
        """Refit the per-entity baseline and management peers on new history; keep the detector."""
        check_fitted(self, "detector_")
        X = check_frames(X, "DnsCalcDetector.refit_baseline")
        X = scoped_history(X, self.scope_)[0]
        prepared = pipeline.prepare(X.connections, X.dns_answers, X.inventory, self.join_params())
        self.baseline_ = EntityBaseline(alpha=self.baseline_alpha).fit(prepared.baseline_input)
        self.mgmt_ = ManagementPlane(extra_allow=tuple(self.mgmt_allow)).fit(X.inventory)
        self.history_days_ = self.baseline_.history_days_
        self.history_warnings_ = [w for part in history_findings(prepared.conns["ts"].to_numpy()) for w in part]
        return self

    # -- scoring ---------------------------------------------------------------------------
    def features(self, X: Frames, state: StreamState | None = None):
        """(prepared batch, feature matrix) of `X`; `state` carries stream state across chunks."""
        check_fitted(self, "detector_")
        X = check_frames(X, "DnsCalcDetector.features")
        prepared = pipeline.prepare(X.connections, X.dns_answers, X.inventory, self.join_params(), state)
        return prepared, self.features_prepared(prepared, X.inventory)

    def features_prepared(self, prepared: pipeline.Prepared, inventory: pd.DataFrame | None) -> pd.DataFrame:
        check_fitted(self, "detector_")
        mgmt = self.mgmt_ if inventory is None else ManagementPlane(tuple(self.mgmt_allow)).fit(inventory)
        return pipeline.extract(prepared, self.baseline_, mgmt)

    def score_samples(self, X: Frames) -> np.ndarray:
        """The score of every connection of `X`, in batch order (higher = more anomalous)."""
        feats = self.features(X)[1]
        return self.detector_.score_samples(feats)

    def score(self, X: Frames, top: int | None = None, explain_top: int = 200,
              state: StreamState | None = None, scope: Scope | None = None) -> pd.DataFrame:
        """Ranked rows (the columns of `schema.ranked_columns()`), alerts first, then by score
        (`schema.RANK_ORDER`); `top` keeps the first N, `explain_top` are attributed. Only the
        connections of `scope` (None: the model's, `scope_`) are scored, as the engines of `scoring`
        do: they give the same rows."""
        check_fitted(self, "detector_")
        X = scoped_history(check_frames(X, "DnsCalcDetector.score"), self.scope_ if scope is None else scope)[0]
        prepared, feats = self.features(X, state)
        rows = self.score_rows(prepared, feats)
        return self.finish(rows, feats, top=top, explain_top=explain_top)

    def score_rows(self, prepared: pipeline.Prepared, feats: pd.DataFrame,
                   components: pd.DataFrame | None = None) -> pd.DataFrame:
        """Scores, components and what the explanation sentence is made of, one row per connection
        in batch order: everything but the global rank, the per-row attributions and the sentence
        itself, which is built (`explain.sentences`) only for the rows that are kept: by `finish`,
        or by the batch writer block by block. `explain.SENTENCE_ONLY` columns are dropped then.
        `components`: `self.detector_.components(feats)` when the caller has it already."""
        check_fitted(self, "detector_")
        comp = self.detector_.components(feats) if components is None else components
        c, ev, ent = prepared.conns, prepared.evidence, prepared.entities
        host = pd.Series(c["esxi_host"].array)
        out = pd.DataFrame({  # `.array`: no copies and no Python objects for the text columns
            "score": comp["score"].to_numpy(), "event_id": c["event_id"].array, "ts": c["ts"].to_numpy(),
            "src_ip": c["src_ip"].array, "src_port": c["src_port"].array,
            "src_name": ent["src_name"].array, "src_kind": ent["src_kind"].array,
            "esxi_host": host.where(host != "", pd.Series(ent["src_esxi_host"].array)).array,
            "dst_ip": c["dst_ip"].array, "dst_port": c["dst_port"].array, "proto": c["proto"].array,
            "process": c["process"].array, "query": ev["query"].array, "answer": ev["answer"].array,
            "rtype": ev["rtype"].array, "dns_delay": ev["dns_delay"].to_numpy(),
            "transform": ev["transform"].array, "rules": comp["rules"].array,
            "forest_score": comp["forest_score"].to_numpy(), "rule_score": comp["rule_score"].to_numpy(),
            "consistency": ev["consistency"].to_numpy(), "port_never_seen": feats["port_never_seen"].to_numpy(),
            "dst_never_seen": feats["dst_never_seen"].to_numpy(), "dst_is_answer": feats["dst_is_answer"].to_numpy(),
            "seen_by": c["seen_by"].array,   # vantage points of the merged connection (`features.merge`)
        })
        out["alert"] = self.detector_.alerts(comp)   # evidence, and a score at the level
        return out

    def finish(self, rows: pd.DataFrame, feats: pd.DataFrame, top: int | None = None,
               explain_top: int = 200) -> pd.DataFrame:
        """Sort (`schema.RANK_ORDER`), rank, keep `top`, explain the kept rows and attribute the first
        `explain_top`, as the scoring engines write them (`scoring.rank.ranked_frame`). `feats` is
        row-aligned with `rows` (from `score_rows`)."""
        from esxi_anomaly.scoring.rank import ranked_frame

        return ranked_frame(self, rows, feats, top=top, explain_top=explain_top)

    @property
    def threshold_(self) -> float:
        check_fitted(self, "detector_")
        return self.detector_.threshold_


def take_rows(prepared: pipeline.Prepared, idx: np.ndarray) -> pipeline.Prepared:
    return pipeline.Prepared(
        conns=prepared.conns.iloc[idx].reset_index(drop=True),
        relationship=prepared.relationship.iloc[idx].reset_index(drop=True),
        evidence=prepared.evidence.iloc[idx].reset_index(drop=True),
        entity_table=prepared.entity_table,
        entity_codes=prepared.entity_codes[idx],
        baseline_input=prepared.baseline_input.iloc[idx].reset_index(drop=True),
        dns_side=prepared.dns_side.iloc[idx].reset_index(drop=True),
    )
