"""The model registry: `<models_dir>/<env>/<version>/`, one bundle per environment and version.

The one module that knows the layout: where a new version goes (`new_version_dir`), which is the
newest (`newest_version`), how a model is written with its model card (`write_model`) and loaded
(`load_model`: the bundle is verified, then unpickled), and where an environment keeps its analyst
verdicts (`feedback_store`, `<models_dir>/<env>/feedback.csv`, next to its versions).

A version is named by its UTC creation time (`20261128T080000Z`, `-2`, `-3` ... when taken), so
names sort as versions do. The environment name becomes a folder: `check_env_name` keeps it one.
"""
from __future__ import annotations

import os
import re
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from esxi_anomaly import bundle as B
from esxi_anomaly.features import transforms as T
from esxi_anomaly.features.scope import scope_line
from esxi_anomaly.feedback import FeedbackStore
from esxi_anomaly.model import DnsCalcDetector

FEEDBACK_FILE = "feedback.csv"
VERSION_NAME = B.VERSION_NAME
_ENV_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def check_env_name(name: str) -> str:
    """`name` when it is a safe environment name (it becomes a folder under the models directory),
    else ValueError: letters, digits, '.', '_', '-', not starting with '.', at most 128 characters."""
    if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
        raise ValueError(f"environment name {name!r} is not allowed: use letters, digits, '.', '_' and '-', "
                         "not starting with '.' (at most 128 characters); it names a folder under the "
                         "models directory")
    return name


# -- where things are --------------------------------------------------------------------------

def new_version_dir(models_dir: str | os.PathLike, env: str, *, now: datetime | None = None) -> Path:
    """A fresh, not yet existing folder `models_dir/<env>/<UTC timestamp>` (suffix -2, -3 ... if taken)."""
    base = Path(models_dir) / check_env_name(env)
    stamp = (now or datetime.now(timezone.utc)).astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    candidate = base / stamp
    counter = 2
    while candidate.exists():
        candidate = base / f"{stamp}-{counter}"
        counter += 1
    return candidate


def newest_version(models_dir: str | os.PathLike, env: str) -> Path:
    """The newest complete bundle folder of `env` (by its timestamp name); BundleError if there is none."""
    base = Path(models_dir) / check_env_name(env)
    found: list[tuple[str, int, Path]] = []
    if base.is_dir():
        for child in base.iterdir():
            match = VERSION_NAME.match(child.name)
            if match and child.is_dir() and (child / B.MANIFEST_NAME).is_file():
                found.append((match.group(1), int(match.group(2) or 1), child))
    if not found:
        raise B.BundleError(f"no model bundle for environment {env!r} under {Path(models_dir)}; "
                            f"train one with `esxi-anomaly train --env {env} ...`")
    return max(found)[2]


def feedback_path(models_dir: str | os.PathLike, env: str) -> Path:
    """Where `env` keeps its analyst verdicts: next to its versions."""
    return Path(models_dir) / check_env_name(env) / FEEDBACK_FILE


def feedback_store(models_dir: str | os.PathLike, env: str) -> FeedbackStore:
    """The analyst verdicts of `env` (`label` writes them, training reads them as labels)."""
    return FeedbackStore(feedback_path(models_dir, env))


def bundle_feedback(directory: str | os.PathLike) -> FeedbackStore:
    """The verdicts of the environment a bundle folder belongs to, for scoring's suppressions. A bundle
    given by folder outside the registry (`--model ./b`) finds none, and reading creates nothing, so
    its parent folder's name is not checked."""
    return FeedbackStore(Path(directory).parent / FEEDBACK_FILE)


# -- writing and loading -----------------------------------------------------------------------

def fit_warnings(model: DnsCalcDetector) -> list[str]:
    """What fitting warned about: the history's times, and an alert level above every training score."""
    return [*model.history_warnings_, *model.level_warnings_]


def _per_day(model: DnsCalcDetector) -> str:
    """Alerts a day on the training history, as the model card says it."""
    rate = model.training_alerts_per_day_
    if rate != rate:
        return "unknown (the history the detector was fitted on spans no time)"
    return f"{rate:,.1f} (alerts the model raises on its own training history, per day)"


def model_card(model: DnsCalcDetector, config, metrics: dict) -> str:
    """The bundle's `model_card.md`: what was trained on what, how well, and what to look at."""
    start, end = model.training_window_
    lines = [
        f"# esxi-anomaly model: {config.env}", "",
        f"- training window: {pd.Timestamp(start, unit='s')} to {pd.Timestamp(end, unit='s')} UTC "
        f"({model.history_days_:.1f} days)",
        f"- transform library: {T.TRANSFORM_LIBRARY_VERSION}",
        f"- alert level (score): {model.threshold_:.4f} (quantile {model.threshold_quantile} of the training "
        "scores of rows without evidence); a row is an alert only when DNS-calculation or management-plane "
        "evidence backs it and its score reaches the level",
        f"- expected alerts per day on the training history: {_per_day(model)}",
        f"- features: {len(model.feature_names_)}; rules: {', '.join(r['id'] for r in model.detector_.rules_)}",
        f"- {scope_line(model.scope_counts_)} ({model.scope_.describe()})",   # the training history's scope
        f"- config hash: {config.digest()}", "", "## Metrics", "",
    ]
    lines += [f"- {k}: {v}" for k, v in metrics.items()] or ["- (none measured)"]
    warnings = fit_warnings(model)
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


def write_model(model: DnsCalcDetector, config, models_dir: str | os.PathLike,
                metrics: dict | None = None, tuning: dict | None = None) -> Path:
    """A new version of `config.env` holding `model`, its model card and a manifest recording the
    config (`TrainConfig.record`), metrics and tuning summary; its folder is returned."""
    target = new_version_dir(models_dir, config.env)   # checks the name before anything is written
    metrics = metrics or {}
    manifest = {
        "env": config.env,
        "kind": "DnsCalcDetector",
        "feature_names": model.feature_names_,
        "transform_library_version": T.TRANSFORM_LIBRARY_VERSION,
        "config_hash": config.digest(),
        "config": config.record(),
        "training_window": list(model.training_window_),
        "threshold": model.threshold_,
        "metrics": metrics,
        "tuning": tuning or {},
        "warnings": fit_warnings(model),
    }
    return B.save_bundle(target, {"model": model, "model_card.md": model_card(model, config, metrics)}, manifest)


def load_model(directory: str | os.PathLike) -> tuple[DnsCalcDetector, dict]:
    """(model, manifest) of a bundle folder, verified before it is unpickled (`bundle.load_bundle`);
    BundleError when it holds no DnsCalcDetector or one of another transform library."""
    artifacts, manifest = B.load_bundle(directory)
    model = artifacts.get("model")
    if not isinstance(model, DnsCalcDetector):
        raise B.BundleError(f"{directory}: the bundle holds no DnsCalcDetector; retrain with `esxi-anomaly train`")
    if manifest.get("transform_library_version") != T.TRANSFORM_LIBRARY_VERSION:
        raise B.BundleError(
            f"{directory}: fitted with transform library {manifest.get('transform_library_version')}, "
            f"this installation has {T.TRANSFORM_LIBRARY_VERSION}; retrain with `esxi-anomaly train`")
    if not hasattr(model.detector_, "evidence_kinds_"):   # its level counts forest-only rows, its rules no evidence
        raise B.BundleError(f"{directory}: fitted before alerts needed evidence (its alert level and rules are of "
                            "an older version); retrain with `esxi-anomaly train`")
    return model, manifest
