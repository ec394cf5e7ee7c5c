"""Attack families: every attack connection's port (or IP) is the family transform of the answer
the victim received just before; checked with independent code, not the generator's own."""
from __future__ import annotations

import ipaddress
import re
import struct

import numpy as np
import pandas as pd
import pytest

from esxi_anomaly import schema
from esxi_anomaly.synth import ATTACK_FAMILIES, generate, inject_attacks, load_scenario
from esxi_anomaly.synth.dataset import attack_seed
from esxi_anomaly.synth.attacks import inject_attacks_detailed
from esxi_anomaly.synth.transforms import nymaim_ip


def _octets(ip: str) -> tuple[int, int, int, int]:
    return tuple(int(x) for x in ip.split("."))


def _nymaim_reference(ip: str) -> str:
    """Nymaim2 (Bader 2018): little-endian read, 16 x (xor, subtract, xor), little-endian write."""
    (v,) = struct.unpack("<I", bytes(_octets(ip)))
    for _ in range(16):
        v ^= 0x87568289
        v = (v - 0x78643587) % 2**32
        v ^= 0x18482642
    return ".".join(str(b) for b in struct.pack("<I", v))


def _campaign_view(ds, family: str):
    """Per attack connection of `family`: the latest A / AAAA / TXT answer its victim got for the C2 name."""
    camp = ds.campaigns[ds.campaigns["family"] == family]
    assert len(camp) >= 1
    ids = ds.labels.loc[(ds.labels["label"] == "attack") & (ds.labels["family"] == family), "event_id"]
    conns = ds.connections[ds.connections["event_id"].isin(ids)]
    rows = []
    for _, c in camp.iterrows():
        mine = conns[conns["src_ip"] == c["entity"]].sort_values("ts")
        assert len(mine) == c["n_connections"] >= 10
        answers = ds.dns_answers[(ds.dns_answers["client_ip"] == c["entity"]) & (ds.dns_answers["query"] == c["query"])]
        out = mine
        for rtype in ("A", "AAAA", "TXT"):
            got = answers.loc[answers["rtype"] == rtype, ["ts", "answer"]].rename(
                columns={"ts": f"{rtype}_ts", "answer": rtype}).sort_values(f"{rtype}_ts")
            if len(got):
                out = pd.merge_asof(out, got, left_on="ts", right_on=f"{rtype}_ts", direction="backward")
        # Nothing else was asked for this name between the answer and the connection.
        assert out["A"].notna().all()
        assert ((out["ts"] - out["A_ts"]).between(0, 1.0)).all()
        rows.append(out.assign(key=c["key"], group=c["group"], campaign=c["campaign"]))
    return pd.concat(rows, ignore_index=True)


def test_every_family_is_present_with_victims_of_the_right_kind(small_ds):
    inv = small_ds.inventory.set_index("ip")["kind"]
    for fam_id, fam in ATTACK_FAMILIES.items():
        victims = small_ds.campaigns.loc[small_ds.campaigns["family"] == fam_id, "entity"]
        assert len(victims) >= 1
        assert (victims.map(inv) == fam.source_kind).all(), fam_id


def test_apt12(small_ds):
    v = _campaign_view(small_ds, "apt12")
    o = v["A"].map(_octets)
    assert (v["dst_port"] == o.map(lambda t: t[0] * t[1] + t[2])).all()
    assert (v["dst_ip"] == v["A"]).all()
    assert v.groupby("campaign")["A"].nunique().min() >= 2 and v["dst_port"].nunique() >= 2
    assert v["dst_port"].between(1024, 65000).all()


def test_low16_mgmt(small_ds):
    v = _campaign_view(small_ds, "low16_mgmt")
    o = v["A"].map(_octets)
    assert (v["dst_port"] == o.map(lambda t: t[2] * 256 + t[3])).all()
    assert (v["dst_ip"] == v["A"]).all()
    assert v["dst_port"].nunique() >= 2


@pytest.mark.parametrize("family", ["xor_key", "offset_key"])
def test_keyed_low16(small_ds, family):
    v = _campaign_view(small_ds, family)
    low16 = v["A"].map(lambda ip: _octets(ip)[2] * 256 + _octets(ip)[3])
    if family == "xor_key":
        expected = low16 ^ v["key"]
        recovered = v["dst_port"] ^ low16
    else:
        expected = (low16 + v["key"]) % 65536
        recovered = (v["dst_port"] - low16) % 65536
    assert (v["dst_port"] == expected).all()
    # The key is a campaign constant, recoverable from any (answer, port) pair.
    assert (recovered.groupby(v["campaign"]).nunique() == 1).all()
    assert (v["dst_ip"] == v["A"]).all() and v["dst_port"].nunique() >= 2


def test_aaaa_port(small_ds):
    v = _campaign_view(small_ds, "aaaa_port")
    groups = v["AAAA"].map(lambda a: ipaddress.IPv6Address(a).exploded.split(":"))
    port = [int(g[k], 16) for g, k in zip(groups, v["group"])]
    assert (v["dst_port"] == port).all()
    assert (v["dst_ip"] == v["A"]).all()              # over IPv4, to the A answer of the same name
    assert ((v["A_ts"] - v["AAAA_ts"]).between(0, 0.05)).all()


def test_txt_port(small_ds):
    v = _campaign_view(small_ds, "txt_port")
    port = v["TXT"].map(lambda t: int(re.fullmatch(r"v=1 p=(\d+)", t).group(1)))
    assert (v["dst_port"] == port).all()
    assert (v["dst_ip"] == v["A"]).all() and v["dst_port"].nunique() >= 2


def test_nymaim_ip(small_ds):
    v = _campaign_view(small_ds, "nymaim_ip")
    assert (v["dst_ip"] == v["A"].map(_nymaim_reference)).all()
    assert (v["dst_port"] == 443).all()
    every_answer = set(small_ds.dns_answers["answer"])
    assert not v["dst_ip"].isin(every_answer).any()        # the destination is never an answer
    assert v["dst_ip"].nunique() >= 2


def test_generator_nymaim_matches_reference_on_known_values():
    ips = ["1.2.3.4", "203.0.113.7", "255.255.255.255", "0.0.0.0"]
    as_int = np.array([int(ipaddress.IPv4Address(i)) for i in ips], dtype=np.uint32)
    got = [str(ipaddress.IPv4Address(int(x))) for x in nymaim_ip(as_int)]
    assert got == [_nymaim_reference(i) for i in ips]


def test_inject_into_benign_traffic_uses_that_environments_entities(benign_ds):
    ds = benign_ds
    assert (ds.labels["label"] != "attack").all()
    conns, dns, labels = inject_attacks(ds.connections, ds.dns_answers, ds.inventory, ["apt12", "low16_mgmt"],
                                        ds.train_end, ds.end, seed=99)
    schema.validate(conns, "connections")
    schema.validate(dns, "dns_answers")
    assert set(labels["label"]) == {"attack"} and set(labels["family"]) == {"apt12", "low16_mgmt"}
    assert labels["event_id"].isin(conns["event_id"]).all()
    # Benign rows are unchanged; only attack rows were added.
    added = conns[conns["event_id"].isin(labels["event_id"])]
    assert len(conns) == len(ds.connections) + len(added) == len(ds.connections) + len(labels)
    kept = conns[~conns["event_id"].isin(labels["event_id"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(kept, ds.connections.reset_index(drop=True))
    assert added["ts"].between(ds.train_end, ds.end, inclusive="left").all()
    kind = ds.inventory.set_index("ip")["kind"]
    assert (labels.loc[labels["family"] == "apt12", "entity"].map(kind) == "vm").all()
    assert (labels.loc[labels["family"] == "low16_mgmt", "entity"].map(kind) == "esxi_mgmt").all()
    # Victims ask the resolver they already use.
    usual = ds.dns_answers.groupby("client_ip")["resolver_ip"].agg(lambda s: s.mode().iloc[0])
    new_dns = dns[~dns["event_id"].isin(ds.dns_answers["event_id"])]
    assert (new_dns["resolver_ip"] == new_dns["client_ip"].map(usual)).all()
    assert not pd.concat([conns["event_id"], dns["event_id"].drop_duplicates()]).duplicated().any()


def test_inject_without_inventory_picks_observed_sources(benign_ds):
    ds = benign_ds
    empty_inv = schema.empty("inventory")
    window = (ds.train_end, ds.train_end + 6 * 3600)
    conns, _dns, labels = inject_attacks(ds.connections, ds.dns_answers, empty_inv, ["low16_mgmt", "xor_key"],
                                         *window, seed=5, rate=1.0)
    heartbeat_sources = set(ds.connections.loc[(ds.connections["dst_port"] == 902)
                                               & (ds.connections["proto"] == "udp"), "src_ip"])
    assert set(labels.loc[labels["family"] == "low16_mgmt", "entity"]) <= heartbeat_sources
    assert set(labels.loc[labels["family"] == "xor_key", "entity"]) <= set(ds.connections["src_ip"])
    added = conns[conns["event_id"].isin(labels["event_id"])]
    assert added["ts"].between(*window, inclusive="left").all()


def test_inject_rate_scales_campaigns_and_is_seeded(benign_ds):
    ds = benign_ds
    args = (ds.connections, ds.dns_answers, ds.inventory, ["offset_key"], ds.train_end, ds.end)
    *_, camp1 = inject_attacks_detailed(*args, seed=1, rate=0.5)
    *_, camp3 = inject_attacks_detailed(*args, seed=1, rate=1.5)
    assert camp1["campaign"].nunique() == 1 and camp3["campaign"].nunique() == 3
    _, _, a = inject_attacks(*args, seed=8)
    _, _, b = inject_attacks(*args, seed=8)
    pd.testing.assert_frame_equal(a, b)


def test_inject_refuses_unknown_family_and_empty_window(benign_ds):
    ds = benign_ds
    with pytest.raises(ValueError, match="unknown attack families"):
        inject_attacks(ds.connections, ds.dns_answers, ds.inventory, ["dga"], ds.train_end, ds.end, seed=1)
    with pytest.raises(ValueError, match="window is empty"):
        inject_attacks(ds.connections, ds.dns_answers, ds.inventory, ["apt12"], ds.end, ds.end, seed=1)


def test_generate_uses_the_injection_path():
    """generate() == its benign traffic + inject_attacks with the seed generate derives."""
    full = generate(days=1, seed=4, scenario="small", attack_days=1, families=["apt12"])
    benign = generate(days=1, seed=4, scenario="small", attack_days=1, families=[])
    rate = load_scenario("small").campaigns_per_family / 2.0
    conns, dns, labels = inject_attacks(benign.connections, benign.dns_answers, benign.inventory, ["apt12"],
                                        benign.train_end, benign.end, seed=attack_seed(4), rate=rate)
    pd.testing.assert_frame_equal(full.connections, conns)
    pd.testing.assert_frame_equal(full.dns_answers, dns)
    pd.testing.assert_frame_equal(full.labels[full.labels["label"] == "attack"].reset_index(drop=True), labels)
