"""generate(): determinism, canonical frames, labels, timing, realism of the benign side."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from esxi_anomaly import schema
from esxi_anomaly.synth import ATTACK_FAMILIES, LOOKALIKE_KINDS, generate, load_scenario

DAY = 86400.0


def test_same_seed_gives_identical_frames_and_another_seed_does_not():
    a = generate(days=1, seed=11, scenario="small", attack_days=1, families=["apt12"])
    b = generate(days=1, seed=11, scenario="small", attack_days=1, families=["apt12"])
    c = generate(days=1, seed=12, scenario="small", attack_days=1, families=["apt12"])
    for name in ("connections", "dns_answers", "inventory", "labels"):
        pd.testing.assert_frame_equal(getattr(a, name), getattr(b, name))
    assert not a.connections["event_id"].equals(c.connections["event_id"])
    assert len(a.connections) != len(c.connections)


def test_frames_are_canonical_and_sorted(small_ds):
    schema.validate(small_ds.connections, "connections")
    schema.validate(small_ds.dns_answers, "dns_answers")
    schema.validate(small_ds.inventory, "inventory")
    assert small_ds.connections["ts"].is_monotonic_increasing
    assert small_ds.dns_answers["ts"].is_monotonic_increasing
    assert list(small_ds.labels.columns) == ["event_id", "label", "family", "entity"]
    assert all(str(small_ds.labels[c].dtype) == "str" for c in small_ds.labels.columns)


def test_window_bounds(small_ds):
    start = load_scenario("small").start
    assert (small_ds.start, small_ds.train_end, small_ds.end) == (start, start + DAY, start + 2 * DAY)
    ts = small_ds.connections["ts"]
    assert ts.min() >= small_ds.start and ts.max() < small_ds.end


def test_uids_are_zeek_shaped_and_unique_across_both_frames(small_ds):
    conn_ids = small_ds.connections["event_id"]
    dns_ids = small_ds.dns_answers["event_id"].drop_duplicates()
    every = pd.concat([conn_ids, dns_ids], ignore_index=True)
    assert every.str.fullmatch(r"C[0-9A-Za-z]{17}").all()
    assert not every.duplicated().any()


def test_labels_refer_to_connections_with_known_kinds(small_ds):
    lab = small_ds.labels
    assert lab["event_id"].isin(small_ds.connections["event_id"]).all()
    assert not lab["event_id"].duplicated().any()
    assert set(lab["label"]) == {"attack", "lookalike"}
    assert set(lab.loc[lab["label"] == "attack", "family"]) == set(ATTACK_FAMILIES)
    assert set(lab.loc[lab["label"] == "lookalike", "family"]) == set(LOOKALIKE_KINDS)
    merged = lab.merge(small_ds.connections[["event_id", "src_ip"]], on="event_id")
    assert (merged["entity"] == merged["src_ip"]).all()


def test_attacks_only_after_train_end_and_lookalikes_every_day(small_ds):
    lab = small_ds.labels.merge(small_ds.connections[["event_id", "ts"]], on="event_id")
    attacks = lab[lab["label"] == "attack"]
    assert attacks["ts"].min() >= small_ds.train_end and attacks["ts"].max() < small_ds.end
    look = lab[lab["label"] == "lookalike"]
    day = ((look["ts"] - small_ds.start) // DAY).astype(int)
    per_day = pd.crosstab(look["family"], day)
    steady = [k for k in LOOKALIKE_KINDS if k != "new_benign_service"]
    assert (per_day.loc[steady] > 0).all().all()
    # The new benign service appears on the attack day only, so "new" alone is no attack.
    assert per_day.loc["new_benign_service", 0] == 0 and per_day.loc["new_benign_service", 1] > 0


def test_default_families_come_from_the_scenario():
    ds = generate(days=1, seed=5, scenario="small", attack_days=1)
    assert ds.families == load_scenario("small").default_families
    assert set(ds.labels.loc[ds.labels["label"] == "attack", "family"]) == set(ds.families)


def test_no_attacks_without_attack_days():
    ds = generate(days=1, seed=5, scenario="small", attack_days=0)
    assert (ds.labels["label"] != "attack").all()
    assert ds.train_end == ds.end


def test_inventory_kinds_names_and_roles(small_ds):
    inv = small_ds.inventory
    sc = load_scenario("small")
    counts = inv["kind"].value_counts().to_dict()
    assert counts == {"vm": sum(sc.vms.values()), "infra": 6, "esxi_mgmt": sc.esxi_hosts, "vcenter": 1}
    vms = inv[inv["kind"] == "vm"]
    assert vms["name"].str.fullmatch(r"vm-[a-z]+-\d\d").all()
    assert (vms["name"].str.split("-").str[1] == vms["role"]).all()
    assert set(inv.loc[inv["kind"] == "esxi_mgmt", "name"]) == {"esx-01", "esx-02"}
    assert inv["esxi_host"].isin(["esx-01", "esx-02"]).all()
    assert not inv["ip"].duplicated().any()


def _last_answer_with_dst(conns: pd.DataFrame, dns: pd.DataFrame) -> pd.Series:
    """Age (s) of the latest A answer to the same client whose address is the dst (NaN if none)."""
    a = dns.loc[dns["rtype"] == "A", ["ts", "client_ip", "answer"]].rename(
        columns={"client_ip": "src_ip", "answer": "dst_ip", "ts": "answer_ts"})
    left = conns[["ts", "src_ip", "dst_ip"]].reset_index()
    joined = pd.merge_asof(left.sort_values("ts"), a.sort_values("answer_ts"), left_on="ts", right_on="answer_ts",
                           by=["src_ip", "dst_ip"], direction="backward")
    return (joined["ts"] - joined["answer_ts"]).set_axis(joined["index"]).sort_index()


def test_named_connections_follow_a_dns_answer_and_management_traffic_mostly_does_not(small_ds):
    conns, inv = small_ds.connections, small_ds.inventory
    age = _last_answer_with_dst(conns, small_ds.dns_answers)
    kind = conns["src_ip"].map(inv.set_index("ip")["kind"])
    vm_age = age[(kind == "vm").to_numpy()]
    # VMs connect by name: nearly always after an answer, and client caching means a good share of
    # connections reuse an older answer rather than a fresh one.
    answered = vm_age.notna().mean()
    assert answered > 0.8
    assert (vm_age.dropna() >= 0).all()
    assert (vm_age.dropna() > 1.0).mean() > 0.2
    # ESXi heartbeats go to vCenter by IP: almost never a recent answer before them (only when the
    # host happened to resolve vCenter's name for something else).
    hb = ((kind == "esxi_mgmt") & (conns["dst_port"] == 902) & (conns["proto"] == "udp")).to_numpy()
    assert hb.sum() > 1000 and (age[hb] <= 300).mean() < 0.1


def test_dns_responses_look_like_dns(small_ds):
    dns = small_ds.dns_answers
    assert set(dns["rcode"]) == {"NOERROR", "NXDOMAIN"}
    nx = dns[dns["rcode"] == "NXDOMAIN"]
    assert (nx["answer"] == "").all() and (nx["answer_index"] == -1).all() and nx["ttl"].isna().all()
    ok = dns[dns["rcode"] == "NOERROR"]
    assert (ok["ttl"] > 0).all() and (ok["answer_index"] >= 0).all()
    assert set(ok["rtype"]) >= {"A", "CNAME", "SRV", "AAAA", "TXT"}
    # Each response's rows share one uid, client and time, and are numbered 0..k-1.
    g = dns.groupby("event_id")
    assert (g["client_ip"].nunique() == 1).all() and (g["ts"].nunique() == 1).all()
    ok_idx = ok.groupby("event_id")["answer_index"].agg(["min", "max", "size"])
    assert (ok_idx["min"] == 0).all() and (ok_idx["max"] == ok_idx["size"] - 1).all()


def test_management_plane_ports(small_ds):
    conns, inv = small_ds.connections, small_ds.inventory
    esx = set(inv.loc[inv["kind"] == "esxi_mgmt", "ip"])
    vcenter = inv.loc[inv["kind"] == "vcenter", "ip"].iloc[0]
    attack_ids = set(small_ds.labels.loc[small_ds.labels["label"] == "attack", "event_id"])
    mgmt = conns[conns["src_ip"].isin(esx) & ~conns["event_id"].isin(attack_ids)]
    pairs = set(zip(mgmt["dst_port"], mgmt["proto"]))
    periodic = {(902, "udp"), (123, "udp"), (514, "udp"), (8182, "udp")}
    occasional = {(8000, "tcp"), (902, "tcp"), (9084, "tcp"), (389, "tcp")}
    assert periodic <= pairs <= periodic | occasional
    hb = mgmt[(mgmt["dst_port"] == 902) & (mgmt["proto"] == "udp")]
    assert (hb["dst_ip"] == vcenter).all()
    assert (conns.loc[conns["src_ip"] == vcenter, "dst_port"].isin([443, 902, 389, 123, 514])).all()


def test_lookalike_coincidental_apt12_satisfies_the_formula(small_ds):
    ids = small_ds.labels.loc[small_ds.labels["family"] == "coincidental_apt12", "event_id"]
    conns = small_ds.connections[small_ds.connections["event_id"].isin(ids)]
    octets = conns["dst_ip"].str.split(".", expand=True).astype(int)
    assert (octets[0] * octets[1] + octets[2] == 443).all()
    assert (conns["dst_port"] == 443).all()
    assert conns["dst_ip"].nunique() >= 10                      # short-TTL rotation
    age = _last_answer_with_dst(conns, small_ds.dns_answers)
    assert age.notna().all() and (age >= 0).all()               # the address was an answer first


def test_lookalike_srv_ports_are_announced_by_srv(small_ds):
    dns, lab, conns = small_ds.dns_answers, small_ds.labels, small_ds.connections
    srv = dns[dns["rtype"] == "SRV"]
    assert set(srv["answer"]) == {"10 60 8765 app1.corp.example", "0 100 389 dc01.corp.example",
                                  "0 100 389 dc02.corp.example"}
    srv_conns = conns[conns["event_id"].isin(lab.loc[lab["family"] == "srv_port", "event_id"])]
    assert set(srv_conns["dst_port"]) == {8765, 389}
    app = srv_conns[srv_conns["dst_port"] == 8765]
    first = app.groupby("src_ip")["ts"].min()
    first_srv = srv[srv["query"] == "_app._tcp.corp.example"].groupby("client_ip")["ts"].min()
    assert (first_srv.reindex(first.index) < first).all()


def test_lookalike_rpc_dynamic_and_stable_ports(small_ds):
    lab, conns = small_ds.labels, small_ds.connections
    port_of = conns.set_index("event_id")["dst_port"]
    rpc = port_of[lab.loc[lab["family"] == "rpc_dynamic", "event_id"]]
    assert rpc.between(49152, 65535).all() and rpc.nunique() > 1
    stable = port_of[lab.loc[lab["family"] == "stable_unusual_port", "event_id"]]
    assert set(stable) == {9200, 8443, 5671}
    new = port_of[lab.loc[lab["family"] == "new_benign_service", "event_id"]]
    assert set(new) == {4318}


def test_diurnal_office_hours_are_busier_for_desktops(small_ds):
    conns, inv = small_ds.connections, small_ds.inventory
    vdi = set(inv.loc[inv["role"] == "vdi", "ip"])
    hour = ((conns.loc[conns["src_ip"].isin(vdi), "ts"] // 3600) % 24).astype(int)
    counts = hour.value_counts().reindex(range(24), fill_value=0)
    assert counts[9:17].mean() > 5 * counts[[0, 1, 2, 3, 22, 23]].mean()


def test_connection_fields_are_consistent(small_ds):
    c = small_ds.connections
    assert set(c["proto"]) == {"tcp", "udp"}
    assert set(c["conn_state"]) <= {"SF", "S0", "REJ", "RSTO", "RSTR"}
    assert (c["process"] == "").all() and (c["esxi_host"] == "").all()
    assert c["src_port"].between(1024, 65535).all() and c["dst_port"].between(1, 65535).all()
    s0_tcp = c[(c["conn_state"] == "S0") & (c["proto"] == "tcp")]
    assert (s0_tcp["bytes_in"] == 0).all() and (s0_tcp["packets_in"] == 0).all()
    single = (c["packets_out"] + c["packets_in"]) == 1
    assert c.loc[single, "duration"].isna().all()                # Zeek logs "-" for one packet
    assert (c.loc[~single, "packets_out"] >= 1).all()
    win = set(small_ds.inventory.loc[small_ds.inventory["role"] == "vdi", "ip"])
    assert c.loc[c["src_ip"].isin(win), "src_port"].ge(49152).all()


def test_scale_multiplies_volume():
    base = generate(days=1, seed=2, scenario="small", attack_days=0)
    big = generate(days=1, seed=2, scenario="small", attack_days=0, scale=3.0)
    assert 2.6 < len(big.connections) / len(base.connections) < 3.4


def test_unknown_scenario_and_family_are_refused():
    with pytest.raises(ValueError, match="unknown scenario"):
        generate(days=1, scenario="nope")
    with pytest.raises(ValueError, match="unknown attack families"):
        generate(days=1, scenario="small", families=["apt13"])


def test_builtin_scenarios_load():
    default = load_scenario("default")
    assert default.esxi_hosts == 4 and sum(default.vms.values()) == 37
    assert default.default_families == ("apt12", "low16_mgmt", "xor_key", "offset_key")
    assert sum(load_scenario("large").vms.values()) == 60
    assert re.fullmatch(r"[a-z.]+", default.domain)
    assert np.isclose(default.start % 86400, 0)
