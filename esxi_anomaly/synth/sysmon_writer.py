"""Write the Windows guests' view as Sysmon events (JSON lines, the flat Windows event-log export).

Windows guests: the inventory's `os` column when it has one, else the roles that run Windows in the
generated estates (`vdi`, `dc`). One file per guest, `<out>/sysmon/<name>.json`, holding:
* EID 3 (NetworkConnect) for each connection the guest initiated (`Initiated` true, Source = the
  guest); inbound connections are not written (a common Sysmon config filter);
* EID 22 (DnsQuery) for each DNS response the guest received: `QueryResults` as Sysmon writes it,
  `;`-terminated, IPv4 mostly as `::ffff:a.b.c.d` (some bare), non-address records as
  `type:  <n> <name>` (two spaces; an SRV keeps only its target, as Sysmon does), `-` when none.
`Hostname` is the guest's FQDN (EID 22 carries no address); `UtcTime` the event time to the
millisecond; `TimeCreated`/`@timestamp` the collector's time a little later.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from esxi_anomaly.synth._text_writer import col, hash64, hex_of, iso_ms, ms_floor, write_lines

WINDOWS_ROLES = ("vdi", "dc")
_RR_CODES = {"CNAME": 5, "NS": 2, "PTR": 12, "MX": 15, "TXT": 16, "SRV": 33, "SOA": 6, "HTTPS": 65}
_STATUS = {"NOERROR": 0, "FORMERR": 9001, "SERVFAIL": 9002, "NXDOMAIN": 9003, "NOTIMP": 9004, "REFUSED": 9005}
_IMAGES = {443: "C:\\Program Files (x86)\\Microsoft\\Edge\\Application\\msedge.exe",
           80: "C:\\Program Files (x86)\\Microsoft\\Edge\\Application\\msedge.exe",
           445: "System", 139: "System", 88: "C:\\Windows\\System32\\lsass.exe",
           389: "C:\\Windows\\System32\\lsass.exe", 636: "C:\\Windows\\System32\\lsass.exe",
           3268: "C:\\Windows\\System32\\lsass.exe", 3389: "C:\\Windows\\System32\\mstsc.exe"}
_DEFAULT_IMAGE = "C:\\Windows\\System32\\svchost.exe"
_HEAD = ('{"SourceName":"Microsoft-Windows-Sysmon","ProviderGuid":"{5770385f-c22a-43e0-bf4c-06f5698ffbd9}",'
         '"Level":"4","Keywords":"0x8000000000000000","Channel":"Microsoft-Windows-Sysmon/Operational",')


def windows_guests(inventory: pd.DataFrame) -> pd.DataFrame:
    """ip, name of the Windows guests (by `os` when the inventory has it, else by role)."""
    inv = inventory.drop_duplicates("ip", keep="last")
    if "os" in inv.columns:
        pick = inv["os"].astype(str).str.lower().str.startswith("windows")
    else:
        pick = inv["role"].isin(WINDOWS_ROLES) & (inv["kind"] != "esxi_mgmt")
    return inv.loc[pick, ["ip", "name"]].reset_index(drop=True)


def _domain(ds) -> str:
    try:
        from esxi_anomaly.synth.scenario import load_scenario
        return load_scenario(ds.scenario).domain
    except Exception:   # a dataset not from a named scenario (real traffic with injections)
        return "corp.example"


def _json_text(values: pd.Series) -> pd.Series:
    return values.str.replace("\\", "\\\\", regex=False).str.replace('"', '\\"', regex=False)


def _guid(keys: pd.Series) -> pd.Series:
    hexs = hex_of(keys, 16)
    return "{" + hexs.str[:8] + "-" + hexs.str[8:12] + "-" + hexs.str[12:16] + "-a2c0-000000000700}"


def _events(eid: int, host: pd.Series, ms: np.ndarray, fields: list[tuple[str, pd.Series]]) -> pd.Series:
    """JSON lines of one event id: the envelope, then `fields` (already JSON-escaped text)."""
    utc = pd.Series(iso_ms(ms, sep=" ", zone=""), dtype=object)
    created = pd.Series(iso_ms(ms + 40 + (hash64(utc) % np.uint64(900)).astype(np.int64)), dtype=object)
    line = (_HEAD + '"Hostname":"' + host + '","TimeCreated":"' + created + '","@timestamp":"' + created
            + f'","EventID":{eid},"Task":"{eid}","RuleName":"-","UtcTime":"' + utc + '"')
    for key, value in fields:
        line = line + f',"{key}":"' + value + '"'
    return line + "}"


def network_lines(conns: pd.DataFrame, fqdn: dict) -> pd.DataFrame:
    c = conns[conns["src_ip"].isin(fqdn)].reset_index(drop=True)
    host = c["src_ip"].map(fqdn).astype(object)
    image = c["dst_port"].map(_IMAGES).fillna(_DEFAULT_IMAGE).astype(object)
    user = np.where(image.str.contains("msedge|mstsc"), host.str.split(".").str[0].str.upper() + "\\user",
                    "NT AUTHORITY\\SYSTEM")
    ms = ms_floor(c["ts"])
    fields = [("ProcessGuid", _guid(host + image)), ("ProcessId", col(1000 + hash64(host + image) % np.uint64(9000))),
              ("Image", _json_text(image)), ("User", _json_text(pd.Series(user, dtype=object))),
              ("Protocol", col(c["proto"])), ("Initiated", pd.Series(["true"] * len(c), dtype=object)),
              ("SourceIsIpv6", col(c["src_ip"].str.contains(":").map({True: "true", False: "false"}))),
              ("SourceIp", col(c["src_ip"])), ("SourceHostname", host), ("SourcePort", col(c["src_port"])),
              ("SourcePortName", pd.Series(["-"] * len(c), dtype=object)),
              ("DestinationIsIpv6", col(c["dst_ip"].str.contains(":").map({True: "true", False: "false"}))),
              ("DestinationIp", col(c["dst_ip"])), ("DestinationHostname", pd.Series(["-"] * len(c), dtype=object)),
              ("DestinationPort", col(c["dst_port"])),
              ("DestinationPortName", pd.Series(["-"] * len(c), dtype=object))]
    return pd.DataFrame({"host": host, "ms": ms, "line": _events(3, host, ms, fields)})


def query_results(dns: pd.DataFrame) -> pd.DataFrame:
    """One row per DNS response: event_id, ts, client_ip, query, rcode, QueryResults text."""
    codes, _ = pd.factorize(dns["event_id"])
    d = dns.take(np.lexsort((dns["answer_index"].to_numpy(), codes))).reset_index(drop=True)
    uid = d["event_id"].to_numpy(dtype=object)
    starts = np.flatnonzero(np.r_[True, uid[1:] != uid[:-1]]) if len(d) else np.array([], dtype=np.int64)
    rtype = d["rtype"].astype(object)
    answer = d["answer"].astype(object)
    mapped = (hash64(d["event_id"]) % np.uint64(10)).astype(np.int64) < 8   # most IPv4 answers are ::ffff:-mapped
    code = rtype.map(_RR_CODES)
    target = answer.where(rtype != "SRV", answer.str.split(" ").str[-1])
    elem = np.where(rtype == "A", np.where(mapped, "::ffff:" + answer, answer),
                    np.where(rtype == "AAAA", answer, "type:  " + col(code.fillna(0).astype(np.int64)) + " " + target))
    elem = np.where(answer == "", "", pd.Series(elem, dtype=object) + ";").astype(object)
    results = np.add.reduceat(elem, starts) if len(d) else np.array([], dtype=object)
    first = d.iloc[starts].reset_index(drop=True)
    return pd.DataFrame({"event_id": first["event_id"], "ts": first["ts"], "client_ip": first["client_ip"],
                         "query": first["query"], "rcode": first["rcode"].replace("", "NOERROR"),
                         "results": np.where(results == "", "-", results)})


def dns_lines(dns: pd.DataFrame, fqdn: dict, domain: str) -> pd.DataFrame:
    r = query_results(dns[dns["client_ip"].isin(fqdn)])
    host = r["client_ip"].map(fqdn).astype(object)
    # internal names are looked up by services, the rest by the browser
    image = pd.Series(np.where(r["query"].str.endswith("." + domain), _DEFAULT_IMAGE, _IMAGES[443]), dtype=object)
    ms = ms_floor(r["ts"])
    fields = [("ProcessGuid", _guid(host + image)), ("ProcessId", col(1000 + hash64(host + image) % np.uint64(9000))),
              ("QueryName", _json_text(r["query"].astype(object))),
              ("QueryStatus", col(r["rcode"].map(_STATUS).fillna(9002).astype(np.int64))),
              ("QueryResults", _json_text(pd.Series(r["results"], dtype=object))), ("Image", _json_text(image)),
              ("User", host.str.split(".").str[0].str.upper() + "\\\\user")]
    return pd.DataFrame({"host": host, "ms": ms, "line": _events(22, host, ms, fields)})


def write_sysmon(ds, out_dir) -> list[Path]:
    """`<out_dir>/sysmon/<guest>.json` per Windows guest with any event."""
    out = Path(out_dir) / "sysmon"
    guests = windows_guests(ds.inventory)
    domain = _domain(ds)
    fqdn = dict(zip(guests["ip"], guests["name"].astype(str) + "." + domain))
    lines = pd.concat([network_lines(ds.connections, fqdn), dns_lines(ds.dns_answers, fqdn, domain)], ignore_index=True)
    written = []
    for host, part in lines.groupby("host", sort=True):
        part = part.iloc[np.argsort(part["ms"].to_numpy(), kind="stable")]
        written.append(write_lines(out / f"{host.split('.')[0]}.json", part["line"].tolist()))
    return written


__all__ = ["write_sysmon", "windows_guests", "query_results", "WINDOWS_ROLES"]
