"""The held-out validation slice that fitting (`validate`) and tuning (`tune`) both measure on.

Without labels, quality is measured self-supervised: the synthetic attack families of `synth` are
injected into the newest slice of the environment's own history and the model must rank them first.
Every connection of that slice that no label calls an attack counts as a negative, so C2 already
present in the history lowers the measured AP; `validate` lists the unlabelled rows that outrank
half of the injected attacks, and known labels (analyst verdicts, or `labels_path`) make confirmed
attacks positives.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from esxi_anomaly import schema
from esxi_anomaly.schema import Frames
from esxi_anomaly.training.config import TrainConfig


def inventory_or_empty(frames: Frames) -> pd.DataFrame:
    return frames.inventory if frames.inventory is not None else schema.empty("inventory")


def split_holdout(frames: Frames, fraction: float) -> tuple[Frames, Frames, float]:
    """History before the cut, and the newest `fraction` of time (with its DNS) for validation."""
    ts = frames.connections["ts"]
    cut = float(ts.min() + (ts.max() - ts.min()) * (1.0 - fraction))
    c, d = frames.connections, frames.dns_answers
    # DNS answers shortly before the cut stay visible to the validation slice's join
    return (Frames(c[c["ts"] < cut], d[d["ts"] < cut], frames.inventory),
            Frames(c[c["ts"] >= cut], d[d["ts"] >= cut - 3600], frames.inventory), cut)


def feedback_labels(config: TrainConfig) -> pd.DataFrame:
    """Known labels of this environment, as evaluation labels (empty when none): analyst verdicts
    (malicious -> attack) and the rows of `config.labels_path` (`evaluate --labels` format)."""
    from esxi_anomaly.evaluate import read_labels
    from esxi_anomaly.feedback import FeedbackStore

    parts = [FeedbackStore.labels_for(config)]
    if config.labels_path:
        parts.append(read_labels(config.labels_path)[["event_id", "label", "family"]])
    return pd.concat(parts, ignore_index=True)


def with_attacks(frames: Frames, holdout: Frames, cut: float, config: TrainConfig) -> tuple[Frames, pd.DataFrame]:
    """The held-out slice (`split_holdout`) with the configured attack families injected after `cut`, and
    the labels to measure it by: the injected attacks and the environment's known labels."""
    from esxi_anomaly.synth import inject_attacks

    end = float(frames.connections["ts"].max())
    conns, dns, labels = inject_attacks(holdout.connections, holdout.dns_answers, inventory_or_empty(frames),
                                        families=config.inject_families, start=cut, end=end, seed=config.seed)
    labels = pd.concat([labels, feedback_labels(config)], ignore_index=True)
    return Frames(conns, dns, frames.inventory), labels


def validate(frames: Frames, config: TrainConfig, **overrides) -> dict:
    """Self-supervised quality: fit on older history, inject attacks into the newest slice, rank it."""
    from esxi_anomaly.evaluate import evaluate

    history, holdout, cut = split_holdout(frames, config.holdout_fraction)
    if not len(history.connections) or not len(holdout.connections):
        return {}
    injected, labels = with_attacks(frames, holdout, cut, config)
    model = config.detector(**overrides).fit(history, scope=config.scope.scope())
    ranked = model.score(injected, explain_top=0)
    return {**evaluate(ranked, labels), **unlabelled_above_attacks(ranked, labels)}


def unlabelled_above_attacks(ranked: pd.DataFrame, labels: pd.DataFrame, examples: int = 5) -> dict:
    """Rows that no label mentions and that score at least the median positive: count, sources, and the
    most frequent (source, name, port) triples. In a clean history these are the detector's worst false
    positives; when the history already holds C2, they are mostly that C2 (counted as negatives)."""
    known = set(labels["event_id"].astype("str"))
    ids = ranked["event_id"].astype("str")
    attack = ids.isin(set(labels.loc[labels["label"] == "attack", "event_id"].astype("str"))).to_numpy()
    if not attack.any():
        return {}
    score = ranked["score"].to_numpy(dtype="float64")
    above = ~ids.isin(known).to_numpy() & (score >= np.median(score[attack]))
    rows = ranked.loc[above, ["src_ip", "query", "dst_port"]].astype("str")
    top = rows.value_counts().head(examples)
    return {"unlabelled_above_median_attack": int(above.sum()),
            "unlabelled_sources_above_median_attack": int(rows["src_ip"].nunique()),
            "unlabelled_examples": [f"{s} -> {q or '(no name)'}:{p} x{n}" for (s, q, p), n in top.items()]}
