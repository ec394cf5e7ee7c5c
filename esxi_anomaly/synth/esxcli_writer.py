"""Write the ESXi hosts' own sockets as `esxcli network ip connection list` snapshots, every 60 s.

One file per host (`<out>/esxcli/<host>.connections.txt`), a collector's loop output: before each
table the line `# <ISO time> <host>`, then the table of formats.md (d) (header, dashes, rows cut at
the dash spans). A snapshot lists what the host holds at that instant:
* LISTEN sockets of its services (443/80 rhttpproxy, 902 hostd, 22 sshd, 8000 vMotion, 8307 hostd on
  127.0.0.1, plus any TCP port some connection was accepted on) and bound UDP sockets (123 ntpd,
  8182 fdm) with no foreign peer;
* the host's outbound sockets (its management IP is the source) that are open at the instant:
  TCP ESTABLISHED while the session lasts (SYN_SENT for one never answered), then TIME_WAIT for
  `TIME_WAIT_S` after a normal close (the FreeBSD-derived stack's 2*MSL); UDP while open only;
* accepted inbound TCP sessions (local = a listening port), ESTABLISHED while they last.
A socket that opens and closes between two snapshots (most UDP datagrams) is never listed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from esxi_anomaly.synth._text_writer import HOST_KIND, col, hash64, iso_ms, write_lines

PERIOD_S = 60.0
TIME_WAIT_S = 60.0
_WIDTHS = (5, 6, 6, 40, 40, 11, 8, 7, 10)
_NAMES = ("Proto", "Recv Q", "Send Q", "Local Address", "Foreign Address", "State", "World ID", "CC Algo", "World Name")
BASE_LISTEN = (("tcp", "0.0.0.0", 443, "rhttpproxy"), ("tcp", "0.0.0.0", 80, "rhttpproxy"),
               ("tcp", "0.0.0.0", 902, "hostd"), ("tcp", "0.0.0.0", 22, "sshd"),
               ("tcp", "127.0.0.1", 8307, "hostd"), ("tcp", "127.0.0.1", 8309, "vpxa"))
BASE_UDP = (("udp", "0.0.0.0", 123, "ntpd"), ("udp", "0.0.0.0", 8182, "fdm"), ("udp", "0.0.0.0", 161, "snmpd"))
_WORLD_OF_PORT = {443: "vpxa-worker", 902: "vpxa", 514: "vmsyslogd", 1514: "vmsyslogd", 123: "ntpd", 8182: "fdm",
                  389: "hostd-worker", 636: "hostd-worker", 3269: "hostd-worker", 53: "hostd-worker",
                  2049: "nfsclient", 3260: "iscsid", 8000: "vmotion", 80: "hostd-worker"}
_SERVICE_WORLD = {443: "rhttpproxy-work", 80: "rhttpproxy-work", 902: "hostd-worker", 22: "sshd", 8000: "vmotion"}


def _header_lines() -> list[str]:
    head = "  ".join(n.ljust(w) for n, w in zip(_NAMES, _WIDTHS)).rstrip()
    dashes = "  ".join("-" * w for w in _WIDTHS)
    return [head, dashes]


def _rows_text(proto, local, foreign, state, world_id, world) -> pd.Series:
    """Table rows, columns padded to the dash spans (numbers right-aligned as esxcli prints them)."""
    n = len(proto)
    zero = pd.Series(["0"] * n, dtype=object)
    parts = [col(proto).str.ljust(5), zero.str.rjust(6), zero.str.rjust(6), col(local).str.ljust(40),
             col(foreign).str.ljust(40), col(state).str.ljust(11), col(world_id).str.rjust(8),
             pd.Series(np.where(np.asarray(proto) == "tcp", "newreno", ""), dtype=object).str.ljust(7), col(world)]
    out = parts[0]
    for p in parts[1:]:
        out = out + "  " + p
    return out.str.rstrip()


def _world_id(names) -> np.ndarray:
    return (2_099_000 + hash64(names) % np.uint64(90_000)).astype(np.int64)


def host_sockets(conns: pd.DataFrame, inventory: pd.DataFrame) -> pd.DataFrame:
    """Every socket sighting: host, snapshot index k (time start + k*PERIOD_S), proto, local, foreign,
    state, world; plus `event_id` of the connection for outbound sockets ("" for inbound)."""
    mgmt = inventory[inventory["kind"] == HOST_KIND].drop_duplicates("ip")
    host_of = dict(zip(mgmt["ip"], mgmt["name"]))
    c = conns.reset_index(drop=True)
    ts = c["ts"].to_numpy()
    dur = np.nan_to_num(c["duration"].to_numpy())
    state = c["conn_state"].to_numpy(dtype=object)
    tcp = (c["proto"] == "tcp").to_numpy()
    out_rows = c["src_ip"].isin(host_of).to_numpy()
    accepted = c["dst_ip"].isin(host_of).to_numpy() & tcp & np.isin(state, ["SF", "RSTO", "RSTR"])
    pieces = []
    for outbound, rows in ((True, np.flatnonzero(out_rows)), (False, np.flatnonzero(accepted))):
        if not len(rows):
            continue
        linger = np.where(outbound & tcp[rows] & (state[rows] == "SF"), TIME_WAIT_S, 0.0)
        close = ts[rows] + dur[rows]
        first = np.ceil(ts[rows] / PERIOD_S).astype(np.int64)
        last = np.floor((close + linger) / PERIOD_S).astype(np.int64)
        n = np.maximum(last - first + 1, 0)
        idx = np.repeat(np.arange(len(rows)), n)
        k = first[idx] + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
        r = rows[idx]
        t = k * PERIOD_S
        if outbound:
            st = np.where(~tcp[r], "", np.where(t <= close[idx], np.where(state[r] == "S0", "SYN_SENT", "ESTABLISHED"),
                                                "TIME_WAIT"))
            ports = c["dst_port"].to_numpy()[r]
            world = pd.Series(ports).map(_WORLD_OF_PORT).fillna("hostd-worker").to_numpy(dtype=object)
            pieces.append(pd.DataFrame({
                "host": c["src_ip"].to_numpy(dtype=object)[r], "k": k, "proto": c["proto"].to_numpy(dtype=object)[r],
                "local": col(c["src_ip"].to_numpy()[r]) + ":" + col(c["src_port"].to_numpy()[r]),
                "foreign": col(c["dst_ip"].to_numpy()[r]) + ":" + col(ports),
                "state": st, "world": world, "event_id": c["event_id"].to_numpy(dtype=object)[r]}))
        else:
            ports = c["dst_port"].to_numpy()[r]
            world = pd.Series(ports).map(_SERVICE_WORLD).fillna("hostd-worker").to_numpy(dtype=object)
            pieces.append(pd.DataFrame({
                "host": c["dst_ip"].to_numpy(dtype=object)[r], "k": k, "proto": "tcp",
                "local": col(c["dst_ip"].to_numpy()[r]) + ":" + col(ports),
                "foreign": col(c["src_ip"].to_numpy()[r]) + ":" + col(c["src_port"].to_numpy()[r]),
                "state": "ESTABLISHED", "world": world, "event_id": ""}))
    if not pieces:
        return pd.DataFrame(columns=["host", "k", "proto", "local", "foreign", "state", "world", "event_id"])
    out = pd.concat(pieces, ignore_index=True)
    out["host"] = out["host"].map(host_of)
    return out


def write_esxcli(ds, out_dir) -> list[Path]:
    """`<out_dir>/esxcli/<host>.connections.txt` per ESXi host, a snapshot every PERIOD_S seconds over the
    dataset's time range (and as long after as a socket is still held)."""
    out = Path(out_dir) / "esxcli"
    inv = ds.inventory
    mgmt = inv[inv["kind"] == HOST_KIND].drop_duplicates("ip")
    socks = host_sockets(ds.connections, inv)
    k0 = int(np.ceil(ds.start / PERIOD_S))
    k_end = int(np.floor(ds.end / PERIOD_S))
    if len(socks):
        k_end = max(k_end, int(socks["k"].max()))
    head = _header_lines()
    written = []
    for ip, host in zip(mgmt["ip"], mgmt["name"]):
        mine = socks[socks["host"] == host]
        accepted_ports = sorted(set(int(f.rsplit(":", 1)[1]) for f in mine.loc[mine["event_id"] == "", "local"].unique()))
        listen = list(BASE_LISTEN) + [("tcp", "0.0.0.0", p, _SERVICE_WORLD.get(p, "hostd-worker"))
                                      for p in accepted_ports if p not in {b[2] for b in BASE_LISTEN}]
        fixed = pd.DataFrame([(pr, f"{a}:{p}", "0.0.0.0:0", "LISTEN" if pr == "tcp" else "", w)
                              for pr, a, p, w in listen + list(BASE_UDP)],
                             columns=["proto", "local", "foreign", "state", "world"])
        fixed_text = _rows_text(fixed["proto"], fixed["local"], fixed["foreign"], fixed["state"],
                                _world_id(fixed["world"]), fixed["world"]).tolist()
        ks = np.arange(k0, k_end + 1)
        stamps = pd.Series(iso_ms((ks * int(PERIOD_S * 1000)).astype(np.int64))).str.replace(".000Z", "Z", regex=False)
        # each snapshot: time line, header, dashes, the fixed sockets, then the live ones (one sort, no loop)
        fixed_block = np.array([*head, *fixed_text], dtype=object)
        n_fixed = len(fixed_block)
        frames = [pd.DataFrame({"k": ks, "pos": -1, "text": ("# " + stamps + " " + host).to_numpy(dtype=object)}),
                  pd.DataFrame({"k": np.repeat(ks, n_fixed), "pos": np.tile(np.arange(n_fixed), len(ks)),
                                "text": np.tile(fixed_block, len(ks))})]
        if len(mine):
            mine = mine.sort_values(["k", "local"], kind="stable")
            frames.append(pd.DataFrame({"k": mine["k"].to_numpy(), "pos": n_fixed + np.arange(len(mine)),
                                        "text": _rows_text(mine["proto"], mine["local"], mine["foreign"], mine["state"],
                                                           _world_id(mine["world"]), mine["world"]).to_numpy()}))
        table = pd.concat(frames, ignore_index=True)
        lines = table["text"].to_numpy()[np.lexsort((table["pos"].to_numpy(), table["k"].to_numpy()))].tolist()
        written.append(write_lines(out / f"{host}.connections.txt", lines))
    return written


__all__ = ["write_esxcli", "host_sockets", "PERIOD_S", "TIME_WAIT_S"]
