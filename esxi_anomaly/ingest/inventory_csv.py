"""The canonical inventory CSV: `ip,name,kind[,esxi_host][,role]` -> the `inventory` frame.

Header names are matched case-insensitively; extra columns are ignored. IPs are normalised to
Python's `ipaddress` text form (IPv6 compressed, lower case) so they join with log IPs. A missing
name becomes the IP, a missing kind becomes `unknown`; an invalid IP or an unknown kind sends the
row to the quarantine. A PowerShell `Export-Csv` `#TYPE ...` first line is skipped.
"""
from __future__ import annotations

import csv
import ipaddress
from typing import Iterator

import pandas as pd

from esxi_anomaly import schema
from esxi_anomaly.ingest.roles import assign_roles
from esxi_anomaly.ingest.base import Quarantine, SourceFormat, open_text

REQUIRED = ("ip", "name", "kind")
OPTIONAL = ("esxi_host", "role")
FORMAT_NAME = "inventory_csv"


def _header_lines(text: str) -> list[str]:
    lines = text.lstrip("\ufeff").splitlines()
    if lines and lines[0].startswith("#TYPE"):
        lines = lines[1:]
    return lines


def sniff(head: bytes) -> bool:
    """A CSV whose header row names at least the ip, name and kind columns."""
    lines = _header_lines(head.decode("utf-8", "replace"))
    if not lines:
        return False
    try:
        header = next(csv.reader([lines[0]]))
    except (csv.Error, StopIteration):
        return False
    names = {h.strip().lower() for h in header}
    return set(REQUIRED) <= names


def _normalise_ip(value: str) -> str | None:
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        return None


def read(path: str, quarantine: Quarantine, chunk_rows: int) -> Iterator[pd.DataFrame]:
    rows: list[tuple[str, str, str, str, str]] = []
    with open_text(path) as fh:
        first = fh.readline()
        line_offset = 0
        if first.lstrip("\ufeff").startswith("#TYPE"):
            first = fh.readline()
            line_offset = 1
        try:
            header = [h.strip().lower() for h in next(csv.reader([first.lstrip("\ufeff")]))]
        except (csv.Error, StopIteration):
            quarantine.add(path, 1 + line_offset, "no CSV header", first)
            return
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            quarantine.add(path, 1 + line_offset, f"header lacks {', '.join(missing)}", first)
            return
        position = {name: header.index(name) for name in REQUIRED + OPTIONAL if name in header}
        width = len(header)
        reader = csv.reader(fh)
        # The inventory is small (one row per VM/host): a per-row loop is fine here.
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                quarantine.add(path, reader.line_num + 1 + line_offset, f"unreadable CSV row ({exc})", "")
                continue
            line = reader.line_num + 1 + line_offset
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) < max(position[c] for c in REQUIRED) + 1:
                quarantine.add(path, line, f"{len(row)} fields, expected {width}", ",".join(row))
                continue
            ip = _normalise_ip(row[position["ip"]])
            if ip is None:
                quarantine.add(path, line, "invalid IP address", ",".join(row))
                continue
            kind = row[position["kind"]].strip().lower() or "unknown"
            if kind not in schema.INVENTORY_KINDS:
                quarantine.add(path, line, f"unknown kind {kind[:40]!r} (expected one of "
                                           f"{', '.join(schema.INVENTORY_KINDS)})", ",".join(row))
                continue
            name = row[position["name"]].strip() or ip
            extra = [row[position[c]].strip() if c in position and position[c] < len(row) else ""
                     for c in OPTIONAL]
            rows.append((ip, name, kind, extra[0], extra[1]))
            if len(rows) >= chunk_rows:
                yield _frame(rows)
                rows = []
    if rows:
        yield _frame(rows)


def _frame(rows) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=["ip", "name", "kind", "esxi_host", "role"])
    return schema.conform(assign_roles(df), "inventory")


FORMATS = [
    SourceFormat(FORMAT_NAME, "inventory", sniff, read,
                 "canonical inventory CSV: ip,name,kind[,esxi_host][,role]"),
]
