"""Synthetic vSphere estate: benign traffic, benign look-alikes and DNS-calculation attack families.

    from esxi_anomaly.synth import generate, write_zeek, inject_attacks, ATTACK_FAMILIES
    ds = generate(days=4, seed=7)                 # 3 benign days + 1 attack day
    write_zeek(ds, "out/")                        # conn.log, dns.log, inventory.csv, labels.csv
    write_formats(ds, "out/", ["nsx", "esxcli", "sysmon", "infoblox"])   # the same estate as real-format logs

DNS server logs (infoblox, windows_dns, bind) are alternatives for the same clients: the clients
Sysmon does not cover (all clients when Sysmon is not written) are split among the DNS server
formats asked for, each client's responses in exactly one of them (`dns_server_split`, by a hash
of the client IP), as each client of a real estate uses one resolver platform.
"""
from pathlib import Path

import numpy as np
import pandas as pd

from esxi_anomaly.synth.attacks import ATTACK_FAMILIES, AttackFamily, inject_attacks
from esxi_anomaly.synth.dataset import SynthDataset, generate
from esxi_anomaly.synth.estate import LOOKALIKE_KINDS
from esxi_anomaly.synth.scenario import builtin_scenarios, load_scenario
from esxi_anomaly.synth.zeek_writer import write_zeek

__all__ = ["ATTACK_FAMILIES", "AttackFamily", "DNS_SERVER_FORMATS", "FORMATS", "LOOKALIKE_KINDS", "SynthDataset",
           "builtin_scenarios", "dns_server_split", "generate", "inject_attacks", "labels_5tuple", "load_scenario",
           "parse_formats", "write_formats", "write_zeek"]

FORMATS = ("zeek", "nsx", "esxcli", "sysmon", "infoblox", "windows_dns", "bind", "ipfix")
DNS_SERVER_FORMATS = ("infoblox", "windows_dns", "bind")
LABEL_COLUMNS = ["ts", "src_ip", "src_port", "dst_ip", "dst_port", "proto", "label", "family"]


def parse_formats(text: str) -> list[str]:
    """`zeek,nsx` -> ["zeek", "nsx"]; `all` -> every format; ValueError naming an unknown one."""
    names = [n.strip().lower() for n in str(text).split(",") if n.strip()]
    if "all" in names:
        return list(FORMATS)
    unknown = [n for n in names if n not in FORMATS]
    if unknown or not names:
        raise ValueError(f"unknown format {', '.join(unknown) or repr(text)} (choose from {', '.join(FORMATS)}, all)")
    return [n for n in FORMATS if n in names]


def labels_5tuple(ds) -> pd.DataFrame:
    """The labels keyed by what every view keeps: connection start time and 5-tuple (not the Zeek uid)."""
    conn = ds.connections[["event_id", "ts", "src_ip", "src_port", "dst_ip", "dst_port", "proto"]]
    out = ds.labels[["event_id", "label", "family"]].merge(conn, on="event_id", how="inner")
    return out.sort_values("ts", kind="stable")[LABEL_COLUMNS].reset_index(drop=True)


def dns_server_split(clients, formats) -> dict[str, set]:
    """format -> the clients whose responses its log holds: `clients` split among the DNS server
    formats in `formats` by a hash of the client IP (deterministic, independent of the estate)."""
    from esxi_anomaly.synth._text_writer import hash64

    servers = [f for f in DNS_SERVER_FORMATS if f in formats]
    clients = pd.unique(pd.Series(list(clients), dtype=object))
    if not servers:
        return {}
    pick = (hash64(clients) % np.uint64(len(servers))).astype(np.int64) if len(clients) else np.array([], dtype=np.int64)
    return {f: set(clients[pick == i]) for i, f in enumerate(servers)}


def write_formats(ds, out_dir, formats=("zeek",), zeek_format: str = "tsv", gzip: bool = False) -> list[Path]:
    """Write `ds` in each of `formats` (names of FORMATS) under `out_dir`: Zeek as `write_zeek` does
    (conn.log, dns.log in `out_dir`), NSX DFW in `nsx/`, esxcli snapshots in `esxcli/`, Sysmon in
    `sysmon/`, vDS IPFIX in `ipfix/`, and the DNS server logs (Infoblox in `infoblox/`, Windows DNS
    Analytical in `windows_dns/`, BIND query log in `bind/`) for the clients Sysmon does not cover
    when Sysmon is written too, split among them by `dns_server_split`. Always: inventory.csv,
    labels.csv (by Zeek uid) and labels_5tuple.csv."""
    from esxi_anomaly.synth.bind_writer import write_bind
    from esxi_anomaly.synth.esxcli_writer import write_esxcli
    from esxi_anomaly.synth.infoblox_writer import write_infoblox
    from esxi_anomaly.synth.nsx_dfw_writer import write_nsx
    from esxi_anomaly.synth.sysmon_writer import windows_guests, write_sysmon
    from esxi_anomaly.synth.vds_ipfix_writer import write_ipfix
    from esxi_anomaly.synth.windows_dns_writer import write_windows_dns

    formats = parse_formats(",".join(formats)) if not isinstance(formats, str) else parse_formats(formats)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if "zeek" in formats:
        written += write_zeek(ds, out, fmt=zeek_format, gzip=gzip)
    else:
        ds.inventory.to_csv(out / "inventory.csv", index=False, columns=["ip", "name", "kind", "esxi_host", "role"])
        ds.labels.to_csv(out / "labels.csv", index=False)
        written += [out / "inventory.csv", out / "labels.csv"]
    if "nsx" in formats:
        written += write_nsx(ds, out)
    if "esxcli" in formats:
        written += write_esxcli(ds, out)
    if "sysmon" in formats:
        written += write_sysmon(ds, out)
    if "ipfix" in formats:
        written += write_ipfix(ds, out)
    clients = pd.unique(ds.dns_answers["client_ip"])
    if "sysmon" in formats:
        clients = clients[~pd.Series(clients).isin(set(windows_guests(ds.inventory)["ip"])).to_numpy()]
    writers = {"infoblox": write_infoblox, "windows_dns": write_windows_dns, "bind": write_bind}
    for name, covered in dns_server_split(clients, formats).items():
        exclude = set(ds.dns_answers["client_ip"]) - covered
        written += writers[name](ds, out, exclude=exclude)
    labels_5tuple(ds).to_csv(out / "labels_5tuple.csv", index=False)
    written.append(out / "labels_5tuple.csv")
    return written
