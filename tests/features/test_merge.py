"""One row per connection and per DNS answer across sources (issue #14): DFW OUT/IN pairs, esxcli
snapshots, Sysmon vs a DNS server; in one batch, across batches and in the batch engine."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from esxi_anomaly import schema
from esxi_anomaly.scoring import core, local
from esxi_anomaly.features import identity, merge, pipeline
from esxi_anomaly.features.stream_state import StreamState

T0 = 1_709_769_600.0   # 2024-03-07T00:00:00Z


def conn(ts, host, source="nsx_dfw", src_port=50_000, event_id=None, **values):
    row = {"event_id": event_id or f"{source}-{host}-{ts}", "ts": T0 + ts, "src_ip": "10.20.2.11",
           "src_port": src_port, "dst_ip": "10.20.7.11", "dst_port": 8086, "proto": "tcp", "esxi_host": host,
           "source": source, "duration": 1.0, "bytes_out": 52.0, "bytes_in": np.nan, "packets_out": 1.0}
    return row | values


def frame(*rows) -> pd.DataFrame:
    return schema.conform(pd.DataFrame(list(rows)), "connections")


def test_vm_to_vm_connection_logged_at_two_hosts_is_one_row():
    conns = frame(conn(0.0, "esx01", event_id="out", bytes_out=52.0),
                  conn(0.0, "esx03", event_id="in", bytes_out=80.0, bytes_in=40.0))
    out = merge.merge_connections(conns)
    assert len(out) == 1
    row = out.iloc[0]
    assert row["seen_by"] == "nsx_dfw:esx01 nsx_dfw:esx03"
    assert row["event_id"] == "out" and row["esxi_host"] == "esx01"      # the earliest row's values
    assert (row["bytes_out"], row["bytes_in"], row["packets_out"]) == (80.0, 40.0, 1.0)   # the largest counts
    # the features boundary sees it: one prepared row, its vantage points kept
    prepared = pipeline.prepare(conns, schema.empty("dns_answers"), None)
    assert prepared.conns["seen_by"].tolist() == ["nsx_dfw:esx01 nsx_dfw:esx03"]


def test_two_connections_on_one_five_tuple_five_minutes_apart_stay_two():
    conns = frame(conn(0.0, "esx01"), conn(0.0, "esx03"), conn(300.0, "esx01"), conn(300.5, "esx03"))
    out = merge.merge_connections(conns)
    assert out["ts"].tolist() == [T0, T0 + 300.0]
    assert out["seen_by"].tolist() == ["nsx_dfw:esx01 nsx_dfw:esx03"] * 2


def test_rows_further_apart_than_the_tolerance_stay_apart():
    conns = frame(conn(0.0, "esx01"), conn(2.5, "esx03"), conn(3.0, "esx01", src_port=50_001))
    assert len(merge.merge_connections(conns)) == 3


def test_esxcli_snapshot_joins_within_the_snapshot_period_plus_duration():
    dfw = conn(0.0, "esx01", duration=100.0)
    inside = conn(159.0, "esx01", source="esxcli_connections", duration=np.nan, bytes_out=np.nan)
    outside = conn(161.0, "esx01", source="esxcli_connections", duration=np.nan, bytes_out=np.nan)
    assert merge.merge_connections(frame(dfw, inside))["seen_by"].tolist() == [
        "nsx_dfw:esx01 esxcli_connections:esx01"]
    assert merge.merge_connections(frame(dfw, outside))["seen_by"].tolist() == [
        "nsx_dfw:esx01", "esxcli_connections:esx01"]
    # snapshots of one socket in successive files: one connection, one vantage point
    snaps = frame(*(conn(60.0 * k, "esx02", source="esxcli_connections", duration=0.0) for k in range(4)))
    assert merge.merge_connections(snaps)["seen_by"].tolist() == ["esxcli_connections:esx02"]


def test_sysmon_and_dfw_rows_merge_in_order_of_first_sight():
    conns = frame(conn(0.0, "", source="sysmon_network", event_id="sysmon"), conn(1.2, "esx01"),
                  conn(1.2, "esx03"), conn(1.5, "esx01"))
    out = merge.merge_connections(conns)
    assert out["event_id"].tolist() == ["sysmon"]
    assert out["seen_by"].tolist() == ["sysmon_network nsx_dfw:esx01 nsx_dfw:esx03"]


def test_zeek_rows_are_kept_as_they_are():
    conns = frame(conn(0.0, "", source="zeek_conn_tsv", event_id="C1"),
                  conn(0.5, "", source="zeek_conn_tsv", event_id="C2"))
    out = merge.merge_connections(conns)
    pd.testing.assert_frame_equal(out.drop(columns="seen_by"), conns)
    assert out["seen_by"].tolist() == ["zeek_conn_tsv", "zeek_conn_tsv"]


def dns_row(ts, source, client="10.20.2.11", answer="10.20.7.11", event_id=None):
    return {"event_id": event_id or f"{source}-{ts}", "ts": T0 + ts, "client_ip": client, "resolver_ip": "10.0.0.53",
            "query": "metrics.corp.local", "rtype": "A", "answer": answer, "answer_index": 0, "ttl": 60.0,
            "rcode": "NOERROR", "source": source}


def test_the_same_answer_from_sysmon_and_infoblox_is_one_dns_row():
    inventory = schema.conform(pd.DataFrame({"ip": ["10.20.2.11"], "name": ["app01.corp.local"], "kind": ["vm"],
                                             "esxi_host": ["esx01"], "role": ["app"]}), "inventory")
    dns = schema.conform(pd.DataFrame([
        dns_row(0.0, "sysmon_dns", client="APP01.corp.local", event_id="sysmon"),
        dns_row(0.3, "infoblox_nios", event_id="infoblox"),
        dns_row(0.4, "infoblox_nios", answer="10.20.7.12"),           # another answer: kept
        dns_row(600.0, "infoblox_nios", event_id="later"),            # asked again later: kept
    ]), "dns_answers")
    out = merge.merge_dns(identity.resolve_clients(dns, inventory))
    assert out["event_id"].tolist() == ["sysmon", "infoblox_nios-0.4", "later"]
    assert out["client_ip"].tolist() == ["10.20.2.11"] * 3
    # one source's repeated rows are its own: never merged
    same = schema.conform(pd.DataFrame([dns_row(0.0, "infoblox_nios"), dns_row(0.5, "infoblox_nios", event_id="b")]),
                          "dns_answers")
    assert len(merge.merge_dns(same)) == 2


def test_batches_with_carried_state_merge_as_one_batch():
    rows = [conn(0.0, "esx01", event_id="a"), conn(0.0, "esx03", event_id="b"),
            conn(9.0, "esx01", src_port=50_001, event_id="c"), conn(10.0, "esx03", src_port=50_001, event_id="d"),
            conn(11.0, "esx01", src_port=50_002, event_id="e")]
    whole = merge.merge_connections(frame(*rows))
    state = StreamState()
    first = merge.merge_connections(frame(*rows[:3]), state)
    second = merge.merge_connections(frame(*rows[3:]), state)
    assert whole["event_id"].tolist() == ["a", "c", "e"]
    # the row of "c" seen again after the border is dropped there: its connection was kept before
    assert first["event_id"].tolist() + second["event_id"].tolist() == ["a", "c", "e"]
    # the state round-trips through its files
    assert set(state.recent) >= {"merge_conn", "merge_conn_info", "merge_conn_vantage"}


def test_chunk_bounds_never_split_a_connection():
    conns = frame(conn(0.0, "esx01"), conn(1.0, "esx03"), conn(2.0, "esx01", src_port=2),
                  conn(3.0, "esx03", src_port=2), conn(4.0, "esx01", src_port=3), conn(5.0, "esx01", src_port=4))
    ts = conns["ts"].to_numpy()
    assert core.chunk_bounds(ts, 1) == [(i, i + 1) for i in range(6)]
    assert core.chunk_bounds(ts, 1, merge.connection_groups(conns)) == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert core.chunk_bounds(ts, 3, merge.connection_groups(conns)) == [(0, 4), (4, 6)]


def dfw_line(ts: float, host: str, direction: str, src_port: int, reverse: bool = False) -> str:
    when = pd.Timestamp(ts, unit="s", tz="UTC").strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    ends = f"10.20.7.11/8086->10.20.2.11/{src_port}" if reverse else f"10.20.2.11/{src_port}->10.20.7.11/8086"
    return f"<13>1 {when} {host} FIREWALL-PKTLOG 1070157 - - 6bc116c9 INET match PASS 1024 {direction} 52 TCP {ends} SEW"


@pytest.mark.parametrize("chunk_rows, reverse", [(3, False), (5, False), (3, True)])
def test_batch_engine_merges_a_pair_across_a_chunk_border_as_one_shot(tmp_path, small_day, chunk_rows, reverse):
    model, folder = small_day
    from esxi_anomaly.ingest import read_connections, read_dns

    dns = read_dns(folder / "dns.log")
    start = float(dns["ts"].max()) - 600
    # 12 VM-to-VM connections, each OUT at esx-01 then IN at esx-03 1 s later: odd chunk sizes
    # put chunk borders between the two rows of one connection (reverse: the IN row logged backwards)
    lines = [dfw_line(start + 10 * k + dt, host, direction, 40_000 + k, reverse and direction == "IN")
             for k in range(12) for dt, host, direction in ((0.0, "esx-01", "OUT"), (1.0, "esx-03", "IN"))]
    path = tmp_path / "dfw.log"
    path.write_text("\n".join(lines) + "\n")
    one_shot = model.score(schema.Frames(read_connections(path), dns, None))
    out = tmp_path / "ranked.csv"
    summary = local.run(model, [path], [folder / "dns.log"], out, chunk_rows=chunk_rows, progress=False)
    assert (summary.connections, summary.connections_merged, summary.written) == (24, 12, 12)
    streamed = pd.read_csv(out, dtype={"event_id": "str"}, keep_default_na=False)
    assert streamed["seen_by"].tolist() == ["nsx_dfw:esx-01 nsx_dfw:esx-03"] * 12
    assert streamed["explanation"].str.endswith("; seen by nsx_dfw:esx-01, nsx_dfw:esx-03").all()
    assert streamed["event_id"].tolist() == one_shot["event_id"].tolist()
    assert streamed["explanation"].tolist() == one_shot["explanation"].tolist()
    assert (streamed["src_ip"] == "10.20.2.11").all() and (streamed["dst_port"] == 8086).all()


def test_explanation_names_the_vantage_points_only_when_several_saw_the_row():
    from esxi_anomaly.detect import explain

    rows = pd.DataFrame({"transform": ["", ""], "answer": ["", ""], "rtype": ["", ""], "query": ["", ""],
                         "dns_delay": [np.nan, np.nan], "consistency": [0.0, 0.0], "dst_port": [8086, 8086],
                         "dst_ip": ["10.20.7.11"] * 2, "src_name": ["app01"] * 2, "port_never_seen": [0, 0],
                         "dst_never_seen": [0, 0], "dst_is_answer": [0, 0], "rules": ["", ""],
                         "seen_by": ["nsx_dfw:esx01 nsx_dfw:esx03", "zeek_conn_tsv"]})
    assert explain.sentences(rows, 7.0).tolist() == [
        "no DNS answer explains 10.20.7.11:8086; seen by nsx_dfw:esx01, nsx_dfw:esx03",
        "no DNS answer explains 10.20.7.11:8086"]


@pytest.mark.parametrize("more", [1, 0])
def test_batch_engine_merges_a_pair_across_a_bucket_border(tmp_path, small_day, more):
    """Bucket groups are scored one after the other: the later row of a connection whose first row
    was scored in the group before is dropped (StreamState), so the rows equal the one-shot rows."""
    model, folder = small_day
    from esxi_anomaly.ingest import read_connections, read_dns

    dns = read_dns(folder / "dns.log")
    border = (np.floor(float(dns["ts"].max()) / 1800) - 1) * 1800
    lines = [dfw_line(border - 0.5, "esx-01", "OUT", 40_000), dfw_line(border + 0.5, "esx-03", "IN", 40_000),
             dfw_line(border + 30, "esx-01", "OUT", 40_001)][:2 + more]   # without it, the later group scores none
    path = tmp_path / "dfw.log"
    path.write_text("\n".join(lines) + "\n")
    one_shot = model.score(schema.Frames(read_connections(path), dns, None))
    out = tmp_path / "ranked.csv"
    summary = local.run(model, [path], [folder / "dns.log"], out, chunk_rows=1, bucket_s=1800, progress=False)
    assert (summary.connections, summary.connections_merged) == (2 + more, 1 + more)
    streamed = pd.read_csv(out, dtype={"event_id": "str"}, keep_default_na=False)
    assert sorted(streamed["event_id"]) == sorted(one_shot["event_id"])


def esx_pair_row(ts, source, host, reverse=False, event_id=None, conn_state="", **values):
    """One side of 10.0.0.20:50123 -> 192.168.35.11:902 (reversed: as logged from the other end)."""
    ends = [("10.0.0.20", 50_123), ("192.168.35.11", 902)][::-1 if reverse else 1]
    row = conn(ts, host, source=source, event_id=event_id, conn_state=conn_state, **values)
    return row | {"src_ip": ends[0][0], "src_port": ends[0][1], "dst_ip": ends[1][0], "dst_port": ends[1][1]}


@pytest.mark.parametrize("esxcli_first", [True, False])
def test_reversed_twin_is_one_row_oriented_as_the_knowing_source(esxcli_first):
    # esxcli guessed 10.0.0.20:50123 -> 192.168.35.11:902; DFW logged it the other way round
    esxcli = esx_pair_row(0.0 if esxcli_first else 30.0, "esxcli_connections", "esx01", event_id="snap",
                          bytes_out=10.0, bytes_in=700.0, packets_out=1.0, packets_in=9.0)
    dfw = esx_pair_row(20.0 if esxcli_first else 0.0, "nsx_dfw", "esx02", reverse=True, event_id="dfw",
                       bytes_out=600.0, bytes_in=20.0, packets_out=8.0, packets_in=2.0)
    out = merge.merge_connections(frame(esxcli, dfw))
    assert len(out) == 1
    row = out.iloc[0]
    assert (row["src_ip"], row["src_port"], row["dst_ip"], row["dst_port"]) == ("192.168.35.11", 902, "10.0.0.20", 50_123)
    # the counts of the esxcli row are turned before the largest are taken
    assert (row["bytes_out"], row["bytes_in"], row["packets_out"], row["packets_in"]) == (700.0, 20.0, 9.0, 2.0)
    first, second = ("esxcli_connections:esx01", "nsx_dfw:esx02")[::1 if esxcli_first else -1]
    assert row["seen_by"] == f"{first} {second}"
    assert row["event_id"] == ("snap" if esxcli_first else "dfw")          # the earliest row's values
    assert out.drop(columns="seen_by").dtypes.equals(frame(dfw).dtypes)         # turned, not retyped
    # the batch engine's chunk borders keep the twins together
    assert merge.connection_groups(frame(esxcli, dfw)).tolist() == [0, 0]


def test_zeek_direction_counts_only_when_it_saw_the_handshake():
    # Zeek saw only midstream traffic (OTH): esxcli's guess stays; with a handshake (SF) Zeek's wins
    esxcli = esx_pair_row(0.0, "esxcli_connections", "esx01")
    midstream = esx_pair_row(10.0, "zeek_conn_tsv", "", reverse=True, conn_state="OTH")
    handshake = esx_pair_row(10.0, "zeek_conn_tsv", "", reverse=True, conn_state="SF")
    out = merge.merge_connections(frame(esxcli, midstream))
    assert out[["src_ip", "src_port", "seen_by"]].values.tolist() == [
        ["10.0.0.20", 50_123, "esxcli_connections:esx01 zeek_conn_tsv"]]
    out = merge.merge_connections(frame(esxcli, handshake))
    assert out[["src_ip", "src_port", "seen_by"]].values.tolist() == [
        ["192.168.35.11", 902, "esxcli_connections:esx01 zeek_conn_tsv"]]


def test_connections_that_swap_endpoints_minutes_apart_stay_two():
    a = esx_pair_row(0.0, "nsx_dfw", "esx01", event_id="a")
    b = esx_pair_row(300.0, "nsx_dfw", "esx02", reverse=True, event_id="b")
    out = merge.merge_connections(frame(a, b))
    assert out[["event_id", "src_ip", "src_port", "seen_by"]].values.tolist() == [
        ["a", "10.0.0.20", 50_123, "nsx_dfw:esx01"], ["b", "192.168.35.11", 902, "nsx_dfw:esx02"]]
    assert merge.connection_groups(frame(a, b)).tolist() == [0, 1]


def test_reversed_twin_across_batches_is_dropped_with_its_connection():
    rows = [esx_pair_row(0.0, "nsx_dfw", "esx01", event_id="a"),
            esx_pair_row(1.0, "nsx_dfw", "esx02", reverse=True, event_id="b"),
            conn(1.5, "", source="zeek_conn_tsv", event_id="c")]
    state = StreamState()
    first = merge.merge_connections(frame(rows[0]), state)
    second = merge.merge_connections(frame(*rows[1:]), state)
    assert first["event_id"].tolist() + second["event_id"].tolist() == ["a", "c"]
    assert merge.merge_connections(frame(*rows))["event_id"].tolist() == ["a", "c"]


@pytest.mark.parametrize("then", ["zeek_conn_tsv", "nsx_dfw", "other_host"])
def test_later_batches_of_one_log_skip_the_merge_and_keep_its_state(monkeypatch, then):
    """Batches of one log that logs each connection once (Zeek at one vantage point), carried over
    rows an earlier batch of the same log left in the state: nothing can join, so the rows go through
    as they are; the output and the state after each batch are the full merge's. A batch of another
    source or vantage point after them is merged with them as before."""
    def zeek(ts, port, **values):
        return conn(ts, "", source="zeek_conn_tsv", src_port=port, event_id=f"z{ts}-{port}", **values)

    batches = [[zeek(0.0, 50_000), zeek(0.5, 50_001), zeek(30.0, 50_000)],
               [zeek(31.0, 50_000), zeek(29.5, 50_002), zeek(np.nan, 50_003), zeek(60.0, 50_001)],
               [zeek(61.0, 50_001), zeek(62.0, 50_004)]]
    last = {"zeek_conn_tsv": zeek(62.5, 50_004), "nsx_dfw": conn(62.5, "esx01", src_port=50_004, event_id="dfw"),
            "other_host": conn(62.5, "esx02", source="zeek_conn_tsv", src_port=50_004, event_id="other")}[then]
    batches.append([last])

    def run(full_merge: bool):
        state, outs, states, merged = StreamState(), [], [], []
        with monkeypatch.context() as patch:
            if full_merge:
                patch.setattr(merge, "_one_log", lambda r: False)
            starts = merge._starts
            patch.setattr(merge, "_starts", lambda *a: merged.append(len(outs)) or starts(*a))
            for rows in batches:
                outs.append(merge.merge_connections(frame(*rows), state))
                states.append({k: tuple(np.array(x, copy=True) for x in v) for k, v in state.recent.items()})
        return outs, states, merged

    fast, fast_states, fast_merged = run(False)
    full, full_states, full_merged = run(True)
    assert full_merged == [0, 1, 2, 3] and fast_merged == ([] if then == "zeek_conn_tsv" else [3])
    for got, expected in zip(fast, full):
        pd.testing.assert_frame_equal(got, expected)
    for got, expected in zip(fast_states, full_states):
        assert got.keys() == expected.keys()
        for key in got:
            for a, b in zip(got[key], expected[key]):
                np.testing.assert_array_equal(a, b)
    assert len(fast_states[0]["merge_conn"][0]) and len(fast_states[1]["merge_conn"][0])   # earlier rows carried
    assert sum(map(len, fast[:3])) == 9
