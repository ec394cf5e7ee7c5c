"""ESXi / vCenter syslog -> context rows: every record, continuation lines joined, events normalised."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import pandas as pd

from tests.ingest._lines import read_through
from hypothesis import given, settings
from hypothesis import strategies as st

from esxi_anomaly import schema
from esxi_anomaly.ingest.base import IngestError, Quarantine, detect_format
from esxi_anomaly.ingest.esxi_syslog import read, sniff

COMMON = "vsphere-elastic-integrations/test-format-common.log"
VMW_LOG = "vcenter-vmwlog-lnav/logfile_vmw_log.0"
VPXD = "vcenter-vmwlog-lnav/logfile_vpxd.0"
VALID = "2023-12-05T17:35:29.040Z No(13) SSH[1053644]: SSH login enabled"


def read_all(path, quarantine=None, chunk_rows=5) -> pd.DataFrame:
    return read_through(read, path, "context", quarantine, chunk_rows)


def ts(text: str) -> float:
    return pd.Timestamp(text).timestamp()


def test_vsphere_common_sample(samples):
    path = samples / COMMON
    text = path.read_text()
    # independent count: 72 records = 71 newlines + an unterminated last line; 69 RFC 5424 vCenter lines
    assert (text.count("\n"), not text.endswith("\n"), text.count("<14>1 ") + text.count("<13>1 ")
            + text.count("<15>1 ") + text.count("<30>1 ") + text.count("<110>1 ")) == (71, True, 69)
    q = Quarantine()
    df = read_all(path, q)
    assert len(q) == 0 and len(df) == 72
    assert df["program"].value_counts().to_dict() == {
        "vmon": 43, "vpxd": 17, "updatemgr": 6, "applmgmt-audit": 2, "hostd": 2, "vmcad": 1, "shell": 1}
    assert df["event"].value_counts().to_dict() == {"other": 69, "syslog_remote_failure": 2, "shell_command": 1}
    first = df.iloc[0]
    assert (first["ts"], first["host"], first["program"], first["message"]) == (
        ts("2021-09-06T14:40:05.753710+00:00"), "vcenter", "applmgmt-audit",
        "2021-09-06T14:40:05.753: INFO AuthorizationResponse = { authorized=True, method=LOCAL }")
    login = df[df["message"].str.startswith("Event [575792] ")].iloc[0]
    assert (login["ts"], login["program"]) == (ts("2021-09-06T14:40:13.263383+00:00"), "vpxd")
    hostd = df[df["program"] == "hostd"].iloc[0]
    assert (hostd["host"], hostd["ts"]) == ("ESXI", ts("2022-11-04T15:01:58.230Z"))
    assert hostd["message"] == ("[Originator@6876 sub=Vimsvc.ha-eventmgr opID=esxui-b370-037c user=root] Event 406 : "
                                "Guest OS reboot for Kali Linux - Foobar on ESXI in ha-datacenter")
    shell = df[df["event"] == "shell_command"].iloc[0]
    assert shell["message"] == ('[shell.cmd@6876 subject="root" object="shell" command="grep -i kali hostd.log | grep reboot" '
                                'result="success" status="0"]')
    lost = df[df["event"] == "syslog_remote_failure"]["message"]
    assert lost.str.contains("vmsyslog logger 10.100.10.30:514 lost 156959 log messages", regex=False).all()
    assert (df["source"] == "esxi_syslog").all()


def test_vmw_log_samples_with_continuation(samples):
    assert len((samples / VMW_LOG).read_text().splitlines()) == 4  # 3 records, the last one continued
    df = read_all(samples / VMW_LOG)
    assert len(df) == 3 and set(df["program"]) == {"vpxd"} and set(df["host"]) == {""}
    assert df["message"].iloc[2].endswith("(Fault cause: vim.fault.NotFound\n--> )")
    assert df["ts"].tolist() == [ts("2022-06-02T11:58:12.193Z"), ts("2022-06-02T11:58:12.194Z"), ts("2022-06-02T11:59:41.498Z")]
    vpxd = read_all(samples / VPXD)
    assert len(vpxd) == len((samples / VPXD).read_text().splitlines()) == 12
    assert vpxd["message"].iloc[-1] == ("[Originator@6876 sub=MoCluster opID=HB-host-493@2000-2922fd96] "
                                        "Host [vim.HostSystem:host-493,esx-2-192.vlcm.com] has 1 HDCS resources")


def test_sniff_and_registry(samples, fixtures):
    for name in (COMMON, VMW_LOG, VPXD):
        assert sniff((samples / name).read_bytes())
        assert detect_format(str(samples / name), "context").name == "esxi_syslog"
    for name in ("esxi8_ondisk_verbatim.log", "esxi7_and_forwarded_verbatim.log"):
        assert sniff((fixtures / "esxi_syslog" / name).read_bytes())
    assert not sniff((samples / "infoblox-nios-elastic-integrations/test-dns.log").read_bytes())
    assert not sniff((fixtures / "dns_servers/dnsmasq_verbatim.log").read_bytes())
    # NSX DFW lines carry an ESXi 8 header but come from no ESXi daemon of ours
    assert not sniff(b"2026-03-03T00:02:11.678Z No(13) FIREWALL-PKTLOG[1069031]: 8b4a1980 INET match PASS 25577 OUT 84 ICMP "
                     b"192.168.72.10->192.168.72.17\n")


def test_esxi8_on_disk_lines(fixtures):
    q = Quarantine()
    df = read_all(fixtures / "esxi_syslog/esxi8_ondisk_verbatim.log", q)
    assert len(q) == 0
    assert df["program"].tolist() == ["hostd"] * 3 + ["ssh"] + ["sshd"] * 3 + ["shell"] * 2 + ["vmkernel", "vmkernel", "vmkwarning", "vmkernel"]
    assert df["event"].tolist() == ["other", "other", "ssh_enabled", "ssh_enabled", "other", "other", "other",
                                    "shell_command", "shell_command", "other", "other", "other", "other"]
    assert df["message"].iloc[7] == "[root]: vim-cmd vmsvc/getallvms"
    assert df["ts"].iloc[-1] == ts("2025-01-23T22:10:20Z")
    assert set(df["host"]) == {""}


def test_esxi7_and_forwarded_lines(fixtures):
    df = read_all(fixtures / "esxi_syslog/esxi7_and_forwarded_verbatim.log")
    assert df[["host", "program"]].values.tolist() == [
        ["", "hostd"], ["", "hostd"], ["hp.kar.int", "hostd"], ["localhost.localdomain", "vpxa"],
        ["E2E-L4-72o-070231", "vpxa"], ["contosa.vm.esxi1", "vmkernel"], ["esxi1.esxlab.com", "rhttpproxy"]]
    assert df["message"].iloc[2] == ("[Originator@6876 sub=PropertyProvider] RecordOp ASSIGN: guest.disk, 4. "
                                     "Sent notification immediately.")
    assert df["ts"].iloc[6] == ts("2019-12-15T13:08:16.441Z")


def test_interesting_events(tmp_path):
    # Constructed in the documented ESXi 8 shell / vobd / hostd layouts: no verbatim capture of
    # these events exists in formats.md or the samples.
    lines = {
        "firewall_change": '2024-01-01T00:00:01.000Z In(14) shell[1]: [root]: esxcli network firewall ruleset set -r sshServer -e true',
        "vib_install": '2024-01-01T00:00:02.000Z In(14) shell[1]: [root]: esxcli software vib install -v /tmp/x.vib --force --no-sig-check',
        "syslog_stopped": '2024-01-01T00:00:03.000Z In(14) shell[1]: [root]: kill -9 $(pidof vmsyslogd)',
        "syslog_remote_failure": "2024-01-01T00:00:04.000Z In(14) vobd[2097521]:  [UserLevelCorrelator] 1us: [vob.user.vmsyslogd.remote.failure] The host lost connection to remote syslog server udp://10.0.0.9:514",
        "shell_enabled": "2024-01-01T00:00:05.000Z In(166) Hostd[1]: [Originator@6876 sub=Hostsvc.ServiceSystem] TSM running status is true",
        "ssh_enabled": "2024-01-01T00:00:06.000Z In(14) vobd[1]:  [UserLevelCorrelator] 1us: [esx.audit.ssh.enabled] SSH access has been enabled.",
        "shell_command": '<110>2024-01-01T00:00:07.000Z esx01 shell[1]: [shell.cmd@6876 subject="root" object="shell" command="esxcli network firewall ruleset list" result="success" status="0"]',
        "other": "2024-01-01T00:00:08.000Z In(14) shell[1]: [root]: echo vmsyslogd is fine",
    }
    path = tmp_path / "events.log"
    path.write_text("\n".join(lines.values()) + "\n")
    df = read_all(path)
    expected = list(lines)
    expected[-1] = "shell_command"  # a shell line that matches nothing more specific
    assert df["event"].tolist() == expected
    assert df["host"].tolist()[6] == "esx01"


def test_esxi8_continuation_marker_and_bad_lines(tmp_path):
    # Constructed from the ESXi 8 ABNF (LINE-MARKER "+" on continuation lines).
    path = tmp_path / "multi.log"
    path.write_bytes(
        b"--> orphan continuation\n"
        b"2024-01-01T00:00:01.000Z In(166) Hostd[7]: first part\n"
        b"2024-01-01T00:00:01.000Z In(166)+ Hostd[7]: second part\n"
        b"\x00\xffbinary junk\n"
        b"2024-01-01T00:00:02.000Z In(166) Hostd[7]: next\n")
    q = Quarantine()
    df = read_all(path, q, chunk_rows=1)
    assert df["message"].tolist() == ["first part\nsecond part", "next"]
    assert [(r.line, r.reason) for r in q.records] == [
        (1, "continuation line without a record before it"), (4, "not an ESXi or vCenter log line")]


def test_placeholder_timestamps_keep_the_line_with_unknown_time(tmp_path):
    # Verbatim Broadcom KB line from formats.md (a): its date is a placeholder.
    path = tmp_path / "kb.log"
    path.write_text("2025-MM-DDThh:mm:ss.073Z Er(163) Hostd[2098450]: [Originator@6876 sub=Default] IpmiIfcOpenIpmiOpen: open(/dev/ipmi0, RDWR) failed 2 m\n")
    df = read_all(path)
    assert df["program"].tolist() == ["hostd"] and np.isnan(df["ts"].iloc[0])


def _read_lines(lines):
    fd, path = tempfile.mkstemp(suffix=".log")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogatepass") as fh:
            fh.write("\n".join(lines) + "\n")
        try:
            return read_all(path, chunk_rows=3)
        except IngestError:
            return schema.empty("context")
    finally:
        os.unlink(path)


@settings(max_examples=50, deadline=None)
@given(garbage=st.lists(st.text(max_size=120), max_size=8), where=st.integers(0, 8))
def test_valid_lines_survive_garbage(garbage, where):
    lines = [g.replace("\n", " ").replace("\r", " ") for g in garbage if not g.lstrip().startswith("-->")]
    lines.insert(min(where, len(lines)), VALID)
    df = _read_lines(lines)
    assert (df["message"].str.split("\n").str[0] == "SSH login enabled").sum() == 1


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_mutated_lines_never_raise(data):
    pos = data.draw(st.integers(0, len(VALID)))
    junk = data.draw(st.text(max_size=20)).replace("\n", " ")
    _read_lines([VALID[:pos] + junk + VALID[pos + data.draw(st.integers(0, 20)):]])
