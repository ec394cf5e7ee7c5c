"""The canonical inventory CSV reader: normalisation, quarantine of bad rows, sniffing."""
from __future__ import annotations

import pytest

from esxi_anomaly import schema
from esxi_anomaly.ingest import IngestError, Quarantine, ReadSummary, detect_format, read_inventory
from esxi_anomaly.ingest.inventory_csv import sniff


def test_reads_fixture_with_exact_rows_and_quarantine(fixtures):
    path = str(fixtures / "inventory" / "inventory.csv")
    quarantine, summary = Quarantine(), ReadSummary()
    inv = read_inventory(path, quarantine, summary)
    schema.validate(inv, "inventory")
    assert inv.to_dict("records") == [
        {"ip": "10.0.0.11", "name": "vm-web-01", "kind": "vm", "esxi_host": "esx-01", "role": "web"},
        {"ip": "10.0.0.5", "name": "esx-01", "kind": "esxi_mgmt", "esxi_host": "esx-01", "role": "esxi_mgmt"},
        {"ip": "10.0.0.2", "name": "vcsa", "kind": "vcenter", "esxi_host": "", "role": "mgmt"},
        # IPv6 normalised to the compressed lower-case form logs use
        {"ip": "2001:db8::1", "name": "dns-01", "kind": "infra", "esxi_host": "esx-02", "role": "dns"},
        # missing name -> the IP, missing kind -> unknown
        {"ip": "10.0.0.13", "name": "10.0.0.13", "kind": "unknown", "esxi_host": "esx-02", "role": "unknown"},
    ]
    bad = quarantine.to_frame()
    assert bad[["line", "reason"]].values.tolist() == [
        [6, "invalid IP address"],
        [7, "unknown kind 'database' (expected one of vm, esxi_mgmt, vcenter, infra, unknown)"],
        [9, "2 fields, expected 6"],
    ]
    assert bad.raw.iloc[0] == "10.0.0.999,broken-ip,vm,esx-01,web,"
    assert (summary.kept, summary.quarantined) == (5, 3)


def test_optional_columns_any_order_case_and_powershell_type_line(tmp_path):
    path = tmp_path / "export.csv"
    path.write_text('#TYPE Selected.Foo\n"Kind","Name","IP"\nvm,"web, 1",10.1.1.1\n', encoding="utf-8-sig")
    inv = read_inventory(str(path))
    assert inv.to_dict("records") == [
        {"ip": "10.1.1.1", "name": "web, 1", "kind": "vm", "esxi_host": "", "role": "vm"}
    ]


def test_last_row_wins_for_duplicate_ip(tmp_path):
    path = tmp_path / "inv.csv"
    path.write_text("ip,name,kind\n10.1.1.1,old,vm\n10.1.1.1,new,vm\n")
    assert read_inventory(str(path)).name.tolist() == ["new"]


def test_huge_field_is_quarantined_not_raised(tmp_path):
    path = tmp_path / "inv.csv"
    path.write_text("ip,name,kind\n10.1.1.1," + "x" * 200_000 + ",vm\n10.1.1.2,b,vm\n")
    quarantine = Quarantine()
    inv = read_inventory(str(path), quarantine)
    assert inv.ip.tolist() == ["10.1.1.2"]
    assert len(quarantine) == 1 and "unreadable CSV row" in quarantine.records[0].reason


@pytest.mark.parametrize(
    "head, expected",
    [
        (b"ip,name,kind\n", True),
        (b"\xef\xbb\xbfIP, Name ,KIND,role\n", True),
        (b"ip,name\n10.0.0.1,a\n", False),
        (b"#separator \\x09\n#fields\tts\tuid\n", False),
        (b"\x00\x01\x02binary", False),
        (b"", False),
    ],
)
def test_sniff(head, expected):
    assert sniff(head) is expected


def test_not_an_inventory_is_rejected_by_the_shared_api(tmp_path):
    path = tmp_path / "notes.csv"
    path.write_text("host,address\nweb,10.0.0.1\n")
    with pytest.raises(IngestError, match=r"notes\.csv: not a known inventory format \(tried: inventory_csv"):
        read_inventory(str(path))
    with pytest.raises(IngestError):
        detect_format(str(path), "inventory")
