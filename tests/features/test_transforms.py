"""Tests for the transform library: exact values on hand-computed answers, brute-force chance rates."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from esxi_anomaly.features import transforms as T


def _ports_of(df: pd.DataFrame, row: int = 0) -> dict[str, int]:
    sub = df[df["row"] == row]
    return dict(zip(sub["transform"].astype(str), sub["port"].astype(int)))


# ---------------------------------------------------------------- parsing


def test_parse_ipv4_strict_dotted_quad():
    octets, valid = T.parse_ipv4(
        ["19.57.34.8", "255.255.255.255", "0.0.0.0", "01.2.3.4", "1.2.3.4 ", "256.1.1.1", "1.2.3", "", None, "é.1.1.1"]
    )
    assert valid.tolist() == [True, True, True, False, False, False, False, False, False, False]
    assert octets[0].tolist() == [19, 57, 34, 8]
    assert octets[1].tolist() == [255, 255, 255, 255]
    assert octets.dtype == np.uint8
    assert (octets[~valid] == 0).all()


def test_parse_ipv4_accepts_series_and_non_strings():
    octets, valid = T.parse_ipv4(pd.Series(["10.1.4.210", None], dtype="str"))
    assert valid.tolist() == [True, False]
    _, valid = T.parse_ipv4(np.array([5, None, 1.5], dtype=object))
    assert valid.tolist() == [False, False, False]


def test_ipv4_int_round_trip():
    n, valid = T.ipv4_to_int(["19.57.34.8", "255.0.0.1", "nope"])
    assert n.dtype == np.uint32
    assert n.tolist() == [0x13392208, 0xFF000001, 0]
    assert valid.tolist() == [True, True, False]
    assert T.int_to_ipv4(n[:2]).tolist() == ["19.57.34.8", "255.0.0.1"]


# ---------------------------------------------------------------- A-record port transforms


def test_a_transform_catalogue_is_fixed():
    ids = [t.id for t in T.A_PORT_TRANSFORMS]
    assert ids[:6] == ["P1", "P2", "P3", "P4", "P5", "P6"]
    assert ids[6:8] == ["P7_be_k1", "P7_be_k2"] and ids[21] == "P7_le_k1"
    assert sum(i.startswith("P7_") for i in ids) == 30
    assert sum(i.startswith("P8_") for i in ids) == 51
    assert T.N_TESTS_A == len(ids) == 87 == len(set(ids))
    # grammar members identical to earlier transforms are dropped (x*y+z on a,b,c is P1, x*256+y on c,d is P3, ...)
    assert T.P8_DROPPED_DUPLICATES == [
        "P8_x*y+z_abc", "P8_(x+y)*z_bca", "P8_x*256+y_ab", "P8_x*256+y_ba",
        "P8_x*256+y_bc", "P8_x*256+y_cb", "P8_x*256+y_cd", "P8_x*256+y_dc",
    ]
    assert T.TRANSFORMS["P1"].prior == 1.0 and T.TRANSFORMS["P1"].formula == "a*b+c"


def test_a_record_columns_are_pairwise_distinct_on_random_answers():
    octets = np.random.default_rng(1).integers(0, 256, size=(2000, 4), dtype=np.uint8)
    ports = T.a_record_ports(octets)
    columns = {ports[:, j].tobytes() for j in range(T.N_TESTS_A)}
    assert len(columns) == T.N_TESTS_A


def test_a_record_ports_hand_computed():
    ports = T.a_record_ports(np.array([[19, 57, 34, 8], [10, 1, 4, 210]], dtype=np.uint8))
    assert ports.shape == (2, 87) and ports.dtype == np.int32
    col = {t.id: j for j, t in enumerate(T.A_PORT_TRANSFORMS)}
    row = ports[0]
    assert row[col["P1"]] == 1117          # 19*57+34
    assert row[col["P2"]] == 1729          # 19*(57+34)
    assert row[col["P3"]] == 8712          # 34*256+8
    assert row[col["P4"]] == 2082          # 8*256+34
    assert row[col["P5"]] == 4921          # 19*256+57
    assert row[col["P6"]] == 14611         # 57*256+19
    # N = 0x13392208, L = 0x08223913
    assert row[col["P7_be_k4"]] == 0x9220  # (0x13392208 >> 4) & 0xFFFF
    assert row[col["P7_be_k15"]] == 0x2672  # 0x13392208 >> 15 = 0x2672
    assert row[col["P7_le_k4"]] == 0x2391  # (0x08223913 >> 4) & 0xFFFF
    assert row[col["P7_le_k8"]] == 0x2239
    assert row[col["P8_x*y+z_abd"]] == 19 * 57 + 8
    assert row[col["P8_x*y-z_cdb"]] == 215  # 34*8-57
    assert row[col["P8_(x+y)*z_abd"]] == (19 + 57) * 8
    assert row[col["P8_x*256+y_da"]] == 8 * 256 + 19
    assert row[col["P8_a+b+c+d"]] == 118
    assert ports[1, col["P3"]] == 1234      # 4*256+210


def test_a_record_ports_invalid_results_are_minus_one():
    col = {t.id: j for j, t in enumerate(T.A_PORT_TRANSFORMS)}
    ports = T.a_record_ports(np.array([[0, 0, 0, 0], [255, 255, 255, 255], [1, 2, 3, 10]], dtype=np.uint8))
    assert (ports[0] == -1).all()                    # every formula gives 0 on 0.0.0.0
    assert ports[1, col["P2"]] == -1                 # 255*510 > 65535
    assert ports[1, col["P1"]] == 65280
    assert ports[2, col["P8_x*y-z_abd"]] == -1       # 1*2-10 < 0
    assert ports[2, col["P8_x*y-z_bcd"]] == -1       # 2*3-10 < 0
    assert ports[2, col["P8_x*y-z_bda"]] == 19       # 2*10-1


def test_derive_ports_a_long_form():
    df = T.derive_ports("A", ["19.57.34.8", "not an ip", "10.1.4.210"])
    assert list(df.columns) == ["row", "transform", "port"]
    assert df["row"].dtype == np.int64 and df["port"].dtype == np.int32
    assert set(df["row"]) == {0, 2}
    assert _ports_of(df, 0)["P1"] == 1117
    assert _ports_of(df, 2)["P3"] == 1234
    assert (df["row"] == 0).sum() == (T.a_record_ports(np.array([[19, 57, 34, 8]], np.uint8)) >= 0).sum()


@pytest.mark.parametrize("junk", [[], [None], [""], ["☃☃"], ["1.2.3.4.5"], [float("nan")], ["::"]])
def test_derive_ports_invalid_a_yields_no_rows(junk):
    df = T.derive_ports("A", junk)
    assert len(df) == 0 and list(df.columns) == ["row", "transform", "port"]


# ---------------------------------------------------------------- chance rates


def test_chance_matches_threat_notes_references():
    p = T.port_chance(["P1", "P1", "P2", "P2", "P3", "P7_le_k9"], [443, 80, 443, 8080, 443, 443])
    assert p[0] * 2**24 == 1386
    assert p[1] == pytest.approx(5.2e-5, rel=0.01)
    assert p[2] == pytest.approx(4.1e-6, rel=0.02)
    assert p[3] == pytest.approx(3.2e-5, rel=0.02)
    assert p[4] == p[5] == 1 / 65536


def test_chance_mean_p1_over_high_ports_and_invalid_ports():
    high = np.arange(1024, 65536)
    assert T.port_chance(np.full(len(high), "P1"), high).mean() == pytest.approx(1.4e-5, rel=0.05)
    assert T.port_chance(["P1", "P1", "P3"], [0, 65536, -1]).tolist() == [0.0, 0.0, 0.0]
    assert T.port_chance("P1", 65280) == 1 / 2**24  # only 255*255+255


def _brute_force_counts(transform_id: str, domain_octets: np.ndarray) -> np.ndarray:
    """Slow obviously-correct count: evaluate the transform per answer in a Python loop."""
    col = [t.id for t in T.A_PORT_TRANSFORMS].index(transform_id)
    counts = np.zeros(65536, dtype=np.int64)
    ports = T.a_record_ports(domain_octets)[:, col]
    for p in ports.tolist():
        if p > 0:
            counts[p] += 1
    return counts


# Preimage count of port p by an obviously-correct loop over (x, y), solving the last octet by hand.
_SOLVERS = {
    "P1": lambda x, y, p: 0 <= p - x * y <= 255,                                 # x*y+z = p
    "P8_x*y-z_abd": lambda x, y, p: 0 <= x * y - p <= 255,                       # x*y-z = p
    "P8_x+y+z_bcd": lambda x, y, p: 0 <= p - x - y <= 255,                       # x+y+z = p
}


@pytest.mark.parametrize("transform_id", ["P1", "P8_x*y-z_abd", "P8_x+y+z_bcd", "P8_x*y+z_bcd"])
def test_chance_by_brute_force_preimages(transform_id):
    solver = _SOLVERS.get(transform_id, _SOLVERS["P1"])
    ports = [1, 443, 9000, 65280, 65281] + np.random.default_rng(7).integers(1, 65536, 3).tolist()
    expected = [sum(solver(x, y, p) for x in range(256) for y in range(256)) / 2**24 for p in ports]
    assert T.port_chance([transform_id] * len(ports), ports).tolist() == expected


def test_chance_p2_by_brute_force_preimages():
    ports = [443, 8080, 1000, 64770, 65535] + np.random.default_rng(8).integers(1, 65536, 4).tolist()
    expected = []
    for p in ports:  # a*(b+c) = p: for each a>0 and each b, c = p/a - b must be an octet
        expected.append(sum(p % a == 0 and 0 <= p // a - b <= 255 for a in range(1, 256) for b in range(256)) / 2**24)
    assert T.port_chance(["P2"] * len(ports), ports).tolist() == expected


def test_chance_two_octet_formula_full_enumeration():
    counts = np.zeros(65536)
    for c in range(256):
        for d in range(256):
            if 1 <= c * d <= 65535:
                counts[c * d] += 1
    assert (T.chance_vector("P8_x*y_cd") == counts / 2**16).all()


def test_chance_four_octet_sum_matches_sampled_enumeration():
    ports = np.arange(1, 1021)
    counts = np.zeros(1021)
    three = np.zeros(766)  # three[v] = #{(b,c,d): b+c+d = v}
    for b in range(256):
        for c in range(256):
            three[b + c : b + c + 256] += 1  # all d
    for a in range(256):
        counts[a : a + 766] += three[: 1021 - a] if a + 766 > 1021 else three
    assert T.port_chance(["P8_a+b+c+d"] * 1020, ports).tolist() == (counts[1:] / 2**32).tolist()


def test_windows_and_aaaa_groups_are_uniform():
    assert T.port_chance(["P7_be_k3", "P7_le_k15", "P4", "P6"], [1, 65535, 22, 8443]).tolist() == [1 / 65536] * 4
