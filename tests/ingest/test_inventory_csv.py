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


# --- properties -----------------------------------------------------------------------------

import csv  # noqa: E402

import pandas as pd  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from esxi_anomaly.ingest import iter_frames  # noqa: E402
from tests.ingest._lines import mutate

HEADER = b"ip,name,kind,esxi_host,role"
# (line, the (ip, name, kind, esxi_host) it must give)
VALID = [
    (b"10.0.0.11,vm-web-01,vm,esx-01,web", ("10.0.0.11", "vm-web-01", "vm", "esx-01")),
    (b"10.0.0.5,esx-01,esxi_mgmt,esx-01,", ("10.0.0.5", "esx-01", "esxi_mgmt", "esx-01")),
    (b'10.0.0.2,"vcsa, main",VCenter,,mgmt', ("10.0.0.2", "vcsa, main", "vcenter", "")),
    (b"2001:DB8::1,dns-01,infra,esx-02,dns", ("2001:db8::1", "dns-01", "infra", "esx-02")),
    (b"10.0.0.13,,,esx-02,", ("10.0.0.13", "10.0.0.13", "unknown", "esx-02")),
]


def _mutate_csv(line: bytes, data) -> bytes:
    return mutate(line, data, b",", 1000)


def _junk(data, quotes: bool) -> bytes:
    if data.draw(st.booleans()):
        blob = data.draw(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
    else:
        blob = _mutate_csv(data.draw(st.sampled_from(VALID))[0], data)
    blob = blob.replace(b"\n", b" ").replace(b"\r", b" ")   # one physical line each
    return blob if quotes else blob.replace(b'"', b"'")


def _rows(path: str, quarantine: Quarantine) -> pd.DataFrame:
    chunks = list(iter_frames(path, "inventory", quarantine))   # all rows, not deduplicated
    return pd.concat(chunks, ignore_index=True) if chunks else schema.empty("inventory")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_and_mutated_lines_never_break_the_reader(tmp_path, data):
    """Anything anywhere (quotes that run on, a broken header, ...): only IngestError may escape."""
    lines = [HEADER] + [line for line, _ in VALID]
    for _ in range(data.draw(st.integers(1, 6))):
        lines.insert(data.draw(st.integers(0, len(lines))), _junk(data, quotes=True))
    path = tmp_path / "inv.csv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    quarantine = Quarantine()
    try:
        inv = read_inventory(str(path), quarantine)
    except IngestError:
        return
    schema.validate(inv, "inventory")
    assert all(0 <= r.line <= len(lines) for r in quarantine.records)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_valid_rows_mixed_with_garbage_are_all_kept(tmp_path, data):
    """Garbage lines (no quote character, which could legally join lines) after the header: every
    valid row is kept exactly, only garbage lines are blamed, and no line vanishes silently."""
    body: list[tuple[bytes, bool]] = [(line, True) for line, _ in VALID]
    for _ in range(data.draw(st.integers(1, 6))):
        body.insert(data.draw(st.integers(0, len(body))), (_junk(data, quotes=False), False))
    path = tmp_path / "inv.csv"
    path.write_bytes(b"\n".join([HEADER] + [line for line, _ in body]) + b"\n")
    quarantine = Quarantine()
    rows = _rows(str(path), quarantine)
    kept = set(rows[["ip", "name", "kind", "esxi_host"]].itertuples(index=False, name=None))
    assert {expected for _, expected in VALID} <= kept
    junk_lines = {2 + i for i, (_, ok) in enumerate(body) if not ok}
    assert {r.line for r in quarantine.records} <= junk_lines
    blank = sum(1 for line, ok in body if not ok and all(
        not cell.strip() for cell in next(csv.reader([line.decode("utf-8", "replace")]), [])))
    assert len(rows) + len(quarantine) + blank == len(body)
    schema.validate(rows, "inventory")
