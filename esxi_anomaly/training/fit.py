"""Per-environment fitting: check the history, tune (when asked), validate on the held-out slice, fit.

`train_environment` never changes the config it is given: tuned parameters go into the copy it
returns (`Trained.config`), which is the one to record in the bundle (`registry.write_model`).
"""
from __future__ import annotations

from typing import NamedTuple

from esxi_anomaly.console import log
from esxi_anomaly.features.scope import Scope, diagnostic_lines, scope_line, scoped_history
from esxi_anomaly.model import DnsCalcDetector, history_findings
from esxi_anomaly.schema import Frames
from esxi_anomaly.training.config import TrainConfig
from esxi_anomaly.training.holdout import validate


def scope_history(frames: Frames, scope: Scope) -> Frames:
    """`frames` cut to `scope` (`features.scope.scoped_history`); what was left out, by reason, and
    the history's blind spots (few connections joined to a DNS answer, encrypted DNS, duplicates)
    on stderr (the fitted model's card repeats the blind spots)."""
    scoped, counts = scoped_history(frames, scope)
    log(scope_line(counts))
    return scoped


def warn_fitted(model: DnsCalcDetector, frames: Frames) -> None:
    """What the fit found, on stderr (also in the model card): the history's blind spots (its times
    were warned about before fitting, `check_history`) and an alert level above every score."""
    for warning in [*diagnostic_lines(model.scope_counts_, len(frames.dns_answers), times=False),
                    *model.level_warnings_]:
        log(f"warning: {warning}")


class Trained(NamedTuple):
    model: DnsCalcDetector
    metrics: dict      # held-out quality (`holdout.validate`); {} without validation
    tuning: dict       # the tuning summary (`tune.tune`); {} without tuning
    config: TrainConfig  # the config the model was fitted with: the given one plus tuned parameters


def fit_model(frames: Frames, config: TrainConfig, **overrides) -> DnsCalcDetector:
    """A model fitted on `frames` cut to the config's scope (`[scope]`), which its scoring keeps."""
    return config.detector(**overrides).fit(frames, scope=config.scope.scope())


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
                      allow_odd_history: bool = False) -> Trained:
    """Check the history's times (`check_history`), tune (when `config.trials`), validate on the
    held-out slice (unless `validation` is False: it costs one more fit and does not change the
    model), then fit on all history."""
    check_history(frames, allow_odd_history)
    scoped = scope_history(frames, config.scope.scope())   # what tuning and validation measure on
    tuning: dict = {}
    if config.trials > 0:
        from esxi_anomaly.training.tune import tune   # Optuna only when tuning

        best, tuning = tune(scoped, config)
        config = config.replace(model={**config.detector_params(), **best})
    metrics = validate(scoped, config) if validation else {}
    model = fit_model(frames, config)
    warn_fitted(model, frames)
    return Trained(model, metrics, tuning, config)


def refit_model(model: DnsCalcDetector, frames: Frames, allow_odd_history: bool = False) -> DnsCalcDetector:
    """Rolling refit: new baselines and forest on recent history, tuned parameters kept."""
    from sklearn.base import clone

    check_history(frames, allow_odd_history)
    model = clone(model).fit(frames, scope=model.scope_)   # the scope it was trained on
    warn_fitted(model, frames)
    return model
