"""ESXi and vCenter syslog (hostd, vpxa, vmkernel, shell, auth, vobd, ...) -> `context` rows.

Every line becomes one context row (ts, host, program, event, message); continuation lines join
the record before them: ``--> ...`` (6.7/7.x) and the ESXi 8 line marker ``Sev(PRI)+``.
Header families (formats.md (a)):

* on-disk vmw_log, 6.7/7.x: ``2022-06-02T11:58:12.796Z info vpxd[47240] [Originator@6876 ...] msg``,
  vmkernel ``<ts>Z cpu0:262792)msg``, vobd ``<ts>Z: [UserLevelCorrelator] ...`` (no host);
* on-disk ESXi 8 ``<ts>Z In(166) Hostd[1050748]: msg`` and every forwarded form (RFC 3164 with an
  RFC 3339 time, RFC 5424, relay-prefixed), taken apart by `syslog_envelope.parse_envelope`.
  A forwarded 6.7/7.x body repeats ``info hostd[tid]``: that is stripped, so `message` is the same
  whichever way the line arrived. Structured data (ESXi audit ``[shell.cmd@6876 ...]``) stays at
  the front of `message`.

`program` is lower-cased (``Hostd`` -> ``hostd``). `event` names the lines that matter for C2 and
anti-forensics (`EVENT_PATTERNS`, first match wins): syslog_remote_failure, syslog_stopped,
firewall_change, ssh_enabled, shell_enabled, vib_install, shell_command; otherwise ``other``.
Lines with no recognisable header are quarantined. Log text is attacker-controlled: it is kept
verbatim, never interpreted.
"""
from __future__ import annotations

import re
import time
from typing import Iterator

import numpy as np
import pandas as pd

from esxi_anomaly import schema
from esxi_anomaly.ingest.base import Quarantine, SourceFormat
from esxi_anomaly.ingest.syslog_envelope import iter_lines, parse_envelope, parse_rfc3339

SOURCE = "esxi_syslog"
MAX_MESSAGE_CHARS = 64 * 1024  # a record's joined continuation lines are capped here

_TS = r"(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:Z|[+-]\d\d:?\d\d)?)"
VMW_LOG = re.compile(_TS + r" (?P<level>verbose|trivia|info|warning|error|critical|panic|debug|alert|emergency) "
                     r"(?P<prog>[A-Za-z][\w.-]{0,63})\[(?P<tid>[0-9A-Fa-fx]{1,20})\] (?P<msg>.*)\Z", re.S)
VMKERNEL = re.compile(_TS + r" (?P<msg>cpu\d+:\d+.*)\Z", re.S)
VOBD = re.compile(_TS + r": (?P<msg>\[.*)\Z", re.S)
ESXI8_CONTINUATION = re.compile(r"\S+ [A-Z][a-z]\(\d{1,3}\)\+ [^\s:]+(?:\[[^\]\s]*\])?: ?(?P<msg>.*)\Z", re.S)
INNER_HEADER = re.compile(r"(?:verbose|trivia|info|warning|error|critical|panic|debug|alert|emergency) "
                          r"(?P<prog>[A-Za-z][\w.-]{0,63})\[[0-9A-Fa-fx]{1,20}\] ")

# ESXi / vCenter daemons: a syslog line from one of these is evidence the file is ours.
ESXI_PROGRAMS = frozenset({
    "hostd", "vpxa", "vmkernel", "vmkwarning", "vobd", "fdm", "rhttpproxy", "vpxd", "vpxd-svcs",
    "vmsyslogd", "vmauthd", "hostd-probe", "shell", "sdrsinjector", "esxupdate", "vmon", "vmcad",
    "updatemgr", "applmgmt", "applmgmt-audit", "sps", "vsanvpd", "storagerm", "dcui", "lwsmd",
    "sfcb-vmware_base", "sfcbd", "crx-cli", "settingsd", "vmafdd", "envoy", "hostprofiletrace",
})

EVENT_PATTERNS: list[tuple[str, str]] = [
    ("syslog_remote_failure",
     r"vob\.user\.vmsyslogd\.remote\.failure|esx\.problem\.vmsyslogd\.remote\.failure"
     r"|vmsyslog logger \S+ lost \d+ log messages"),
    ("syslog_stopped",
     r"vmsyslogd\b.{0,80}\b(?:stopp(?:ed|ing)|killed|exit(?:ed|ing)|terminat\w*)"
     r"|\b(?:kill|pkill|killall)\b[^\n]{0,80}vmsyslogd|/etc/init\.d/vmsyslogd\s+stop"
     r"|vob\.user\.vmsyslogd\.(?:stopped|killed)"),
    ("firewall_change",
     r"\b(?:esx|local)cli\b(?:\s+--?\S+)*\s+network\s+firewall\s+(?:ruleset\s+(?:allowedip\s+)?)?"
     r"(?:set|add|remove|load|unload|refresh)\b"
     r"|esx\.audit\.net\.firewall\.(?:config\.changed|disabled|enabled|port\.(?:hooked|removed))"
     r"|hostsvc/firewall_(?:enable|disable)"),
    ("ssh_enabled",
     r"SSH login enabled|esx\.audit\.ssh\.enabled|SSH for the host .{0,200} has been enabled"
     r"|hostsvc/(?:enable|start)_ssh|TSM-SSH running status is true"),
    ("shell_enabled",
     r"ESXi Shell login enabled|esx\.audit\.shell\.enabled|ESXi Shell for the host .{0,200} has been enabled"
     r"|hostsvc/(?:enable|start)_esx_shell|\bTSM running status is true"),
    ("vib_install",
     r"\bsoftware\s+(?:vib|component|profile)\s+(?:install|update|apply)\b"
     r"|\bacceptance\s+set\b.{0,80}community|esx\.audit\.esximage\.(?:vib\.install\.successful|install\.novalidation)"),
]
_EVENT_RES = [(name, re.compile(p, re.IGNORECASE | re.S)) for name, p in EVENT_PATTERNS]


def classify(programs: pd.Series, messages: pd.Series) -> np.ndarray:
    """The normalised event of each (program, message), first matching pattern wins."""
    conditions = [messages.str.contains(rx, regex=True) for _name, rx in _EVENT_RES]
    conditions.append((programs == "shell") | messages.str.contains("shell.cmd@6876", regex=False))
    choices = [name for name, _rx in _EVENT_RES] + ["shell_command"]
    return np.select([c.to_numpy(dtype=bool) for c in conditions], choices, default="other")


def parse_line(line: str, default_year: int | None = None) -> tuple[float, str, str, str] | None:
    """(ts, host, program, message) of one ESXi/vCenter log line; None if it is not one."""
    m = VMW_LOG.match(line)
    if m:
        return _ts(m["ts"]), "", m["prog"].lower(), m["msg"]
    m = VMKERNEL.match(line)
    if m:
        return _ts(m["ts"]), "", "vmkernel", m["msg"]
    m = VOBD.match(line)
    if m:
        return _ts(m["ts"]), "", "vobd", m["msg"]
    env = parse_envelope(line, default_year)
    if env is None or not env.program:
        return None
    program, message = env.program.lower(), env.message
    inner = INNER_HEADER.match(message)
    if inner and inner["prog"].lower() == program:
        message = message[inner.end():]
    if env.structured_data:  # keep the body as written, SD included (`[root]: cmd` looks like SD)
        start = line.find(env.structured_data)
        message = line[start:] if start >= 0 else f"{env.structured_data} {message}"
    return (np.nan if env.ts is None else env.ts), env.host, program, message


def _ts(text: str) -> float:
    value = parse_rfc3339(text)
    return np.nan if value is None else value


def sniff(head: bytes) -> bool:
    """Mostly ESXi/vCenter-shaped lines, at least one from an ESXi/vCenter daemon."""
    lines = [l for l in head.decode("utf-8", "replace").splitlines()[:200] if l.strip()]
    if len(lines) > 1 and len(head) >= 65536:
        lines = lines[:-1]  # the last line of a full head may be cut
    recognised = evidence = 0
    for line in lines:
        if line.startswith("-->") or ESXI8_CONTINUATION.match(line):
            recognised += 1
            continue
        parsed = parse_line(line)
        if parsed is None:
            continue
        recognised += 1
        if parsed[2] in ESXI_PROGRAMS or "Originator@6876" in line:
            evidence += 1
    return evidence > 0 and recognised * 2 >= len(lines)


def read(path: str, quarantine: Quarantine, chunk_rows: int) -> Iterator[pd.DataFrame]:
    try:
        import os

        default_year = time.gmtime(os.stat(path).st_mtime).tm_year
    except OSError:
        default_year = None
    records: list[list] = []  # [ts, host, program, message, first line number]
    pending: list | None = None
    for lineno, line in iter_lines(path, quarantine):
        if not line.strip():
            continue
        continuation = None
        if line.lstrip().startswith("-->"):
            continuation = line.lstrip()
        else:
            marker = ESXI8_CONTINUATION.match(line)
            if marker:
                continuation = marker["msg"]
        if continuation is not None:
            if pending is None:
                quarantine.add(path, lineno, "continuation line without a record before it", line)
            elif len(pending[3]) + len(continuation) + 1 > MAX_MESSAGE_CHARS:
                quarantine.add(path, lineno, f"continuation beyond {MAX_MESSAGE_CHARS} characters of one record", line)
            else:
                pending[3] = f"{pending[3]}\n{continuation}"
            continue
        parsed = parse_line(line, default_year)
        if parsed is None:
            quarantine.add(path, lineno, "not an ESXi or vCenter log line", line)
            continue
        if pending is not None:
            records.append(pending)
            if len(records) >= chunk_rows:
                yield _frame(records)
                records = []
        pending = [*parsed, lineno]
    if pending is not None:
        records.append(pending)
    if records:
        yield _frame(records)


def _frame(records: list[list]) -> pd.DataFrame:
    df = pd.DataFrame(records, columns=["ts", "host", "program", "message", "line"])
    df["ts"] = df["ts"].astype("float64")
    df["program"] = df["program"].astype("str")
    df["message"] = df["message"].astype("str")
    df["event"] = classify(df["program"], df["message"])
    df["source"] = SOURCE
    return schema.conform(df, "context")


FORMATS = [SourceFormat(SOURCE, "context", sniff, read,
                        "ESXi/vCenter syslog (vmw_log, ESXi 8, forwarded RFC 3164/5424): one context row per record")]
