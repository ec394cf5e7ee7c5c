"""PowerCLI Export-Csv and govc JSON inventory exports -> inventory rows (one per IP), with roles.

No real export exists (formats.md (g) "Gaps"): the fixtures in `inventory_exports/` are
constructed from the documented headers and object shapes (see that folder's README).
"""
from __future__ import annotations

import logging
import os
import tempfile

import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from esxi_anomaly import schema
from esxi_anomaly.ingest import inventory_govc, inventory_powercli
from esxi_anomaly.ingest.base import IngestError, Quarantine, detect_format

COLS = ["ip", "name", "kind", "esxi_host", "role"]


def read_all(module, path, quarantine=None) -> pd.DataFrame:
    quarantine = quarantine if quarantine is not None else Quarantine()
    chunks = list(module.read(str(path), quarantine, 2))
    out = pd.concat(chunks, ignore_index=True) if chunks else schema.empty("inventory")
    schema.validate(out, "inventory")
    return out


def test_powercli_get_vm(fixtures, caplog):
    q = Quarantine()
    with caplog.at_level(logging.INFO):
        df = read_all(inventory_powercli, fixtures / "inventory_exports/powercli_get_vm.csv", q)
    assert df[COLS].values.tolist() == [
        ["10.1.0.10", "dc01", "vm", "esx01.lab.local", "domain_controller"],
        ["fe80::250:56ff:fe01:1", "dc01", "vm", "esx01.lab.local", "domain_controller"],
        ["10.1.0.30", "app-7", "vm", "esx02.lab.local", "vm"],
        ["10.1.0.20", "web-02", "vm", "esx01.lab.local", "web"],
    ]
    assert [(r.line, r.reason.split(":")[0]) for r in q.records] == [(7, "IP list exported as System.Object[]")]
    assert "skipped 1 rows without any IP address" in caplog.text  # off-vm (tpl is quarantined instead)


def test_powercli_get_vmhost_utf16_semicolons(fixtures):
    df = read_all(inventory_powercli, fixtures / "inventory_exports/powercli_get_vmhost_usculture_utf16.csv")
    assert df[COLS].values.tolist() == [
        ["10.0.0.11", "esx01.lab.local", "esxi_mgmt", "esx01.lab.local", "esxi_mgmt"],
        ["10.0.0.12", "10.0.0.12", "esxi_mgmt", "10.0.0.12", "esxi_mgmt"],
    ]


def test_powercli_bad_rows(tmp_path):
    path = tmp_path / "vms.csv"
    path.write_text('Name,VMHost,IPAddress\nok,esx1,10.0.0.1;10.0.0.2\nshort,esx1\nbad,esx1,10.0.0.3 not-an-ip 999.1.1.1\n')
    q = Quarantine()
    df = read_all(inventory_powercli, path, q)
    assert df["ip"].tolist() == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert [(r.line, r.reason, r.raw) for r in q.records] == [
        (3, "row has 2 fields, the header has 3", "short,esx1"),
        (4, "not an IP address", "not-an-ip"), (4, "not an IP address", "999.1.1.1")]


def test_govc_vm_and_host_info(fixtures, caplog):
    with caplog.at_level(logging.INFO):
        df = read_all(inventory_govc, fixtures / "inventory_exports/govc_vm_info.json")
    assert df[COLS].values.tolist() == [
        ["10.2.0.5", "web-01", "vm", "esx01.lab.local", "web"],
        ["fe80::250:56ff:feaa:bb01", "web-01", "vm", "esx01.lab.local", "web"],
        ["10.3.0.5", "web-01", "vm", "esx01.lab.local", "web"],
        ["10.0.0.11", "esx01.lab.local", "esxi_mgmt", "esx01.lab.local", "esxi_mgmt"],
        ["10.0.1.11", "esx01.lab.local", "esxi_mgmt", "esx01.lab.local", "esxi_mgmt"],
    ]
    assert "skipped 1 objects" in caplog.text  # the template without IP


def test_govc_legacy_ls_and_object_collect(fixtures):
    legacy = read_all(inventory_govc, fixtures / "inventory_exports/govc_vm_info_legacy.json")
    assert legacy[COLS].values.tolist() == [["10.9.0.53", "dns-01", "vm", "host-9", "dns_server"]]
    ls = read_all(inventory_govc, fixtures / "inventory_exports/govc_ls.json")
    assert ls[COLS].values.tolist() == [["10.4.0.9", "db-01", "vm", "host-3", "database"]]
    collected = read_all(inventory_govc, fixtures / "inventory_exports/govc_object_collect.json")
    assert collected[COLS].values.tolist() == [["10.5.0.7", "jump-01", "vm", "host-4", "jump_host"]]


def test_folder_rules_reach_the_readers(fixtures, tmp_path, monkeypatch):
    # the readers pass folder and tags to roles.assign_roles; a site file can key on them
    rules = tmp_path / "roles.toml"
    rules.write_text('[[rule]]\nrole = "databases"\nfolder = "prod/databases"\n')
    from esxi_anomaly.ingest import roles

    real = roles.assign_roles
    monkeypatch.setattr(inventory_govc, "assign_roles", lambda df: real(df, rules))
    ls = read_all(inventory_govc, fixtures / "inventory_exports/govc_ls.json")
    assert ls["role"].tolist() == ["databases"]


def test_sniffers_and_registry(fixtures, samples, tmp_path):
    inv = fixtures / "inventory_exports"
    assert detect_format(str(inv / "powercli_get_vm.csv"), "inventory").name == "powercli_csv"
    assert detect_format(str(inv / "powercli_get_vmhost_usculture_utf16.csv"), "inventory").name == "powercli_csv"
    for name in ("govc_vm_info.json", "govc_vm_info_legacy.json", "govc_ls.json", "govc_object_collect.json"):
        assert detect_format(str(inv / name), "inventory").name == "govc_json"
        assert not inventory_powercli.sniff((inv / name).read_bytes())
    canonical = b"ip,name,kind,esxi_host,role\n10.0.0.1,vm1,vm,esx1,web\n"
    assert not inventory_powercli.sniff(canonical) and not inventory_govc.sniff(canonical)
    assert not inventory_govc.sniff((samples / "windows-dns-analytical-elastic-integrations/test-events.json").read_bytes())
    rvtools = b"VM,Powerstate,Template,SRM Placeholder,Config status,DNS Name,Connection state,Host\n"
    assert not inventory_powercli.sniff(rvtools)


def test_govc_invalid_json_is_quarantined(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"virtualMachines": [{"name": "x", "guest": {"ipAddress": "10.0.0.1"')
    q = Quarantine()
    assert len(read_all(inventory_govc, path, q)) == 0
    assert q.records[0].reason.startswith("invalid JSON")


def _read_bytes(module, data: bytes):
    fd, path = tempfile.mkstemp()
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        try:
            return read_all(module, path)
        except IngestError:
            return schema.empty("inventory")
    finally:
        os.unlink(path)


@settings(max_examples=40, deadline=None)
@given(garbage=st.lists(st.text(max_size=80), max_size=6), where=st.integers(0, 6))
def test_powercli_valid_rows_survive_garbage_rows(garbage, where):
    lines = [g.replace("\n", " ").replace("\r", " ").replace('"', "") for g in garbage]
    lines.insert(min(where, len(lines)), '"vm-a","esx1","10.7.7.7"')
    text = '"Name","VMHost","IPAddress"\n' + "\n".join(lines) + "\n"
    df = _read_bytes(inventory_powercli, text.encode("utf-8", "surrogatepass"))
    assert df[df["name"] == "vm-a"]["ip"].tolist() == ["10.7.7.7"]


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_mutated_exports_never_raise(fixtures, data):
    for name, module in (("powercli_get_vm.csv", inventory_powercli), ("govc_vm_info.json", inventory_govc)):
        raw = (fixtures / "inventory_exports" / name).read_bytes()
        pos = data.draw(st.integers(0, len(raw)))
        junk = data.draw(st.binary(max_size=20))
        _read_bytes(module, raw[:pos] + junk + raw[pos + data.draw(st.integers(0, 20)):])
