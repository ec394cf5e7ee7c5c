"""govc JSON output -> `inventory`: `vm.info -json`, `host.info -json`, `ls -json`, `object.collect -json`.

Shapes (govc's JSON is the vSphere managed objects; older govc writes Go field names such as
``VirtualMachines``/``Guest``/``Net``, newer ones lowerCamelCase: keys are matched ignoring case):

* ``vm.info -json``: ``{"virtualMachines": [VirtualMachine, ...]}``;
* ``host.info -json``: ``{"hostSystems": [HostSystem, ...]}``;
* ``ls -json`` / ``ls -l -json``: ``{"elements": [{"path": "/DC/vm/x", "object": {...}}]}``;
* ``object.collect -json``: ``[{"obj": {"type": "VirtualMachine", "value": "vm-1"},
  "propSet": [{"name": "guest.net", "val": [...]}, ...]}]``.

A VM gives one row per guest IP (``guest.net[].ipAddress[]`` and ``guest.ipAddress``), kind
``vm``; its `esxi_host` is the host's name when the same file holds that HostSystem, else the
MoRef value (``host-12``: vm.info only carries the reference). A HostSystem gives one row per
vmknic IP (``config.network.vnic[].spec.ip.ipAddress``), kind ``esxi_mgmt``. A path (ls) gives
the folder used by the role rules. Objects without any IP are skipped and counted; invalid JSON
and invalid addresses are quarantined.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import posixpath
from typing import Iterator

import pandas as pd

from esxi_anomaly import schema
from esxi_anomaly.ingest.base import IngestError, Quarantine, SourceFormat, open_binary
from esxi_anomaly.ingest.roles import assign_roles

log = logging.getLogger(__name__)

SOURCE = "govc_json"
MAX_FILE_BYTES = 512 * 1024 * 1024
_SNIFF_KEYS = ('"virtualmachines"', '"hostsystems"')


def _get(d, *path):
    """Nested lookup ignoring key case (govc versions differ in JSON key case)."""
    for key in path:
        if not isinstance(d, dict):
            return None
        if key in d:
            d = d[key]
            continue
        lowered = key.lower()
        d = next((v for k, v in d.items() if isinstance(k, str) and k.lower() == lowered), None)
    return d


def sniff(head: bytes) -> bool:
    text = head.decode("utf-8", "replace").lstrip("\ufeff \t\r\n")
    if not text.startswith(("{", "[")):
        return False
    low = text.lower()
    if any(k in low for k in _SNIFF_KEYS):
        return True
    return ('"propset"' in low or '"elements"' in low) and ('"virtualmachine"' in low or '"hostsystem"' in low)


def _objects(doc) -> Iterator[tuple[str, dict, str]]:
    """(type, managed object, inventory path) of every VM / host in a govc document."""
    if isinstance(doc, dict):
        for key, kind in (("virtualMachines", "VirtualMachine"), ("hostSystems", "HostSystem")):
            for obj in _get(doc, key) or []:
                yield kind, obj, ""
        for element in _get(doc, "elements") or []:
            obj = _get(element, "object")
            if isinstance(obj, dict):
                yield _type_of(obj), obj, str(_get(element, "path") or "")
    elif isinstance(doc, list):
        for item in doc:
            props = _get(item, "propSet")
            if isinstance(props, list):
                yield str(_get(item, "obj", "type") or ""), _unflatten(props), ""
            elif isinstance(item, dict):
                yield _type_of(item), item, ""


def _type_of(obj: dict) -> str:
    return str(_get(obj, "self", "type") or _get(obj, "_typeName") or "")


def _unflatten(props: list) -> dict:
    out: dict = {}
    for prop in props:
        name, value = _get(prop, "name"), _get(prop, "val")
        if not isinstance(name, str):
            continue
        node = out
        parts = name.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[parts[-1]] = value
    return out


def _vm_ips(obj: dict) -> list:
    found = []
    for nic in _get(obj, "guest", "net") or []:
        found.extend(_get(nic, "ipAddress") or [])
    found.append(_get(obj, "guest", "ipAddress"))
    found.append(_get(obj, "summary", "guest", "ipAddress"))
    return found


def _host_ips(obj: dict) -> list:
    return [_get(vnic, "spec", "ip", "ipAddress") for vnic in (_get(obj, "config", "network", "vnic") or [])]


def read(path: str, quarantine: Quarantine, chunk_rows: int) -> Iterator[pd.DataFrame]:
    try:
        with open_binary(path) as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except (OSError, EOFError, ValueError) as exc:
        raise IngestError(f"{path}: cannot read ({exc})") from exc
    if len(data) > MAX_FILE_BYTES:
        raise IngestError(f"{path}: larger than {MAX_FILE_BYTES} bytes; not a govc export")
    try:
        doc = json.loads(data.decode("utf-8-sig", "replace"))
    except ValueError as exc:
        quarantine.add(path, 1, f"invalid JSON ({str(exc)[:80]})", data[:256])
        return
    objects = list(_objects(doc))
    host_names = {}
    for kind, obj, _p in objects:
        if kind == "HostSystem":
            ref = _get(obj, "self", "value") or _get(obj, "summary", "host", "value")
            if ref and _get(obj, "name"):
                host_names[str(ref)] = str(_get(obj, "name"))
    rows, skipped = [], 0
    for number, (kind, obj, inv_path) in enumerate(objects, start=1):
        if not isinstance(obj, dict) or kind not in ("VirtualMachine", "HostSystem"):
            skipped += 1
            continue
        name = str(_get(obj, "name") or _get(obj, "summary", "config", "name") or _get(obj, "config", "name")
                   or (posixpath.basename(inv_path) if inv_path else ""))
        if kind == "VirtualMachine":
            raw_ips, row_kind = _vm_ips(obj), "vm"
            ref = _get(obj, "runtime", "host", "value") or _get(obj, "summary", "runtime", "host", "value") or ""
            host = host_names.get(str(ref), str(ref))
        else:
            raw_ips, row_kind, host = _host_ips(obj) + [name], "esxi_mgmt", name
        ips = []
        for value in raw_ips:
            if not value:
                continue
            try:
                ip = str(ipaddress.ip_address(str(value).split("%", 1)[0]))
            except ValueError:
                if not (kind == "HostSystem" and value == name):  # a host named by FQDN is fine
                    quarantine.add(path, number, f"{kind} {name[:60]!r}: not an IP address", str(value))
                continue
            if ip not in ips:
                ips.append(ip)
        if not ips:
            skipped += 1
            continue
        folder = posixpath.dirname(inv_path) if inv_path else ""
        rows.extend({"ip": ip, "name": name or ip, "kind": row_kind, "esxi_host": host, "folder": folder}
                    for ip in ips)
    if skipped:
        log.info("%s: skipped %d objects that are not VMs or hosts, or have no IP address", path, skipped)
    if rows:
        df = assign_roles(pd.DataFrame(rows))
        for start in range(0, len(df), chunk_rows):
            yield schema.conform(df.iloc[start:start + chunk_rows].reset_index(drop=True), "inventory")


FORMATS = [SourceFormat(SOURCE, "inventory", sniff, read,
                        "govc JSON (vm.info, host.info, ls, object.collect): one row per IP")]
