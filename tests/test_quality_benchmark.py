"""benchmarks/quality.py: exact values of the reference baselines on hand-made frames, and a smoke
run of the baselines and tables on a tiny generated estate."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from esxi_anomaly import schema

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def q():
    spec = importlib.util.spec_from_file_location("quality_benchmark", ROOT / "benchmarks" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def conns(rows) -> pd.DataFrame:
    """rows: (src_ip, dst_ip, dst_port[, proto, duration, bytes_out])."""
    recs = []
    for i, r in enumerate(rows):
        rec = {"event_id": f"C{i}", "ts": float(i), "src_ip": r[0], "dst_ip": r[1], "dst_port": r[2],
               "proto": r[3] if len(r) > 3 else "tcp", "duration": r[4] if len(r) > 4 else 1.0,
               "bytes_out": r[5] if len(r) > 5 else 100.0, "bytes_in": 200.0, "packets_out": 3.0,
               "packets_in": 3.0}
        recs.append(rec)
    return schema.conform(pd.DataFrame(recs), "connections")


def test_apt12_query_exact(q):
    c = conns([
        ("10.0.0.5", "100.50.7.9", 5007),       # 100*50+7 = 5007, public, in range -> 1
        ("10.0.0.5", "100.50.7.9", 5008),       # port differs -> 0
        ("10.0.0.5", "20.30.40.1", 640),        # 20*30+40 = 640 < 4096 -> 0
        ("10.0.0.5", "192.168.1.1", 32257),     # 192*168+1, but RFC1918 -> 0
        ("10.0.0.5", "172.31.0.1", 5332),       # 172*31, RFC1918 (172.16/12) -> 0
        ("10.0.0.5", "172.32.0.1", 5504),       # 172*32, public -> 1
        ("10.0.0.5", "10.200.100.1", 2100),     # RFC1918 and below range -> 0
        ("10.0.0.5", "80.101.0.5", 8080),       # 80*101 = 8080, excluded by df00tech -> 0
        ("10.0.0.5", "200.245.151.1", 49151),   # upper bound inclusive -> 1
        ("10.0.0.5", "200.245.152.1", 49152),   # above range -> 0
        ("10.0.0.5", "64.64.0.1", 4096),        # lower bound inclusive -> 1
        ("10.0.0.5", "2001:db8::1", 5007),      # not IPv4 -> 0
        ("10.0.0.5", "", -1),                   # missing -> 0
        ("10.0.0.5", "300.20.7.1", 6007),       # not an address -> 0
    ])
    got = q.apt12_query_scores(c)
    assert got.tolist() == [1, 0, 0, 0, 0, 1, 0, 0, 1, 0, 1, 0, 0, 0]
    assert got.dtype == np.float64


def test_port_rarity_exact(q):
    train = conns([("10.0.0.1", "1.1.1.1", 443)] * 3 + [("10.0.0.1", "1.1.1.1", 53), ("10.0.0.2", "1.1.1.1", 22)])
    test = conns([("10.0.0.1", "9.9.9.9", 443), ("10.0.0.1", "9.9.9.9", 8443), ("10.0.0.1", "9.9.9.9", 53),
                  ("10.0.0.2", "9.9.9.9", 22), ("10.0.0.3", "9.9.9.9", 443)])
    got = q.port_rarity_scores(train, test)
    want = [-math.log(4 / 65540), -math.log(1 / 65540), -math.log(2 / 65540), -math.log(2 / 65537),
            -math.log(1 / 65536)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    # alpha and the port-space size are parameters
    np.testing.assert_allclose(q.port_rarity_scores(train, test[:1], alpha=0.5, n_ports=10),
                               [-math.log(3.5 / 9.0)], atol=1e-12)


def test_raw_matrix_and_iforest(q):
    rng = np.random.default_rng(0)
    train = conns([("10.0.0.1", "1.1.1.1", 443, "tcp", d, b) for d, b in zip(rng.uniform(0.5, 2, 200),
                                                                              rng.uniform(50, 150, 200))]
                  + [("10.0.0.1", "1.1.1.1", 53, "udp", d, 60.0) for d in rng.uniform(0.001, 0.05, 200)])
    x = q.raw_matrix(conns([("10.0.0.1", "1.1.1.1", 443, "icmp", float("nan"), 5.0)]), ["tcp", "udp"])
    # dst_port, duration (NaN -> 0), bytes_out, bytes_in, packets_out, packets_in, tcp, udp
    assert x.tolist() == [[443.0, 0.0, 5.0, 200.0, 3.0, 3.0, 0.0, 0.0]]
    test = conns([("10.0.0.1", "1.1.1.1", 443, "tcp", 1.0, 100.0),
                  ("10.0.0.1", "1.1.1.1", 31337, "tcp", 900.0, 5e6)])
    s = q.iforest_raw_scores(train, test, seed=0)
    assert s.shape == (2,) and s[1] > s[0]
    np.testing.assert_array_equal(s, q.iforest_raw_scores(train, test, seed=0))   # seeded


def test_subset_ap_and_shuffled_ranking(q):
    ranked = pd.DataFrame({"event_id": ["a", "b", "c", "d"], "score": [4.0, 3.0, 2.0, 1.0]})
    labels = pd.DataFrame({"event_id": ["a", "c"], "label": ["attack", "attack"], "family": ["aaaa_port", "apt12"]})
    assert q.subset_ap(ranked, labels, q.HELD_OUT) == 1.0                    # "c" removed, "a" first
    assert q.subset_ap(ranked, labels, q.INJECTED) == pytest.approx(1 / 2)   # c below b (a removed)
    assert math.isnan(q.subset_ap(ranked, labels, ["txt_port"]))
    c = conns([("10.0.0.1", "1.1.1.1", p) for p in range(10)])
    r = q.shuffled_ranking(c, np.arange(10.0), seed=3)
    assert sorted(r["event_id"]) == sorted(c["event_id"])
    assert r.set_index("event_id")["score"].sort_index().tolist() == list(np.arange(10.0))  # ids C0..C9


@pytest.fixture(scope="module")
def smoke(q):
    from esxi_anomaly.synth import generate

    ds = generate(days=2, seed=0, scenario="small", families=list(q.EVAL_FAMILIES))
    train, test = q.split(ds)
    return ds, train, test, q.run_baselines(train, test, ds.labels, seed=0)


def test_baselines_smoke(q, smoke):
    ds, train, test, res = smoke
    assert (train.connections["ts"] < ds.train_end).all() and (test.connections["ts"] >= ds.train_end).all()
    assert len(train.connections) + len(test.connections) == len(ds.connections)
    assert set(res) == {"iforest-raw", "apt12-query", "port-rarity"}
    for name, m in res.items():
        assert m["connections"] == len(test.connections)
        assert m["attacks"] == int((ds.labels["label"] == "attack").sum())
        for k in ("ap", "ap_seen", "ap_held_out"):
            assert 0.0 <= m[k] <= 1.0, (name, k)
        assert set(m["recall"]) == set(q.EVAL_FAMILIES)
    # the APT12 query finds APT12 attacks (ports 4096-49151) and hardly anything of the other families
    rec = res["apt12-query"]["recall"]
    assert rec["apt12"] > 0.5
    assert rec["nymaim_ip"] == 0.0 and rec["aaaa_port"] == 0.0


def test_tables_smoke(q, smoke):
    *_, res = smoke
    rows = [{"method": k, "scenario": "small 2d", "seed": s, **v} for s in (0, 1) for k, v in res.items()]
    detail = q.results_table(rows)
    assert detail.count("\n") == 1 + len(rows)
    md, mean = q.mean_table(rows)
    assert list(mean["method"]) == ["iforest-raw", "apt12-query", "port-rarity"]
    assert (mean["seeds"] == 2).all()
    readme = q.readme_table(mean)
    assert readme.splitlines()[0] == "| method | small 2d: AP (held-out) |"
    assert q.verdict(mean) == []   # no esxi-anomaly rows


def test_alert_recall_and_precision_smoke(q, smoke, tmp_path):
    ds, train, test, _ = smoke
    m = q.run_detector(train, test, ds.labels, seed=0, trials=0, env="smoke", storage_dir=tmp_path)
    assert m["alerts"] > 0 and 0.0 <= m["alert_recall"] <= 1.0 and 0.0 <= m["alert_precision"] <= 1.0
    assert set(m["alert_recall_family"]) == set(q.EVAL_FAMILIES)
    rows = [{"method": "esxi-anomaly N=0", "view": "zeek", "scenario": "small 2d", "seed": 0, **m},
            {"method": "esxi-anomaly N=0" + q.HISTORY_ATTACKS, "view": "zeek", "scenario": "small 2d", "seed": 0,
             **{**m, "alert_recall": 0.5}}]
    table, checks = q.alerts_table(rows)
    assert table.count("\n") == 3 and len(checks) == 2
    assert checks[1].startswith("- small 2d, esxi-anomaly N=0 attacks in history [zeek]: alert recall 0.500")
    assert checks[1].split(" -> target ")[1].startswith("NOT met")


def test_the_history_attacks_estate_trains_on_a_day_of_attacks(q):
    ds, train_end = q.history_attacks_estate(q.Scenario("small", 3), seed=0)
    attacks = ds.labels[ds.labels["label"] == "attack"]
    ts = ds.connections.set_index("event_id").loc[attacks["event_id"], "ts"]
    assert (ts < train_end).sum() > 0 and (ts >= train_end).sum() > 0 and train_end == ds.end - 86_400
