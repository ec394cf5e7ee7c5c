"""DNS-to-port relationship features on hand-made cases with exact expected values."""
from __future__ import annotations

import numpy as np
import pandas as pd

from esxi_anomaly import schema
from esxi_anomaly.features import dns_join, dns_port
from esxi_anomaly.features.stream_state import StreamState


def make(dns_rows, conn_rows):
    dns = schema.conform(pd.DataFrame(dns_rows, columns=["event_id", "ts", "client_ip", "query", "answer"]).assign(
        rtype="A", answer_index=0, ttl=60.0, rcode="NOERROR"), "dns_answers")
    conns = schema.conform(pd.DataFrame(conn_rows, columns=["event_id", "ts", "src_ip", "dst_ip", "dst_port"]).assign(
        proto="tcp"), "connections")
    return conns, dns


def features(conns, dns, state=None):
    j = dns_join.join(conns, dns)
    return dns_port.relationship_features(conns, dns, j, state)


def test_apt12_match_and_repeated_derivation():
    # the C2 answer changes; the port follows a*b+c each time
    conns, dns = make(
        [("d1", 100, "10.0.0.5", "upd.evil.net", "19.57.34.8"), ("d2", 1000, "10.0.0.5", "upd.evil.net", "20.30.40.9"),
         ("d3", 2000, "10.0.0.5", "upd.evil.net", "19.57.34.8")],
        [("c1", 102.1, "10.0.0.5", "19.57.34.8", 1117), ("c2", 1001, "10.0.0.5", "20.30.40.9", 640),
         ("c3", 2001, "10.0.0.5", "19.57.34.8", 1117)])
    f, ev = features(conns, dns)
    assert f["dst_is_answer"].tolist() == [1, 1, 1]
    assert ev["transform"].tolist() == ["P1", "P1", "P1"]
    assert f["match_on_ip_answer"].tolist() == [1, 1, 1]
    # distinct ports explained by a*b+c for (client, name): 1, then 2, and a repeat of 1117 adds none
    assert f["consistency_ports"].tolist() == [1, 2, 2]
    assert ev.loc[0, "answer"] == "19.57.34.8" and ev.loc[0, "query"] == "upd.evil.net"
    assert abs(ev.loc[0, "dns_delay"] - 2.1) < 1e-9
    assert (f["match_significance"] > 0).all()
    assert f.loc[0, "arith_distance_log"] == 0.0


def test_cdn_coincidence_on_stable_port_is_not_evidence():
    # rotating answers 2.200.43.x all give 2*200+43 = 443, and the client always uses 443
    dns_rows = [(f"d{i}", 100 * i, "10.0.0.6", "cdn.example.com", f"2.200.43.{i}") for i in range(1, 9)]
    conn_rows = [(f"c{i}", 100 * i + 1, "10.0.0.6", f"2.200.43.{i}", 443) for i in range(1, 9)]
    f, ev = features(*make(dns_rows, conn_rows))
    assert (ev["transform"] == "P1").all()          # the coincidence is seen...
    assert f["consistency_ports"].max() == 1         # ...but the port never follows the answer
    assert f["keyed_consistency"].max() == 1         # nor does a constant key appear


def test_keyed_xor_variant_from_two_distinct_answers():
    key = 0x5A5A
    answers = ["10.1.4.210", "10.1.9.17"]
    ports = [(4 * 256 + 210) ^ key, (9 * 256 + 17) ^ key]
    conns, dns = make([("d1", 100, "10.0.0.7", "k.evil.net", answers[0]), ("d2", 500, "10.0.0.7", "k.evil.net", answers[1])],
                      [("c1", 101, "10.0.0.7", answers[0], ports[0]), ("c2", 501, "10.0.0.7", answers[1], ports[1])])
    f, ev = features(conns, dns)
    assert f["keyed_consistency"].tolist() == [1, 2]
    assert ev.loc[1, "transform"] == "P9_xor"


def test_keyed_offset_variant_from_two_distinct_answers():
    key = 7_000
    answers = ["10.1.4.210", "10.1.9.17"]
    ports = [(4 * 256 + 210 + key) % 65536, (9 * 256 + 17 + key) % 65536]
    conns, dns = make([("d1", 100, "10.0.0.8", "o.evil.net", answers[0]), ("d2", 500, "10.0.0.8", "o.evil.net", answers[1])],
                      [("c1", 101, "10.0.0.8", answers[0], ports[0]), ("c2", 501, "10.0.0.8", answers[1], ports[1])])
    f, ev = features(conns, dns)
    assert f["keyed_consistency"].tolist() == [1, 2]
    assert ev.loc[1, "transform"] == "P9_add"


def test_state_carries_consistency_across_batches():
    conns, dns = make(
        [("d1", 100, "10.0.0.5", "upd.evil.net", "19.57.34.8"), ("d2", 1000, "10.0.0.5", "upd.evil.net", "20.30.40.9")],
        [("c1", 102, "10.0.0.5", "19.57.34.8", 1117), ("c2", 1001, "10.0.0.5", "20.30.40.9", 640)])
    one_shot, _ = features(conns, dns)
    state = StreamState()
    first, _ = features(conns.iloc[:1], dns.iloc[:1], state)
    second, _ = features(conns.iloc[1:].reset_index(drop=True), dns, state)
    assert first["consistency_ports"].tolist() + second["consistency_ports"].tolist() == one_shot["consistency_ports"].tolist() == [1, 2]


def test_no_dns_at_all():
    conns, dns = make([], [("c1", 1, "10.0.0.9", "66.63.168.35", 5888)])
    f, ev = features(conns, dns)
    assert f["dst_is_answer"].tolist() == [0]
    assert f["dns_delay_log"].tolist() == [dns_port.NO_DNS_DELAY_LOG]
    assert ev["transform"].tolist() == [""]


def make_typed(dns_rows, conn_rows):
    """As `make`, with (event_id, ts, client, query, rtype, answer, answer_index) DNS rows."""
    dns = schema.conform(pd.DataFrame(dns_rows, columns=["event_id", "ts", "client_ip", "query", "rtype", "answer",
                                                         "answer_index"]).assign(ttl=60.0, rcode="NOERROR"), "dns_answers")
    conns = schema.conform(pd.DataFrame(conn_rows, columns=["event_id", "ts", "src_ip", "dst_ip", "dst_port"]).assign(
        proto="tcp"), "connections")
    return conns, dns


def test_via_cname_marks_the_ip_reached_through_an_alias():
    conns, dns = make_typed(
        [("d1", 100, "10.0.0.5", "x1y2z3.appsync-api.evil.net", "CNAME", "c2.freescan.net", 0),
         ("d1", 100, "10.0.0.5", "x1y2z3.appsync-api.evil.net", "A", "13.59.205.66", 1),
         ("d2", 200, "10.0.0.5", "www.example.com", "A", "93.184.216.34", 0)],
        [("c1", 101, "10.0.0.5", "13.59.205.66", 443), ("c2", 201, "10.0.0.5", "93.184.216.34", 443),
         ("c3", 202, "10.0.0.5", "8.8.8.8", 443)])
    f, _ = features(conns, dns)
    assert f["via_cname"].tolist() == [1, 0, 0]


def test_answer_checksum_on_raw_and_nymaim_decoded_records():
    from esxi_anomaly.features import transforms as T

    # raw: 10.0.0.1 + 10.0.0.2 = 20.0.0.3; decoded: the third record's Nymaim2 decoding is the sum
    # of the other two decodings mod 2^32 (records built by inverting the decoder)
    def encode(words):
        little = T._nymaim2_inverse(np.asarray(words, dtype=np.uint32))
        return T._octets_to_strings(T._int_to_octets(T._byteswap32(little)))

    decoded = np.array([0xC0A80001, 0xFFFFFFF0, (0xC0A80001 + 0xFFFFFFF0) % 2**32], dtype=np.uint32)
    coded = encode(decoded)
    rows = [("d1", 100, "10.0.0.5", "a.evil.net", "A", ip, i) for i, ip in enumerate(["10.0.0.1", "10.0.0.2", "20.0.0.3"])]
    rows += [("d2", 200, "10.0.0.5", "b.evil.net", "A", ip, i) for i, ip in enumerate(coded)]
    rows += [("d3", 300, "10.0.0.5", "cdn.example.com", "A", ip, i) for i, ip in enumerate(["2.2.2.1", "2.2.2.2", "2.2.2.4"])]
    conns, dns = make_typed(rows, [("c1", 101, "10.0.0.5", "10.0.0.2", 443), ("c2", 201, "10.0.0.5", coded[0], 443),
                                   ("c3", 301, "10.0.0.5", "2.2.2.4", 443)])
    f, _ = features(conns, dns)
    assert f["answer_checksum"].tolist() == [1, 1, 0]


def test_no_a_record_candidates_for_unlinked_connections():
    """Connections not linked by IP whose candidate answers hold no A record (only a CNAME): the IP
    derivation tests have nothing to compare and give nothing (regression: an empty comparison
    raised on real Zeek logs)."""
    conns, dns = make([("d1", 99, "10.0.0.5", "www.example.com", "cdn.example.net")],
                      [("c1", 100, "10.0.0.5", "198.51.100.7", 443)])
    dns = dns.assign(rtype="CNAME")
    feats, evidence = features(conns, dns)
    assert feats["ip_derived"].tolist() == [0.0] and feats["dst_is_answer"].tolist() == [0.0]
    assert evidence["transform"].tolist() == [""]
