"""Attack families (T1568.003 DNS Calculation variants) and their injection into any environment.

`inject_attacks` generates campaigns *for the environment it is given*: victims are that
environment's own VMs (or ESXi management IPs for management-plane families), the DNS resolver
is the one each victim already uses, and timing falls inside [start, end). Benign rows are
returned unchanged. Each campaign has 1-3 victims beaconing with jitter to one C2 name whose
answer changes several times, so the derived port (or IP) changes with the answer.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import numpy as np
import pandas as pd

from esxi_anomaly import schema
from esxi_anomaly.synth import transforms as tf
from esxi_anomaly.synth._common import ephemeral_ports, int_to_ip, new_uids, sort_by_ts
from esxi_anomaly.synth.engine import PROFILE_NAMES, SOURCE, connection_fields

PORT_RANGE = (1024, 65000)
DEFAULT_CAMPAIGNS = 2          # campaigns per family at rate=1.0
LABEL_COLUMNS = ("event_id", "label", "family", "entity")


@dataclass(frozen=True)
class AttackFamily:
    id: str
    description: str
    formula: str
    source_kind: str           # "vm" | "esxi_mgmt"


ATTACK_FAMILIES: dict[str, AttackFamily] = {f.id: f for f in (
    AttackFamily("apt12", "VM beacons to the resolved IP on a port computed from the A record (APT12 DNSCALC)",
                 "port = a*b + c of A a.b.c.d; dst = answer", "vm"),
    AttackFamily("low16_mgmt", "ESXi management IP connects to the resolved IP on the answer's low 16 bits",
                 "port = c*256 + d of A a.b.c.d; dst = answer", "esxi_mgmt"),
    AttackFamily("xor_key", "VM; port is the answer's low 16 bits XOR a campaign key",
                 "port = (c*256 + d) XOR K; dst = answer", "vm"),
    AttackFamily("offset_key", "VM; port is the answer's low 16 bits plus a campaign key",
                 "port = (c*256 + d + K) mod 65536; dst = answer", "vm"),
    AttackFamily("aaaa_port", "VM resolves A and AAAA; port is one 16-bit group of the AAAA answer, "
                 "connection over IPv4 to the A answer", "port = AAAA group g; dst = A answer", "vm"),
    AttackFamily("txt_port", "VM resolves TXT 'v=1 p=<port>' and A; connects to the A answer on that port",
                 "port = int(TXT p=); dst = A answer", "vm"),
    AttackFamily("nymaim_ip", "VM connects on 443 to the Nymaim2 transform of the A answer (IP not an answer)",
                 "dst = LE(T^16(LE(A))), T(v) = ((v ^ 0x87568289) - 0x78643587) ^ 0x18482642; port 443", "vm"),
)}

_C2_WORDS = ("update", "cdn", "sync", "telemetry", "static", "api", "img", "metrics", "edge", "cloud", "assets",
             "node", "relay", "status", "secure", "mail")
_C2_TLDS = ("net", "com", "info", "org", "io", "biz")
_A_PORT_FAMILIES = ("apt12", "low16_mgmt", "xor_key", "offset_key")
_BAD_FIRST = {0, 10, 100, 127, 169, 172, 192, 198, 203} | set(range(224, 256))


def _c2_name(rng: np.random.Generator) -> str:
    w = rng.choice(len(_C2_WORDS), 3, replace=False)
    return f"{_C2_WORDS[w[0]]}.{_C2_WORDS[w[1]]}-{_C2_WORDS[w[2]]}{int(rng.integers(1, 99))}.{rng.choice(_C2_TLDS)}"


def _public_candidates(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32)
    first = v >> 24
    ok = ~np.isin(first, list(_BAD_FIRST)) & ((v & 255) != 0) & ((v & 255) != 255)
    return v[ok]


def _answers_for(family: str, rng: np.random.Generator, n: int, key: int, group: int) -> dict:
    """`n` distinct answers for `family` whose derived port (or IP) is valid; re-draws the rest."""
    lo, hi = PORT_RANGE
    for _attempt in range(100):
        ips = _public_candidates(rng, 64 * n + 64)
        if family == "apt12":
            port = tf.apt12_port(ips)
        elif family == "low16_mgmt":
            port = tf.low16_port(ips)
        elif family == "xor_key":
            port = tf.xor_key_port(ips, key)
        elif family == "offset_key":
            port = tf.offset_key_port(ips, key)
        else:
            port = np.full(ips.size, 443)
        ok = (port >= lo) & (port <= hi) if family in _A_PORT_FAMILIES else np.ones(ips.size, dtype=bool)
        if family == "nymaim_ip":
            dst = tf.nymaim_ip(ips)
            ok &= ~np.isin(dst >> 24, list(_BAD_FIRST))
        ips, port = ips[ok], port[ok]
        # Distinct answers, and distinct ports where the port comes from the A record.
        _, first = np.unique(port if family in _A_PORT_FAMILIES else ips, return_index=True)
        pick = np.sort(first)[:n]
        if pick.size == n:
            break
    else:
        raise RuntimeError(f"{family}: cannot draw {n} answers with ports in {PORT_RANGE}")
    ips, port = ips[pick], port[pick]
    out = {"a": ips, "port": port.astype(np.int64), "dst": ips.copy()}
    if family == "nymaim_ip":
        out["dst"] = tf.nymaim_ip(ips)
    elif family == "aaaa_port":
        ports = rng.integers(lo, hi + 1, n)
        groups = rng.integers(0, 65536, size=(n, 8))
        groups[:, 0] = 0x2a00 + rng.integers(0, 16, n)    # global unicast 2a0x::/16
        groups[:, group] = ports
        out["aaaa"] = np.array([str(ipaddress.IPv6Address(":".join(f"{g:x}" for g in row))) for row in groups],
                               dtype=object)
        out["port"] = ports
    elif family == "txt_port":
        ports = rng.integers(lo, hi + 1, n)
        out["txt"] = np.array([f"v=1 p={p}" for p in ports], dtype=object)
        out["port"] = ports
    return out


def _victims(family: AttackFamily, inventory: pd.DataFrame, connections: pd.DataFrame) -> np.ndarray:
    kind = family.source_kind
    pool = inventory.loc[inventory["kind"] == kind, "ip"].to_numpy(dtype=object) if len(inventory) else []
    if len(pool) == 0:
        if kind == "esxi_mgmt":   # no inventory: sources that send vpxa heartbeats look like ESXi hosts
            hb = connections[(connections["dst_port"] == 902) & (connections["proto"] == "udp")]
            pool = hb["src_ip"].unique()
        if len(pool) == 0:
            pool = connections["src_ip"].unique()
    return np.sort(np.asarray(pool, dtype=object))


def inject_attacks(connections: pd.DataFrame, dns_answers: pd.DataFrame, inventory: pd.DataFrame, families,
                   start: float, end: float, seed: int, rate: float = 1.0):
    """The given traffic plus attack campaigns of `families` in [start, end).

    Returns (connections, dns_answers, labels): both frames canonical and sorted by ts (benign rows
    unchanged), labels with one row per injected attack connection.
    """
    conns, dns, labels, _ = inject_attacks_detailed(connections, dns_answers, inventory, families, start, end,
                                                    seed, rate)
    return conns, dns, labels


def inject_attacks_detailed(connections, dns_answers, inventory, families, start, end, seed, rate=1.0):
    """`inject_attacks` plus a campaigns frame: family, campaign, entity, query, key, group, n_connections."""
    rng = np.random.default_rng(seed)
    families = list(families)
    unknown = [f for f in families if f not in ATTACK_FAMILIES]
    if unknown:
        raise ValueError(f"unknown attack families {unknown}; known: {sorted(ATTACK_FAMILIES)}")
    if not end > start:
        raise ValueError(f"attack window is empty: start={start} end={end}")
    resolver_of = _usual_resolvers(dns_answers)
    os_of = _os_of(inventory)
    conn_parts, dns_parts, label_parts, campaigns = [], [], [], []
    n_campaigns = max(1, int(round(DEFAULT_CAMPAIGNS * rate)))
    for fam_id in families:
        fam = ATTACK_FAMILIES[fam_id]
        pool = _victims(fam, inventory, connections)
        for c in range(n_campaigns):
            camp = _campaign(fam, c, pool, rng, start, end, resolver_of, os_of)
            conn_parts.append(camp["conns"])
            dns_parts.append(camp["dns"])
            label_parts.append(camp["labels"])
            campaigns.extend(camp["rows"])
    att_conn = pd.concat(conn_parts, ignore_index=True)
    att_dns = pd.concat(dns_parts, ignore_index=True)
    # Fresh uids that collide with nothing already present.
    taken = pd.concat([connections["event_id"], dns_answers["event_id"]], ignore_index=True)
    n_flows = len(att_conn) + att_dns["event_id"].nunique()
    uids = new_uids(rng, n_flows, taken)
    conn_uid = uids[:len(att_conn)]
    codes, _ = pd.factorize(att_dns["event_id"])
    att_conn["event_id"] = conn_uid
    att_dns["event_id"] = uids[len(att_conn):][codes]
    labels = pd.concat(label_parts, ignore_index=True)
    labels["event_id"] = conn_uid
    out_conn = sort_by_ts(pd.concat([schema.conform(connections, "connections"),
                                     schema.conform(att_conn, "connections")], ignore_index=True))
    out_dns = sort_by_ts(pd.concat([schema.conform(dns_answers, "dns_answers"),
                                    schema.conform(att_dns, "dns_answers")], ignore_index=True))
    labels = labels_frame(labels)
    return out_conn, out_dns, labels, pd.DataFrame(campaigns)


def labels_frame(df: pd.DataFrame | None = None) -> pd.DataFrame:
    if df is None or not len(df):
        return pd.DataFrame({c: pd.Series([], dtype="str") for c in LABEL_COLUMNS})
    return pd.DataFrame({c: df[c].astype("str") for c in LABEL_COLUMNS}).reset_index(drop=True)


def _usual_resolvers(dns: pd.DataFrame) -> pd.Series:
    if not len(dns):
        return pd.Series(dtype="str")
    first = dns.drop_duplicates("event_id")
    counts = first.groupby(["client_ip", "resolver_ip"]).size().reset_index(name="n")
    counts = counts.sort_values(["client_ip", "n", "resolver_ip"], ascending=[True, False, True])
    return counts.drop_duplicates("client_ip").set_index("client_ip")["resolver_ip"]


def _os_of(inventory: pd.DataFrame) -> dict[str, str]:
    out = {}
    for ip, kind, role in zip(inventory["ip"], inventory["kind"], inventory["role"]):
        out[ip] = "esxi" if kind == "esxi_mgmt" else ("windows" if role in ("vdi", "dc", "windows", "desktop")
                                                     else "linux")
    return out


def _campaign(fam: AttackFamily, index: int, pool: np.ndarray, rng: np.random.Generator, start: float, end: float,
              resolver_of: pd.Series, os_of: dict) -> dict:
    window = end - start
    n_victims = int(min(len(pool), rng.integers(1, 4)))
    victims = rng.choice(pool, n_victims, replace=False)
    duration = min(window * 0.9, float(rng.uniform(4, 10)) * 3600.0)
    cs = start + float(rng.uniform(0, max(window - duration, 0.0)))
    ce = cs + duration
    n_answers = int(rng.integers(3, 7))
    key = int(rng.integers(1, 65536))
    group = int(rng.integers(1, 8))
    ans = _answers_for(fam.id, rng, n_answers, key, group)
    changes = np.sort(cs + duration * (np.arange(1, n_answers) + rng.uniform(-0.3, 0.3, n_answers - 1)) / n_answers)
    qname = _c2_name(rng)
    ttl = float(rng.choice([60.0, 120.0, 300.0]))
    conns, dns, labels, rows = [], [], [], []
    for victim in victims:
        period = float(rng.uniform(300, 900))
        t = cs + float(rng.uniform(0, period)) + np.cumsum(period * rng.uniform(0.8, 1.2, int(duration / period) + 2))
        t = t[t < ce]
        if t.size == 0:
            t = np.array([cs + 1.0])
        n = t.size
        which = np.searchsorted(changes, t)
        delay = rng.uniform(0.005, 0.3, n)          # answer -> connection
        resp_ts = np.round(t - delay, 6)
        resolver = resolver_of.get(victim, "")
        dns.append(_attack_dns(fam.id, victim, resolver, qname, resp_ts, ans, which, ttl, rng))
        os_kind = np.full(n, os_of.get(victim, "esxi" if fam.source_kind == "esxi_mgmt" else "linux"))
        proto = np.full(n, "tcp", dtype=object)
        fields = connection_fields(rng, np.full(n, PROFILE_NAMES.index("beacon")), proto)
        t = np.round(t, 6)
        fields["duration"] = np.round(fields["duration"], 6)
        conns.append(pd.DataFrame({
            "event_id": "", "ts": t, "src_ip": victim, "src_port": ephemeral_ports(rng, os_kind),
            "dst_ip": int_to_ip(ans["dst"][which]), "dst_port": ans["port"][which].astype(np.int32), "proto": proto,
            **fields, "process": "", "esxi_host": "", "source": SOURCE,
        }))
        labels.append(pd.DataFrame({"event_id": "", "label": "attack", "family": fam.id, "entity": victim},
                                   index=range(n)))
        rows.append({"family": fam.id, "campaign": f"{fam.id}-{index + 1}", "entity": victim, "query": qname,
                     "key": key if fam.id in ("xor_key", "offset_key") else -1,
                     "group": group if fam.id == "aaaa_port" else -1, "n_connections": n,
                     "n_answers": int(np.unique(which).size), "start": float(t[0]), "end": float(t[-1])})
    return {"conns": pd.concat(conns, ignore_index=True), "dns": pd.concat(dns, ignore_index=True),
            "labels": pd.concat(labels, ignore_index=True), "rows": rows}


def _attack_dns(family: str, victim: str, resolver: str, qname: str, resp_ts: np.ndarray, ans: dict,
                which: np.ndarray, ttl: float, rng: np.random.Generator) -> pd.DataFrame:
    """One response per beacon (A, plus AAAA or TXT a few ms earlier for those families)."""
    n = resp_ts.size
    # Temporary ids group the rows of one response; inject_attacks replaces them with uids.
    tag = f"{victim}|{qname}|"
    blocks = [pd.DataFrame({"event_id": [f"{tag}A{i}" for i in range(n)], "ts": resp_ts, "rtype": "A",
                            "answer": int_to_ip(ans["a"][which]), "answer_index": 0})]
    extra = {"aaaa_port": ("AAAA", "aaaa"), "txt_port": ("TXT", "txt")}.get(family)
    if extra:
        rtype, field = extra
        blocks.append(pd.DataFrame({"event_id": [f"{tag}{rtype}{i}" for i in range(n)],
                                    "ts": np.round(resp_ts - rng.uniform(0.001, 0.01, n), 6), "rtype": rtype,
                                    "answer": ans[field][which], "answer_index": 0}))
    out = pd.concat(blocks, ignore_index=True)
    out["client_ip"], out["resolver_ip"], out["query"] = victim, resolver, qname
    out["ttl"], out["rcode"], out["source"] = ttl, "NOERROR", SOURCE
    return out
