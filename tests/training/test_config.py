"""The training config: unknown keys, wrong types and impossible search spaces are refused with the file,
the key and what was expected, before any input is read; a config never changes under its caller."""
from __future__ import annotations

import pydantic
import pytest

from esxi_anomaly.training import ConfigError, TrainConfig
from esxi_anomaly.training.config import DEFAULT_SEARCH_SPACE


def refused(tmp_path, text: str) -> str:
    path = tmp_path / "train.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        TrainConfig.from_toml(path)
    return str(error.value)


@pytest.mark.parametrize("text, message", [
    # unknown keys, at the top, in [model], in the search space and in one parameter's range
    ("bogus = 1\n", "bogus: unknown key; known: env, seed, model, "),
    ("[model]\nn_trees = 5\n", "[model] n_trees: unknown key; known: baseline_alpha, "),
    ("[tuning.search_space.n_trees]\nlow = 1\nhigh = 2\n", "[tuning.search_space] n_trees: unknown key; known: "),
    ("[tuning.search_space.forest_weight]\nlow = 0.2\nhigh = 0.9\nlog_scale = true\n",
     "[tuning.search_space.forest_weight] log_scale: unknown key; known: log, low, high, step, choices"),
    # wrong types: of the key, of a [model] parameter, of a bound (integer parameters take integer bounds)
    ('seed = "three"\n', "seed: expected an integer, got 'three'"),
    ("trials = true\n", "trials: expected an integer, got True"),
    ('inject_families = "apt12"\n', "inject_families: expected a list, got 'apt12'"),
    ("[model]\nn_estimators = 1.5\n", "[model] n_estimators: expected an integer, got 1.5"),
    ('[model]\nforest_weight = "high"\n', "[model] forest_weight: expected a number, got 'high'"),
    ('[tuning.search_space.n_estimators]\nlow = 50\nhigh = "ten"\n',
     "[tuning.search_space.n_estimators] high: expected an integer, got 'ten'"),
    ('[tuning.search_space.max_samples]\nchoices = [128, "all"]\n',
     "[tuning.search_space.max_samples] choices[1]: expected an integer, got 'all'"),
    ('mgmt_allow = [["*", "syslog", "tcp", 6514, 6514]]\n', "mgmt_allow[0]: expected at least 6 items, got 5"),
    ("rules = 3\n", "rules: expected a table, got 3"),
    # values no run could use
    ("holdout_fraction = 1.5\n", "holdout_fraction: expected less than 1, got 1.5"),
    ('inject_families = ["apt12", "apt99"]\n', "inject_families: expected attack families of ["),
    ('env = "../etc"\n', "env: environment name '../etc' is not allowed"),
])
def test_bad_keys_and_types_are_refused_with_file_key_and_expected_type(tmp_path, text, message):
    assert refused(tmp_path, text).startswith(f"{tmp_path / 'train.toml'}: {message}")


@pytest.mark.parametrize("spec, message", [
    ("low = 0.95\nhigh = 0.9", "low: expected at most high (0.9), got 0.95"),
    ("low = 0.0\nhigh = 0.9\nlog = true", "low: expected above 0 with log = true, got 0.0"),
    ("low = 0.2\nhigh = 0.9\nstep = -0.1", "step: expected above 0, got -0.1"),
    ("low = 0.2", "expected choices = [...] or both low and high"),
    ("choices = []", "choices: expected at least one value, got []"),
    ("choices = [0.3]\nlow = 0.2\nhigh = 0.9", "choices: expected either choices or low/high, not both"),
])
def test_impossible_search_ranges_are_refused_with_the_parameter(tmp_path, spec, message):
    text = f"[tuning.search_space.forest_weight]\n{spec}\n"
    assert refused(tmp_path, text) == f"{tmp_path / 'train.toml'}: [tuning.search_space.forest_weight] {message}"


def test_tuning_needs_something_to_search(tmp_path):
    assert refused(tmp_path, "trials = 5\n[tuning]\nsearch_space = {}\n") == (
        f"{tmp_path / 'train.toml'}: [tuning] search_space: expected at least one parameter to tune with trials > 0")
    assert TrainConfig.parse({"tuning": {"search_space": {}}}).search_space() == {}   # fitting only: fine


def test_every_problem_of_a_file_is_named_at_once(tmp_path):
    message = refused(tmp_path, 'seed = "x"\ntrials = -1\n[model]\nn_trees = 5\n')
    assert message.count(str(tmp_path / "train.toml")) == 3
    assert "seed: expected an integer" in message and "trials: expected greater than or equal to 0" in message
    assert "[model] n_trees: unknown key" in message


def test_a_file_that_is_not_toml_is_refused_with_its_name(tmp_path):
    assert refused(tmp_path, "seed = = 3\n").startswith(f"{tmp_path / 'train.toml'}: not valid TOML")


def test_the_default_search_space_is_the_one_tuning_always_searched():
    """Same names, order, ranges and kinds as the hard-coded space before it was configurable: the same
    study names and the same trials."""
    assert TrainConfig().search_space() == {
        "min_window_s": [120.0, 300.0, 900.0],
        "baseline_alpha": (0.5, 20.0, {"log": True}),
        "forest_weight": (0.2, 0.9, {}),
        "forest_floor": (0.8, 0.995, {}),
        "n_estimators": (50, 300, {"step": 50}),
        "max_samples": [128, 256, 512],
    }
    assert list(TrainConfig().search_space()) == list(DEFAULT_SEARCH_SPACE)


def test_a_configured_search_space_replaces_the_default_and_is_recorded(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text("[tuning.search_space.max_samples]\nchoices = [64, 128]\n"
                    "[tuning.search_space.grace_s]\nlow = 30\nhigh = 120\n")
    cfg = TrainConfig.from_toml(path)
    # the detector's parameter order, whatever the file's; an integer-valued bound of a float parameter is a float
    assert cfg.search_space() == {"grace_s": (30.0, 120.0, {}), "max_samples": [64, 128]}
    assert cfg.record()["tuning"] == {"search_space": {"grace_s": {"low": 30.0, "high": 120.0},
                                                       "max_samples": {"choices": [64, 128]}}}
    assert cfg.digest() != TrainConfig().digest()
    # the default space, spelt out, is the default: recorded and hashed as if absent
    spelt = "".join(f"[tuning.search_space.{name}]\n" + "".join(f"{k} = {str(v).lower()}\n" for k, v in spec.items())
                    for name, spec in DEFAULT_SEARCH_SPACE.items())
    path.write_text(spelt)
    assert "tuning" not in TrainConfig.from_toml(path).record()
    assert TrainConfig.from_toml(path).digest() == TrainConfig().digest()


def test_model_parameters_are_recorded_as_written(tmp_path):
    """A bundle's manifest records the config as given: an integer written for a float parameter stays
    the integer it always was in the manifest and the config hash."""
    path = tmp_path / "train.toml"
    path.write_text("[model]\nmin_window_s = 600\nforest_weight = 0.5\nn_estimators = 40\n")
    cfg = TrainConfig.from_toml(path)
    assert cfg.detector_params() == {"min_window_s": 600, "forest_weight": 0.5, "n_estimators": 40}
    assert type(cfg.detector_params()["min_window_s"]) is int
    assert cfg.detector().get_params()["min_window_s"] == 600


def test_a_config_is_frozen_and_replace_gives_a_validated_copy():
    cfg = TrainConfig(env="lab", model={"n_estimators": 40})
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.trials = 3
    other = cfg.replace(trials=3, model={**cfg.detector_params(), "forest_weight": 0.3})
    assert (cfg.trials, cfg.detector_params()) == (0, {"n_estimators": 40})
    assert (other.trials, other.detector_params(), other.env) == (3, {"n_estimators": 40, "forest_weight": 0.3}, "lab")
    with pytest.raises(ConfigError, match=r"^config: trials: expected an integer, got 'many'$"):
        cfg.replace(trials="many")


def test_a_recorded_config_reads_back_as_the_same_config(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text('env = "lab"\nseed = 3\nmgmt_allow = [["*", "syslog", "tcp", 6514, 6514, "syslog-tls"]]\n'
                    "[model]\nn_estimators = 40\n[rules.repeated_derivation]\nenabled = false\n"
                    "[tuning.search_space.forest_weight]\nchoices = [0.3, 0.6]\n")
    cfg = TrainConfig.from_toml(path)
    again = TrainConfig.from_manifest({"config": cfg.record()})
    assert again == cfg and again.record() == cfg.record() and again.digest() == cfg.digest()
    with pytest.raises(ConfigError, match=r"^models/lab/1: config: seed: expected an integer"):
        TrainConfig.from_manifest({"config": {**cfg.record(), "seed": "x"}}, "models/lab/1")


def test_train_with_a_bad_config_exits_4_naming_it_before_reading_any_input(tmp_path, capsys):
    from esxi_anomaly.cli import main
    from esxi_anomaly.console import EXIT_INPUT

    bad = tmp_path / "bad.toml"
    bad.write_text('[tuning.search_space.n_estimators]\nlow = 50\nhigh = "ten"\n')
    argv = ["train", "--env", "lab", "--models-dir", str(tmp_path / "models"), "--config", str(bad),
            "--conn", str(tmp_path / "absent-conn.log"), "--dns", str(tmp_path / "absent-dns.log")]
    assert main(argv) == EXIT_INPUT
    err = capsys.readouterr().err
    assert f"{bad}: [tuning.search_space.n_estimators] high: expected an integer, got 'ten'" in err
    assert "absent" not in err and "[read" not in err and not (tmp_path / "models").exists()


def test_the_scope_table_is_checked_and_recorded_only_when_set(tmp_path):
    """`[scope]`: the networks trained on and scored by default; a bad CIDR is refused naming the
    key; a default config keeps its record (and hash)."""
    from esxi_anomaly.features.scope import Scope

    path = tmp_path / "lab.toml"
    path.write_text('[scope]\nlocal_nets = ["10.20.0.0/16"]\nresolvers = ["10.20.0.53"]\n')
    cfg = TrainConfig.from_toml(path)
    assert cfg.scope.scope() == Scope(("10.20.0.0/16",), ("10.20.0.53",))
    assert cfg.record()["scope"]["local_nets"] == ["10.20.0.0/16"] and "scope" not in TrainConfig().record()
    path.write_text('[scope]\nlocal_nets = ["10.20.0.0/33"]\n')
    with pytest.raises(ConfigError, match=r"scope.*10\.20\.0\.0/33.*not a CIDR"):
        TrainConfig.from_toml(path)
