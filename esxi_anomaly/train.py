"""Per-environment training: fit, (optionally) tune, evaluate on a held-out slice, write a bundle.

Configs are TOML files under `training/` (see `training/example.toml`). Without labels, quality is
measured self-supervised: the synthetic attack families of `synth` are injected into the newest
slice of the environment's own history and the model must rank them first. Every connection of
that slice that no label calls an attack counts as a negative, so C2 already present in the history
lowers the measured AP; `validate` lists the unlabelled rows that outrank half of the injected
attacks, and known labels (analyst verdicts, or `labels_path`) make confirmed attacks positives.
"""
from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from esxi_anomaly import bundle as B, schema
from esxi_anomaly.console import log
from esxi_anomaly.feedback import check_env_name
from esxi_anomaly.features import transforms as T
from esxi_anomaly.model import DnsCalcDetector, history_findings
from esxi_anomaly.schema import Frames

MODEL_PARAMS = set(DnsCalcDetector().get_params())


@dataclass
class TrainConfig:
    """What a data scientist sets per environment (all optional)."""

    env: str = "default"
    seed: int = 0
    model: dict = field(default_factory=dict)        # DnsCalcDetector params
    rules: dict = field(default_factory=dict)        # rule overrides by id
    mgmt_allow: list = field(default_factory=list)   # extra allow-list rows
    trials: int = 0
    holdout_fraction: float = 0.25
    inject_families: list = field(default_factory=lambda: ["apt12", "low16_mgmt", "xor_key", "offset_key"])
    study_storage: str = ""                          # Optuna storage URL; "" -> sqlite under training/
    feedback_path: str = ""                          # analyst verdicts (set from --models-dir/--env)
    labels_path: str = ""                            # known labels of this history (CSV: event_id, label)

    @classmethod
    def from_toml(cls, path: str | Path) -> "TrainConfig":
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        cfg = cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        unknown = set(cfg.model) - MODEL_PARAMS
        if unknown:
            raise ValueError(f"{path}: unknown [model] parameters {sorted(unknown)}; known: {sorted(MODEL_PARAMS)}")
        return cfg

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.__dict__, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def detector(self, **overrides) -> DnsCalcDetector:
        params = {"random_state": self.seed, **self.model, **overrides}
        params["rule_overrides"] = self.rules or None
        params["mgmt_allow"] = tuple(tuple(r) for r in self.mgmt_allow)
        return DnsCalcDetector(**params)


def fit_model(frames: Frames, config: TrainConfig, **overrides) -> DnsCalcDetector:
    return config.detector(**overrides).fit(frames)


def model_card(model: DnsCalcDetector, config: TrainConfig, metrics: dict) -> str:
    start, end = model.training_window_
    lines = [
        f"# esxi-anomaly model: {config.env}", "",
        f"- training window: {pd.Timestamp(start, unit='s')} to {pd.Timestamp(end, unit='s')} UTC "
        f"({model.history_days_:.1f} days)",
        f"- transform library: {T.TRANSFORM_LIBRARY_VERSION}",
        f"- alert threshold (score): {model.threshold_:.4f} (quantile {model.threshold_quantile} of training scores)",
        f"- features: {len(model.feature_names_)}; rules: {', '.join(r['id'] for r in model.detector_.rules_)}",
        f"- config hash: {config.digest()}", "", "## Metrics", "",
    ]
    lines += [f"- {k}: {v}" for k, v in metrics.items()] or ["- (none measured)"]
    warnings = getattr(model, "history_warnings_", [])
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
    if metrics.get("unlabelled_above_median_attack"):
        lines += ["", f"{metrics['unlabelled_above_median_attack']} connections of the held-out history "
                  f"({metrics.get('unlabelled_sources_above_median_attack', 0)} sources), neither injected nor "
                  "labelled, outrank half of the injected attacks: C2 already in the history, or the worst "
                  "false positives. They count as negatives in the AP above. Review them; confirmed attacks "
                  "become positives with `esxi-anomaly label --verdict malicious` or `labels_path`."]
    lines += ["", "Higher score = more anomalous. Scores are comparable within one bundle only."]
    return "\n".join(lines) + "\n"


def write_model(model: DnsCalcDetector, config: TrainConfig, models_dir: str | Path,
                metrics: dict | None = None, tuning: dict | None = None) -> Path:
    check_env_name(config.env)  # it names the bundle's folder
    metrics = metrics or {}
    manifest = {
        "env": config.env,
        "kind": "DnsCalcDetector",
        "feature_names": model.feature_names_,
        "transform_library_version": T.TRANSFORM_LIBRARY_VERSION,
        "config_hash": config.digest(),
        "config": config.__dict__,
        "training_window": list(model.training_window_),
        "threshold": model.threshold_,
        "metrics": metrics,
        "tuning": tuning or {},
        "warnings": list(getattr(model, "history_warnings_", [])),
    }
    target = B.new_bundle_dir(models_dir, config.env)
    return B.save_bundle(target, {"model": model, "model_card.md": model_card(model, config, metrics)}, manifest)


def load_model(directory: str | Path) -> tuple[DnsCalcDetector, dict]:
    artifacts, manifest = B.load_bundle(directory)
    model = artifacts.get("model")
    if not isinstance(model, DnsCalcDetector):
        raise B.BundleError(f"{directory}: the bundle holds no DnsCalcDetector; retrain with `esxi-anomaly train`")
    if manifest.get("transform_library_version") != T.TRANSFORM_LIBRARY_VERSION:
        raise B.BundleError(
            f"{directory}: fitted with transform library {manifest.get('transform_library_version')}, "
            f"this installation has {T.TRANSFORM_LIBRARY_VERSION}; retrain with `esxi-anomaly train`")
    return model, manifest


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


def validate(frames: Frames, config: TrainConfig, **overrides) -> dict:
    """Self-supervised quality: fit on older history, inject attacks into the newest slice, rank it."""
    from esxi_anomaly.evaluate import evaluate
    from esxi_anomaly.synth import inject_attacks

    history, holdout, cut = split_holdout(frames, config.holdout_fraction)
    if not len(history.connections) or not len(holdout.connections):
        return {}
    end = float(frames.connections["ts"].max())
    conns, dns, labels = inject_attacks(holdout.connections, holdout.dns_answers, inventory_or_empty(frames),
                                        families=config.inject_families, start=cut, end=end, seed=config.seed)
    model = fit_model(history, config, **overrides)
    ranked = model.score(Frames(conns, dns, frames.inventory), explain_top=0)
    labels = pd.concat([labels, feedback_labels(config)], ignore_index=True)
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


def feedback_labels(config: TrainConfig) -> pd.DataFrame:
    """Known labels of this environment, as evaluation labels (empty when none): analyst verdicts
    (malicious -> attack) and the rows of `config.labels_path` (`evaluate --labels` format)."""
    from esxi_anomaly.evaluate import read_labels
    from esxi_anomaly.feedback import FeedbackStore

    parts = [FeedbackStore.labels_for(config)]
    if config.labels_path:
        parts.append(read_labels(config.labels_path)[["event_id", "label", "family"]])
    return pd.concat(parts, ignore_index=True)


def check_history(frames: Frames, allow_odd: bool = False) -> list[str]:
    """Refuse a history whose times point at a broken clock or unit (before 2000, more than a day
    ahead, over 400 days long) unless `allow_odd`; warn on stderr about those and about a history
    under a day long. The warnings (also in the model card) are returned."""
    odd, thin = history_findings(frames.connections["ts"].to_numpy())
    if odd and not allow_odd:
        raise ValueError(
            "implausible training history: " + "; ".join(odd) + ". Likely cause: a log with a wrong clock or "
            "time unit (a device whose clock was never set, milliseconds read as seconds) or files of unrelated "
            "periods mixed in; `esxi-anomaly inspect` shows each file's time range. Remove them, or give "
            "--allow-odd-history (API: allow_odd_history=True) to train on it anyway")
    for warning in odd + thin:
        log(f"warning: {warning}")
    return odd + thin


def train_environment(frames: Frames, config: TrainConfig, validation: bool = True,
                      allow_odd_history: bool = False) -> tuple[DnsCalcDetector, dict, dict]:
    """Check the history's times (`check_history`), tune (when `config.trials`), validate on the
    held-out slice (unless `validation` is False: it costs one more fit and does not change the
    model), then fit on all history."""
    check_history(frames, allow_odd_history)
    tuning: dict = {}
    if config.trials > 0:
        from esxi_anomaly.tuning import tune

        best, tuning = tune(frames, config)
        config.model.update(best)
    metrics = validate(frames, config) if validation else {}
    model = fit_model(frames, config)
    return model, metrics, tuning


def refit_model(model: DnsCalcDetector, frames: Frames, allow_odd_history: bool = False) -> DnsCalcDetector:
    """Rolling refit: new baselines and forest on recent history, tuned parameters kept."""
    from sklearn.base import clone

    check_history(frames, allow_odd_history)
    return clone(model).fit(frames)
