"""Scope (`features.scope`): connections a monitored entity initiated, re-oriented, the rest counted by reason."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from esxi_anomaly import schema
from esxi_anomaly.features.merge import duplicate_records
from esxi_anomaly.features.scope import (REASONS, Scope, apply_scope, coverage, diagnostic_lines, resolvers_seen,
                                         scope_line, scoped_history)

NOW = 1_800_000_000.0


def _conns(rows: list[dict]) -> pd.DataFrame:
    base = {"ts": 1_700_000_000.0, "src_port": 50000, "proto": "tcp", "source": "zeek_conn_tsv", "conn_state": "SF",
            "history": "ShADadFf", "bytes_out": 10.0, "bytes_in": 200.0, "packets_out": 1.0, "packets_in": 2.0}
    frame = pd.DataFrame([{**base, "event_id": f"C{i}", **row} for i, row in enumerate(rows)])
    return schema.conform(frame, "connections")


def _reasons(result) -> dict:
    return {k: v for k, v in result.out_of_scope.items() if v}


def test_each_reason_is_counted_once_and_in_scope_rows_kept():
    conns = _conns([
        {"src_ip": "10.0.0.5", "dst_ip": "93.184.216.34", "dst_port": 443},                 # in scope
        {"src_ip": "203.0.113.9", "dst_ip": "10.0.0.5", "dst_port": 22},                    # inbound scan
        {"src_ip": "10.0.0.5", "dst_ip": "8.8.8.8", "dst_port": 8, "proto": "icmp"},        # ICMP type as port
        {"src_ip": "10.0.0.5", "dst_ip": "224.0.0.22", "dst_port": -1, "proto": "igmp"},    # IGMP (and multicast)
        {"src_ip": "10.0.0.5", "dst_ip": "239.255.255.250", "dst_port": 1900, "proto": "udp"},
        {"src_ip": "10.0.0.5", "dst_ip": "255.255.255.255", "dst_port": 67, "proto": "udp"},
        {"src_ip": "10.0.0.5", "dst_ip": "10.0.0.255", "dst_port": 137, "proto": "udp"},   # directed broadcast
        {"src_ip": "10.0.0.5", "dst_ip": "169.254.1.1", "dst_port": 80},
        {"src_ip": "fe80::1", "dst_ip": "fe80::2", "dst_port": 5000},
        {"src_ip": "10.0.0.5", "dst_ip": "10.0.0.53", "dst_port": 53, "proto": "udp"},     # lookup to the resolver
    ])
    result = apply_scope(conns, None, Scope(resolvers=("10.0.0.53",)), now=NOW)
    assert result.connections["event_id"].tolist() == ["C0"]
    assert _reasons(result) == {"inbound": 1, "icmp": 1, "other_protocol": 1, "multicast": 1, "broadcast": 2,
                                "link_local": 2, "resolver_lookup": 1}
    assert result.checks["read"] == len(conns) == result.checks["in_scope"] + sum(result.out_of_scope.values())
    assert set(result.out_of_scope) == set(REASONS)


def test_a_flow_recorded_backwards_is_turned_round_and_scored_from_the_local_side():
    conns = _conns([
        # Zeek picked up a DoT session midstream: the resolver's side logged as the originator
        {"src_ip": "1.1.1.2", "src_port": 853, "dst_ip": "10.0.0.5", "dst_port": 51234, "conn_state": "OTH",
         "history": "dA", "bytes_out": 900.0, "bytes_in": 100.0, "local_orig": "F", "local_resp": "T"},
        # Zeek flipped this one itself ("^"): as logged, it is the right way round already
        {"src_ip": "10.0.0.5", "src_port": 853, "dst_ip": "203.0.113.5", "dst_port": 40000, "history": "^dA",
         "conn_state": "SHR"},
        # an inbound SYN from a source port 443 (a scanner's trick): the SYN shows who opened it
        {"src_ip": "203.0.113.9", "src_port": 443, "dst_ip": "10.0.0.5", "dst_port": 40000, "history": "S",
         "conn_state": "S0"},
    ])
    result = apply_scope(conns, None, Scope(), now=NOW)
    got = result.connections.set_index("event_id")
    assert list(got.index) == ["C0", "C1"] and result.checks["reoriented"] == 1
    turned = got.loc["C0"]
    assert (turned.src_ip, turned.src_port, turned.dst_ip, turned.dst_port) == ("10.0.0.5", 51234, "1.1.1.2", 853)
    assert (turned.bytes_out, turned.bytes_in, turned.local_orig, turned.local_resp) == (100.0, 900.0, "T", "F")
    assert got.loc["C1"].src_ip == "10.0.0.5"
    assert _reasons(result) == {"inbound": 1} and result.checks["dns_over_tls"] == 1


def test_monitored_sources_inventory_local_nets_and_local_orig():
    conns = _conns([
        {"src_ip": "147.32.83.165", "dst_ip": "93.184.216.34", "dst_port": 443, "local_orig": "T"},
        {"src_ip": "100.64.1.2", "dst_ip": "93.184.216.34", "dst_port": 443},
        {"src_ip": "198.51.100.7", "dst_ip": "93.184.216.34", "dst_port": 443},
        {"src_ip": "192.168.1.9", "dst_ip": "93.184.216.34", "dst_port": 443},
    ])
    inventory = schema.conform(pd.DataFrame({"ip": ["198.51.100.7"], "name": ["web01"], "kind": ["vm"]}), "inventory")
    default = apply_scope(conns, inventory, Scope(), now=NOW)
    assert default.connections["event_id"].tolist() == ["C0", "C2", "C3"]   # local_orig, inventory, RFC 1918
    nets = apply_scope(conns, None, Scope(local_nets=("100.64.0.0/10",)), now=NOW)
    assert nets.connections["event_id"].tolist() == ["C0", "C1"]          # RFC 1918 is no longer assumed
    assert apply_scope(conns, None, Scope(all_directions=True), now=NOW).connections.equals(conns)
    with pytest.raises(ValueError, match="not a CIDR"):
        Scope(local_nets=("10.0.0.0/33",))


def test_resolvers_come_from_the_answers_and_lookups_elsewhere_stay():
    dns = schema.conform(pd.DataFrame({"client_ip": ["10.0.0.5"], "resolver_ip": ["10.0.0.53"], "query": ["a.b"]}),
                         "dns_answers")
    assert resolvers_seen(dns) == ["10.0.0.53"]
    conns = _conns([{"src_ip": "10.0.0.5", "dst_ip": "10.0.0.53", "dst_port": 53, "proto": "udp"},
                    {"src_ip": "10.0.0.5", "dst_ip": "203.0.113.53", "dst_port": 53, "proto": "udp"}])
    frames, counts = scoped_history(schema.Frames(conns, dns, None), Scope(), now=NOW)
    assert frames.connections["event_id"].tolist() == ["C1"] and counts["resolver_lookup"] == 1


def test_duplicate_records_of_one_sensor_are_merged_and_counted():
    row = {"src_ip": "10.0.0.5", "dst_ip": "93.184.216.34", "dst_port": 443}
    dfw = {**row, "source": "nsx_dfw"}
    conns = _conns([row, row, {**row, "ts": 1_700_000_001.0}, dfw, dfw])
    # the second row repeats the first (another uid); DFW logs OUT and IN by design: `merge` merges those
    assert duplicate_records(conns).tolist() == [False, True, False, False, False]
    frames, counts = scoped_history(schema.Frames(conns, schema.empty("dns_answers"), None), Scope(), now=NOW)
    assert len(frames.connections) == 4 and counts["duplicates"] == 1
    assert any("duplicate connection records" in line for line in diagnostic_lines(counts))


def test_diagnostics_name_the_dns_gap_encrypted_dns_and_odd_times():
    counts = {"read": 100, "in_scope": 90, "scored": 90, "joined_dns": 3, "dns_over_tls": 12, "icmp": 10,
              "before_2000": 5, "future": 1}
    lines = diagnostic_lines(counts, dns_records=40, history_days=0.2)
    assert lines[0].startswith("only 3 % of in-scope connections were joined to a DNS answer")
    assert "DNS over TLS (port 853) on 12 connections seen" in lines[0]
    assert any("before 2000" in line for line in lines) and any("future" in line for line in lines)
    assert any("under a day" in line for line in lines)
    assert "no DNS answers were read" in diagnostic_lines({**counts, "dns_over_tls": 0}, dns_records=0)[0]
    assert diagnostic_lines({"read": 10, "in_scope": 10, "scored": 10, "joined_dns": 9}, 50, 3.0) == []
    assert coverage(counts)["dns_share"] == pytest.approx(3 / 90, abs=1e-4)
    assert scope_line(counts) == "scope: 90 of 100 connections in scope; out of scope: ICMP 10"


def test_apply_scope_works_per_distinct_address():
    """Thousands of rows of a few addresses: decided per address (no Python step per row)."""
    n = 50_000
    rng = np.random.default_rng(0)
    conns = _conns([{"src_ip": "10.0.0.5", "dst_ip": "93.184.216.34", "dst_port": 443}]).sample(n, replace=True,
                                                                                                  random_state=0)
    conns["src_ip"] = pd.Series(rng.choice(["10.0.0.5", "203.0.113.9"], n), dtype="str").to_numpy()
    conns = schema.conform(conns, "connections")
    result = apply_scope(conns, None, Scope(), now=NOW)
    assert result.checks["in_scope"] == int((conns["src_ip"] == "10.0.0.5").sum())
    assert result.out_of_scope["inbound"] == n - result.checks["in_scope"]


def test_a_backwards_row_is_slotted_by_its_initiator():
    """The engines cut sources into partitions by `initiators`: a re-oriented row must go with the
    connections and DNS answers of the host that opened it."""
    from esxi_anomaly.features.scope import initiators

    conns = _conns([{"src_ip": "1.1.1.2", "src_port": 853, "dst_ip": "10.0.0.5", "dst_port": 51234, "history": "dA"},
                    {"src_ip": "10.0.0.5", "src_port": 51000, "dst_ip": "1.1.1.2", "dst_port": 853}])
    assert initiators(conns, Scope()).tolist() == ["10.0.0.5", "10.0.0.5"]
    assert initiators(conns, Scope(all_directions=True)).tolist() == ["1.1.1.2", "10.0.0.5"]


def test_recorded_backwards_reads_the_text_columns_of_port_candidates_only_with_the_same_result():
    """`recorded_backwards` checks the ports first and the direction (source, state, history, protocol)
    of the rows they leave: the same answer as the whole-row formula, row by row."""
    from esxi_anomaly.features.scope import _lower, _service, direction_known, recorded_backwards

    rng = np.random.default_rng(7)
    n = 4000
    conns = _conns([{"src_ip": "10.0.0.5", "dst_ip": "10.0.0.9",
                     "src_port": int(rng.choice([53, 443, 853, 902, 5000, 50000, 65535])),
                     "dst_port": int(rng.choice([22, 443, 1023, 1024, 5353, 8443, 51234])),
                     "proto": str(rng.choice(["tcp", "UDP", "icmp", "", "Tcp"])),
                     "source": str(rng.choice(["zeek_conn_tsv", "zeek_conn_json", "nsx_dfw", "vds_ipfix", "sysmon"])),
                     "conn_state": str(rng.choice(["SF", "OTH", "S0", "RSTOS0", ""])),
                     "history": str(rng.choice(["ShADadFf", "^dA", "dA", "S", "R", ""]))} for _ in range(n)])
    conns.index = np.arange(n) * 3 + 11   # not a range index: candidates are taken by position
    proto = _lower(conns["proto"])
    sport, dport = conns["src_port"].to_numpy(dtype="int64"), conns["dst_port"].to_numpy(dtype="int64")
    whole = (np.isin(proto, ("tcp", "udp", "")) & _service(sport) & (dport >= 1024) & ~_service(dport)
             & ~direction_known(conns, proto))
    assert 0 < whole.sum() < n
    np.testing.assert_array_equal(recorded_backwards(conns), whole)
    np.testing.assert_array_equal(recorded_backwards(conns, proto), whole)
    assert not recorded_backwards(conns.iloc[:0]).size
