"""Scenario files are checked like the training config: every key, its type and range, with the file named."""
from __future__ import annotations

from pathlib import Path

import pytest

from esxi_anomaly.config import ConfigError
from esxi_anomaly.synth.scenario import builtin_scenarios, load_scenario

EXAMPLE = Path(__file__).resolve().parents[2] / "datasets" / "scenarios" / "example.toml"


@pytest.mark.parametrize("name", builtin_scenarios())
def test_every_builtin_scenario_is_valid(name):
    assert load_scenario(name).name == name


def test_the_example_file_loads_with_its_values():
    scenario = load_scenario(EXAMPLE)
    assert (scenario.esxi_hosts, scenario.vms["vdi"], scenario.vms["file"]) == (3, 20, 1)
    assert scenario.default_families == ("apt12", "xor_key")
    assert scenario.start == 1709510400.0   # 2024-03-04T00:00:00Z


@pytest.mark.parametrize("text, message", [
    ('esxi_host = 3\n', "esxi_host: unknown key; known: name, description"),
    ('esxi_hosts = "4"\n', "esxi_hosts: expected an integer, got '4'"),
    ('esxi_hosts = 0\n', "esxi_hosts: expected greater than or equal to 1, got 0"),
    ('[vms]\nweb = 2\ndesk = 3\n', "[vms] desk: unknown key; known: web, app, db, vdi, build, file, mon"),
    ('[vms]\nweb = -1\n', "[vms] web: expected greater than or equal to 0, got -1"),
    ('default_families = "apt12"\n', "default_families: expected a list, got 'apt12'"),
    ('start = "Monday"\n', "expected an ISO 8601 time"),
    ('volume = 0\n', "volume: expected greater than 0, got 0"),
    ('name = [1\n', "not valid TOML"),
])
def test_a_bad_scenario_file_is_refused_naming_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        load_scenario(path)
    assert str(error.value).startswith(f"{path}: ")
    assert message in str(error.value)


def test_volume_may_be_written_as_a_whole_number(tmp_path):
    path = tmp_path / "whole.toml"
    path.write_text("volume = 2\n", encoding="utf-8")
    assert load_scenario(path).volume == 2.0


def test_an_unknown_name_says_which_scenarios_exist():
    with pytest.raises(ConfigError, match="not one of .*default"):
        load_scenario("no-such-scenario")
