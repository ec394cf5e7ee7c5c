"""Training one model per environment: the config, the held-out slice, fitting and tuning.

    config.py    TrainConfig: strict and frozen, read from `training/<env>.toml`, search space included
    holdout.py   the held-out slice with injected attacks that fitting and tuning both measure on
    fit.py       fit_model, check_history, train_environment (tunes when asked), refit_model
    tune.py      Optuna studies (imported only when tuning: scoring never loads Optuna)

Writing and loading bundles is the registry's (`esxi_anomaly.registry`).
"""
from esxi_anomaly.training.config import ConfigError, TrainConfig
from esxi_anomaly.training.fit import Trained, check_history, fit_model, refit_model, train_environment
from esxi_anomaly.training.holdout import feedback_labels, split_holdout, validate

__all__ = ["ConfigError", "TrainConfig", "Trained", "check_history", "feedback_labels", "fit_model", "refit_model",
           "split_holdout", "train_environment", "validate"]
