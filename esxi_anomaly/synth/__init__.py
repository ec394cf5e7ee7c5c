"""Synthetic vSphere estate: benign traffic, benign look-alikes and DNS-calculation attack families.

    from esxi_anomaly.synth import generate, write_zeek, inject_attacks, ATTACK_FAMILIES
    ds = generate(days=4, seed=7)                 # 3 benign days + 1 attack day
    write_zeek(ds, "out/")                        # conn.log, dns.log, inventory.csv, labels.csv
    write_formats(ds, "out/", ["nsx", "esxcli", "sysmon", "infoblox"])   # the same estate as real-format logs
"""
from pathlib import Path

import pandas as pd

from esxi_anomaly.synth.attacks import ATTACK_FAMILIES, AttackFamily, inject_attacks
from esxi_anomaly.synth.dataset import SynthDataset, generate
from esxi_anomaly.synth.estate import LOOKALIKE_KINDS
from esxi_anomaly.synth.scenario import builtin_scenarios, load_scenario
from esxi_anomaly.synth.zeek_writer import write_zeek

__all__ = ["ATTACK_FAMILIES", "AttackFamily", "FORMATS", "LOOKALIKE_KINDS", "SynthDataset", "builtin_scenarios",
           "generate", "inject_attacks", "labels_5tuple", "load_scenario", "parse_formats", "write_formats",
           "write_zeek"]

FORMATS = ("zeek", "nsx", "esxcli", "sysmon", "infoblox")
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


def write_formats(ds, out_dir, formats=("zeek",), zeek_format: str = "tsv", gzip: bool = False) -> list[Path]:
    """Write `ds` in each of `formats` (names of FORMATS) under `out_dir`: Zeek as `write_zeek` does
    (conn.log, dns.log in `out_dir`), NSX DFW in `nsx/`, esxcli snapshots in `esxcli/`, Sysmon in
    `sysmon/`, Infoblox in `infoblox/` (the responses of every client Sysmon does not cover when
    Sysmon is written too). Always: inventory.csv, labels.csv (by Zeek uid) and labels_5tuple.csv."""
    from esxi_anomaly.synth.esxcli_writer import write_esxcli
    from esxi_anomaly.synth.infoblox_writer import write_infoblox
    from esxi_anomaly.synth.nsx_dfw_writer import write_nsx
    from esxi_anomaly.synth.sysmon_writer import windows_guests, write_sysmon

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
    if "infoblox" in formats:
        exclude = windows_guests(ds.inventory)["ip"] if "sysmon" in formats else ()
        written += write_infoblox(ds, out, exclude=exclude)
    labels_5tuple(ds).to_csv(out / "labels_5tuple.csv", index=False)
    written.append(out / "labels_5tuple.csv")
    return written
