"""PowerCLI `Get-VM | Export-Csv` and `Get-VMHost | Export-Csv` -> `inventory`, one row per IP.

Columns are matched by name (case and punctuation ignored), since every script selects its own:
the IP list comes from `Guest.IPAddress` / `IPAddress` / `IP` (several addresses in one field,
separated by `,` `;` `|` or spaces, become several rows; VMHost exports may carry
`ManagementIP`), the host from `VMHost`, and `Folder` / `Tag` feed the role rules (`roles`).
Handles the Windows PowerShell 5.1 `#TYPE ...` first line, `-UseCulture` delimiters (`;`, tab)
and UTF-16 / UTF-8 BOMs. VMHost rows get kind ``esxi_mgmt`` and are their own `esxi_host`.

An IP field exported as ``System.Object[]`` (the array was not joined before Export-Csv) is
quarantined with that explanation; so are tokens that are not IP addresses and rows whose field
count does not match the header. A VM without any IP (powered off, no VMware Tools) cannot be
joined to traffic: it is skipped and counted (logged at INFO).
"""
from __future__ import annotations

import csv
import io
import ipaddress
import logging
import re
from typing import Iterator

import pandas as pd

from esxi_anomaly import schema
from esxi_anomaly.ingest.base import IngestError, Quarantine, SourceFormat, open_binary
from esxi_anomaly.ingest.roles import assign_roles

log = logging.getLogger(__name__)

SOURCE = "powercli_csv"
MAX_FILE_BYTES = 256 * 1024 * 1024
IP_COLUMNS = ("guestipaddress", "ipaddress", "ipaddresses", "ip", "ips", "guestip", "managementip", "mgmtip",
              "vmkernelip", "vmkip")
HOST_COLUMNS = ("vmhost", "vmhostname", "esxihost", "host")
FOLDER_COLUMNS = ("folder", "folderpath", "path")
TAG_COLUMNS = ("tag", "tags")
IP_SPLIT = re.compile(r"[,;|\s]+")


def decode(data: bytes) -> str:
    """Text of an export: UTF-16 when it has a UTF-16 BOM, else UTF-8 (BOM dropped, bad bytes replaced)."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", "replace")
    return data.decode("utf-8-sig", "replace")


def _key(column: str) -> str:
    return re.sub(r"[^a-z0-9]", "", column.lower())


def _split_header(text: str) -> tuple[str, list[str], str, int]:
    """(#TYPE text, header fields, delimiter, number of lines before the header)."""
    lines = text.splitlines()
    type_line, skip = "", 0
    if lines and lines[0].startswith("#TYPE"):
        type_line, skip = lines[0], 1
    header = lines[skip] if len(lines) > skip else ""
    delimiter = max((",", ";", "\t"), key=header.count)
    fields = next(csv.reader([header], delimiter=delimiter), [])
    return type_line, fields, delimiter, skip


def sniff(head: bytes) -> bool:
    text = decode(head)
    type_line, fields, _delim, _skip = _split_header(text)
    if "VMware.VimAutomation" in type_line:
        return True
    return "Name" in fields and bool({"VMHost", "PowerState", "ConnectionState"} & set(fields)) and "kind" not in fields


def _pick(columns: dict[str, str], candidates: tuple[str, ...]) -> str | None:
    return next((columns[c] for c in candidates if c in columns), None)


def read(path: str, quarantine: Quarantine, chunk_rows: int) -> Iterator[pd.DataFrame]:
    try:
        with open_binary(path) as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except (OSError, EOFError, ValueError) as exc:
        raise IngestError(f"{path}: cannot read ({exc})") from exc
    if len(data) > MAX_FILE_BYTES:
        raise IngestError(f"{path}: larger than {MAX_FILE_BYTES} bytes; not an inventory export")
    text = decode(data)
    try:
        type_line, fields, delimiter, skip = _split_header(text)
    except csv.Error as exc:   # e.g. a header field over csv.field_size_limit() (128 KiB)
        reason = f"header line cannot be parsed as CSV ({exc})"
        raise IngestError(f"{path}: {reason}", reason) from None
    columns = {_key(f): f for f in fields}
    ip_col, host_col = _pick(columns, IP_COLUMNS), _pick(columns, HOST_COLUMNS)
    folder_col, tag_col = _pick(columns, FOLDER_COLUMNS), _pick(columns, TAG_COLUMNS)
    is_host_export = ("VMHostImpl" in type_line) or (
        not type_line and "vmhost" not in columns and bool({"connectionstate", "version"} & set(columns)))
    kind = "esxi_mgmt" if is_host_export else "vm"
    rows: list[dict] = []
    skipped = 0
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    try:
        for record in reader:
            if reader.line_num <= skip + 1:
                continue
            lineno = reader.line_num
            if not any(v.strip() for v in record):
                continue
            if len(record) != len(fields):
                quarantine.add(path, lineno, f"row has {len(record)} fields, the header has {len(fields)}", delimiter.join(record))
                continue
            row = dict(zip(fields, record))
            name = row.get("Name", row.get(fields[0], "")).strip()
            ips = _ips(row.get(ip_col, "") if ip_col else "", name if is_host_export else "", path, lineno, quarantine)
            if ips is None:
                continue
            if not ips:
                skipped += 1
                continue
            host = name if is_host_export else (row.get(host_col, "").strip() if host_col else "")
            for ip in ips:
                rows.append({"ip": ip, "name": name or ip, "kind": kind, "esxi_host": host,
                             "folder": row.get(folder_col, "") if folder_col else "",
                             "tags": row.get(tag_col, "") if tag_col else ""})
    except csv.Error as exc:
        quarantine.add(path, reader.line_num, f"CSV cannot be parsed past here ({exc})", "")
    if skipped:
        log.info("%s: skipped %d rows without any IP address", path, skipped)
    if rows:
        df = assign_roles(pd.DataFrame(rows))
        for start in range(0, len(df), chunk_rows):
            yield schema.conform(df.iloc[start:start + chunk_rows].reset_index(drop=True), "inventory")


def _ips(field: str, fallback: str, path: str, lineno: int, quarantine: Quarantine) -> list[str] | None:
    """Valid addresses of an IP field; None when the row is quarantined."""
    field = field.strip().strip("{}")
    if field.startswith("System.") and field.endswith("[]"):
        quarantine.add(path, lineno, f"IP list exported as {field}: join it before Export-Csv "
                                     "([string]::Join(',', $_.Guest.IPAddress))", field)
        return None
    out: list[str] = []
    for token in IP_SPLIT.split(field):
        if not token:
            continue
        try:
            ip = str(ipaddress.ip_address(token.split("%", 1)[0]))
        except ValueError:
            quarantine.add(path, lineno, "not an IP address", token)
            continue
        if ip not in out:
            out.append(ip)
    if not out and fallback:
        try:
            out.append(str(ipaddress.ip_address(fallback)))
        except ValueError:
            pass
    return out


FORMATS = [SourceFormat(SOURCE, "inventory", sniff, read,
                        "PowerCLI Get-VM / Get-VMHost Export-Csv: one row per IP, roles from the role rules")]
