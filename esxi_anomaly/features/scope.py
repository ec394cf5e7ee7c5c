"""Which connections are scored: those a monitored entity initiated, seen from its side.

A DNS-calculated C2 port is something a monitored host *connects to*; an inbound scan, ICMP, IGMP,
multicast, broadcast, link-local chatter and the DNS lookups themselves are not, and on real
captures they filled the top of the ranking. So, before features:

1. **Protocol**: TCP and UDP only (a source that logs no protocol is kept); ICMP (its type and
   code printed as ports) and every other protocol (IGMP, ESP, GRE, ...) are out of scope.
2. **Re-orientation**: a row whose source cannot know who opened the connection
   (`merge.knows_direction`: a Zeek midstream flow, an esxcli socket) and whose originator side
   has a service port (< 1024, or `SERVICE_PORTS`) while the responder side has an ephemeral one
   is turned round (ends, ports, byte and packet counts swapped): `1.1.1.2:853 -> 10.0.0.5:51234`
   is the host's DoT lookup. A Zeek `history` starting with `^` means Zeek has *already* flipped
   the flow by its own port heuristic (docs.zeek.org, "Connection Handling: Flipping
   Connections"), so such a row is taken as it is, never flipped back.
3. **Destination**: multicast, broadcast (255.255.255.255 and the broadcast address of each
   `--local-nets` network) and link-local destinations are out of scope; so are lookups to the
   resolvers (port 53/853 to an address the DNS answers name as `resolver_ip`, or configured).
4. **Initiator**: the source must be monitored: in the inventory, in `local_nets`, marked Zeek
   `local_orig`, or, when no `local_nets` are given, an RFC 1918 / ULA address. Else: inbound.

Every row out of scope is counted under its first reason (`REASONS`, in that order); nothing is
dropped silently. `Scope(all_directions=True)` keeps every row as it is (and counts nothing out).
Work is per distinct address, never per row.
"""
from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np
import pandas as pd

from esxi_anomaly.features.merge import SWAPPED, duplicate_records, knows_direction
from esxi_anomaly.schema import Frames

DEFAULT_LOCAL_NETS = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")   # RFC 1918, ULA
# services above 1023 that clients connect to: a flow *from* one of them to an ephemeral port ran backwards
SERVICE_PORTS = frozenset({853, 902, 1194, 1433, 1434, 1521, 1723, 1883, 1900, 2049, 2375, 2376, 3128, 3268, 3269,
                           3306, 3389, 3478, 4500, 5060, 5061, 5222, 5223, 5228, 5353, 5355, 5432, 5671, 5672,
                           5900, 5985, 5986, 6379, 6443, 8000, 8008, 8080, 8443, 8883, 8888, 9000, 9092, 9200,
                           9443, 11211, 27017})
RESOLVER_PORTS = (53, 853)
DOT_PORT = 853
# well-known DNS-over-HTTPS resolvers (port 443): Cloudflare, Google, Quad9, OpenDNS, AdGuard, CleanBrowsing
DOH_IPS = frozenset({"1.1.1.1", "1.0.0.1", "1.1.1.2", "1.0.0.2", "1.1.1.3", "1.0.0.3", "8.8.8.8", "8.8.4.4",
                     "9.9.9.9", "149.112.112.112", "9.9.9.10", "149.112.112.10", "9.9.9.11", "208.67.222.222",
                     "208.67.220.220", "94.140.14.14", "94.140.15.15", "185.228.168.9", "185.228.169.9",
                     "2606:4700:4700::1111", "2606:4700:4700::1001", "2001:4860:4860::8888",
                     "2001:4860:4860::8844", "2620:fe::fe", "2620:fe::9", "2620:119:35::35",
                     "2620:119:53::53"})
# out-of-scope reasons, in the order they are decided (a row counts under the first that holds)
REASONS = ("icmp", "other_protocol", "multicast", "broadcast", "link_local", "resolver_lookup", "inbound")
REASON_TEXT = {"icmp": "ICMP", "other_protocol": "IGMP or another non-TCP/UDP protocol", "multicast": "multicast",
               "broadcast": "broadcast", "link_local": "link-local", "resolver_lookup": "lookups to the resolvers",
               "inbound": "inbound (not initiated by a monitored entity)"}
ICMP_PROTOS = ("icmp", "icmp6", "ipv6-icmp", "icmpv6")
EARLIEST_PLAUSIBLE_TS = 946_684_800.0   # 2000-01-01 UTC
FUTURE_SLACK_S = 86_400.0
LOW_DNS_SHARE = 0.5   # below this share of in-scope connections joined to an answer, the DNS coverage is a gap


def _network(text: str):
    try:
        return ipaddress.ip_network(str(text).strip(), strict=False)
    except ValueError:
        raise ValueError(f"local network {text!r} is not a CIDR (e.g. 10.20.0.0/16 or fd00::/8)") from None


def _address(text: str):
    try:
        return ipaddress.ip_address(str(text).strip().split("%")[0])
    except ValueError:
        return None


@dataclass(frozen=True)
class Scope:
    """What is in scope (see the module). `local_nets`: CIDRs of the monitored networks (empty: RFC
    1918 and ULA); `resolvers`: the DNS resolvers' addresses (the lookups to them are out of scope,
    with those the DNS answers name); `all_directions`: keep every row (the scoring of old)."""

    local_nets: tuple[str, ...] = ()
    resolvers: tuple[str, ...] = ()
    all_directions: bool = False

    def __post_init__(self):
        nets = tuple(str(_network(n)) for n in self.local_nets)
        bad = [r for r in self.resolvers if _address(r) is None]
        if bad:
            raise ValueError(f"resolver {bad[0]!r} is not an IP address")
        object.__setattr__(self, "local_nets", nets)
        object.__setattr__(self, "resolvers", tuple(sorted({str(_address(r)) for r in self.resolvers})))
        object.__setattr__(self, "all_directions", bool(self.all_directions))

    def with_resolvers(self, ips) -> "Scope":
        """This scope with the resolvers `ips` (addresses the DNS answers name) added."""
        extra = [ip for ip in ips if _address(ip) is not None]
        return self if not extra else replace(self, resolvers=tuple(self.resolvers) + tuple(extra))

    def record(self) -> dict:
        """As JSON (a run's fingerprint, a summary)."""
        return {"local_nets": list(self.local_nets), "resolvers": list(self.resolvers),
                "all_directions": self.all_directions}

    def describe(self) -> str:
        if self.all_directions:
            return "all directions (nothing out of scope)"
        nets = ", ".join(self.local_nets) or "RFC 1918/ULA"
        return f"connections initiated by the inventory, Zeek local_orig or {nets}"


@lru_cache(maxsize=64)
def _parsed_nets(nets: tuple[str, ...]) -> tuple:
    return tuple(ipaddress.ip_network(n) for n in nets)


@dataclass
class Scoped:
    """The connections in scope (re-oriented), and what was left out and found on the way."""

    connections: pd.DataFrame
    out_of_scope: dict[str, int] = field(default_factory=dict)   # reason -> rows (`REASONS`)
    checks: dict[str, int] = field(default_factory=dict)         # `CHECKS`: counts for the coverage lines


CHECKS = ("read", "in_scope", "reoriented", "dns_over_tls", "doh", "before_2000", "future")


def resolvers_seen(dns: pd.DataFrame | None) -> list[str]:
    """The distinct resolver addresses the DNS answers name."""
    if dns is None or not len(dns) or "resolver_ip" not in dns.columns:
        return []
    values = pd.unique(dns["resolver_ip"].astype("str"))
    return sorted(v for v in values if v)


def _per_address(values: pd.Series):
    """(codes, distinct values, their parsed addresses): work per distinct address."""
    codes, uniques = pd.factorize(values, use_na_sentinel=False)
    texts = np.asarray(uniques, dtype=object).astype(str)
    return codes, texts, [_address(t) for t in texts]


def _in_nets(addrs: list, nets: tuple) -> np.ndarray:
    return np.array([a is not None and any(a.version == n.version and a in n for n in nets) for a in addrs],
                    dtype=bool)


def _broadcast(a, nets: tuple) -> bool:
    """The limited broadcast, a `local_nets` network's broadcast address, or (without `local_nets`)
    a private IPv4 address ending in .255 (the directed broadcast of the usual /24)."""
    if a.version != 4:
        return False
    if str(a) == "255.255.255.255":
        return True
    if nets:
        return any(a.version == n.version and n.prefixlen < 31 and a == n.broadcast_address for n in nets)
    return a.is_private and str(a).endswith(".255") and any(a in n for n in _parsed_nets(DEFAULT_LOCAL_NETS[:3]))


def _per_distinct(values: pd.Series, fn) -> tuple[np.ndarray, np.ndarray]:
    """(code per row, fn of each distinct value as text): work once per distinct value."""
    codes, uniques = pd.factorize(values, use_na_sentinel=False)
    return codes, np.array([fn(str(u)) for u in uniques] + [None], dtype=object)[:-1]


def _per_value(values: pd.Series, fn) -> np.ndarray:
    """fn of each row's value, computed once per distinct value (an object array)."""
    if not len(values):
        return np.zeros(0, dtype=object)
    codes, results = _per_distinct(values, fn)
    return results[codes]


def _lower(values: pd.Series) -> np.ndarray:
    return _per_value(values, str.lower)


def _service(port: np.ndarray) -> np.ndarray:
    return ((port >= 0) & (port < 1024)) | np.isin(port, list(SERVICE_PORTS))


def apply_scope(conns: pd.DataFrame, inventory: pd.DataFrame | None, scope: Scope, now: float | None = None) -> Scoped:
    """The connections of `scope` (rows in the frame's order, re-oriented where they ran backwards),
    the rows out of scope per reason and the checks (`CHECKS`) of all rows read."""
    n = len(conns)
    conns = conns.reset_index(drop=True)
    ts = conns["ts"].to_numpy(dtype="float64")
    now = time.time() if now is None else now
    checks = dict.fromkeys(CHECKS, 0)
    checks["read"] = n
    checks["before_2000"] = int((ts < EARLIEST_PLAUSIBLE_TS).sum())
    checks["future"] = int((ts > now + FUTURE_SLACK_S).sum())
    if scope.all_directions or not n:
        checks.update(in_scope=n, **_encrypted_dns(conns, np.ones(n, bool)))
        return Scoped(conns, dict.fromkeys(REASONS, 0), checks)
    proto_codes, protos = _per_distinct(conns["proto"], str.lower)   # tested once per distinct value
    proto = protos[proto_codes]
    tcp_udp = np.isin(protos, ("tcp", "udp", ""))[proto_codes]
    icmp = np.isin(protos, ICMP_PROTOS)[proto_codes]
    # re-orientation: a service port on the originator side, an ephemeral one on the responder side,
    # logged by a source that did not see who opened it (and not flipped by Zeek already)
    dport = conns["dst_port"].to_numpy(dtype="int64")
    backwards = recorded_backwards(conns, proto)
    if backwards.any():
        swapped = {**SWAPPED, "local_orig": "local_resp", "local_resp": "local_orig"}
        pairs = {name: other for name, other in swapped.items() if name in conns.columns and other in conns.columns}
        turned = {name: pd.Series(np.where(backwards, conns[other].to_numpy(), conns[name].to_numpy()),
                                  dtype=conns[name].dtype) for name, other in pairs.items()}
        conns = conns.assign(**turned)
        dport = conns["dst_port"].to_numpy(dtype="int64")
    checks["reoriented"] = int(backwards.sum())
    checks.update(_encrypted_dns(conns, tcp_udp))

    reason = np.full(n, -1, dtype=np.int8)   # index into REASONS, -1: in scope

    def mark(k: str, mask: np.ndarray) -> None:
        reason[(reason < 0) & mask] = REASONS.index(k)

    mark("icmp", icmp)
    mark("other_protocol", ~tcp_udp & ~icmp)
    nets = _parsed_nets(scope.local_nets)
    dcodes, dtexts, daddrs = _per_address(conns["dst_ip"])
    multicast = np.array([a is not None and a.is_multicast for a in daddrs], dtype=bool)
    broadcast = np.array([a is not None and _broadcast(a, nets) for a in daddrs], dtype=bool)
    link_local = np.array([a is not None and a.is_link_local for a in daddrs], dtype=bool)
    resolver = np.isin(dtexts, list(scope.resolvers))
    mark("multicast", multicast[dcodes])
    mark("broadcast", broadcast[dcodes])
    mark("link_local", link_local[dcodes])
    mark("resolver_lookup", resolver[dcodes] & np.isin(dport, RESOLVER_PORTS))
    scodes, stexts, saddrs = _per_address(conns["src_ip"])
    local = _in_nets(saddrs, nets or _parsed_nets(DEFAULT_LOCAL_NETS))
    if inventory is not None and len(inventory):
        local |= np.isin(stexts, inventory["ip"].astype("str").to_numpy(dtype=object))
    monitored = local[scodes]
    if "local_orig" in conns.columns:   # Zeek's Site::local_nets: the capture's own configuration
        monitored |= (conns["local_orig"].astype("str") == "T").to_numpy(dtype=bool)
    mark("inbound", ~monitored)
    keep = reason < 0
    counts = np.bincount(reason[~keep].astype(np.int64), minlength=len(REASONS))
    checks["in_scope"] = int(keep.sum())
    out = conns if keep.all() else conns[keep].reset_index(drop=True)
    return Scoped(out, {k: int(c) for k, c in zip(REASONS, counts)}, checks)


def recorded_backwards(conns: pd.DataFrame, proto: np.ndarray | None = None) -> np.ndarray:
    """Per row: was it recorded backwards (a service port on the originator side, an ephemeral one
    on the responder side, by a source that did not see who opened it, `direction_known`)?"""
    sport = conns["src_port"].to_numpy(dtype="int64")
    dport = conns["dst_port"].to_numpy(dtype="int64")
    # the ports first: the text columns are read for the few rows they leave (factorizing the source,
    # state and history of every row was most of a read's scope cost)
    rows = np.flatnonzero(_service(sport) & (dport >= 1024) & ~_service(dport))
    backwards = np.zeros(len(conns), dtype=bool)
    if len(rows):
        some = conns.iloc[rows]
        proto = _lower(some["proto"]) if proto is None else proto[rows]
        backwards[rows] = np.isin(proto, ("tcp", "udp", "")) & ~direction_known(some, proto)
    return backwards


def initiators(conns: pd.DataFrame, scope: Scope) -> pd.Series:
    """The address each connection is scored from: its source, or, for a row recorded backwards
    (unless `scope.all_directions`), its destination. The engines cut the sources into partitions
    by it, so a re-oriented row is scored with its initiator's other connections and DNS answers."""
    if scope.all_directions or not len(conns):
        return conns["src_ip"]
    backwards = recorded_backwards(conns)
    if not backwards.any():
        return conns["src_ip"]
    src, dst = conns["src_ip"].to_numpy(dtype=object), conns["dst_ip"].to_numpy(dtype=object)
    return pd.Series(np.where(backwards, dst, src), dtype="str", index=conns.index)


def direction_known(conns: pd.DataFrame, proto: np.ndarray | None = None) -> np.ndarray:
    """Per row: is its originator known to have opened the connection? Sources that see it
    (`merge.knows_direction`); for Zeek rows with a `history`, only TCP whose originator's SYN was
    seen (history "S...") or flows Zeek flipped itself ("^..."): a Zeek UDP flow's originator is
    only the first packet seen, and a midstream TCP flow's a guess (its conn_state says little: an
    RSTOS0 row with history "R" never saw a SYN)."""
    known = knows_direction(conns)
    if "history" not in conns.columns:
        return known
    first = _per_value(conns["history"], lambda h: h[:1])
    proto = _lower(conns["proto"]) if proto is None else proto
    zeek = _per_value(conns["source"], lambda s: s.startswith("zeek_conn")).astype(bool) & (first != "")
    return np.where(zeek, (first == "^") | ((first == "S") & (proto == "tcp")), known)


def _encrypted_dns(conns: pd.DataFrame, candidates: np.ndarray) -> dict[str, int]:
    """Rows to DNS over TLS (port 853) and to well-known DoH resolvers (port 443)."""
    dport = conns["dst_port"].to_numpy(dtype="int64")
    doh = _per_value(conns["dst_ip"], lambda ip: ip in DOH_IPS).astype(bool)
    return {"dns_over_tls": int((candidates & (dport == DOT_PORT)).sum()),
            "doh": int((candidates & doh & (dport == 443)).sum())}


# -- what a run (or a training) found: counts and the lines that name a gap ----------------------

COUNTS = (*REASONS, *CHECKS, "duplicates", "scored", "joined_dns")   # what `score_block` adds up


def add_counts(total: dict, scoped: Scoped | dict) -> dict:
    """`total` (changed, and returned) plus the counts of `scoped` (a `Scoped` or a counts dict)."""
    part = {**scoped.out_of_scope, **scoped.checks} if isinstance(scoped, Scoped) else scoped
    for key, value in part.items():
        total[key] = int(total.get(key, 0)) + int(value)
    return total


def out_of_scope(counts: dict) -> dict[str, int]:
    """Rows out of scope per reason (`REASONS`), reasons with none left out."""
    return {k: int(counts.get(k, 0)) for k in REASONS if counts.get(k, 0)}


def coverage(counts: dict) -> dict:
    """The coverage and sanity numbers of `counts`: in-scope rows, the share of scored connections
    joined to a DNS answer, encrypted DNS, re-oriented, duplicate and implausibly timed rows."""
    scored = int(counts.get("scored", 0))
    return {"in_scope": int(counts.get("in_scope", 0)), "reoriented": int(counts.get("reoriented", 0)),
            "joined_dns": int(counts.get("joined_dns", 0)),
            "dns_share": round(int(counts.get("joined_dns", 0)) / scored, 4) if scored else None,
            "dns_over_tls": int(counts.get("dns_over_tls", 0)), "doh": int(counts.get("doh", 0)),
            "duplicates": int(counts.get("duplicates", 0)), "before_2000": int(counts.get("before_2000", 0)),
            "future": int(counts.get("future", 0))}


def scope_line(counts: dict) -> str:
    """One line: how many connections were in scope, and why the others were not."""
    read, out = int(counts.get("read", 0)), out_of_scope(counts)
    why = ", ".join(f"{REASON_TEXT[k]} {v:,}" for k, v in out.items())
    line = f"scope: {int(counts.get('in_scope', 0)):,} of {read:,} connections in scope"
    line += f"; out of scope: {why}" if why else ""
    if counts.get("reoriented"):
        line += f"; {int(counts['reoriented']):,} recorded backwards were re-oriented"
    return line


def diagnostic_lines(counts: dict, dns_records: int | None = None, history_days: float | None = None,
                     times: bool = True) -> list[str]:
    """The blind spots of a run or a training history, each in plain words (empty: none found):
    a low share of in-scope connections joined to a DNS answer (and why, when it can tell),
    encrypted DNS, a history under a day, times before 2000 or in the future (unless not `times`:
    training names those itself, `model.history_findings`), duplicate records. `--strict` fails on
    any of them."""
    cov, lines = coverage(counts), []
    encrypted = []
    if cov["dns_over_tls"]:
        encrypted.append(f"DNS over TLS (port 853) on {cov['dns_over_tls']:,} connection"
                         + ("s" if cov["dns_over_tls"] > 1 else ""))
    if cov["doh"]:
        encrypted.append(f"{cov['doh']:,} connections to well-known DNS-over-HTTPS resolvers")
    share = cov["dns_share"]
    if share is not None and share < LOW_DNS_SHARE:
        if dns_records == 0:
            cause = "no DNS answers were read (DNS logs missing)"
        else:
            cause = "DNS logs missing for most sources or hours, or DNS encrypted"
        if encrypted:
            cause += " (" + "; ".join(encrypted) + " seen)"
        lines.append(f"only {100 * share:.0f} % of in-scope connections were joined to a DNS answer: {cause}; "
                     "derivations from answers cannot be checked for the rest")
    elif encrypted:
        lines.append("encrypted DNS seen: " + "; ".join(encrypted) + ": the answers it carried are not in the "
                     "DNS logs, so connections after them cannot be checked")
    if history_days is not None and history_days < 1.0:
        lines.append(f"the model's history spans only {24 * history_days:.1f} hours, under a day: most normal "
                     "traffic looks new to it")
    if times and cov["before_2000"]:
        lines.append(f"{cov['before_2000']:,} connections have times before 2000-01-01: a clock never set, or "
                     "times relative to the capture's start")
    if times and cov["future"]:
        lines.append(f"{cov['future']:,} connections have times more than a day in the future")
    if cov["duplicates"]:
        lines.append(f"{cov['duplicates']:,} duplicate connection records (same 5-tuple, time and sensor, "
                     "another uid) were merged: a log read twice, or overlapping files")
    return lines


def scoped_history(frames: Frames, scope: Scope, now: float | None = None) -> tuple[Frames, dict]:
    """(frames cut to `scope`, counts): a training history as scoring sees its days: connections in
    scope, re-oriented, duplicate records merged, the lookups to the resolvers its own DNS answers
    name left out. The DNS answers and inventory are kept whole."""
    scoped = apply_scope(frames.connections, frames.inventory,
                         scope.with_resolvers(resolvers_seen(frames.dns_answers)), now)
    conns = scoped.connections
    duplicate = duplicate_records(conns)
    if duplicate.any():
        conns = conns[~duplicate].reset_index(drop=True)
    counts = add_counts({}, scoped)
    counts["duplicates"] = int(duplicate.sum())
    return Frames(conns, frames.dns_answers, frames.inventory), counts
