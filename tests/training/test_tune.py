"""Tuning starts from the configured values, keeps them when no trial measures better, resumes its study,
and searches the space the config gives."""
from __future__ import annotations

import optuna
import pandas as pd

from esxi_anomaly.schema import Frames
from esxi_anomaly.training import TrainConfig
from esxi_anomaly.training.tune import best_trial, starting_point, study_name, tune


def test_starting_point_is_the_configuration_inside_the_space():
    assert starting_point(TrainConfig()) == {
        "min_window_s": 300.0, "baseline_alpha": 5.0, "forest_weight": 0.6, "forest_floor": 0.9,
        "n_estimators": 100, "max_samples": 256}
    # configured values replace the defaults; values the space cannot suggest are left to the sampler
    cfg = TrainConfig(model={"min_window_s": 600.0, "n_estimators": 120, "forest_weight": 0.3,
                                   "baseline_alpha": 40.0})
    assert starting_point(cfg) == {"forest_weight": 0.3, "forest_floor": 0.9, "max_samples": 256}


def test_ties_go_to_the_earliest_trial():
    dist = {"forest_weight": optuna.distributions.FloatDistribution(*TrainConfig().search_space()["forest_weight"][:2])}
    study = optuna.create_study(direction="maximize")
    for w, value in ((0.6, 1.0), (0.3, 0.99), (0.8, 1.0), (0.25, 1.0)):
        study.add_trial(optuna.trial.create_trial(params={"forest_weight": w}, distributions=dist, value=value))
    study.add_trial(optuna.trial.create_trial(params={"forest_weight": 0.5}, distributions=dist,
                                              state=optuna.trial.TrialState.FAIL))
    assert best_trial(study).number == 0 and best_trial(study).params == {"forest_weight": 0.6}


def test_first_trial_of_a_new_study_is_the_starting_point(tmp_path):
    from esxi_anomaly.synth import generate

    ds = generate(days=2, seed=4, scenario="small", attack_days=0, scale=0.3)
    cfg = TrainConfig(env="lab", seed=1, trials=1, model={"forest_weight": 0.45, "n_estimators": 50},
                            study_storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    best, summary = tune(Frames(ds.connections, ds.dns_answers, ds.inventory), cfg)
    assert summary["best_trial"] == 0 and summary["trials"] == 1
    assert best == starting_point(cfg) == {"min_window_s": 300.0, "baseline_alpha": 5.0, "forest_weight": 0.45,
                                           "forest_floor": 0.9, "n_estimators": 50, "max_samples": 256}
    assert summary["best_average_precision"] > 0.5


def test_study_name_follows_the_objective_not_the_trial_count():
    """Same data, labels and objective settings: one study, whatever `trials`, storage, feedback path or
    starting values; different data, labels or seed: another."""
    from esxi_anomaly.synth import generate

    ds = generate(days=1, seed=4, scenario="small", attack_days=0, scale=0.05)
    frames = Frames(ds.connections, ds.dns_answers, ds.inventory)
    labels = pd.DataFrame({"event_id": ["a"], "label": ["attack"], "family": ["x"]})
    cfg = TrainConfig(env="lab", seed=1, trials=2)
    name = study_name(frames, cfg, labels)
    assert name.startswith("lab-")
    same = TrainConfig(env="lab", seed=1, trials=40, study_storage="sqlite:///elsewhere.db",
                             feedback_path="/x/feedback.csv", model={"forest_weight": 0.3})
    assert study_name(frames, same, labels) == name
    fewer = Frames(ds.connections.iloc[1:], ds.dns_answers, ds.inventory)
    others = [study_name(fewer, cfg, labels), study_name(frames, cfg, labels.assign(label="benign")),
              study_name(frames, TrainConfig(env="lab", seed=2), labels),
              study_name(frames, TrainConfig(env="lab", seed=1, model={"grace_s": 30.0}), labels),
              study_name(frames, TrainConfig(env="lab2", seed=1), labels)]
    assert len(set(others + [name])) == 6


def test_tuning_resumes_its_study_to_the_total_and_never_repeats_parameters(tmp_path, estate):
    """`trials` is the study's total: 2, then 4 resumes the same study with 2 new parameter sets (the
    sampler is not re-seeded as in the first run), then 4 again runs nothing."""
    import optuna

    history, _ = estate
    # n_estimators inside the space: the first trial draws nothing from the sampler
    cfg = TrainConfig(env="lab", seed=3, model={"n_estimators": 50}, trials=2,
                      study_storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    best, first = tune(history, cfg)
    assert first["trials"] == first["trials_run"] == 2 and set(best) >= {"forest_weight", "min_window_s"}
    assert 0.0 <= first["best_average_precision"] <= 1.0
    cfg = cfg.replace(trials=4)
    _, second = tune(history, cfg)
    assert second["study"] == first["study"] and second["trials"] == 4 and second["trials_run"] == 2
    trials = optuna.load_study(study_name=first["study"], storage=cfg.study_storage).trials
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.params not in [old.params for old in trials[:2]] for t in trials[2:])
    assert trials[2].params != trials[3].params
    _, third = tune(history, cfg)
    assert third["study"] == first["study"] and third["trials"] == 4 and third["trials_run"] == 0
    assert len(optuna.load_study(study_name=first["study"], storage=cfg.study_storage).trials) == 4


def test_the_configured_search_space_is_the_one_searched(tmp_path, estate):
    """Only the parameters of `[tuning.search_space]`, within its bounds; another space is another study."""
    history, _ = estate
    path = tmp_path / "train.toml"
    path.write_text(f'env = "lab"\nseed = 3\ntrials = 3\nstudy_storage = "sqlite:///{tmp_path / "optuna.db"}"\n'
                    "[model]\nn_estimators = 40\n"
                    "[tuning.search_space.forest_weight]\nchoices = [0.3, 0.6]\n"
                    "[tuning.search_space.max_samples]\nlow = 64\nhigh = 128\nstep = 64\n")
    cfg = TrainConfig.from_toml(path)
    best, summary = tune(history, cfg)
    trials = optuna.load_study(study_name=summary["study"], storage=cfg.study_storage).trials
    assert len(trials) == 3 and trials[0].params["forest_weight"] == 0.6   # the starting point (max_samples drawn)
    assert set(best) == {"forest_weight", "max_samples"} and all(t.params.keys() == best.keys() for t in trials)
    assert all(t.params["forest_weight"] in (0.3, 0.6) and t.params["max_samples"] in (64, 128) for t in trials)
    labels = pd.DataFrame({"event_id": ["a"], "label": ["attack"], "family": ["x"]})
    narrower = cfg.replace(tuning={"search_space": {"forest_weight": {"choices": [0.3, 0.6]}}})
    assert study_name(history, cfg, labels) != study_name(history, narrower, labels)
