"""generate --formats: the same estate written as NSX DFW, esxcli, Sysmon, vDS IPFIX, Infoblox, Windows DNS
Analytical and BIND query logs reads back through `esxi_anomaly.ingest` with nothing quarantined and exactly
the covered connections and answers."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from esxi_anomaly.ingest import Quarantine, ReadSummary, read_connections, read_dns
from esxi_anomaly.synth import dns_server_split, generate, labels_5tuple, parse_formats, write_formats

VM_KINDS = {"vm", "infra", "vcenter"}
FIVE = ["src_ip", "src_port", "dst_ip", "dst_port", "proto"]


@pytest.fixture(scope="module")
def estate(tmp_path_factory):
    ds = generate(days=1, seed=11, scale=0.02)
    out = tmp_path_factory.mktemp("formats")
    write_formats(ds, out, "all")
    inv = ds.inventory
    return ds, out, inv


def _read(paths, frame):
    q, s = Quarantine(), ReadSummary()
    df = (read_connections if frame == "connections" else read_dns)([str(p) for p in paths], q, s)
    assert len(q) == 0, [(r.path, r.reason, r.raw) for r in q.records[:5]]
    return df, s


def _same_connections(got: pd.DataFrame, want: pd.DataFrame, tol: float = 1.0):
    """Same multiset of 5-tuples, each with its time within `tol` seconds."""
    g = got.sort_values(FIVE + ["ts"], kind="stable").reset_index(drop=True)
    w = want.sort_values(FIVE + ["ts"], kind="stable").reset_index(drop=True)
    assert len(g) == len(w)
    for c in FIVE:
        assert g[c].astype(str).tolist() == w[c].astype(str).tolist(), c
    assert np.abs(g["ts"].to_numpy() - w["ts"].to_numpy()).max(initial=0) < tol


def _windows(inv):
    return inv[inv["role"].isin(["vdi", "dc"]) & (inv["kind"] != "esxi_mgmt")]


def test_nsx_each_host_logs_its_vms_connections(estate):
    ds, out, inv = estate
    kind, host_of = dict(zip(inv["ip"], inv["kind"])), dict(zip(inv["ip"], inv["esxi_host"]))
    c = ds.connections
    files = sorted((out / "nsx").glob("*.dfwpktlogs.log"))
    assert [f.name for f in files] == [f"{h}.dfwpktlogs.log" for h in sorted(inv.loc[inv["kind"] == "esxi_mgmt", "name"])]
    total = 0
    for f in files:
        host = f.name.split(".")[0]
        got, _ = _read([f], "connections")
        out_rows = c[c["src_ip"].map(kind).isin(VM_KINDS) & (c["src_ip"].map(host_of) == host)]
        in_rows = c[c["dst_ip"].map(kind).isin(VM_KINDS) & (c["dst_ip"].map(host_of) == host)]
        _same_connections(got, pd.concat([out_rows, in_rows]))
        text = f.read_text()
        # TERM lines complete their PASS rows: as many rows with a duration as TERM lines, with the counts
        assert got["duration"].notna().sum() == text.count(" INET TERM ") > 0
        done = got[got["duration"].notna()].merge(c, on=FIVE, suffixes=("", "_c"))
        assert np.abs(done["duration"] - done["duration_c"]).max() < 0.002
        assert (done["bytes_out"] == done["bytes_out_c"]).all() and (done["packets_in"] == done["packets_in_c"]).all()
        envelope_host = host if text.startswith("<13>1 ") else ""
        assert set(got["esxi_host"]) == {envelope_host}
        total += len(got)
    assert {f.read_text()[:1] for f in files} == {"<", "2"}   # both envelopes are in use


def test_vm_to_vm_connection_is_logged_at_both_hosts(estate):
    ds, out, inv = estate
    kind, host_of = dict(zip(inv["ip"], inv["kind"])), dict(zip(inv["ip"], inv["esxi_host"]))
    c = ds.connections
    cross = c[c["src_ip"].map(kind).isin(VM_KINDS) & c["dst_ip"].map(kind).isin(VM_KINDS)
              & (c["src_ip"].map(host_of) != c["dst_ip"].map(host_of))]
    assert len(cross) > 10
    seen = []
    for f in sorted((out / "nsx").glob("*.dfwpktlogs.log")):
        got, _ = _read([f], "connections")
        seen.append(got[FIVE].assign(at=f.name.split(".")[0]))
    seen = pd.concat(seen).merge(cross[FIVE + ["event_id"]], on=FIVE)
    hosts = seen.groupby("event_id")["at"].agg(lambda s: tuple(sorted(s)))
    want = cross.set_index("event_id").apply(
        lambda r: tuple(sorted((host_of[r["src_ip"]], host_of[r["dst_ip"]]))), axis=1)
    assert hosts.sort_index().to_dict() == want.sort_index().to_dict()


def _snapshot_view(conns, linger):
    """Connections held at some snapshot (every 60 s): ts = first snapshot, `last` = last one."""
    close = conns["ts"] + conns["duration"].fillna(0)
    first = np.ceil(conns["ts"] / 60.0) * 60.0
    last = np.floor((close + linger) / 60.0) * 60.0
    seen = (first <= last).to_numpy()
    return conns[seen].assign(ts=first[seen], last=last[seen])


def test_esxcli_lists_the_hosts_sockets_seen_at_a_snapshot(estate):
    ds, out, inv = estate
    mgmt = inv[inv["kind"] == "esxi_mgmt"]
    c = ds.connections
    own = c[c["src_ip"].isin(mgmt["ip"])]
    # outbound: TIME_WAIT holds a normally closed TCP socket 60 s more; UDP only while open
    want_out = _snapshot_view(own, np.where((own["proto"] == "tcp") & (own["conn_state"] == "SF"), 60.0, 0.0))
    accepted = c[c["dst_ip"].isin(mgmt["ip"]) & (c["proto"] == "tcp") & c["conn_state"].isin(["SF", "RSTO", "RSTR"])]
    want_in = _snapshot_view(accepted, 0.0)
    got, summary = _read([out / "esxcli"], "connections")
    assert {f.format for f in summary.files} == {"esxcli_connections"}
    assert len(want_out) > 20 and len(want_in) > 0
    # accepted inbound sessions (vCenter -> host:443) are in the tables, never read as egress of the
    # host: the reader reports them from the client's side (an older reader: not at all)
    text = "".join(p.read_text() for p in (out / "esxcli").glob("*.txt"))
    assert all(f"{ip}:{port}  " in text for ip, port in zip(want_in["src_ip"], want_in["src_port"]))
    reversed_ = set(zip(accepted["dst_ip"], accepted["dst_port"], accepted["src_ip"], accepted["src_port"]))
    assert not reversed_ & set(zip(got["src_ip"], got["src_port"], got["dst_ip"], got["dst_port"]))
    want = pd.concat([want_out, want_in]) if len(got) > len(want_out) else want_out
    _same_connections(got, want, tol=1e-6)
    # a socket seen in several snapshots is one row lasting from its first to its last sighting
    # (host-to-host sessions are seen at both ends: order the twins by that duration too)
    g = got.sort_values(FIVE + ["ts", "duration"], kind="stable")
    w = want.assign(duration=want["last"] - want["ts"]).sort_values(FIVE + ["ts", "duration"], kind="stable")
    assert np.allclose(g["duration"].to_numpy(), w["duration"].to_numpy())
    lines = [l for l in text.splitlines() if l.startswith("# ")]
    assert len(lines) >= 4 * 1440 and all(l.endswith(" esx-0" + l[-1]) for l in lines)


def test_sysmon_network_and_dns_of_the_windows_guests(estate):
    ds, out, inv = estate
    win = _windows(inv)
    c = ds.connections
    got, _ = _read([out / "sysmon"], "connections")
    _same_connections(got, c[c["src_ip"].isin(win["ip"])])
    assert sorted(p.stem for p in (out / "sysmon").glob("*.json")) == sorted(win["name"])
    dns, _ = _read([out / "sysmon"], "dns_answers")
    fqdn_ip = {f"{n}.corp.example": ip for n, ip in zip(win["name"], win["ip"])}
    dns["client_ip"] = dns["client_ip"].map(lambda v: fqdn_ip.get(v, v))
    want = ds.dns_answers[ds.dns_answers["client_ip"].isin(win["ip"])].copy()
    # Sysmon keeps an SRV record's target only
    srv = want["rtype"] == "SRV"
    want.loc[srv, "answer"] = want.loc[srv, "answer"].str.split(" ").str[-1]
    _same_answers(dns, want, ["client_ip", "query", "rtype", "answer"])
    text = "".join(p.read_text() for p in (out / "sysmon").glob("*.json"))
    assert '"QueryResults":"type:  5 ' in text and ";::ffff:" in text


def _same_answers(got, want, keys, tol=1.0):
    g = got[got["answer"] != ""].sort_values(keys + ["ts"], kind="stable").reset_index(drop=True)
    w = want[want["answer"] != ""].sort_values(keys + ["ts"], kind="stable").reset_index(drop=True)
    assert len(g) == len(w) > 0
    for k in keys:
        assert g[k].astype(str).tolist() == w[k].astype(str).tolist(), k
    assert np.abs(g["ts"].to_numpy() - w["ts"].to_numpy()).max() < tol
    assert (got["answer"] == "").sum() == want["event_id"][want["answer"] == ""].nunique()


def _server_clients(ds, inv, name):
    """The clients a DNS server log of the `all` estate covers: its share of the non-Windows clients."""
    others = ds.dns_answers.loc[~ds.dns_answers["client_ip"].isin(_windows(inv)["ip"]), "client_ip"]
    return dns_server_split(others, ["infoblox", "windows_dns", "bind"])[name]


def test_infoblox_has_its_clients_answers(estate):
    ds, out, inv = estate
    got, _ = _read([out / "infoblox"], "dns_answers")
    want = ds.dns_answers[ds.dns_answers["client_ip"].isin(_server_clients(ds, inv, "infoblox"))]
    # the reader keeps SRV rdata as written: some lines end the target with the root dot
    got["answer"] = got["answer"].where(got["rtype"] != "SRV", got["answer"].str.rstrip("."))
    _same_answers(got, want, ["client_ip", "resolver_ip", "query", "rtype", "answer", "ttl"])


def test_labels_by_five_tuple_and_time(estate):
    ds, out, inv = estate
    lab = pd.read_csv(out / "labels_5tuple.csv")
    assert list(lab.columns) == ["ts", "src_ip", "src_port", "dst_ip", "dst_port", "proto", "label", "family"]
    assert len(lab) == len(ds.labels) and lab["ts"].is_monotonic_increasing
    got = labels_5tuple(ds).merge(ds.connections, on=FIVE + ["ts"])
    assert got["event_id"].isin(ds.labels["event_id"]).all() and len(got) == len(ds.labels)
    attacks = lab[lab["label"] == "attack"]
    assert set(attacks["family"]) == set(ds.labels.loc[ds.labels["label"] == "attack", "family"])


def test_parse_formats():
    assert parse_formats("zeek") == ["zeek"]
    assert parse_formats("infoblox, NSX") == ["nsx", "infoblox"]
    assert parse_formats("all") == ["zeek", "nsx", "esxcli", "sysmon", "infoblox", "windows_dns", "bind", "ipfix"]
    assert parse_formats("bind,IPFIX,windows_dns") == ["windows_dns", "bind", "ipfix"]
    with pytest.raises(ValueError, match="unknown format netflow"):
        parse_formats("zeek,netflow")


def test_generate_refuses_an_unknown_format(tmp_path, capsys):
    from esxi_anomaly.cli import main

    assert main(["generate", "--out", str(tmp_path / "o"), "--days", "1", "--formats", "zeek,bogus"]) == 2
    assert "unknown format bogus" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _quality_module():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "quality.py"
    spec = importlib.util.spec_from_file_location("quality_benchmark_views", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_quality_labels_real_rows_by_five_tuple_and_time(estate):
    ds, out, inv = estate
    q = _quality_module()
    got, _ = _read([out / "nsx"], "connections")
    labels = q.match_labels(got, labels_5tuple(ds))
    # every row of a labelled connection gets its label (two rows for a VM-to-VM one), no other row does
    truth = ds.labels.merge(ds.connections[["event_id"] + FIVE], on="event_id")
    want = got.merge(truth[FIVE + ["label", "family"]], on=FIVE)
    assert sorted(zip(labels["event_id"], labels["label"], labels["family"])) == \
        sorted(zip(want["event_id"], want["label"], want["family"]))
    assert (labels["label"] == "attack").sum() > 0
    # label_row names the labelled connection: both rows of a VM-to-VM connection name the same one
    l5 = labels_5tuple(ds)
    rows = labels.merge(got[["event_id"] + FIVE], on="event_id")
    assert (rows[FIVE].astype(str).to_numpy() == l5.iloc[rows["label_row"]][FIVE].astype(str).to_numpy()).all()
    # a row starting more than the slack after the labelled connection is not that connection
    late = got[got["event_id"].isin(labels["event_id"])].head(3).assign(ts=lambda d: d["ts"] + q.LABEL_SLACK_S + 1)
    assert q.match_labels(late, labels_5tuple(ds)).empty


def test_dns_server_logs_split_the_other_clients(estate):
    ds, out, inv = estate
    others = set(ds.dns_answers["client_ip"]) - set(_windows(inv)["ip"])
    parts = [_server_clients(ds, inv, n) for n in ("infoblox", "windows_dns", "bind")]
    assert all(len(p) >= 5 for p in parts) and set().union(*parts) == others
    assert sum(map(len, parts)) == len(others)            # each client in exactly one server's log
    # one server log asked for alone takes every client; none asked for: no split
    assert dns_server_split(others, ["zeek", "bind"]) == {"bind": others}
    assert dns_server_split(others, ["zeek"]) == {}
    # the three logs together hold every non-Windows response once
    got, _ = _read([out / "infoblox", out / "windows_dns", out / "bind"], "dns_answers")
    want = ds.dns_answers[ds.dns_answers["client_ip"].isin(others)]
    assert got.groupby("event_id").ngroups == want["event_id"].nunique()


def test_windows_dns_has_its_clients_answers(estate):
    ds, out, inv = estate
    got, summary = _read([out / "windows_dns"], "dns_answers")
    assert {f.format for f in summary.files} == {"windows_dns_analytical"}
    want = ds.dns_answers[ds.dns_answers["client_ip"].isin(_server_clients(ds, inv, "windows_dns"))]
    # the wire reader renders TXT as quoted character-strings and keeps the SRV target's root dot
    got["answer"] = got["answer"].where(got["rtype"] != "TXT", got["answer"].str.strip('"'))
    got["answer"] = got["answer"].where(got["rtype"] != "SRV", got["answer"].str.rstrip("."))
    _same_answers(got, want, ["client_ip", "resolver_ip", "query", "rtype", "answer", "ttl"])
    assert (got.loc[got["answer"] == "", "rcode"] == "NXDOMAIN").all()
    text = (out / "windows_dns" / "analytical.json").read_text()
    # the server's own QUERY_RECEIVED events precede the responses (the reader skips them)
    assert text.count('"code":"256"') == want["event_id"].nunique() == got["event_id"].nunique()
    assert '"QNAME":"' in text and '"PacketData":"0x' in text


def test_bind_has_its_clients_queries(estate):
    ds, out, inv = estate
    got, summary = _read([out / "bind"], "dns_answers")
    assert {f.format for f in summary.files} == {"bind_query"}
    want = ds.dns_answers[ds.dns_answers["client_ip"].isin(_server_clients(ds, inv, "bind"))]
    # one query per response, of the response's first non-CNAME record type (A when it has none)
    w = want.sort_values(["event_id", "answer_index"], kind="stable")
    qtype = w[~w["rtype"].isin(["CNAME", ""])].groupby("event_id")["rtype"].first()
    heads = w.groupby("event_id").first()
    heads = heads.assign(rtype=qtype.reindex(heads.index).fillna("A"))
    assert (got["answer"] == "").all() and (got["answer_index"] == -1).all()
    g = got.sort_values(["client_ip", "query", "rtype", "ts"], kind="stable").reset_index(drop=True)
    h = heads.sort_values(["client_ip", "query", "rtype", "ts"], kind="stable").reset_index(drop=True)
    assert len(g) == len(h) > 20
    for k in ["client_ip", "query", "rtype"]:
        assert g[k].tolist() == h[k].tolist(), k
    assert np.abs(g["ts"].to_numpy() - h["ts"].to_numpy()).max() < 0.001
    assert (g["resolver_ip"] == h["resolver_ip"].replace("", "127.0.0.1")).all()


def test_ipfix_has_each_guest_connection_once(estate):
    import struct

    from esxi_anomaly.ingest import vds_ipfix

    ds, out, inv = estate
    kind, host_of = dict(zip(inv["ip"], inv["kind"])), dict(zip(inv["ip"], inv["esxi_host"]))
    c = ds.connections
    src_vm, dst_vm = c["src_ip"].map(kind).isin(VM_KINDS), c["dst_ip"].map(kind).isin(VM_KINDS)
    files = sorted((out / "ipfix").glob("*.ipfix"))
    assert [f.stem for f in files] == sorted(set(np.where(src_vm, c["src_ip"].map(host_of), c["dst_ip"].map(host_of))[src_vm | dst_vm]))
    vds_ipfix.clear_template_cache()      # the templates must come from these files
    try:
        got, summary = _read(files, "connections")
    finally:
        vds_ipfix.clear_template_cache()
    assert {f.format for f in summary.files} == {"vds_ipfix"}
    want = c[src_vm | dst_vm]
    _same_connections(got, want, tol=0.001)
    g = got.sort_values(FIVE + ["ts"], kind="stable").reset_index(drop=True)
    w = want.sort_values(FIVE + ["ts"], kind="stable").reset_index(drop=True)   # aligned as compared above
    assert (g["bytes_out"].to_numpy() == w["bytes_out"].fillna(0).to_numpy()).all()
    assert np.abs(g["duration"].to_numpy() - w["duration"].fillna(0).to_numpy()).max() < 0.002
    # each file: a template message first, then data messages of at most 19 records (one datagram)
    for f in files:
        blob, pos, sizes = f.read_bytes(), 0, []
        while pos < len(blob):
            version, length = struct.unpack_from(">HH", blob, pos)
            assert version == 10
            sizes.append((struct.unpack_from(">H", blob, pos + 16)[0], length))
            pos += length
        assert pos == len(blob) and sizes[0][0] == 2
        assert all(sid == 256 and length <= 20 + 19 * 72 for sid, length in sizes[1:])
