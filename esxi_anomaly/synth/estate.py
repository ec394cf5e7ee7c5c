"""The vSphere estate: inventory, DNS names, and the "routes" its benign traffic follows.

A route is one (source, destination name or IP, port set, protocol) a source uses, with a rate
(Poisson per hour, shaped by a diurnal curve) or a period (heartbeats). The traffic engine
(`engine.py`) turns routes into connections and DNS answers; this module only decides *who
talks to what*. Look-alike routes carry their look-alike kind, which becomes their label.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from esxi_anomaly import schema
from esxi_anomaly.synth._common import int_to_ip, ip_to_int
from esxi_anomaly.synth.scenario import Scenario

LOOKALIKE_KINDS = (
    "coincidental_apt12", "srv_port", "cdn_rotation", "stable_unusual_port", "rpc_dynamic", "new_benign_service",
)
CURVES = ("flat", "server", "office", "nightly")

# First octets used for synthetic public addresses: avoids private, loopback, CGNAT, multicast and
# the 2.x/4.x blocks the coincidental-APT12 look-alike uses.
_PUBLIC_FIRST_OCTETS = np.array([o for o in range(11, 224) if o not in (100, 127, 169, 172, 192, 198, 203)])


def public_ips(label: str, n: int) -> list[int]:
    """`n` distinct, stable public IPv4 addresses derived from `label` (a DNS name)."""
    out: list[int] = []
    i = 0
    while len(out) < n:
        h = int.from_bytes(hashlib.blake2b(f"{label}#{i}".encode(), digest_size=8).digest(), "big")
        ip = (int(_PUBLIC_FIRST_OCTETS[h % len(_PUBLIC_FIRST_OCTETS)]) << 24) | ((h >> 8) & 0xFFFFFF)
        if (ip & 255) not in (0, 255) and ip not in out:
            out.append(ip)
        i += 1
    return out


@dataclass
class NameTable:
    """DNS names the estate resolves, with how their answers look (pool, rotation, TTL, CNAME)."""

    names: list[str] = field(default_factory=list)
    pool_offset: list[int] = field(default_factory=list)
    pool_size: list[int] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)      # A records per response
    rotate: list[float] = field(default_factory=list)     # seconds between answer rotations; 0 = fixed
    ttl: list[float] = field(default_factory=list)
    cname: list[str] = field(default_factory=list)
    pool: list[int] = field(default_factory=list)         # uint32 addresses, all names concatenated
    _index: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, ips: list[int], answers: int | None = None, rotate: float = 0.0,
            ttl: float = 300.0, cname: str = "") -> int:
        if name in self._index:
            return self._index[name]
        self._index[name] = len(self.names)
        self.names.append(name)
        self.pool_offset.append(len(self.pool))
        self.pool_size.append(len(ips))
        self.pool.extend(ips)
        self.answers.append(min(answers or len(ips), len(ips)))
        self.rotate.append(float(rotate))
        self.ttl.append(float(ttl))
        self.cname.append(cname)
        return self._index[name]

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "name": np.array(self.names, dtype=object),
            "pool_offset": np.array(self.pool_offset, dtype=np.int64),
            "pool_size": np.array(self.pool_size, dtype=np.int64),
            "answers": np.array(self.answers, dtype=np.int64),
            "rotate": np.array(self.rotate, dtype=np.float64),
            "ttl": np.array(self.ttl, dtype=np.float64),
            "cname": np.array(self.cname, dtype=object),
            "pool": np.array(self.pool, dtype=np.uint32),
        }


@dataclass
class Entity:
    ip: int
    name: str             # short inventory name (vm-web-03, esx-01)
    kind: str             # vm | esxi_mgmt | vcenter | infra
    role: str
    esxi_host: str
    os: str               # linux | windows | esxi
    resolver: int         # the DNS server it asks


@dataclass
class Estate:
    scenario: Scenario
    entities: list[Entity]
    names: NameTable
    routes: pd.DataFrame               # one row per route (see `_Routes.add`)
    infra: dict[str, int]              # well-known service addresses (vcenter, ntp, syslog, dns1, dc1, ...)

    def inventory(self) -> pd.DataFrame:
        df = pd.DataFrame({
            "ip": int_to_ip(np.array([e.ip for e in self.entities], dtype=np.uint32)),
            "name": [e.name for e in self.entities],
            "kind": [e.kind for e in self.entities],
            "esxi_host": [e.esxi_host for e in self.entities],
            "role": [e.role for e in self.entities],
        })
        return schema.conform(df, "inventory")

    def by_role(self, role: str) -> list[Entity]:
        return [e for e in self.entities if e.role == role]

    def by_kind(self, kind: str) -> list[Entity]:
        return [e for e in self.entities if e.kind == kind]


class _Routes:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, src: Entity, port, rate: float = 0.0, *, name_id: int = -1, dst_ip: int = 0,
            proto: str = "tcp", profile: str = "web", curve: str = "server", period: float = 0.0,
            lookalike: str = "", active_from: float = -np.inf, dns_only: bool = False,
            srv_query: str = "", srv_rdata: tuple[str, ...] = ()) -> None:
        ports = tuple(port) if isinstance(port, (tuple, list)) else (int(port),)
        self.rows.append(dict(
            src=src.ip, os=src.os, resolver=src.resolver, name_id=name_id, dst_ip=dst_ip, ports=ports,
            proto=proto, profile=profile, curve=curve, rate=float(rate), period=float(period),
            lookalike=lookalike, active_from=float(active_from), dns_only=dns_only,
            srv_query=srv_query, srv_rdata="|".join(srv_rdata),
        ))

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)


_SITE_WORDS = (
    "news", "shop", "cloud", "maps", "video", "mail", "docs", "wiki", "travel", "bank", "sport", "music",
    "learn", "health", "jobs", "photo", "game", "code", "market", "weather", "food", "home", "auto", "tech",
)
_TLDS = ("com", "net", "org", "io", "de", "co.uk", "fr")


def build_estate(scenario: Scenario, new_service_from: float = np.inf) -> Estate:
    """The estate of `scenario`: entities, DNS names and routes.

    `new_service_from` (epoch seconds) is when the `new_benign_service` look-alike starts; it is the
    attack window's start in `generate`, so "new" alone never means "attack".
    """
    dom = scenario.domain
    names = NameTable()
    routes = _Routes()
    infra = {
        "vcenter": ip_to_int("10.10.0.10"), "dns1": ip_to_int("10.10.1.53"), "dns2": ip_to_int("10.10.1.54"),
        "ntp": ip_to_int("10.10.1.123"), "syslog": ip_to_int("10.10.1.14"),
        "dc1": ip_to_int("10.10.1.21"), "dc2": ip_to_int("10.10.1.22"),
    }
    hosts = [f"esx-{i + 1:02d}" for i in range(scenario.esxi_hosts)]
    entities: list[Entity] = []
    for i, h in enumerate(hosts):
        entities.append(Entity(ip_to_int(f"10.10.0.{11 + i}"), h, "esxi_mgmt", "esxi", h, "esxi", infra["dns1"]))
    entities.append(Entity(infra["vcenter"], "vcenter", "vcenter", "vcenter", hosts[0], "linux", infra["dns1"]))
    for key, nm, role, os_kind in (("dns1", "dns01", "dns", "linux"), ("dns2", "dns02", "dns", "linux"),
                                  ("ntp", "ntp01", "ntp", "linux"), ("syslog", "syslog01", "syslog", "linux"),
                                  ("dc1", "dc01", "dc", "windows"), ("dc2", "dc02", "dc", "windows")):
        resolver = infra["dc1"] if os_kind == "windows" else infra["dns1"]
        entities.append(Entity(infra[key], nm, "infra", role, hosts[len(entities) % len(hosts)], os_kind, resolver))
    subnet = {"web": 1, "app": 2, "db": 3, "vdi": 4, "build": 5, "file": 6, "mon": 7}
    vm_no = 0
    for role, count in scenario.vms.items():
        for j in range(count):
            os_kind = "windows" if role == "vdi" else "linux"
            resolver = (infra["dc1"] if j % 3 else infra["dc2"]) if os_kind == "windows" else (
                infra["dns1"] if j % 4 else infra["dns2"])
            host_octet = (100 + j) if role == "vdi" else (11 + j)
            entities.append(Entity(ip_to_int(f"10.20.{subnet[role]}.{host_octet}"), f"vm-{role}-{j + 1:02d}", "vm",
                                   role, hosts[vm_no % len(hosts)], os_kind, resolver))
            vm_no += 1
    est = Estate(scenario, entities, names, pd.DataFrame(), infra)

    def internal(name: str, ip: int, ttl: float = 3600.0) -> int:
        return names.add(f"{name}.{dom}", [ip], ttl=ttl)

    def external(name: str, n: int = 1, answers: int | None = None, rotate: float = 0.0, ttl: float = 300.0,
                 cname: str = "") -> int:
        return names.add(name, public_ips(name, n), answers=answers, rotate=rotate, ttl=ttl, cname=cname)

    by_name = {e.name: e for e in entities}
    dc_names = [internal("dc01", infra["dc1"]), internal("dc02", infra["dc2"])]
    vcenter_name = internal("vcenter", infra["vcenter"])
    ntp_name = internal("ntp", infra["ntp"])
    for e in entities:
        if e.kind in ("vm", "esxi_mgmt"):
            internal(e.name, e.ip)
    peers = {role: [names.add(f"{e.name}.{dom}", [e.ip]) for e in est.by_role(role)] for role in subnet}
    mon_name = peers["mon"][0] if peers["mon"] else internal("metrics", ip_to_int("10.20.7.250"))
    es_name = internal("es", ip_to_int("10.20.7.200"), ttl=300)
    mq_name = internal("mq", ip_to_int("10.20.2.200"), ttl=300)
    nexus_name = internal("nexus", ip_to_int("10.20.5.200"))
    git_name = internal("git", ip_to_int("10.20.5.201"))
    app1_name = internal("app1", ip_to_int("10.20.2.201"), ttl=600)
    file_name = peers["file"][0] if peers["file"] else internal("files", ip_to_int("10.20.6.250"))
    wpad_name = names.add(f"wpad.{dom}", [], ttl=0)

    # Look-alike 1: short-TTL rotating answers that all satisfy a*b+c == 443 (2*200+43, 4*110+3).
    apt12_pool = [ip_to_int(f"2.200.43.{d}") for d in range(1, 255)] + [ip_to_int(f"4.110.3.{d}") for d in range(1, 255)]
    coincidental = names.add("img.edgecache-cdn.net", apt12_pool, answers=2, rotate=60, ttl=60)
    # Look-alike 3: CDNs with rotating short-TTL answers over many distinct addresses.
    cdn = {
        "static": external("static.cdn-assets.net", 200, answers=2, rotate=30, ttl=20),
        "npm": external("registry.npmjs.org", 64, answers=2, rotate=120, ttl=300),
        "pypi": external("files.pythonhosted.org", 64, answers=4, rotate=60, ttl=60),
        "o365": external("outlook.office365.com", 128, answers=3, rotate=60, ttl=30,
                         cname="outlook.ha.office365.com"),
    }
    ubuntu = external("archive.ubuntu.com", 4, answers=3, rotate=600, ttl=60)
    ubuntu_sec = external("security.ubuntu.com", 4, answers=3, rotate=600, ttl=60)
    new_service = external("otlp.newvendor-apm.io", 2, ttl=300)

    linux_vms = [e for e in entities if e.kind == "vm" and e.os == "linux"]
    windows_vms = [e for e in entities if e.kind == "vm" and e.os == "windows"]
    rng = np.random.default_rng(12345)  # the layout is fixed per scenario; the seed drives traffic only

    # --- every Linux VM ---------------------------------------------------------------------------
    for e in linux_vms:
        routes.add(e, 123, 1.0, dst_ip=infra["ntp"], proto="udp", profile="ntp", curve="flat")
        routes.add(e, 514, 6.0, dst_ip=infra["syslog"], proto="udp", profile="syslog", curve="server")
        routes.add(e, 8086, 0, name_id=mon_name, period=60.0, profile="metrics")
        routes.add(e, 80, 0.3, name_id=ubuntu, profile="download", curve="nightly")
        routes.add(e, 80, 0.3, name_id=ubuntu_sec, profile="download", curve="nightly")
        routes.add(e, 389, 2.0, name_id=dc_names[e.ip % 2], profile="ldap", curve="server")
    # --- roles -----------------------------------------------------------------------------------
    payments = external("api.payments-gw.com", 2, ttl=300)
    partner_idp = external("auth.partner-idp.com", 1, ttl=3600)
    for j, e in enumerate(est.by_role("web")):
        for p in _pick(peers["app"], j, 2):
            routes.add(e, 8080, 20.0, name_id=p, profile="api", curve="server")
        routes.add(e, 443, 6.0, name_id=payments, profile="api", curve="office")
        routes.add(e, 443, 5.0, name_id=cdn["static"], profile="web", curve="office", lookalike="cdn_rotation")
        routes.add(e, 443, 3.0, name_id=coincidental, profile="web", curve="office", lookalike="coincidental_apt12")
        routes.add(e, 8443, 4.0, name_id=partner_idp, profile="api", curve="office", lookalike="stable_unusual_port")
        routes.add(e, 4318, 10.0, name_id=new_service, profile="api", curve="server",
                   lookalike="new_benign_service", active_from=new_service_from)
    for j, e in enumerate(est.by_role("app")):
        for p in _pick(peers["db"], j, 2):
            routes.add(e, 5432, 25.0, name_id=p, profile="db", curve="server")
            routes.add(e, 6379, 10.0, name_id=p, profile="small", curve="server")
        routes.add(e, 5671, 8.0, name_id=mq_name, profile="amqp", curve="server", lookalike="stable_unusual_port")
        routes.add(e, 8765, 3.0, name_id=app1_name, profile="api", curve="server", lookalike="srv_port",
                   srv_query=f"_app._tcp.{dom}", srv_rdata=(f"10 60 8765 app1.{dom}",))
        routes.add(e, 443, 4.0, name_id=payments, profile="api", curve="office")
        routes.add(e, 4318, 10.0, name_id=new_service, profile="api", curve="server",
                   lookalike="new_benign_service", active_from=new_service_from)
    for j, e in enumerate(est.by_role("db")):
        for p in _pick([p for p in peers["db"] if p != names._index.get(f"{e.name}.{dom}")], j, 1):
            routes.add(e, 5432, 20.0, name_id=p, profile="db", curve="flat")
        routes.add(e, 445, 4.0, name_id=file_name, profile="bulk", curve="nightly")
    for j, e in enumerate(est.by_role("build")):
        routes.add(e, 443, 10.0, name_id=external("github.com", 3, answers=1, rotate=300, ttl=60), profile="download",
                   curve="nightly")
        routes.add(e, 443, 15.0, name_id=cdn["npm"], profile="download", curve="nightly", lookalike="cdn_rotation")
        routes.add(e, 443, 5.0, name_id=external("pypi.org", 4, answers=2, rotate=120, ttl=300), profile="api",
                   curve="nightly")
        routes.add(e, 443, 10.0, name_id=cdn["pypi"], profile="download", curve="nightly", lookalike="cdn_rotation")
        routes.add(e, 443, 5.0, name_id=external("registry-1.docker.io", 8, answers=3, rotate=60, ttl=60),
                   profile="download", curve="nightly")
        routes.add(e, 22, 5.0, name_id=git_name, profile="ssh", curve="office")
        routes.add(e, 8081, 20.0, name_id=nexus_name, profile="download", curve="nightly")
    for e in est.by_role("file"):
        routes.add(e, 443, 3.0, name_id=external("backup.cloudvault.net", 2, ttl=300), profile="bulk", curve="nightly")
    for e in est.by_role("mon"):
        routes.add(e, 9200, 30.0, name_id=es_name, profile="api", curve="flat", lookalike="stable_unusual_port")
        routes.add(e, 443, 12.0, name_id=vcenter_name, profile="api", curve="flat")
        for h in est.by_kind("esxi_mgmt"):
            routes.add(e, 161, 12.0, dst_ip=h.ip, proto="udp", profile="snmp", curve="flat")
    # --- Windows desktops ------------------------------------------------------------------------
    sites = _browse_sites(scenario.browse_sites, rng)
    site_ids = [external(s, n, answers=k, rotate=r, ttl=t, cname=c) for s, n, k, r, t, c in sites]
    popularity = 1.0 / np.arange(1, len(site_ids) + 1) ** 1.1
    popularity = 60.0 * popularity / popularity.sum()          # 60 connections/hour of browsing at weight 1
    for j, e in enumerate(windows_vms):
        dc = dc_names[0] if e.resolver == infra["dc1"] else dc_names[1]
        for sid, rate in zip(site_ids, popularity):
            routes.add(e, 443, rate, name_id=sid, profile="web", curve="office")
        routes.add(e, 443, 20.0, name_id=cdn["o365"], profile="web", curve="office", lookalike="cdn_rotation")
        routes.add(e, 443, 3.0, name_id=coincidental, profile="web", curve="office", lookalike="coincidental_apt12")
        routes.add(e, 443, 2.0, name_id=external("settings-win.data.microsoft.com", 6, answers=1, rotate=300, ttl=300),
                   profile="api", curve="office")
        routes.add(e, 443, 1.0, name_id=external("fe2.update.microsoft.com", 8, answers=2, rotate=300, ttl=300),
                   profile="download", curve="office")
        routes.add(e, 88, 4.0, name_id=dc, profile="small", curve="office")
        routes.add(e, 389, 3.0, name_id=dc, profile="ldap", curve="office", lookalike="srv_port",
                   srv_query=f"_ldap._tcp.dc._msdcs.{dom}",
                   srv_rdata=(f"0 100 389 dc01.{dom}", f"0 100 389 dc02.{dom}"))
        routes.add(e, 445, 2.0, name_id=dc, profile="smb", curve="office")
        routes.add(e, 135, 2.0, name_id=dc, profile="small", curve="office")
        # RPC dynamic ports the DC's endpoint mapper hands out (Windows 49152-65535).
        routes.add(e, (49664, 49667, 49668, 49670, 52741), 2.0, name_id=dc, profile="small", curve="office",
                   lookalike="rpc_dynamic")
        routes.add(e, 445, 10.0, name_id=file_name, profile="smb", curve="office")
        routes.add(e, 80, 2.0, name_id=wpad_name, curve="office", dns_only=True)
    # --- infrastructure servers -------------------------------------------------------------------
    dcs = est.by_role("dc")
    for a, b in ((0, 1), (1, 0)):
        routes.add(dcs[a], 389, 6.0, name_id=dc_names[b], profile="ldap", curve="flat")
        routes.add(dcs[a], 135, 2.0, name_id=dc_names[b], profile="small", curve="flat")
        routes.add(dcs[a], (49667, 49668), 4.0, name_id=dc_names[b], profile="small", curve="flat",
                   lookalike="rpc_dynamic")
    routes.add(by_name["ntp01"], 123, 1.0, name_id=external("0.pool.ntp.org", 16, answers=4, rotate=150, ttl=150),
               proto="udp", profile="ntp", curve="flat")
    # --- ESXi management plane (threat-notes §3): mostly configured by IP, so no DNS first -------
    esx = est.by_kind("esxi_mgmt")
    for i, h in enumerate(esx):
        routes.add(h, 902, 0, dst_ip=infra["vcenter"], proto="udp", period=10.0, profile="heartbeat")
        if i % 2:   # half the hosts have NTP configured by name
            routes.add(h, 123, 0, name_id=ntp_name, proto="udp", period=256.0, profile="ntp")
        else:
            routes.add(h, 123, 0, dst_ip=infra["ntp"], proto="udp", period=256.0, profile="ntp")
        routes.add(h, 514, 0, dst_ip=infra["syslog"], proto="udp", period=60.0, profile="syslog")
        for k, peer in enumerate(esx):
            if peer is h:
                continue
            if i == 0 or k == 0:   # HA master (esx-01) exchanges heartbeats with every slave
                routes.add(h, 8182, 0, dst_ip=peer.ip, proto="udp", period=60.0, profile="heartbeat_ack")
            routes.add(h, 8000, 0.15, dst_ip=peer.ip, profile="vmotion", curve="office")
            routes.add(h, 902, 0.05, dst_ip=peer.ip, profile="bulk", curve="flat")
        routes.add(h, 9084, 0.2, name_id=vcenter_name, profile="download", curve="flat")
        routes.add(h, 389, 0.5, name_id=dc_names[0], profile="ldap", curve="flat")
    vc = by_name["vcenter"]
    for h in esx:
        routes.add(vc, 443, 60.0, dst_ip=h.ip, profile="api", curve="flat")
        routes.add(vc, 902, 2.0, dst_ip=h.ip, profile="small", curve="flat")
    routes.add(vc, 389, 6.0, name_id=dc_names[0], profile="ldap", curve="server")
    routes.add(vc, 123, 1.0, dst_ip=infra["ntp"], proto="udp", profile="ntp", curve="flat")
    routes.add(vc, 514, 0, dst_ip=infra["syslog"], proto="udp", period=60.0, profile="syslog")
    routes.add(vc, 443, 1.0, name_id=external("vcsa.vmware.com", 2, ttl=300), profile="api", curve="flat")
    routes.add(vc, 443, 0.2, name_id=external("hostupdate.vmware.com", 4, answers=2, rotate=300, ttl=300),
               profile="download", curve="flat")
    est.routes = routes.frame()
    return est


def _pick(items: list[int], j: int, n: int) -> list[int]:
    """`n` items starting at position `j` (wrapping): a stable peer assignment."""
    if not items:
        return []
    return [items[(j + i) % len(items)] for i in range(min(n, len(items)))]


def _browse_sites(n: int, rng: np.random.Generator) -> list[tuple]:
    """(name, pool size, answers, rotate s, ttl, cname) of `n` web sites; popular ones sit behind CDNs."""
    out = []
    for i in range(n):
        word = _SITE_WORDS[i % len(_SITE_WORDS)]
        name = f"www.{word}{i // len(_SITE_WORDS) or ''}.{_TLDS[i % len(_TLDS)]}"
        if i < n // 10:
            out.append((name, 32, 2, 60.0, 60.0, f"{word}{i}.edgekey-cdn.net"))
        else:
            k = int(rng.integers(1, 3))
            out.append((name, k, k, 0.0, float(rng.choice([300, 600, 3600])), ""))
    return out
