"""roles.assign_roles: first matching rule wins, default role = kind, an existing role is kept."""
from __future__ import annotations

import importlib.resources

import pandas as pd
import pytest

from esxi_anomaly.ingest.roles import RoleRulesError, assign_roles, load_rules

INV = pd.DataFrame({
    "ip": ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6", "10.0.0.7"],
    "name": ["dc01.corp", "web-02", "esx01", "app-7", "sql1", "build-agent", "nsdc"],
    "kind": ["vm", "vm", "esxi_mgmt", "vm", "vm", "vm", "vm"],
    "folder": ["", "", "", "/DC1/vm/Infra/DNS/east", "", "/DC1/vm/CI", ""],
    "tags": ["", "", "", "", "", "Env/Prod; Role/Runner", ""],
    "role": ["", "", "", "", "analyst-set", "", ""],
})


def test_packaged_default_rules():
    assert importlib.resources.files("esxi_anomaly").joinpath("data", "inventory_roles.toml").is_file()
    assert [r.role for r in load_rules()] == ["domain_controller", "dns_server", "database", "web", "backup", "jump_host"]
    out = assign_roles(INV)
    assert out["role"].tolist() == ["domain_controller", "web", "esxi_mgmt", "vm", "analyst-set", "vm", "vm"]
    assert INV["role"].tolist()[0] == ""  # the input is not modified


def test_rules_file_and_extra_rules_first_match_wins(tmp_path):
    rules = tmp_path / "site.toml"
    rules.write_text(
        '[[rule]]\nrole = "dns"\nfolder = "infra/dns"\n\n'
        '[[rule]]\nrole = "ci"\ntag = "role/runner"\n\n'
        '[[rule]]\nrole = "everything-vm"\nkind = "vm"\n')
    out = assign_roles(INV, rules, extra=[{"role": "lab", "name_regex": "^app-"}])
    assert out["role"].tolist() == ["everything-vm", "everything-vm", "esxi_mgmt", "lab", "analyst-set", "ci", "everything-vm"]


def test_without_optional_columns():
    out = assign_roles(INV[["ip", "name", "kind"]])
    assert out["role"].tolist() == ["domain_controller", "web", "esxi_mgmt", "vm", "database", "vm", "vm"]


@pytest.mark.parametrize("text, message", [
    ('[[rule]]\nrole = "x"\ncolour = "red"\n', "unknown keys \\['colour'\\]"),
    ('[[rule]]\nname_regex = "a"\n', "'role' must be a non-empty string"),
    ('[[rule]]\nrole = "x"\n', "needs at least one of"),
    ('[[rule]]\nrole = "x"\nname_regex = "("\n', "does not compile"),
    ('[[rule]\n', "cannot load role rules"),
    ('rule = 3\n', "must be an array of tables"),
])
def test_invalid_rules_are_refused_with_the_reason(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(RoleRulesError, match=message):
        assign_roles(INV, path)
