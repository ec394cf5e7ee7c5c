"""Management-plane allow-list: keyed on (process, peer class, proto, port), not on port alone."""
from __future__ import annotations

import pandas as pd

from esxi_anomaly import schema
from esxi_anomaly.features.entities import attach_entities
from esxi_anomaly.features.mgmt_plane import ManagementPlane

INV = schema.conform(pd.DataFrame([
    ("10.10.0.11", "esx-01", "esxi_mgmt", "esx-01", "esxi"),
    ("10.10.0.12", "esx-02", "esxi_mgmt", "esx-02", "esxi"),
    ("10.10.0.5", "vcsa", "vcenter", "", "vcenter"),
    ("10.10.0.2", "ntp-01", "infra", "", "ntp"),
    ("10.20.0.7", "vm-web-01", "vm", "esx-01", "web"),
], columns=["ip", "name", "kind", "esxi_host", "role"]), "inventory")


def test_expected_and_unexpected_management_egress():
    conns = schema.conform(pd.DataFrame([
        ("10.10.0.11", "10.10.0.5", 902, "udp", "vpxa"),   # heartbeat to vCenter
        ("10.10.0.11", "10.10.0.2", 123, "udp", ""),       # NTP
        ("10.10.0.11", "10.10.0.12", 8000, "tcp", ""),     # vMotion to a peer host
        ("10.10.0.11", "19.57.34.8", 1117, "tcp", ""),     # internet egress on a derived port
        ("10.10.0.11", "10.10.0.2", 902, "udp", ""),       # 902 but to the NTP server: not allowed
        ("10.20.0.7", "19.57.34.8", 1117, "tcp", ""),      # a VM: not management plane
    ], columns=["src_ip", "dst_ip", "dst_port", "proto", "process"]), "connections")
    m = ManagementPlane().fit(INV)
    out = m.transform(conns, attach_entities(conns, INV))
    assert out["mgmt_source"].tolist() == [1, 1, 1, 1, 1, 0]
    assert out["mgmt_expected"].tolist() == [1, 1, 1, 0, 0, 0]
    assert out["mgmt_unexpected_egress"].tolist() == [0, 0, 0, 1, 1, 0]


def test_environment_extension():
    conns = schema.conform(pd.DataFrame([("10.10.0.11", "10.10.0.2", 6514, "tcp", "")],
                                        columns=["src_ip", "dst_ip", "dst_port", "proto", "process"]), "connections")
    ent = attach_entities(conns, INV)
    assert ManagementPlane().fit(INV).transform(conns, ent)["mgmt_expected"].tolist() == [0]
    extra = (("*", "ntp", "tcp", 6514, 6514, "custom-syslog-tls"),)
    assert ManagementPlane(extra_allow=extra).fit(INV).transform(conns, ent)["mgmt_expected"].tolist() == [1]
