"""Optuna tuning of a DnsCalcDetector on the environment's own traffic with injected attacks.

The only module that imports Optuna (`fit.train_environment` imports it when `trials` > 0), so
scoring never loads it. The objective is average precision on the newest slice of history, into
which `synth` injects the configured attack families (plus analyst verdicts when present;
`holdout.with_attacks`). Preparation (DNS join and relationship features) depends only on the join
parameters, so it is computed once per join setting and shared by all trials that use it. The
search space is the config's (`[tuning.search_space]`, `TrainConfig.search_space`). Studies persist
in SQLite under `training/` by default; any SQLAlchemy URL works, so several machines can tune one
study.

A study is named by the environment and a fingerprint of everything its objective depends on (the
data, the labels, the fixed parameters, the search space), never by the number of trials:
`trials` is the study's total, so calling `tune` again resumes it and runs only the trials it lacks,
and the sampler is seeded with `seed` plus the trials already stored, so a resumed study does not
draw again the parameters of its first run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from sklearn.metrics import average_precision_score

from esxi_anomaly.features import pipeline, transforms as T
from esxi_anomaly.model import take_rows
from esxi_anomaly.schema import Frames
from esxi_anomaly.training.config import TrainConfig
from esxi_anomaly.training.holdout import split_holdout, with_attacks

DEFAULT_STORAGE_DIR = Path("training")
MAX_VALIDATION_NEGATIVES = 100_000  # per trial; negatives beyond this are sampled and weighted
TRIAL_FOREST_ROWS = 100_000         # forest training rows per trial (the final fit uses the model's own)


def suggest(trial: optuna.Trial, space: dict) -> dict:
    """One value per tuned parameter of `space` (`TrainConfig.search_space`), in its order."""
    out = {}
    for name, spec in space.items():
        if isinstance(spec, list):
            out[name] = trial.suggest_categorical(name, spec)
        elif isinstance(spec[0], int) and isinstance(spec[1], int):
            out[name] = trial.suggest_int(name, spec[0], spec[1], **spec[2])
        else:
            out[name] = trial.suggest_float(name, spec[0], spec[1], **spec[2])
    return out


def starting_point(config: TrainConfig) -> dict:
    """The configured (or default) values of the tuned parameters that lie in the search space: the
    first trial of a new study, so tuning never returns worse than not tuning on its own objective."""
    params = config.detector().get_params()
    out = {}
    for name, spec in config.search_space().items():
        value = params[name]
        inside = value in spec if isinstance(spec, list) else spec[0] <= value <= spec[1]
        if isinstance(spec, tuple) and "step" in spec[2]:
            inside = inside and (value - spec[0]) % spec[2]["step"] == 0
        if inside:
            out[name] = value
    return out


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The best trial, ties going to the earliest (the starting point first). On the environment's
    own history the objective often saturates (AP 1.0 for most trials): a random tie-break would then
    replace the defaults with an arbitrary configuration that no measurement preferred."""
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
    top = max(t.value for t in done)
    return min((t for t in done if t.value == top), key=lambda t: t.number)


def storage_url(config: TrainConfig) -> str:
    if config.study_storage:
        return config.study_storage
    DEFAULT_STORAGE_DIR.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(DEFAULT_STORAGE_DIR / 'optuna.db').as_posix()}"


def study_name(frames: Frames, config: TrainConfig, labels: pd.DataFrame) -> str:
    """`<env>-<fingerprint>`: the same data, labels, objective settings and search space give the same
    study, whatever `trials`. Tuned parameters set in the config only choose the first trial, and
    `trials`, storage and the feedback path's location do not change the objective: all left out."""
    digest = hashlib.sha256()
    for table in (frames.connections, frames.dns_answers, frames.inventory, labels):
        if table is not None:
            digest.update(",".join(map(str, table.columns)).encode())
            try:
                hashed = pd.util.hash_pandas_object(table, index=False)
            except TypeError:  # unhashable cells (lists, dicts): their text then
                hashed = pd.util.hash_pandas_object(table.astype(str), index=False)
            digest.update(hashed.to_numpy().tobytes())
    space = config.search_space()
    settings = {"seed": config.seed, "holdout_fraction": config.holdout_fraction,
                "inject_families": config.inject_families, "rules": config.rules,
                "mgmt_allow": [list(row) for row in config.mgmt_allow],
                "model": {k: v for k, v in config.detector_params().items() if k not in space}, "space": space,
                "trial_forest_rows": TRIAL_FOREST_ROWS, "validation_negatives": MAX_VALIDATION_NEGATIVES,
                "transforms": T.TRANSFORM_LIBRARY_VERSION}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return f"{config.env}-{digest.hexdigest()[:16]}"


def completed(study: optuna.Study) -> int:
    return sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def tune(frames: Frames, config: TrainConfig) -> tuple[dict, dict]:
    """Best parameters and a summary (trials, trials run now, best AP, study name and storage).
    `config.trials` is the study's total of completed trials: only the missing ones are run."""
    history, holdout, cut = split_holdout(frames, config.holdout_fraction)
    validation, labels = with_attacks(frames, holdout, cut, config)
    positives = set(labels.loc[labels["label"] == "attack", "event_id"])
    space = config.search_space()
    cache: dict = {}

    def prepared_for(params):
        """Per join setting (and baseline split), once: both preparations, the fitted baselines, and the
        validation rows (every positive, a weighted sample of negatives: AP is estimated without
        scoring them all)."""
        model = config.detector(**params)
        key = (model.join_params(), model.baseline_split)
        if key not in cache:
            jp = model.join_params()
            hist = pipeline.prepare(history.connections, history.dns_answers, history.inventory, jp)
            val = pipeline.prepare(validation.connections, validation.dns_answers, validation.inventory, jp)
            y = val.conns["event_id"].isin(positives).to_numpy()
            rate = min(1.0, MAX_VALIDATION_NEGATIVES / max(int((~y).sum()), 1))
            keep = y | (np.random.default_rng(config.seed).random(len(y)) < rate)
            idx = np.flatnonzero(keep)
            weight = np.where(y[idx], 1.0, 1.0 / rate)
            cache[key] = (hist, take_rows(val, idx), y[idx], weight, model.fitted_baselines(hist))
        return cache[key]

    def objective(trial):
        params = suggest(trial, space)
        hist_prep, val_prep, y, weight, baselines = prepared_for(params)
        model = config.detector(**params, max_forest_rows=TRIAL_FOREST_ROWS)
        model.fit_prepared(hist_prep, history.inventory, baselines)
        scores = model.detector_.score_samples(model.features_prepared(val_prep, validation.inventory))
        return float(average_precision_score(y, scores, sample_weight=weight)) if y.any() else 0.0

    optuna.logging.set_verbosity(logging.WARNING)
    name = study_name(frames, config, labels)
    study = optuna.create_study(direction="maximize", study_name=name, storage=storage_url(config),
                                load_if_exists=True)
    # a sampler seeded as in the first run would draw that run's parameters again
    study.sampler = optuna.samplers.TPESampler(seed=config.seed + len(study.trials))
    if not study.trials:
        study.enqueue_trial(starting_point(config))
    missing = max(0, config.trials - completed(study))
    if not missing:
        print(f"tuning {config.env}: study {name} already has {completed(study)} trials "
              f"(--trials {config.trials}); none run", file=sys.stderr)
    started, finished = time.perf_counter(), []

    def report(study, trial):  # one line per trial: tuning is the longest step a user waits on
        finished.append(trial.number)
        value = f"AP={trial.value:.4f}" if trial.value is not None else trial.state.name
        done = [t.value for t in study.trials if t.value is not None]
        best = f", best so far {max(done):.4f}" if done else ""
        print(f"tuning {config.env}: trial {completed(study)}/{config.trials} {value}{best} "
              f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)

    # the total bound also holds when other machines add trials to the same study meanwhile
    total = optuna.study.MaxTrialsCallback(config.trials, states=(optuna.trial.TrialState.COMPLETE,))
    if missing:
        study.optimize(objective, n_trials=missing, show_progress_bar=False, callbacks=[report, total])
    chosen = best_trial(study)
    best = dict(chosen.params)
    summary = {"study": name, "storage": storage_url(config), "trials": completed(study),
               "trials_run": len(finished),
               "best_average_precision": round(chosen.value, 4), "best_trial": chosen.number,
               "best_params": best}
    return best, summary
