"""One identity per entity: DNS clients named by host name (Sysmon EID 22) meet their connections."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from esxi_anomaly import ingest, schema
from esxi_anomaly.scoring import local, write
from esxi_anomaly.features import identity, pipeline
from esxi_anomaly.report.csv import write_csv
from esxi_anomaly.schema import Frames

INV = schema.conform(pd.DataFrame({"ip": ["10.0.0.5", "10.0.0.8", "10.0.0.9", "10.0.0.6"],
                                   "name": ["mail01", "web01.corp.local", "db01", "db01"],
                                   "kind": "vm", "role": "app"}), "inventory")


def conns(rows):
    return schema.conform(pd.DataFrame(rows, columns=["event_id", "ts", "src_ip", "dst_ip", "dst_port"]).assign(
        proto="tcp", src_port=50000, source="test"), "connections")


def dns(rows):
    return schema.conform(pd.DataFrame(rows, columns=["event_id", "ts", "client_ip", "query", "answer"]).assign(
        rtype="A", answer_index=0, rcode="NOERROR", source="sysmon_dns"), "dns_answers")


def test_lookup_matches_case_blind_full_then_short_names():
    pos, ips = identity.Identity.from_inventory(INV).lookup(
        ["MAIL01.corp.local", "WEB01", "web01.other.local", "Web01.Corp.Local.", "DB01", "ghost", "10.0.0.5"])
    assert list(zip(pos, ips)) == [(0, "10.0.0.5"), (1, "10.0.0.8"), (3, "10.0.0.8"), (4, "10.0.0.9"), (4, "10.0.0.6")]


def test_resolve_clients_replaces_names_one_row_per_ip_and_keeps_the_rest():
    d = dns([("a", 1.0, "10.0.0.7", "x.example", "1.1.1.1"), ("b", 2.0, "DB01.corp.local", "y.example", "2.2.2.2"),
             ("c", 3.0, "ghost.corp.local", "z.example", "3.3.3.3"), ("d", 4.0, "MAIL01", "w.example", "4.4.4.4")])
    out = identity.resolve_clients(d, INV)
    assert out[["event_id", "client_ip"]].values.tolist() == [
        ["a", "10.0.0.7"], ["b", "10.0.0.9"], ["b", "10.0.0.6"], ["c", "ghost.corp.local"], ["d", "10.0.0.5"]]
    schema.validate(out, "dns_answers")
    zeek = d.iloc[:1]
    assert identity.resolve_clients(zeek, INV) is zeek   # only IP clients: the frame itself, untouched


def test_named_client_joins_its_connection_and_unknown_name_does_not():
    c = conns([("c1", 100.0, "10.0.0.5", "93.184.216.34", 8443), ("c2", 100.0, "10.0.0.6", "93.184.216.35", 8443),
               ("c3", 101.0, "10.0.0.9", "93.184.216.35", 8443), ("c4", 102.0, "10.0.0.7", "93.184.216.36", 8443)])
    d = dns([("d1", 98.0, "MAIL01.corp.local", "c2.example", "93.184.216.34"),
             ("d2", 99.0, "db01", "two.example", "93.184.216.35"),
             ("d3", 99.5, "ghost.corp.local", "lost.example", "93.184.216.36")])
    ev = pipeline.prepare(c, d, INV).evidence
    assert ev["query"].tolist() == ["c2.example", "two.example", "two.example", ""]  # both NICs of db01
    assert ev["dns_delay"].tolist()[:3] == [2.0, 1.0, 2.0] and np.isnan(ev["dns_delay"].iloc[3])


E22 = {"SourceName": "Microsoft-Windows-Sysmon", "EventID": 22, "QueryStatus": "0"}
E3 = {"SourceName": "Microsoft-Windows-Sysmon", "EventID": 3, "Initiated": "true", "Protocol": "tcp",
      "SourcePort": "50000", "DestinationPort": "8443", "Image": "C:\\a.exe"}


def _utc(ts: float) -> str:
    return pd.Timestamp(ts, unit="s").strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def test_sysmon_file_named_clients_through_inventory_and_eid3_join_when_read(tmp_path):
    t = 1_700_000_000.0
    events = [  # MAIL01 only in the inventory; WS07 only through its own EID 3 in the file
        {**E22, "Hostname": "MAIL01.corp.local", "UtcTime": _utc(t), "QueryName": "c2.example",
         "QueryResults": "::ffff:93.184.216.34;"},
        {**E22, "Hostname": "WS07.corp.local", "UtcTime": _utc(t + 1), "QueryName": "ws.example",
         "QueryResults": "::ffff:93.184.216.40;"},
        {**E22, "Hostname": "GHOST", "UtcTime": _utc(t + 2), "QueryName": "lost.example",
         "QueryResults": "::ffff:93.184.216.41;"},
        {**E3, "Hostname": "WS07.corp.local", "UtcTime": _utc(t + 3), "SourceIp": "10.0.0.30",
         "DestinationIp": "93.184.216.40"},
    ]
    path = tmp_path / "sysmon.json"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    zeek = conns([("z1", t + 5, "10.0.0.5", "93.184.216.34", 8443)])
    quarantine, summary = ingest.Quarantine(), ingest.ReadSummary()
    c = pd.concat([zeek, ingest.read_connections([path], quarantine, summary)], ignore_index=True)
    summary.note("connections", "zeek_conn_tsv", zeek)
    d = ingest.read_dns([path], quarantine, summary)
    inv = ingest.read_inventory([_inventory_csv(tmp_path)], quarantine, summary)
    assert len(quarantine) == 0 and d["client_ip"].tolist() == ["MAIL01.corp.local", "10.0.0.30", "GHOST"]
    ev = pipeline.prepare(c, d, inv).evidence
    assert ev["query"].tolist() == ["c2.example", "ws.example"] and ev["dns_delay"].tolist() == [5.0, 2.0]
    assert summary.dns_coverage() == {"sysmon_dns": (2, 3)}   # GHOST counted, unresolved
    assert summary.lines()[-1] == (
        "warning: DNS source sysmon_dns: 2 of 3 clients (66.7 %) resolved to a connection source, under 90 %: "
        "the others' answers join no connection (names not in the inventory, or hosts with no connection log)")


def _inventory_csv(folder):
    path = folder / "inventory.csv"
    path.write_text("ip,name,kind,esxi_host,role\n10.0.0.5,mail01,vm,esx-01,mail\n")
    return path


def test_coverage_lines_no_warning_at_90_percent():
    cover = identity.coverage({"infoblox": {f"10.0.0.{i}" for i in range(10)} | {""}},
                              {f"10.0.0.{i}" for i in range(9)}, None)
    assert cover == {"infoblox": (9, 10)}
    assert identity.coverage_lines(cover) == [
        "DNS source infoblox: 9 of 10 clients (90.0 %) resolved to a connection source"]


def named_sysmon(folder, out):
    """(Sysmon EID 22 file at `out`, its events): 3 answers each for 8 inventory hosts of the small day's
    Zeek conn.log, the client the upper case FQDN of the host's inventory name, each answering one of
    its connections that no Zeek answer covers."""
    inventory = ingest.read_inventory(folder / "inventory.csv")
    c = ingest.read_connections(folder / "conn.log")
    named = inventory[inventory["name"] != ""].set_index("ip")["name"]
    zeek = ingest.read_dns(folder / "dns.log")
    answered = set(zip(zeek["client_ip"], zeek["answer"]))
    fresh = c[[(s, d) not in answered for s, d in zip(c["src_ip"], c["dst_ip"])]]   # no Zeek answer to compete
    events = []
    for ip in [i for i in pd.unique(fresh["src_ip"]) if i in named.index][:8]:
        for row in fresh[fresh["src_ip"] == ip].head(3).itertuples():
            events.append({**E22, "Hostname": named[ip].upper() + ".corp.local", "UtcTime": _utc(row.ts - 0.5),
                           "QueryName": f"{named[ip]}-{row.Index}.sysmon.example",
                           "QueryResults": f"::ffff:{row.dst_ip};"})
    out.write_text("".join(json.dumps(e) + "\n" for e in events))
    return out, events


def named_joined(got: pd.DataFrame) -> int:
    """Hosts whose named answers joined a connection of theirs in scored rows `got` (a host's later
    connection to the same IP takes the latest answer, so not every answer shows)."""
    joined = got.loc[got["query"].str.endswith(".sysmon.example"), "query"].str.split("-").str[:-1].str.join("-")
    return joined.nunique()


def test_batch_with_two_workers_equals_one_shot_on_named_clients(tmp_path, small_day, monkeypatch):
    """Sysmon EID 22 named by host (upper case FQDN of the inventory name) beside the Zeek logs: the
    batch engine resolves them before partitioning, so its rows are the one-shot model's."""
    model, folder = small_day
    inventory = ingest.read_inventory(folder / "inventory.csv")
    c = ingest.read_connections(folder / "conn.log")
    sysmon, events = named_sysmon(folder, tmp_path / "sysmon.json")
    frames = Frames(c, ingest.read_dns([folder / "dns.log", sysmon]), inventory)
    write_csv(model.score(frames), tmp_path / "one.csv")
    monkeypatch.setattr(write, "WRITE_BLOCK", 1000)
    out = tmp_path / "two.csv"
    two = local.run(model, [folder / "conn.log"], [folder / "dns.log", sysmon], out, inventory=inventory, workers=2,
                    chunk_rows=800, bucket_s=1800, progress=False)
    assert two.partitions == 2
    got = pd.read_csv(out, dtype={"event_id": "str"}, keep_default_na=False)
    assert len(events) == 24 and named_joined(got) == 8   # every host's named answers joined
    assert (tmp_path / "one.csv").read_bytes() == out.read_bytes()


def test_inspect_prints_the_dns_coverage_of_all_files_after_the_file_lines(tmp_path, small_day, capsys):
    """The coverage takes every given file into account: the inventory of another file resolves the
    Sysmon names to connection sources of the Zeek conn.log; without it, none resolves."""
    from esxi_anomaly import cli

    _, folder = small_day
    sysmon, _ = named_sysmon(folder, tmp_path / "sysmon.json")
    files = [str(folder / "conn.log"), str(sysmon), str(folder / "inventory.csv")]
    assert cli.main(["inspect", *files]) == 0
    out = capsys.readouterr().out.splitlines()
    # the file lines first (paths in sorted order; Sysmon: as connections and as DNS), then the coverage
    assert [line.split(":")[0] for line in out[:-1]] == [files[1], files[1], files[0], files[2]]
    assert out[-1] == "DNS source sysmon_dns: 8 of 8 clients (100.0 %) resolved to a connection source"
    assert cli.main(["inspect", *files[:2]]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "warning: DNS source sysmon_dns: 0 of 8 clients (0.0 %) resolved to a connection source, under 90 %: "
        "the others' answers join no connection (names not in the inventory, or hosts with no connection log)")


def test_read_summary_notes_survive_json():
    """What the coverage needs, as plain JSON (a resumed run's reads.json) and back: the same coverage."""
    summary = ingest.ReadSummary()
    summary.note("connections", "zeek_conn_tsv", conns([("c1", 1.0, "10.0.0.5", "1.1.1.1", 443)]))
    summary.note("dns_answers", "sysmon_dns", dns([("d1", 1.0, "MAIL01", "a.example", "1.1.1.1"),
                                                   ("d2", 2.0, "ghost", "b.example", "1.1.1.1")]))
    summary.note("inventory", "inventory_csv", INV)
    back = ingest.ReadSummary()
    back.add_notes(json.loads(json.dumps(summary.notes_record())))
    assert back.conn_sources == {"10.0.0.5"} and back.dns_clients == {"sysmon_dns": {"MAIL01", "ghost"}}
    assert back.dns_coverage() == summary.dns_coverage() == {"sysmon_dns": (1, 2)}
    empty = ingest.ReadSummary()
    empty.add_notes(json.loads(json.dumps(ingest.ReadSummary().notes_record())))
    assert empty.notes_record() == {"conn_sources": [], "dns_clients": {}, "inventory": {"ip": [], "name": []}}
