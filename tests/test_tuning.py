"""Tuning starts from the configured values and keeps them when no trial measures better."""
from __future__ import annotations

import optuna

from esxi_anomaly import train
from esxi_anomaly.schema import Frames
from esxi_anomaly.tuning import SPACE, best_trial, starting_point, study_name, tune


def test_starting_point_is_the_configuration_inside_the_space():
    assert starting_point(train.TrainConfig()) == {
        "min_window_s": 300.0, "baseline_alpha": 5.0, "forest_weight": 0.6, "forest_floor": 0.9,
        "n_estimators": 100, "max_samples": 256}
    # configured values replace the defaults; values the space cannot suggest are left to the sampler
    cfg = train.TrainConfig(model={"min_window_s": 600.0, "n_estimators": 120, "forest_weight": 0.3,
                                   "baseline_alpha": 40.0})
    assert starting_point(cfg) == {"forest_weight": 0.3, "forest_floor": 0.9, "max_samples": 256}


def test_ties_go_to_the_earliest_trial():
    dist = {"forest_weight": optuna.distributions.FloatDistribution(*SPACE["forest_weight"][:2])}
    study = optuna.create_study(direction="maximize")
    for w, value in ((0.6, 1.0), (0.3, 0.99), (0.8, 1.0), (0.25, 1.0)):
        study.add_trial(optuna.trial.create_trial(params={"forest_weight": w}, distributions=dist, value=value))
    study.add_trial(optuna.trial.create_trial(params={"forest_weight": 0.5}, distributions=dist,
                                              state=optuna.trial.TrialState.FAIL))
    assert best_trial(study).number == 0 and best_trial(study).params == {"forest_weight": 0.6}


def test_first_trial_of_a_new_study_is_the_starting_point(tmp_path):
    from esxi_anomaly.synth import generate

    ds = generate(days=2, seed=4, scenario="small", attack_days=0, scale=0.3)
    cfg = train.TrainConfig(env="lab", seed=1, trials=1, model={"forest_weight": 0.45, "n_estimators": 50},
                            study_storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    best, summary = tune(Frames(ds.connections, ds.dns_answers, ds.inventory), cfg)
    assert summary["best_trial"] == 0 and summary["trials"] == 1
    assert best == starting_point(cfg) == {"min_window_s": 300.0, "baseline_alpha": 5.0, "forest_weight": 0.45,
                                           "forest_floor": 0.9, "n_estimators": 50, "max_samples": 256}
    assert summary["best_average_precision"] > 0.5


def test_study_name_follows_the_objective_not_the_trial_count():
    """Same data, labels and objective settings: one study, whatever `trials`, storage, feedback path or
    starting values; different data, labels or seed: another."""
    import pandas as pd

    from esxi_anomaly.synth import generate

    ds = generate(days=1, seed=4, scenario="small", attack_days=0, scale=0.05)
    frames = Frames(ds.connections, ds.dns_answers, ds.inventory)
    labels = pd.DataFrame({"event_id": ["a"], "label": ["attack"], "family": ["x"]})
    cfg = train.TrainConfig(env="lab", seed=1, trials=2)
    name = study_name(frames, cfg, labels)
    assert name.startswith("lab-")
    same = train.TrainConfig(env="lab", seed=1, trials=40, study_storage="sqlite:///elsewhere.db",
                             feedback_path="/x/feedback.csv", model={"forest_weight": 0.3})
    assert study_name(frames, same, labels) == name
    fewer = Frames(ds.connections.iloc[1:], ds.dns_answers, ds.inventory)
    others = [study_name(fewer, cfg, labels), study_name(frames, cfg, labels.assign(label="benign")),
              study_name(frames, train.TrainConfig(env="lab", seed=2), labels),
              study_name(frames, train.TrainConfig(env="lab", seed=1, model={"grace_s": 30.0}), labels),
              study_name(frames, train.TrainConfig(env="lab2", seed=1), labels)]
    assert len(set(others + [name])) == 6
