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


def test_port_chance_models_for_non_a_transforms_and_categorical_ids():
    ids = ["P11_g3", "P11_v4_P1", "P12_txt", "P12_srv", "P12_mx", "P9_xor"]
    assert T.port_chance(ids, [8443, 443, 9001, 5060, 10, 77]).tolist() == [
        1 / 65536, 1386 / 2**24, 1 / 65536, 1 / 65536, 1 / 65536, 1 / 65536,
    ]
    df = T.derive_ports("A", ["19.57.34.8"])
    by_cat = T.port_chance(df["transform"], df["port"])
    by_str = T.port_chance(df["transform"].astype(str).to_numpy(), df["port"].to_numpy())
    assert (by_cat == by_str).all() and by_cat[0] == T.port_chance("P1", 1117)
    with pytest.raises(KeyError):
        T.port_chance(["I1"], [80])


def test_all_chance_vectors_sum_to_at_most_one_and_are_fast():
    import time

    T._shape_chance.cache_clear()
    start = time.perf_counter()
    totals = {t.id: T.chance_vector(t.id).sum() for t in T.A_PORT_TRANSFORMS}
    assert time.perf_counter() - start < 2.0
    assert totals["P3"] == pytest.approx(65535 / 65536)
    assert totals["P1"] == pytest.approx(1 - 511 / 2**24, abs=1e-12)  # lost: a*b+c == 0 (511 pairs with a*b == 0, c == 0)
    assert all(0 < v <= 1 for v in totals.values())


# ---------------------------------------------------------------- AAAA


def test_parse_ipv6_agrees_with_ipaddress():
    import ipaddress

    rng = np.random.default_rng(5)
    texts = []
    for _ in range(1500):
        groups = np.where(rng.random(8) < 0.4, 0, rng.integers(0, 65536, 8))
        addr = ipaddress.IPv6Address(groups.astype(">u2").tobytes())
        texts.append(str(addr) if rng.random() < 0.7 else addr.exploded.upper())
    texts += ["::", "::1", "1::", "1:2:3:4:5:6:7::", "::ffff:1.2.3.4", "1:2:3:4:5:6:1.2.3.4", ":", ":::", "1::2::3",
              "12345::", "1:2:3:4:5:6:7:8:9", "fe80::1%eth0", "::ffff:1.2.3.256", "1.2.3.4", "", None, "☃"]
    groups, valid = T.parse_ipv6(texts)
    for text, row, ok in zip(texts, groups, valid):
        try:
            if text and "%" in text:
                raise ValueError("zone ids never appear in AAAA rdata: rejected on purpose")
            packed = ipaddress.IPv6Address(text).packed
        except (ValueError, TypeError):
            assert not ok, text
            continue
        assert ok and row.astype(">u2").tobytes() == packed, text


def test_aaaa_groups_and_embedded_ipv4():
    df = T.derive_ports("AAAA", ["2001:db8::20fb", "::ffff:19.57.34.8"])
    assert _ports_of(df, 0) == {"P11_g0": 0x2001, "P11_g1": 0xDB8, "P11_g7": 8443, "P11_v4_P1": 32, "P11_v4_P4": 0xFB20}
    assert _ports_of(df, 1) == {
        "P11_g5": 65535, "P11_g6": 19 * 256 + 57, "P11_g7": 34 * 256 + 8,
        "P11_v4_P1": 1117, "P11_v4_P2": 19 * (57 + 34), "P11_v4_P4": 8 * 256 + 34, "P11_v4_P6": 57 * 256 + 19,
    }
    ips = T.derive_ips("AAAA", ["::ffff:19.57.34.8", "not::an::ip"])
    assert ips[["row", "ip"]].values.tolist() == [[0, "19.57.34.8"]]
    assert ips["transform"].astype(str).tolist() == ["I8_aaaa_v4"]


# ---------------------------------------------------------------- text, SRV, SVCB, MX


@pytest.mark.parametrize(
    "text, expected",
    [
        ("v=spf1 ip4:1.2.3.4 -all", {}),  # SPF yields no port: "ip4:1" is not host:port, "spf1" not standalone
        ("v=spf1 ip6:2001:db8::/32 ip4:10.0.0.0/8 include:_spf.example.com ~all", {}),
        ("v=DMARC1; p=none; pct=100; rua=mailto:d@x.example", {}),
        ("v=DKIM1; k=rsa; p=MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQC1", {}),
        ("google-site-verification=abcDEF1234567890", {}),
        ("meet at 12:30", {}),
        ("1.2.3.4:8443", {"P12_txt": {8443}}),
        ("[2001:db8::1]:9001", {"P12_txt": {9001}}),
        ("https://x.example:4443/p", {"P12_txt": {4443}}),
        ("cG9ydD01NTU1", {"P12_txt_b64": {5555}}),          # base64("port=5555")
        ("706f72743d35353535", {"P12_txt_hex": {5555}}),    # hex("port=5555")
        ("cfg port: 31337; p=7", {"P12_txt": {31337, 7}}),
        ("TXT 23 hello 8080 world 99999 0", {"P12_txt": {8080}}),  # Zeek "TXT <len>" prefix dropped; out of range dropped
        ("c2.example:443 c2.example:443", {"P12_txt": {443}}),      # deduplicated
    ],
)
def test_txt_port_rules(text, expected):
    df = T.derive_ports("TXT", [text])
    got: dict[str, set] = {}
    for tid, port in zip(df["transform"].astype(str), df["port"]):
        got.setdefault(tid, set()).add(int(port))
    assert got == expected
    assert (df["row"] == 0).all()


def test_txt_ip_rules():
    texts = ["v=spf1 ip4:1.2.3.4 -all", "[2001:DB8::1]:9001", "MS4yLjMuNDo4NDQz", "ip4:10.0.0.0/8 1.2.3.4.5 999.1.1.1"]
    df = T.derive_ips("TXT", texts)
    got = sorted(zip(df["row"], df["transform"].astype(str), df["ip"]))
    assert got == [
        (0, "I7_txt", "1.2.3.4"),
        (1, "I7_txt", "2001:db8::1"),
        (2, "I7_txt_b64", "1.2.3.4"),   # base64("1.2.3.4:8443")
        (3, "I7_txt", "10.0.0.0"),
    ]


def test_srv_svcb_https_mx_fields():
    df = T.derive_ports(
        ["SRV", "HTTPS", "SVCB", "MX", "SRV", "MX"],
        ["10 60 5060 sip.example.", "1 . alpn=h2 port=8443", '1 svc.example. port="853"', "10 mail.example.", "garbage", "mail.example."],
    )
    assert sorted(zip(df["row"], df["transform"].astype(str), df["port"])) == [
        (0, "P12_srv", 5060), (1, "P12_svcb", 8443), (2, "P12_svcb", 853), (3, "P12_mx", 10),
    ]


def test_mixed_record_types_keep_row_positions():
    df = T.derive_ports(["TXT", "A", "srv", "NS"], ["1.2.3.4:8443", "19.57.34.8", "0 5 389 dc1.example.", "ns.example."])
    assert sorted(set(df["row"])) == [0, 1, 2]
    assert _ports_of(df, 0) == {"P12_txt": 8443}
    assert _ports_of(df, 1)["P1"] == 1117
    assert _ports_of(df, 2) == {"P12_srv": 389}
    assert df["row"].is_monotonic_increasing


JUNK = [None, "", "   ", "☃☃", "not an ip", "1.2.3.4.5", "::::", "\x00\x01", "é" * 300, float("nan"), 12345]


@pytest.mark.parametrize("rtype", ["A", "AAAA", "TXT", "CNAME", "SRV", "HTTPS", "SVCB", "MX", "NS", "", None])
def test_invalid_input_yields_no_rows_never_raises(rtype):
    junk = [j for j in JUNK if not (rtype in ("TXT", "CNAME") and j == 12345)]  # a bare number in TXT is a port
    ports = T.derive_ports(rtype, junk)
    ips = T.derive_ips(rtype, junk)
    assert len(ports) == 0 and list(ports.columns) == ["row", "transform", "port"]
    assert len(ips) == 0 and list(ips.columns) == ["row", "transform", "ip"]
    assert len(T.derive_ports(rtype, [])) == 0


# ---------------------------------------------------------------- IP transforms


def _nymaim2_slow(ip: str, inverse: bool = False) -> str:
    """Independent reference: struct little-endian read, Python ints, 16 rounds (Bader 2018)."""
    import struct

    (v,) = struct.unpack("<I", bytes(int(x) for x in ip.split(".")))
    for _ in range(16):
        if inverse:
            v = (((v ^ 0x18482642) + 0x78643587) & 0xFFFFFFFF) ^ 0x87568289
        else:
            v = (((v ^ 0x87568289) - 0x78643587) & 0xFFFFFFFF) ^ 0x18482642
    return ".".join(str(x) for x in struct.pack("<I", v))


def test_nymaim2_matches_slow_reference_and_round_trips():
    answers = ["19.57.34.8", "8.8.8.8", "0.0.0.0", "255.255.255.255", "192.0.2.77"]
    df = T.derive_ips("A", answers)
    forward = df[df["transform"] == "I5_nymaim2"].set_index("row")["ip"]
    inverse = df[df["transform"] == "I5_nymaim2_inv"].set_index("row")["ip"]
    for i, answer in enumerate(answers):
        assert forward[i] == _nymaim2_slow(answer)
        assert inverse[i] == _nymaim2_slow(answer, inverse=True)
        back = T.derive_ips("A", [forward[i]])
        assert back.loc[back["transform"] == "I5_nymaim2_inv", "ip"].tolist() == [answer]
    assert forward[0] == "19.41.37.22"


def test_a_record_ip_transforms():
    df = T.derive_ips("A", ["19.57.34.8", "1.1.1.1", "1.2.2.1"])
    row0 = dict(zip(df.loc[df["row"] == 0, "transform"].astype(str), df.loc[df["row"] == 0, "ip"]))
    assert row0["I1"] == "8.34.57.19"
    assert row0["I4_bacd"] == "57.19.34.8" and row0["I4_dabc"] == "8.19.57.34"
    assert sum(k.startswith("I4_") for k in row0) == 22 and "I4_abcd" not in row0 and "I4_dcba" not in row0
    # results equal to the answer are not derivations: 1.1.1.1 keeps only the Nymaim2 pair
    assert sorted(df.loc[df["row"] == 1, "transform"].astype(str)) == ["I5_nymaim2", "I5_nymaim2_inv"]
    assert "I1" not in set(df.loc[df["row"] == 2, "transform"].astype(str))  # 1.2.2.1 reversed is itself


def test_ip_and_port_keys():
    a, _ = T.ipv4_to_int(["10.0.0.1", "255.255.255.255"])
    d, _ = T.ipv4_to_int(["10.0.0.3", "0.0.0.1"])
    keys = T.ip_keys(a, d)
    assert keys["I2_xor"].tolist() == [2, 0xFFFFFFFE]
    assert keys["I3_add"].tolist() == [2, 2]  # (1 - 0xFFFFFFFF) mod 2^32
    pk = T.port_keys(np.array([1234, 65535, -1]), np.array([1236, 1, 80]))
    assert pk["P9_xor"].tolist() == [1234 ^ 1236, 65535 ^ 1, -1]
    assert pk["P9_add"].tolist() == [2, 2, -1]


# ---------------------------------------------------------------- explanations and catalogue


@pytest.mark.parametrize(
    "args, text",
    [
        (("P1", "19.57.34.8", 1117), "1117 = 19*57+34 (APT12 a*b+c)"),
        (("P3", "10.1.4.210", 1234), "1234 = 4*256+210 (low 16 bits c*256+d)"),
        (("P1", "19.57.34.8", 1118), "1118 != 19*57+34 = 1117 (APT12 a*b+c)"),
        (("P7_le_k4", "19.57.34.8", 9105), "9105 = (0x08223913>>4)&0xFFFF (16-bit window of little-endian word at bit 4)"),
        (("P8_x*y-z_cdb", "19.57.34.8", 215), "215 = 34*8-57 (grammar c*d-b)"),
        (("P11_v4_P1", "::ffff:19.57.34.8", 1117), "1117 = 19*57+34 on embedded IPv4 19.57.34.8 (APT12 a*b+c on AAAA-embedded IPv4 (h6:h7))"),
        (("I1", "19.57.34.8", "8.34.57.19"), "8.34.57.19 = d.c.b.a of 19.57.34.8 (byte-reversed IP)"),
        (("P1", "junk", 5), "5: 'junk' is not an A answer (APT12 a*b+c)"),
    ],
)
def test_describe(args, text):
    assert T.describe(*args) == text


def test_describe_text_sources_say_whether_found():
    assert T.describe("P12_txt_b64", "cG9ydD01NTU1", 5555).startswith("5555 found in TXT answer 'cG9ydD01NTU1'")
    assert T.describe("P12_srv", "10 60 5060 sip.example.", 5061).startswith("5061 not found in SRV answer")


def test_catalogue_is_consistent():
    assert isinstance(T.TRANSFORM_LIBRARY_VERSION, str) and T.TRANSFORM_LIBRARY_VERSION
    for tid, t in T.TRANSFORMS.items():
        assert t.id == tid and t.output in ("port", "ip") and 0 < t.prior <= 1 and t.rtypes
        if t.output == "port":
            assert T.chance_vector(tid).shape == (65536,)
    assert [t.id for t in T.A_IP_TRANSFORMS][:2] == ["I1", "I4_abdc"]
    assert len(T.A_IP_TRANSFORMS) == 25


def test_rows_are_positions_not_series_labels():
    answers = pd.Series(["x", "19.57.34.8"], index=[10, 20], dtype="str")
    rtypes = pd.Series(["TXT", "A"], index=[5, 6], dtype="str")
    df = T.derive_ports(rtypes, answers)
    assert set(df["row"]) == {1} and _ports_of(df, 1)["P1"] == 1117


def test_checksum_rows_exact():
    words = np.array([5, 7, 12, 2**32 - 1, 2, 1, 9, 9], dtype=np.uint64)
    group = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    # group 0: 12 = 5 + 7; group 1: 1 = (2^32 - 1) + 2 mod 2^32; group 2 has two rows only
    assert T.checksum_rows(words, group).tolist() == [False, False, True, False, False, True, False, False]
    assert T.checksum_rows(words, group, min_records=2).tolist()[6:] == [True, True]
