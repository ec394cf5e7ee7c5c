"""The traffic engine: routes -> connections, DNS responses (long form) and look-alike labels.

Everything is vectorised over events: Poisson counts per (route, hour) shaped by diurnal curves,
periodic schedules for heartbeats, a client DNS cache keyed on (client, name, TTL bucket) so only
the first connection of a bucket triggers a lookup, resolver-side answer rotation for CDNs, and
per-profile byte/duration/packet/state draws. No Python loop runs per connection.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from esxi_anomaly import schema
from esxi_anomaly.synth._common import ephemeral_ports, int_to_ip, mix64, new_uids
from esxi_anomaly.synth.estate import CURVES, Estate

SOURCE = "synth"

# Client-side DNS cache cap (seconds) per OS: glibc without nscd does not cache, but the
# applications on our Linux servers pool connections/cache for a few minutes; Windows honours TTL.
OS_CACHE_CAP = {"linux": 300.0, "windows": 86400.0, "esxi": 86400.0}


@dataclass(frozen=True)
class Profile:
    """Size/duration/state distribution of one kind of connection (medians, log-sigmas)."""

    out_median: float
    out_sigma: float
    in_median: float
    in_sigma: float
    dur_median: float
    dur_sigma: float
    states: tuple[tuple[str, float], ...]   # conn_state -> probability


_TCP_OK = (("SF", 0.94), ("RSTO", 0.02), ("RSTR", 0.02), ("S0", 0.01), ("REJ", 0.01))
PROFILES: dict[str, Profile] = {
    "web": Profile(900, 0.7, 30000, 1.6, 2.0, 1.3, _TCP_OK),
    "api": Profile(600, 0.6, 2500, 1.0, 0.15, 1.0, _TCP_OK),
    "small": Profile(300, 0.5, 400, 0.6, 0.02, 0.8, _TCP_OK),
    "db": Profile(1500, 1.0, 12000, 1.5, 0.3, 1.2, _TCP_OK),
    "ldap": Profile(450, 0.5, 1800, 0.8, 0.05, 0.8, _TCP_OK),
    "smb": Profile(4000, 1.5, 60000, 2.0, 5.0, 1.5, _TCP_OK),
    "amqp": Profile(2000, 1.0, 2000, 1.0, 30.0, 1.0, _TCP_OK),
    "metrics": Profile(2500, 0.3, 300, 0.2, 0.03, 0.5, _TCP_OK),
    "download": Profile(700, 0.5, 400000, 2.0, 3.0, 1.5, _TCP_OK),
    "bulk": Profile(2e6, 1.5, 20000, 1.0, 60.0, 1.2, _TCP_OK),
    "vmotion": Profile(4e9, 0.8, 2e6, 0.8, 40.0, 0.6, (("SF", 1.0),)),
    "ssh": Profile(3000, 1.0, 20000, 1.5, 4.0, 1.0, _TCP_OK),
    "ntp": Profile(48, 0.0, 48, 0.0, 0.004, 0.6, (("SF", 0.99), ("S0", 0.01))),
    "snmp": Profile(90, 0.3, 300, 0.5, 0.01, 0.6, (("SF", 1.0),)),
    "syslog": Profile(2500, 1.0, 0, 0.0, 20.0, 0.8, (("S0", 1.0),)),
    "heartbeat": Profile(260, 0.1, 0, 0.0, 0.0, 0.0, (("S0", 1.0),)),        # one datagram
    "heartbeat_ack": Profile(120, 0.1, 120, 0.1, 0.001, 0.5, (("SF", 1.0),)),
    "beacon": Profile(350, 0.6, 1200, 1.2, 0.8, 1.0, (("SF", 0.9), ("RSTR", 0.05), ("S0", 0.05))),
}
PROFILE_NAMES = tuple(PROFILES)
_ALL_STATES = ("SF", "S0", "REJ", "RSTO", "RSTR")


def curve_weights(start: float, n_hours: int) -> np.ndarray:
    """Hourly activity weights (curve x hour), UTC; weekends are quiet for office curves."""
    hours = start + 3600.0 * np.arange(n_hours)
    hod = ((hours // 3600) % 24).astype(int)
    dow = ((hours // 86400 + 3) % 7).astype(int)     # 1970-01-01 was a Thursday; 0 = Monday
    weekday = dow < 5
    office_hours = (hod >= 8) & (hod < 18)
    w = np.ones((len(CURVES), n_hours))
    w[CURVES.index("server")] = np.where(office_hours & weekday, 1.4, 0.8) * np.where(weekday, 1.0, 0.8)
    office = np.where(office_hours, 2.2, np.where((hod == 7) | (hod == 18) | (hod == 19), 0.8, 0.08))
    w[CURVES.index("office")] = office * np.where(weekday, 1.0, 0.08)
    w[CURVES.index("nightly")] = np.where((hod >= 1) & (hod < 4), 4.0, np.where(office_hours, 0.9, 0.3))
    return w


def route_events(est: Estate, start: float, end: float, rng: np.random.Generator, scale: float):
    """(route index, ts) of every benign event in [start, end)."""
    r = est.routes
    rate = r["rate"].to_numpy() * scale * est.scenario.volume
    period = r["period"].to_numpy() / max(scale * est.scenario.volume, 1e-9)
    n_hours = int(np.ceil((end - start) / 3600.0))
    weights = curve_weights(start, n_hours)
    curve_idx = r["curve"].map({c: i for i, c in enumerate(CURVES)}).to_numpy()
    poisson = np.flatnonzero((r["period"].to_numpy() == 0) & (rate > 0))
    lam = rate[poisson, None] * weights[curve_idx[poisson]]
    counts = rng.poisson(lam).ravel()
    cell = np.repeat(np.arange(counts.size), counts)
    ev_route = poisson[cell // n_hours]
    ev_ts = start + 3600.0 * (cell % n_hours) + rng.random(cell.size) * 3600.0
    periodic = np.flatnonzero(r["period"].to_numpy() > 0)
    per = period[periodic]
    phase = rng.random(periodic.size) * per
    n_per = np.maximum(np.floor((end - start - phase) / per).astype(np.int64) + 1, 0)
    rep = np.repeat(np.arange(periodic.size), n_per)
    k = np.arange(rep.size) - np.repeat(np.cumsum(n_per) - n_per, n_per)
    jitter = rng.normal(0.0, 0.01, rep.size) * per[rep]
    p_ts = start + phase[rep] + k * per[rep] + jitter
    ev_route = np.concatenate([ev_route, periodic[rep]])
    ev_ts = np.concatenate([ev_ts, p_ts])
    active = r["active_from"].to_numpy()[ev_route]
    keep = (ev_ts >= start) & (ev_ts < end) & (ev_ts >= active)
    ev_route, ev_ts = ev_route[keep], ev_ts[keep]
    order = np.argsort(ev_ts, kind="stable")
    return ev_route[order], ev_ts[order]


def connection_fields(rng: np.random.Generator, profile_idx: np.ndarray, proto: np.ndarray) -> dict[str, np.ndarray]:
    """duration, bytes, packets and conn_state per connection, drawn from each row's profile."""
    n = len(profile_idx)
    prof = [PROFILES[p] for p in PROFILE_NAMES]
    par = np.array([[p.out_median, p.out_sigma, p.in_median, p.in_sigma, p.dur_median, p.dur_sigma] for p in prof])
    state_p = np.array([[dict(p.states).get(s, 0.0) for s in _ALL_STATES] for p in prof])
    pp = par[profile_idx]
    z = rng.standard_normal((n, 3))
    bytes_out = np.round(pp[:, 0] * np.exp(pp[:, 1] * z[:, 0]))
    bytes_in = np.round(pp[:, 2] * np.exp(pp[:, 3] * z[:, 1]))
    duration = pp[:, 4] * np.exp(pp[:, 5] * z[:, 2])
    cum = np.cumsum(state_p[profile_idx], axis=1)
    state_idx = np.minimum((rng.random(n)[:, None] > cum).sum(axis=1), len(_ALL_STATES) - 1)
    state = np.array(_ALL_STATES, dtype=object)[state_idx]
    tcp = proto == "tcp"
    seg = 1448.0
    packets_out = np.where(tcp, np.ceil(bytes_out / seg) + 3, np.maximum(np.ceil(bytes_out / 1200.0), 1))
    packets_in = np.where(tcp, np.ceil(bytes_in / seg) + 2, np.where(bytes_in > 0, np.ceil(bytes_in / 1200.0), 0))
    # Unanswered / rejected attempts carry no payload (SYN retries at 1 s and 3 s; REJ = SYN + RST).
    s0 = (state == "S0") & tcp
    retries = rng.integers(1, 3, n)
    bytes_out[s0], bytes_in[s0], packets_in[s0] = 0, 0, 0
    packets_out[s0] = retries[s0] + 1
    duration[s0] = np.where(retries[s0] == 1, 1.0, 3.0) + rng.random(int(s0.sum())) * 0.01
    rej = state == "REJ"
    bytes_out[rej], bytes_in[rej], packets_out[rej], packets_in[rej] = 0, 0, 1, 1
    duration[rej] = rng.random(int(rej.sum())) * 0.002
    udp_s0 = (state == "S0") & ~tcp
    bytes_in[udp_s0], packets_in[udp_s0] = 0, 0
    # Zeek logs no duration or byte counts for single-packet flows ("-").
    single = (packets_out + packets_in) <= 1
    duration[single], bytes_out[single], bytes_in[single] = np.nan, np.nan, np.nan
    return {"duration": duration, "bytes_out": bytes_out, "bytes_in": bytes_in,
            "packets_out": packets_out.astype(float), "packets_in": packets_in.astype(float), "conn_state": state}


def benign_traffic(est: Estate, start: float, end: float, rng: np.random.Generator, scale: float = 1.0):
    """Benign connections, DNS answers and look-alike labels of the estate in [start, end).

    Returns (connections, dns_answers, labels) with raw uint32 addresses not yet formatted:
    use `to_frames` to get canonical frames.
    """
    r = est.routes
    nt = est.names.arrays()
    ev_route, ev_ts = route_events(est, start, end, rng, scale)
    name_id = r["name_id"].to_numpy()[ev_route]
    src = r["src"].to_numpy().astype(np.uint32)[ev_route]
    os_kind = r["os"].to_numpy()[ev_route]
    dns_only = r["dns_only"].to_numpy()[ev_route]

    # --- client DNS cache: the first event of each (client, name, TTL bucket) looks the name up ---
    named = np.flatnonzero(name_id >= 0)
    nid = name_id[named]
    cap = pd.Series(os_kind[named]).map(OS_CACHE_CAP).to_numpy()
    cache = np.maximum(np.minimum(nt["ttl"][nid], cap), 1.0)
    key = (src[named].astype(np.int64) << 20) | nid
    phase = (mix64(key) % np.uint64(1_000_000)).astype(float) / 1e6 * cache
    bucket = np.floor((ev_ts[named] + phase) / cache).astype(np.int64)
    bucket = np.where(dns_only[named], -1 - np.arange(named.size), bucket)   # no cache for DNS-only events
    order = np.lexsort((ev_ts[named], bucket, key))
    k_s, b_s = key[order], bucket[order]
    first = np.ones(order.size, dtype=bool)
    first[1:] = (k_s[1:] != k_s[:-1]) | (b_s[1:] != b_s[:-1])
    group = np.cumsum(first) - 1
    lookup_of_named = np.empty(order.size, dtype=np.int64)
    lookup_of_named[order] = group
    lk_event = named[order[first]]                      # the event that triggered each lookup
    lk_name = name_id[lk_event]
    external = ~np.isin(nt["pool"][nt["pool_offset"][lk_name].clip(0, max(len(nt["pool"]) - 1, 0))] >> 24, [10]) \
        if len(nt["pool"]) else np.zeros(lk_name.size, dtype=bool)
    external &= nt["pool_size"][lk_name] > 0
    delay = np.clip(np.exp(np.log(0.004) + 1.0 * rng.standard_normal(lk_event.size)), 0.0003, 2.0)
    lk_ts = ev_ts[lk_event] - delay
    rot = nt["rotate"][lk_name]
    rot_idx = np.where(rot > 0, np.floor(lk_ts / np.where(rot > 0, rot, 1.0)), 0).astype(np.int64)
    size = nt["pool_size"][lk_name]
    first_pos = np.where((rot > 0) & (size > 0),
                         (mix64((lk_name.astype(np.int64) * 1_000_003) ^ rot_idx) % np.maximum(size, 1).astype(np.uint64))
                         .astype(np.int64), 0)
    first_answer = np.where(size > 0, nt["pool"][np.minimum(nt["pool_offset"][lk_name] + first_pos,
                                                             max(len(nt["pool"]) - 1, 0))], 0)

    dns = _lookup_rows(est, rng, lk_ts, src[lk_event], r["resolver"].to_numpy()[ev_route[lk_event]], lk_name,
                       first_pos, external)
    srv_dns = _srv_rows(rng, r, ev_route[lk_event], lk_ts, src[lk_event])

    # --- connections --------------------------------------------------------------------------
    conn_ev = np.flatnonzero(~dns_only)
    dst = r["dst_ip"].to_numpy().astype(np.uint32)[ev_route[conn_ev]]
    ev_lookup = np.full(ev_ts.size, -1, dtype=np.int64)
    ev_lookup[named] = lookup_of_named
    has_name = ev_lookup[conn_ev] >= 0
    dst[has_name] = first_answer[ev_lookup[conn_ev][has_name]]
    ports_flat, ports_off, ports_len = _port_table(r)
    rr = ev_route[conn_ev]
    pick = (rng.random(conn_ev.size) * ports_len[rr]).astype(np.int64)
    dst_port = ports_flat[ports_off[rr] + pick]
    proto = r["proto"].to_numpy()[rr]
    profile_idx = r["profile"].map({p: i for i, p in enumerate(PROFILE_NAMES)}).to_numpy()[rr]
    conns = {"ts": ev_ts[conn_ev], "src": src[conn_ev], "dst": dst, "dst_port": dst_port.astype(np.int32),
             "src_port": ephemeral_ports(rng, os_kind[conn_ev]), "proto": proto,
             **connection_fields(rng, profile_idx, proto)}
    look = r["lookalike"].to_numpy()[rr]
    return conns, _concat_dns([dns, srv_dns]), look


def _port_table(r: pd.DataFrame):
    lens = r["ports"].map(len).to_numpy()
    flat = np.fromiter((p for ports in r["ports"] for p in ports), dtype=np.int64, count=int(lens.sum()))
    return flat, np.cumsum(lens) - lens, lens


def _lookup_rows(est: Estate, rng, lk_ts, client, resolver, lk_name, first_pos, external) -> dict:
    """Long-form answer rows of every lookup: optional CNAME, then `answers` A records (or NXDOMAIN)."""
    nt = est.names.arrays()
    n = lk_ts.size
    size = nt["pool_size"][lk_name]
    k = np.where(size > 0, nt["answers"][lk_name], 0)
    has_cname = (nt["cname"][lk_name] != "") & (size > 0)
    n_rows = has_cname.astype(np.int64) + np.maximum(k, 1)
    row_lk = np.repeat(np.arange(n), n_rows)
    pos = np.arange(row_lk.size) - np.repeat(np.cumsum(n_rows) - n_rows, n_rows)
    is_cname = has_cname[row_lk] & (pos == 0)
    a_pos = pos - has_cname[row_lk]
    nx = size[row_lk] == 0
    pool_idx = nt["pool_offset"][lk_name][row_lk] + (first_pos[row_lk] + a_pos) % np.maximum(size[row_lk], 1)
    ip = nt["pool"][np.clip(pool_idx, 0, max(len(nt["pool"]) - 1, 0))] if len(nt["pool"]) else np.zeros(row_lk.size)
    answer = int_to_ip(ip).astype(object)
    answer[is_cname] = nt["cname"][lk_name][row_lk][is_cname]
    answer[nx] = ""
    rtype = np.where(is_cname, "CNAME", np.where(nx, "", "A")).astype(object)
    ttl = nt["ttl"][lk_name][row_lk].astype(float)
    # Recursive resolvers count cached external TTLs down; CNAMEs usually live longer.
    countdown = external[row_lk] & ~is_cname & (ttl >= 10)
    ttl[countdown] = np.ceil(ttl[countdown] * rng.uniform(0.1, 1.0, int(countdown.sum())))
    ttl[is_cname] = np.maximum(ttl[is_cname] * 5, 300.0)
    ttl[nx] = np.nan
    return {"lookup": row_lk, "n_lookups": n, "ts": lk_ts[row_lk], "client": client[row_lk],
            "resolver": resolver[row_lk].astype(np.uint32), "query": nt["name"][lk_name][row_lk],
            "rtype": rtype, "answer": answer, "answer_index": np.where(nx, -1, pos),
            "ttl": ttl, "rcode": np.where(nx, "NXDOMAIN", "NOERROR").astype(object)}


def _srv_rows(rng, r: pd.DataFrame, lk_route, lk_ts, client) -> dict:
    """SRV responses that precede the A lookups of SRV-discovered services."""
    srv_q = r["srv_query"].to_numpy()[lk_route]
    which = np.flatnonzero(srv_q != "")
    rdata = r["srv_rdata"].to_numpy()[lk_route[which]]
    parts = [s.split("|") for s in pd.unique(rdata)]
    table = {s: p for s, p in zip(pd.unique(rdata), parts)}
    counts = np.array([len(table[s]) for s in rdata], dtype=np.int64)
    row = np.repeat(np.arange(which.size), counts)
    pos = np.arange(row.size) - np.repeat(np.cumsum(counts) - counts, counts)
    answer = np.array([table[s][p] for s, p in zip(rdata[row], pos)], dtype=object) if row.size else np.array([], object)
    ts = lk_ts[which] - rng.uniform(0.001, 0.02, which.size)
    return {"lookup": row, "n_lookups": which.size, "ts": ts[row], "client": client[which][row],
            "resolver": r["resolver"].to_numpy().astype(np.uint32)[lk_route[which]][row],
            "query": srv_q[which][row], "rtype": np.full(row.size, "SRV", dtype=object), "answer": answer,
            "answer_index": pos, "ttl": np.full(row.size, 600.0), "rcode": np.full(row.size, "NOERROR", dtype=object)}


def _concat_dns(parts: list[dict]) -> dict:
    """Concatenate long-form DNS row blocks, renumbering lookups so each block's stay distinct."""
    out: dict[str, list] = {}
    base = 0
    for p in parts:
        for k, v in p.items():
            if k == "n_lookups":
                continue
            out.setdefault(k, []).append(v + base if k == "lookup" else v)
        base += p["n_lookups"]
    merged = {k: np.concatenate(v) for k, v in out.items()}
    merged["n_lookups"] = base
    return merged


def to_frames(conns: dict, dns: dict, rng: np.random.Generator, taken: set[str] | None = None):
    """Canonical (connections, dns_answers) frames from engine arrays, with fresh unique uids.

    DNS rows of one lookup share one uid (one Zeek dns.log record). Rows are sorted by ts.
    """
    # Microsecond resolution, as Zeek logs it, so written logs read back to the same values.
    conns = {**conns, "ts": np.round(conns["ts"], 6), "duration": np.round(conns["duration"], 6)}
    dns = {**dns, "ts": np.round(dns["ts"], 6)}
    n_conn = len(conns["ts"])
    uids = new_uids(rng, n_conn + dns["n_lookups"], taken)
    conn_df = pd.DataFrame({
        "event_id": uids[:n_conn], "ts": conns["ts"], "src_ip": int_to_ip(conns["src"]),
        "src_port": conns["src_port"], "dst_ip": int_to_ip(conns["dst"]), "dst_port": conns["dst_port"],
        "proto": conns["proto"], "duration": conns["duration"], "bytes_out": conns["bytes_out"],
        "bytes_in": conns["bytes_in"], "packets_out": conns["packets_out"], "packets_in": conns["packets_in"],
        "conn_state": conns["conn_state"], "process": "", "esxi_host": "", "source": SOURCE,
    })
    dns_df = pd.DataFrame({
        "event_id": uids[n_conn:][dns["lookup"]], "ts": dns["ts"], "client_ip": int_to_ip(dns["client"]),
        "resolver_ip": int_to_ip(dns["resolver"]), "query": dns["query"], "rtype": dns["rtype"],
        "answer": dns["answer"], "answer_index": dns["answer_index"], "ttl": dns["ttl"], "rcode": dns["rcode"],
        "source": SOURCE,
    })
    return schema.conform(conn_df, "connections"), schema.conform(dns_df, "dns_answers")
