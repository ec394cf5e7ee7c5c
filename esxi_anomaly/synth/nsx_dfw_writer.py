"""Write a dataset's guest connections as NSX DFW packet logs, one `dfwpktlogs.log` per ESXi host.

Each VM's connections are logged at the vNIC filter of the host the inventory puts it on (formats.md
(b)): OUT at the sender's vNIC, IN at the receiver's, so a VM-to-VM connection is logged twice (at
two hosts when the VMs run on different hosts). ESXi management (vmk) sockets are not behind a DFW
filter and are not logged. Every session gets its first-packet line (`match PASS`, TCP flags `S`,
`SEW` for Windows-like stacks); a share of TCP sessions that ended (SF/RST) also gets a `TERM` line
at the session end with packets and bytes in/out relative to the vNIC.

Envelopes (a host's file keeps one, as a file is either the host's own or a collector's copy):
the ESXi 8 on-disk form `<ts> No(13) FIREWALL-PKTLOG[<pid>]: <body>` (no host name in the line), or
RFC 5424 as forwarded by ESXi 8 `<13>1 <ts> <host> FIREWALL-PKTLOG <pid> - - <body>`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from esxi_anomaly.synth._text_writer import VM_KINDS, col, entity_maps, hash64, hex_of, iso_ms, ms_floor, write_lines

TERM_SHARE = 0.7          # TCP sessions that ended and get a TERM line
ENVELOPES = ("esxi8_disk", "rfc5424")


def host_envelope(host: str) -> str:
    """The envelope of a host's file: alternates deterministically by host name."""
    return ENVELOPES[int(hash64([host])[0] % np.uint64(2))]


def dfw_events(conns: pd.DataFrame, inventory: pd.DataFrame) -> pd.DataFrame:
    """One row per logged vNIC sighting: the connection's columns plus `host`, `dir`, `vm` (the vNIC's IP)."""
    kind, host_of, _ = entity_maps(inventory)
    c = conns.reset_index(drop=True)
    parts = []
    for direction, end in (("OUT", "src_ip"), ("IN", "dst_ip")):
        ip = c[end].astype(object)
        is_vm = ip.map(kind).isin(VM_KINDS).to_numpy()
        part = c[is_vm].copy()
        part["dir"] = direction
        part["vm"] = ip[is_vm].to_numpy()
        part["host"] = ip[is_vm].map(host_of).to_numpy()
        part["_row"] = np.flatnonzero(is_vm)
        parts.append(part)
    out = pd.concat(parts, ignore_index=True)
    return out[out["host"].fillna("") != ""].reset_index(drop=True)


def _bodies(ev: pd.DataFrame, term: bool) -> pd.Series:
    vif = hex_of(ev["vm"], 8)   # the vNIC's filter hash: one per VM
    rule = np.where(hash64(ev["dst_port"].astype(str)) % np.uint64(4) == 0, "mainrs/1024", "1024").astype(object)
    tcp = (ev["proto"] == "tcp").to_numpy()
    proto = pd.Series(np.where(tcp, "TCP", np.where(ev["proto"] == "udp", "UDP", "PROTO 1")).astype(object))
    addr = (col(ev["src_ip"]) + "/" + col(ev["src_port"]) + "->" + col(ev["dst_ip"]) + "/" + col(ev["dst_port"]))
    if not term:
        win = (ev["src_port"].to_numpy() >= 49152)
        length = np.where(tcp, np.where(win, 52, 60), 28 + np.clip(
            np.nan_to_num(ev["bytes_out"].to_numpy() / np.maximum(ev["packets_out"].fillna(1).to_numpy(), 1)),
            0, 1472).astype(np.int64))
        flags = np.where(tcp, np.where(win, " SEW", " S"), "").astype(object)
        return (vif + " INET match PASS " + pd.Series(rule) + " " + ev["dir"].astype(object).reset_index(drop=True)
                + " " + col(length) + " " + proto + " " + addr + pd.Series(flags))
    is_out = (ev["dir"] == "OUT").to_numpy()
    po, pi = ev["packets_out"].fillna(0).astype(np.int64).to_numpy(), ev["packets_in"].fillna(0).astype(np.int64).to_numpy()
    bo, bi = ev["bytes_out"].fillna(0).astype(np.int64).to_numpy(), ev["bytes_in"].fillna(0).astype(np.int64).to_numpy()
    # "in" = towards the vNIC: for OUT the peer's replies, for IN the initiator's packets
    p_in, p_out = np.where(is_out, pi, po), np.where(is_out, po, pi)
    b_in, b_out = np.where(is_out, bi, bo), np.where(is_out, bo, bi)
    reason = np.where(ev["conn_state"].isin(["RSTO", "RSTR"]), "RST", "FIN").astype(object)
    return (vif + " INET TERM " + pd.Series(rule) + " " + ev["dir"].astype(object).reset_index(drop=True) + " "
            + proto + " " + pd.Series(reason) + " " + addr + " " + col(p_in) + "/" + col(p_out) + " "
            + col(b_in) + "/" + col(b_out))


def term_rows(conns: pd.DataFrame) -> np.ndarray:
    """Which connections get a TERM line (ended TCP sessions, a deterministic share of them)."""
    ended = (conns["proto"] == "tcp") & conns["conn_state"].isin(["SF", "RSTO", "RSTR"])
    share = (hash64(conns["event_id"]) % np.uint64(1000)).astype(np.int64) < int(TERM_SHARE * 1000)
    return (ended.to_numpy() & share)


def write_nsx(ds, out_dir) -> list[Path]:
    """`<out_dir>/nsx/<host>.dfwpktlogs.log` for every host running a VM with a logged connection."""
    out = Path(out_dir) / "nsx"
    ev = dfw_events(ds.connections, ds.inventory)
    if not len(ev):
        return []
    term = term_rows(ev)
    start_ms = ms_floor(ev["ts"])
    end_ms = np.maximum(ms_floor(ev["ts"].to_numpy() + np.nan_to_num(ev["duration"].to_numpy())), start_ms)
    tev = ev[term].reset_index(drop=True)
    lines = pd.DataFrame({
        "host": np.concatenate([ev["host"].to_numpy(dtype=object), tev["host"].to_numpy(dtype=object)]),
        "ms": np.concatenate([start_ms, end_ms[term]]),
        "body": np.concatenate([_bodies(ev.reset_index(drop=True), False).to_numpy(),
                                _bodies(tev, True).to_numpy()]),
    })
    lines = lines.iloc[np.lexsort((np.arange(len(lines)), lines["ms"].to_numpy()))].reset_index(drop=True)
    written = []
    for host, part in lines.groupby("host", sort=True):
        stamp = iso_ms(part["ms"].to_numpy())
        pid = str(1069000 + int(hash64([host])[0] % np.uint64(9000)))
        if host_envelope(host) == "rfc5424":
            text = "<13>1 " + pd.Series(stamp) + f" {host} FIREWALL-PKTLOG {pid} - - " + part["body"].reset_index(drop=True)
        else:
            text = pd.Series(stamp) + f" No(13) FIREWALL-PKTLOG[{pid}]: " + part["body"].reset_index(drop=True)
        written.append(write_lines(out / f"{host}.dfwpktlogs.log", text.tolist()))
    return written


__all__ = ["write_nsx", "dfw_events", "term_rows", "host_envelope"]
