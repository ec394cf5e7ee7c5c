"""A small ranked frame, shaped like `esxi-anomaly score` output, with attacker-controlled text in it."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

T0 = 1_795_000_000.0  # 2026-11-18T11:06:40Z

XSS_QUERY = "<script>window.__pwned=1</script>.evil.example"


def make_ranked() -> pd.DataFrame:
    rows = [
        # rank, score, event_id, dt, src_ip, src_name, src_kind, esxi_host, dst_ip, dst_port, process,
        # query, answer, rtype, dns_delay, transform, rules, forest, rule, explanation, top_features, family
        (1, 0.97, "CxA1", 10.0, "10.0.1.5", "vm-web-03", "vm", "esx01", "19.57.34.8", 1117, "",
         '=HYPERLINK("http://x")', "19.57.34.8", "A", 2.1, "apt12_a*b+c", "R_APT12;R_REPEAT", 0.88, 1.0,
         "port 1117 = 19*57+34 (APT12 a*b+c) from A 19.57.34.8", "port_rarity=+0.31; dns_match_significance=+0.22",
         "apt12"),
        (2, 0.91, "CxA2", 70.0, "10.0.1.5", "vm-web-03", "vm", "esx01", "19.57.34.9", 1118, "",
         XSS_QUERY, "19.57.34.9", "A", 1.5, "apt12_a*b+c", "R_APT12", 0.80, 0.9,
         "</script><img src=x onerror=\"window.__pwned=2\">", "port_rarity=+0.29", "apt12"),
        (3, 0.64, "CxB1", 30.0, "10.0.0.21", "esx01-vmk0", "esxi_mgmt", "esx01", "203.0.113.7", 4443, "hostd",
         "+cmd", "203.0.113.7", "A", np.nan, "", "R_MGMT_EGRESS", 0.55, 0.7,
         "unexpected management egress", "mgmt_unexpected=+0.40", "mgmt_c2"),
        (4, 0.40, "CxC1", 50.0, "10.0.2.9", "vm-db-01", "vm", "esx02", "10.0.0.53", 53, "",
         "-2+3", "10.0.0.53", "A", 0.2, "", "", 0.40, 0.0, "", "", "benign"),
        (5, 0.12, "CxC2", 90.0, "10.0.2.9", "vm-db-01", "vm", "esx02", "10.0.0.80", 443, "",
         "@SUM(1)", "", "", np.nan, "", "", 0.12, 0.0, "", "", "benign"),
    ]
    columns = ["rank", "score", "event_id", "dt", "src_ip", "src_name", "src_kind", "esxi_host", "dst_ip",
               "dst_port", "process", "query", "answer", "rtype", "dns_delay", "transform", "rules",
               "forest_score", "rule_score", "explanation", "top_features", "family"]
    frame = pd.DataFrame(rows, columns=columns)
    frame.insert(3, "ts", T0 + frame.pop("dt"))
    frame.insert(5, "src_port", np.array([50001, 50002, -1, 40000, 40001], dtype="int32"))
    frame.insert(10, "proto", "tcp")
    frame["dst_port"] = frame["dst_port"].astype("int32")
    frame["port_delta"] = [-2.5, 0.0, -7.0, 3.25, -1e-9]  # extra numeric column with negatives
    frame["offset"] = np.array([-7, 0, 3, -1, 2], dtype="int64")
    for column in frame.columns:
        if frame[column].dtype == object:
            frame[column] = frame[column].astype("str")
    return frame


@pytest.fixture
def ranked() -> pd.DataFrame:
    return make_ranked()
