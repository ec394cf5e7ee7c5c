"""parse_envelope on the verbatim forwarded lines of formats.md (a) and (b), and on junk."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esxi_anomaly.ingest.syslog_envelope import Envelope, parse_envelope, parse_rfc3339

# Verbatim lines copied from /work/shared/domain/formats.md (sources cited there).
CASES = [
    (
        "<166>2022-11-04T15:01:58.230Z ESXI Hostd: info hostd[1053970] [Originator@6876 sub=Vimsvc.ha-eventmgr "
        "opID=esxui-b370-037c user=root] Event 406 : Guest OS reboot for Kali Linux - Foobar on ESXI in ha-datacenter",
        Envelope(1667574118.23, "ESXI", "Hostd", "",
                 "info hostd[1053970] [Originator@6876 sub=Vimsvc.ha-eventmgr opID=esxui-b370-037c user=root] "
                 "Event 406 : Guest OS reboot for Kali Linux - Foobar on ESXI in ha-datacenter", "", 166),
    ),
    (
        '<110>2022-11-04T15:25:46.186Z ESXI shell[1231448]: [shell.cmd@6876 subject="root" object="shell" '
        'command="grep -i kali hostd.log | grep reboot" result="success" status="0"]',
        Envelope(1667575546.186, "ESXI", "shell", "1231448", "",
                 '[shell.cmd@6876 subject="root" object="shell" command="grep -i kali hostd.log | grep reboot" '
                 'result="success" status="0"]', 110),
    ),
    (
        "<14>1 2021-09-06T14:40:13.263383+00:00 vcenter vpxd 58650 - -  Event [575792] [1-1] "
        "[2021-09-06T14:40:13.26309Z] [vim.event.UserLoginSessionEvent]",
        Envelope(1630939213.263383, "vcenter", "vpxd", "58650",
                 "Event [575792] [1-1] [2021-09-06T14:40:13.26309Z] [vim.event.UserLoginSessionEvent]", "", 14),
    ),
    (
        "<167> 2019-12-15T13:08:16.441Z esxi1.esxlab.com Rhttpproxy: verbose rhttpproxy[2099567] "
        "[Originator@6876 sub=Proxy Req 07995] Resolved endpoint",
        Envelope(1576415296.441, "esxi1.esxlab.com", "Rhttpproxy", "",
                 "verbose rhttpproxy[2099567] [Originator@6876 sub=Proxy Req 07995] Resolved endpoint", "", 167),
    ),
    (  # collector-stored, PRI stripped
        "2016-09-14T14:14:25.234Z contosa.vm.esxi1 vmkernel: cpu0:33011)WARNING: IOMMUIntel: 2777: IOMMU",
        Envelope(1473862465.234, "contosa.vm.esxi1", "vmkernel", "", "cpu0:33011)WARNING: IOMMUIntel: 2777: IOMMU",
                 "", -1),
    ),
    (  # ESXi 8 on-disk dfwpktlogs (Broadcom KB 431735): no host
        "2026-03-03T00:02:11.678Z No(13) FIREWALL-PKTLOG[1069031]: 8b4a1980 INET match PASS 25577 OUT 84 ICMP "
        "192.168.72.10->192.168.72.17",
        Envelope(1772496131.678, "", "FIREWALL-PKTLOG", "1069031",
                 "8b4a1980 INET match PASS 25577 OUT 84 ICMP 192.168.72.10->192.168.72.17", "", 13),
    ),
    (  # KB placeholder date: splits, ts unknown
        "2025-MM-DDThh:mm:ss.810Z In(182) vmkernel: cpu0:2098001)Jumpstart plugin swapobjd activated.",
        Envelope(None, "", "vmkernel", "", "cpu0:2098001)Jumpstart plugin swapobjd activated.", "", 182),
    ),
    (  # NSX-T gateway firewall, RFC 5424 with SD
        '<181>1 2020-09-21T22:14:12.080427+00:00 lur-svc.nsxedge-ob-16404613-1-gdefw NSX 2802 FIREWALL '
        '[nsx@6876 comp="nsx-edge" subcomp="datapathd.firewallpkt" level="INFO"] <1 55f1af2f487544e9:b0e059132ad7753d> '
        'INET reason-match PASS 1005 OUT 60 TCP 1.1.1.10/45120->91.189.92.38/443 S',
        Envelope(1600726452.080427, "lur-svc.nsxedge-ob-16404613-1-gdefw", "NSX", "2802",
                 "<1 55f1af2f487544e9:b0e059132ad7753d> INET reason-match PASS 1005 OUT 60 TCP "
                 "1.1.1.10/45120->91.189.92.38/443 S",
                 '[nsx@6876 comp="nsx-edge" subcomp="datapathd.firewallpkt" level="INFO"]', 181),
    ),
    (  # relay-prefixed (shape from a Splunk TA README): the inner ESXi header wins
        "Jan 1 12:34:56 10.100.101.102 2023-01-02T12:34:56.789Z esxihostname Hostd: info hostd[A1B2C3] x",
        Envelope(1672662896.789, "esxihostname", "Hostd", "", "info hostd[A1B2C3] x", "", -1),
    ),
    (  # BSD timestamp without a year
        "<144>Jan 27 16:42:13 host dfwpktlogs: 1234 INET match PASS domain-c7/1001 IN 60 TCP "
        "10.33.24.50/45926->10.33.24.9/8140 S",
        Envelope(None, "host", "dfwpktlogs", "",
                 "1234 INET match PASS domain-c7/1001 IN 60 TCP 10.33.24.50/45926->10.33.24.9/8140 S", "", 144),
    ),
]


@pytest.mark.parametrize("line,expected", CASES)
def test_verbatim_lines(line, expected):
    got = parse_envelope(line)
    assert got is not None
    assert got.host == expected.host
    assert got.program == expected.program
    assert got.pid == expected.pid
    assert got.message == expected.message
    assert got.structured_data == expected.structured_data
    assert got.pri == expected.pri
    if expected.ts is None:
        assert got.ts is None
    else:
        assert got.ts == pytest.approx(expected.ts, abs=1e-6)


def test_bsd_year_resolved_when_given():
    env = parse_envelope("<144>Jan 27 16:42:13 host dfwpktlogs: x", default_year=2024)
    assert env.ts == 1706373733.0  # 2024-01-27T16:42:13Z


@pytest.mark.parametrize(
    "line",
    [
        # on-disk ESXi 7 and raw NSX bodies carry no envelope
        "2021-01-20T02:53:41.868Z info hostd[2099213] [Originator@6876 sub=Hostsvc.HostTpmManager] Creating",
        "2018-07-03T19:44:09.749Z b6507827 INET match PASS mainrs/1024 IN 52 TCP 192.168.4.3/49627->192.168.4.4/49153 SEW",
        "2025-MM-DDThh:mm:ss.630Z cpu0:262792)Jumpstart plugin swapobjd activated.",
        "",
        "\x00\x01\x02garbage",
        "<14>1 2021-09-06T14:40:13Z vcenter vpxd 1 - nosd message",  # SD must be "-" or [..]
        "x" * (2 << 20),
    ],
)
def test_not_an_envelope(line):
    assert parse_envelope(line) is None


def test_rfc3339_offsets_and_bad_dates():
    assert parse_rfc3339("2021-09-06T16:40:13+02:00") == 1630939213.0
    assert parse_rfc3339("2021-09-06T14:40:13") == 1630939213.0
    assert parse_rfc3339("2021-02-30T00:00:00Z") is None
    assert parse_rfc3339("yesterday") is None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_random_text_never_raises(text):
    result = parse_envelope(text)
    assert result is None or isinstance(result, Envelope)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([c[0] for c in CASES]), st.integers(0, 400), st.text(max_size=20))
def test_mutated_lines_never_raise(line, position, insert):
    mutated = line[:position] + insert + line[position + len(insert):]
    result = parse_envelope(mutated)
    assert result is None or isinstance(result, Envelope)
