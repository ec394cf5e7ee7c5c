"""`core.score_block` scores the connections in scope and counts the rest, the same whatever the
chunking; the counts reach the run summary and survive a checkpoint (resume)."""
from __future__ import annotations

import pandas as pd
import pytest

from esxi_anomaly.features.scope import Scope, apply_scope, resolvers_seen
from esxi_anomaly.ingest import read_connections, read_dns, read_inventory
from esxi_anomaly.report.csv import write_csv
from esxi_anomaly.schema import Frames
from esxi_anomaly.scoring import core, local

EXTRA = [   # (src, sport, dst, dport, proto, history): rows a real sensor logs that are not C2 candidates
    ("203.0.113.9", 40000, "{vm}", 22, "tcp", "S"),            # an inbound scan
    ("{vm}", 8, "8.8.8.8", 0, "icmp", "-"),                    # ICMP echo (type and code as ports)
    ("{vm}", 0, "224.0.0.22", 0, "igmp", "-"),
    ("{vm}", 137, "10.255.255.255", 137, "udp", "D"),
    ("1.1.1.2", 853, "{vm}", 51234, "tcp", "dA"),              # DoT logged backwards: re-oriented, kept
]


@pytest.fixture(scope="module")
def with_extra(small_day, tmp_path_factory):
    """The small day's Zeek conn.log with out-of-scope rows, one backwards flow and a duplicate record
    (the first data line again, another uid) appended every 100 lines."""
    model, folder = small_day
    lines = (folder / "conn.log").read_text().splitlines()
    fields = next(x for x in lines if x.startswith("#fields")).split("\t")[1:]
    data = [x for x in lines if not x.startswith("#")]
    vm = data[0].split("\t")[fields.index("id.orig_h")]
    out = []
    for i, line in enumerate(data):
        out.append(line)
        if i % 100 == 50:
            values = line.split("\t")
            for k, (src, sport, dst, dport, proto, history) in enumerate(EXTRA):
                row = dict(zip(fields, values))
                row.update({"uid": f"Cextra{i}x{k}", "id.orig_h": src.format(vm=vm), "id.orig_p": str(sport),
                            "id.resp_h": dst.format(vm=vm), "id.resp_p": str(dport), "proto": proto,
                            "history": history, "conn_state": "OTH",
                            "ts": f"{float(row['ts']) + 0.000123 * (k + 1):.6f}"})   # no tie with the row copied
                out.append("\t".join(row[f] for f in fields))
            out.append("\t".join(dict(zip(fields, values), uid=f"Cdup{i}")[f] for f in fields))
    target = tmp_path_factory.mktemp("extra")
    header = [x for x in lines if x.startswith("#") and not x.startswith("#close")]
    (target / "conn.log").write_text("\n".join(header + out) + "\n")
    frames = Frames(read_connections(target / "conn.log"), read_dns(folder / "dns.log"),
                    read_inventory(folder / "inventory.csv"))
    return model, folder, target, frames


def test_streamed_scope_equals_one_shot_and_every_row_is_accounted_for(tmp_path, with_extra):
    model, folder, target, frames = with_extra
    one_shot = model.score(frames)
    write_csv(one_shot, tmp_path / "one.csv")
    out = tmp_path / "streamed.csv"
    summary = local.run(model, [target / "conn.log"], [folder / "dns.log"], out, inventory=frames.inventory,
                        chunk_rows=600, bucket_s=1800, progress=False)
    assert (tmp_path / "one.csv").read_bytes() == out.read_bytes()
    scope = core.model_scope(model).with_resolvers(resolvers_seen(frames.dns_answers))
    expected = apply_scope(frames.connections, frames.inventory, scope)
    assert summary.out_of_scope == {k: v for k, v in expected.out_of_scope.items() if v}
    assert set(summary.out_of_scope) == {"inbound", "icmp", "other_protocol", "broadcast"}
    assert summary.connections == len(frames.connections) == summary.in_scope + sum(summary.out_of_scope.values())
    assert summary.coverage["reoriented"] == summary.out_of_scope["icmp"] > 0   # one of each per insertion
    assert summary.coverage["duplicates"] == summary.out_of_scope["icmp"]
    assert summary.written == summary.in_scope - summary.coverage["duplicates"]
    assert summary.coverage["dns_over_tls"] == summary.coverage["reoriented"]
    ranked = pd.read_csv(out, dtype={"event_id": "str"}, keep_default_na=False)
    assert ranked["event_id"].is_unique and len(ranked) == summary.written   # one row per duplicated record
    turned = ranked[ranked["dst_port"] == 853]
    assert len(turned) and (turned["src_port"] == 51234).all() and (turned["dst_ip"] == "1.1.1.2").all()
    assert summary.report_summary()["out_of_scope"] == summary.out_of_scope
    # partitions of the sources: a re-oriented row goes with its initiator (the same bytes again)
    parted = local.run(model, [target / "conn.log"], [folder / "dns.log"], tmp_path / "parted.csv",
                       inventory=frames.inventory, chunk_rows=600, workers=2, progress=False)
    assert parted.partitions == 2 and (tmp_path / "parted.csv").read_bytes() == out.read_bytes()
    assert (parted.out_of_scope, parted.coverage) == (summary.out_of_scope, summary.coverage)


def test_all_directions_keeps_every_row(tmp_path, with_extra):
    model, folder, target, frames = with_extra
    summary = local.run(model, [target / "conn.log"], [folder / "dns.log"], tmp_path / "all.csv",
                        inventory=frames.inventory, progress=False, scope=Scope(all_directions=True))
    assert summary.out_of_scope == {} and summary.in_scope == summary.connections
    assert summary.written == summary.connections - summary.coverage["duplicates"]


def test_the_counts_survive_a_checkpoint(tmp_path):
    cp = core.Checkpoint(counts={"read": 10, "inbound": 3, "in_scope": 7, "joined_dns": 2})
    cp.to_files(tmp_path / "cp")
    assert core.Checkpoint.from_files(tmp_path / "cp").counts == cp.counts


def test_the_model_scores_with_the_scope_it_was_trained_on(small_day):
    """Trained on the sources of one /24 (no inventory), the model leaves the others out when it
    scores, without being told again."""
    import ipaddress

    from esxi_anomaly.synth import generate

    ds = generate(days=2, seed=5, scenario="default", attack_days=0, scale=0.05)
    c = ds.connections
    net = str(ipaddress.ip_network(f"{c['src_ip'].iloc[0]}/24", strict=False))
    mine = c["src_ip"].map(lambda ip: ipaddress.ip_address(ip) in ipaddress.ip_network(net)).to_numpy()
    assert 0 < mine.sum() < len(c)
    history = Frames(c, ds.dns_answers, None)
    model, _ = small_day
    trained = type(model)(random_state=5, n_estimators=20).fit(history, scope=Scope(local_nets=(net,)))
    assert core.model_scope(trained).local_nets == (net,)
    assert trained.scope_counts_["inbound"] == (~mine).sum()
    counts: dict = {}
    rows, _ = core.score_block(trained, history, None, None, counts=counts)   # the model's scope by default
    assert counts["inbound"] == (~mine).sum() and len(rows) == counts["scored"] == mine.sum()
