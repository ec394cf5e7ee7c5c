"""Per-environment training: configs, rule overrides, analyst feedback, Optuna studies."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from esxi_anomaly import train
from esxi_anomaly.feedback import FeedbackStore, apply_suppressions
from esxi_anomaly.schema import Frames


@pytest.fixture(scope="module")
def estate():
    from esxi_anomaly.synth import generate

    ds = generate(days=3, seed=2, scenario="default", attack_days=1, scale=0.05)
    c, d = ds.connections, ds.dns_answers
    history = Frames(c[c["ts"] < ds.train_end], d[d["ts"] < ds.train_end], ds.inventory)
    today = Frames(c[c["ts"] >= ds.train_end], d[d["ts"] >= ds.train_end - 3700], ds.inventory)
    return history, today


def config(tmp_path, text: str = "") -> train.TrainConfig:
    path = tmp_path / "env.toml"
    path.write_text('env = "lab"\nseed = 3\n[model]\nn_estimators = 40\n' + text)
    return train.TrainConfig.from_toml(path)


def test_rule_override_from_config_changes_scores(tmp_path, estate):
    history, today = estate
    base = train.fit_model(history, config(tmp_path)).score(today)
    fired = base["rules"].str.contains("repeated_derivation")
    assert fired.any()
    off = config(tmp_path, "[rules.repeated_derivation]\nenabled = false\n")
    changed = train.fit_model(history, off).score(today).set_index("event_id").loc[base["event_id"]]
    assert not changed["rules"].str.contains("repeated_derivation").any()
    # rows that fired the disabled rule lose score; rows that did not keep it exactly
    assert (changed["score"].to_numpy()[fired.to_numpy()] < base["score"].to_numpy()[fired.to_numpy()]).all()
    np.testing.assert_array_equal(changed["score"].to_numpy()[~fired.to_numpy()],
                                  base["score"].to_numpy()[~fired.to_numpy()])


def test_unknown_model_parameter_is_refused(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[model]\nn_trees = 5\n")
    with pytest.raises(ValueError, match="n_trees"):
        train.TrainConfig.from_toml(path)


def test_feedback_changes_the_next_validation(tmp_path, estate):
    history, _ = estate
    cfg = config(tmp_path)
    cfg.feedback_path = str(tmp_path / "models" / "lab" / "feedback.csv")
    before = train.validate(history, cfg)
    _, holdout, _ = train.split_holdout(history, cfg.holdout_fraction)
    event = holdout.connections["event_id"].iloc[len(holdout.connections) // 2]
    FeedbackStore(tmp_path / "models", "lab").add(event, "malicious", "seen C2 from this VM")
    after = train.validate(history, cfg)
    assert after["attacks"] == before["attacks"] + 1
    assert after["average_precision"] != before["average_precision"]


def test_benign_verdicts_become_suppressions(tmp_path):
    store = FeedbackStore(tmp_path, "lab")
    store.add("C1", "benign", "backup agent", {"src_ip": "10.0.0.5", "query": "backup.corp", "dst_port": 9443})
    rows = pd.DataFrame({"score": [0.9, 0.5], "event_id": ["C1", "C2"], "alert": [True, False],
                         "src_ip": ["10.0.0.5", "10.0.0.6"], "query": ["backup.corp", "x.net"], "dst_port": [9443, 1117]})
    out = apply_suppressions(rows, store.suppressions())
    assert out["suppressed"].tolist() == [True, False] and out["alert"].tolist() == [False, False]
    assert out["score"].tolist() == [pytest.approx(0.09), 0.5]
    with pytest.raises(ValueError, match="verdict"):
        store.add("C3", "maybe")


def test_tuning_persists_and_resumes_its_study(tmp_path, estate):
    history, _ = estate
    cfg = config(tmp_path)
    cfg.trials = 2
    cfg.study_storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    from esxi_anomaly.tuning import tune

    best, summary = tune(history, cfg)
    assert summary["trials"] == 2 and set(best) >= {"forest_weight", "min_window_s"}
    assert 0.0 <= summary["best_average_precision"] <= 1.0
    _, again = tune(history, cfg)        # same study name and storage: continues, does not restart
    assert again["trials"] == 4 and again["study"] == summary["study"]


def test_attacks_already_in_the_history_are_listed_and_known_labels_make_them_positives(tmp_path):
    """The held-out slice of a history that already holds C2 (here the generator's attack day): without
    labels those rows count as negatives (large estate, full volume: validation AP 0.35 instead of 0.98),
    so validation must list them for review; with the labels file they become positives."""
    from esxi_anomaly.synth import generate

    ds = generate(days=2, seed=2, scenario="small", attack_days=1, scale=0.3,
                  families=["apt12", "xor_key", "aaaa_port", "nymaim_ip"])
    frames = Frames(ds.connections, ds.dns_answers, ds.inventory)
    cfg = train.TrainConfig(env="lab", seed=3, model={"n_estimators": 40}, holdout_fraction=0.5)
    _, holdout, cut = train.split_holdout(frames, cfg.holdout_fraction)
    real = set(ds.labels.loc[ds.labels["label"] == "attack", "event_id"])
    n_real = int(holdout.connections["event_id"].isin(real).sum())
    assert cut <= ds.train_end and n_real == len(real) == 779      # the whole attack day is held out

    unlabelled = train.validate(frames, cfg)
    assert unlabelled["unlabelled_above_median_attack"] >= 100
    assert unlabelled["unlabelled_sources_above_median_attack"] <= 6
    c2_names = set(ds.campaigns["query"])
    assert len(unlabelled["unlabelled_examples"]) == 5
    assert all(e.split(" -> ")[1].rsplit(":", 1)[0] in c2_names for e in unlabelled["unlabelled_examples"])
    assert unlabelled["average_precision"] < 0.8
    assert "outrank half of the injected attacks" in train.model_card(
        train.fit_model(Frames(ds.connections[:2000], ds.dns_answers, ds.inventory), cfg), cfg, unlabelled)

    ds.labels.to_csv(tmp_path / "labels.csv", index=False)
    cfg.labels_path = str(tmp_path / "labels.csv")
    labelled = train.validate(frames, cfg)
    assert labelled["attacks"] == unlabelled["attacks"] + n_real
    assert labelled["average_precision"] >= 0.99
    assert labelled["unlabelled_above_median_attack"] == 0 and labelled["unlabelled_examples"] == []
