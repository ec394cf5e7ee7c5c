"""Per-environment fitting: rule overrides, analyst feedback, the held-out slice, odd histories."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from esxi_anomaly import registry
from esxi_anomaly.feedback import apply_suppressions
from esxi_anomaly.schema import Frames
from esxi_anomaly.training import TrainConfig, fit_model, refit_model, split_holdout, train_environment, validate


def config(tmp_path, text: str = "") -> TrainConfig:
    path = tmp_path / "env.toml"
    path.write_text('env = "lab"\nseed = 3\n[model]\nn_estimators = 40\n' + text)
    return TrainConfig.from_toml(path)


def test_rule_override_from_config_changes_scores(tmp_path, estate):
    history, today = estate
    base = fit_model(history, config(tmp_path)).score(today)
    fired = base["rules"].str.contains("repeated_derivation")
    assert fired.any()
    off = config(tmp_path, "[rules.repeated_derivation]\nenabled = false\n")
    changed = fit_model(history, off).score(today).set_index("event_id").loc[base["event_id"]]
    assert not changed["rules"].str.contains("repeated_derivation").any()
    # rows that fired the disabled rule lose score; rows that did not keep it exactly
    assert (changed["score"].to_numpy()[fired.to_numpy()] < base["score"].to_numpy()[fired.to_numpy()]).all()
    np.testing.assert_array_equal(changed["score"].to_numpy()[~fired.to_numpy()],
                                  base["score"].to_numpy()[~fired.to_numpy()])


def test_feedback_changes_the_next_validation(tmp_path, estate):
    history, _ = estate
    cfg = config(tmp_path).replace(feedback_path=str(registry.feedback_path(tmp_path / "models", "lab")))
    before = validate(history, cfg)
    _, holdout, _ = split_holdout(history, cfg.holdout_fraction)
    event = holdout.connections["event_id"].iloc[len(holdout.connections) // 2]
    registry.feedback_store(tmp_path / "models", "lab").add(event, "malicious", "seen C2 from this VM")
    after = validate(history, cfg)
    assert after["attacks"] == before["attacks"] + 1
    assert after["average_precision"] != before["average_precision"]


def test_benign_verdicts_become_suppressions(tmp_path):
    store = registry.feedback_store(tmp_path, "lab")
    store.add("C1", "benign", "backup agent", {"src_ip": "10.0.0.5", "query": "backup.corp", "dst_port": 9443})
    rows = pd.DataFrame({"score": [0.9, 0.5], "event_id": ["C1", "C2"], "alert": [True, False],
                         "src_ip": ["10.0.0.5", "10.0.0.6"], "query": ["backup.corp", "x.net"], "dst_port": [9443, 1117]})
    out = apply_suppressions(rows, store.suppressions())
    assert out["suppressed"].tolist() == [True, False] and out["alert"].tolist() == [False, False]
    assert out["score"].tolist() == [pytest.approx(0.09), 0.5]
    with pytest.raises(ValueError, match="verdict"):
        store.add("C3", "maybe")


def test_attacks_already_in_the_history_are_listed_and_known_labels_make_them_positives(tmp_path):
    """The held-out slice of a history that already holds C2 (here the generator's attack day): without
    labels those rows count as negatives (large estate, full volume: validation AP 0.35 instead of 0.98),
    so validation must list them for review; with the labels file they become positives."""
    from esxi_anomaly.synth import generate

    ds = generate(days=2, seed=2, scenario="small", attack_days=1, scale=0.3,
                  families=["apt12", "xor_key", "aaaa_port", "nymaim_ip"])
    frames = Frames(ds.connections, ds.dns_answers, ds.inventory)
    cfg = TrainConfig(env="lab", seed=3, model={"n_estimators": 40}, holdout_fraction=0.5)
    _, holdout, cut = split_holdout(frames, cfg.holdout_fraction)
    real = set(ds.labels.loc[ds.labels["label"] == "attack", "event_id"])
    n_real = int(holdout.connections["event_id"].isin(real).sum())
    assert cut <= ds.train_end and n_real == len(real) == 779      # the whole attack day is held out

    unlabelled = validate(frames, cfg)
    assert unlabelled["unlabelled_above_median_attack"] >= 100
    assert unlabelled["unlabelled_sources_above_median_attack"] <= 6
    c2_names = set(ds.campaigns["query"])
    assert len(unlabelled["unlabelled_examples"]) == 5
    assert all(e.split(" -> ")[1].rsplit(":", 1)[0] in c2_names for e in unlabelled["unlabelled_examples"])
    assert unlabelled["average_precision"] < 0.8
    assert "outrank half of the injected attacks" in registry.model_card(
        fit_model(Frames(ds.connections[:2000], ds.dns_answers, ds.inventory), cfg), cfg, unlabelled)

    ds.labels.to_csv(tmp_path / "labels.csv", index=False)
    cfg = cfg.replace(labels_path=str(tmp_path / "labels.csv"))
    labelled = validate(frames, cfg)
    assert labelled["attacks"] == unlabelled["attacks"] + n_real
    assert labelled["average_precision"] >= 0.99
    assert labelled["unlabelled_above_median_attack"] == 0 and labelled["unlabelled_examples"] == []


def _moved(frames: Frames, ts: float) -> Frames:
    """`frames` with the newest connection moved to `ts` (a broken clock in one log)."""
    c = frames.connections.copy()
    c.loc[c["ts"].idxmax(), "ts"] = ts
    return Frames(c, frames.dns_answers, frames.inventory)


@pytest.mark.parametrize("year, found", [(2090, "1 connections more than a day in the future"),
                                         (1995, "1 connections before 2000-01-01")])
def test_training_refuses_an_implausible_history_unless_allowed(tmp_path, estate, capsys, year, found):
    history, _ = estate
    odd = _moved(history, pd.Timestamp(f"{year}-06-01", tz="UTC").timestamp())
    cfg = config(tmp_path)
    with pytest.raises(ValueError, match=rf"{found}.*more than 400.*--allow-odd-history") as refused:
        train_environment(odd, cfg, validation=False)
    assert f"{year}-06-01" in str(refused.value)
    with pytest.raises(ValueError, match=found):
        refit_model(fit_model(history, cfg), odd)
    model = train_environment(odd, cfg, validation=False, allow_odd_history=True).model
    assert f"warning: {found}" in capsys.readouterr().err
    card = (registry.write_model(model, cfg, tmp_path / "models") / "model_card.md").read_text()
    warnings = card.split("## Warnings\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert len(warnings) == 2 and found in warnings[0] and "more than 400" in warnings[1]


def test_training_on_minutes_of_history_warns_in_stderr_and_model_card(tmp_path, estate, capsys):
    history, _ = estate
    c = history.connections
    short = c[c["ts"] < c["ts"].min() + 300]
    frames = _moved(Frames(short, history.dns_answers[history.dns_answers["ts"] < short["ts"].max()],
                           history.inventory), c["ts"].min() + 300)
    cfg = config(tmp_path)
    model = train_environment(frames, cfg, validation=False).model
    err = capsys.readouterr().err
    assert "warning: the history spans only 5.0 minutes" in err and "under a day" in err
    bundle = registry.write_model(model, cfg, tmp_path / "models")
    card = (bundle / "model_card.md").read_text()
    assert "## Warnings\n\n- the history spans only 5.0 minutes" in card
    # a normal history has no warnings section
    model = train_environment(history, cfg, validation=False).model
    assert "## Warnings" not in registry.model_card(model, cfg, {}) and model.history_warnings_ == []


def test_train_command_refuses_a_log_with_a_broken_clock_unless_allowed(tmp_path, capsys):
    import dataclasses

    from esxi_anomaly.cli import main
    from esxi_anomaly.console import EXIT_INPUT, EXIT_OK
    from esxi_anomaly.synth import generate, write_zeek

    ds = generate(days=2, seed=2, scenario="small", attack_days=0, scale=0.05)
    c = ds.connections.copy()
    c.loc[c["ts"].idxmax(), "ts"] = pd.Timestamp("2090-06-01", tz="UTC").timestamp()
    write_zeek(dataclasses.replace(ds, connections=c), tmp_path / "lab")
    argv = ["train", "--env", "lab", "--models-dir", str(tmp_path / "models"), "--trials", "0",
            "--conn", str(tmp_path / "lab" / "conn.log"), "--dns", str(tmp_path / "lab" / "dns.log")]
    assert main(argv) == EXIT_INPUT
    err = capsys.readouterr().err
    assert "implausible training history" in err and "2090-06-01" in err and "--allow-odd-history" in err
    assert not (tmp_path / "models").exists()
    assert main(argv + ["--allow-odd-history"]) == EXIT_OK
    assert "warning: 1 connections more than a day in the future" in capsys.readouterr().err
    card = next((tmp_path / "models" / "lab").glob("*/model_card.md")).read_text()
    assert "## Warnings" in card and "2090-06-01" in card


def test_train_environment_leaves_the_callers_config_unchanged_and_returns_the_tuned_one(tmp_path, estate):
    history, _ = estate
    cfg = TrainConfig(env="lab", seed=3, model={"n_estimators": 40, "forest_weight": 0.45}, trials=1,
                      study_storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    before = cfg.record()
    trained = train_environment(history, cfg, validation=False)
    assert cfg.record() == before and cfg.detector_params() == {"n_estimators": 40, "forest_weight": 0.45}
    # the returned config holds the tuned parameters (n_estimators=40 lies outside the space: drawn anew)
    tuned = trained.tuning["best_params"]
    assert trained.config.detector_params() == {"n_estimators": 40, "forest_weight": 0.45, **tuned}
    assert tuned["forest_weight"] == 0.45 and tuned["n_estimators"] != 40
    assert {k: trained.model.get_params()[k] for k in tuned} == tuned
    # and it is the one the bundle records
    manifest = registry.load_model(registry.write_model(trained.model, trained.config, tmp_path / "models"))[1]
    assert manifest["config"]["model"] == trained.config.detector_params()


def test_model_card_states_the_alert_level_and_the_alerts_a_day_of_the_history(tmp_path, estate):
    history, today = estate
    cfg = config(tmp_path)
    clean = fit_model(history, cfg)
    card = registry.model_card(clean, cfg, {})
    assert f"- alert level (score): {clean.threshold_:.4f} (quantile 0.999 of the training scores of rows " \
           "without evidence)" in card
    assert "- expected alerts per day on the training history: 0.0 (alerts the model raises" in card
    # a history holding the attack day: its attacks alert on it (the level does not rise above them)
    dirty = fit_model(Frames(pd.concat([history.connections, today.connections], ignore_index=True),
                             pd.concat([history.dns_answers, today.dns_answers]).drop_duplicates(ignore_index=True),
                             history.inventory), cfg)
    assert dirty.training_alerts_per_day_ > 50
    assert f"training history: {dirty.training_alerts_per_day_:,.1f} (" in registry.model_card(dirty, cfg, {})
    assert abs(dirty.threshold_ - clean.threshold_) < 0.05


def test_training_warns_when_the_level_is_above_every_training_score(tmp_path, estate, capsys, monkeypatch):
    from esxi_anomaly import model as M
    from esxi_anomaly.detect import ensemble

    assert M.level_findings(0.6, 0.7) == [] and M.level_findings(0.6, 0.6) == []
    history, _ = estate
    cfg = config(tmp_path)
    monkeypatch.setattr(ensemble, "alert_level", lambda scores, q: 2.0)   # above any score in [0, 1]
    model = train_environment(history, cfg, validation=False).model
    assert "warning: the alert level 2.0000 is above the top training score" in capsys.readouterr().err
    card = (registry.write_model(model, cfg, tmp_path / "models") / "model_card.md").read_text()
    assert "## Warnings\n\n- the alert level 2.0000 is above the top training score" in card
