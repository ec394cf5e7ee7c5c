"""ESXi context events appear in the explanations of the same host's later connections."""
from __future__ import annotations

import pandas as pd

from esxi_anomaly import schema
from esxi_anomaly.detect.explain import context_clauses


def test_notable_event_of_the_same_host_within_a_day_is_cited():
    context = schema.conform(pd.DataFrame({
        "ts": [1000.0, 5000.0, 9000.0], "host": ["ESX-01", "esx-02", "esx-01"],
        "program": ["vobd", "shell", "hostd"],
        "event": ["syslog_remote_failure", "ssh_enabled", "other"], "message": ["", "", ""]}), "context")
    rows = pd.DataFrame({"ts": [8200.0, 900.0, 6000.0, 200_000.0], "src_name": ["esx-01", "esx-01", "vm-web-01", "esx-01"],
                         "esxi_host": ["esx-01", "esx-01", "esx-02", "esx-01"]})
    out = context_clauses(rows, context)
    assert out.tolist() == ["; esx-01: syslog_remote_failure 2.0 h earlier", "",
                            "; esx-02: ssh_enabled 0.3 h earlier", ""]
    assert context_clauses(rows, None).tolist() == ["", "", "", ""]
