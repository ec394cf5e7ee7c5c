"""Per-entity baselines: exact novelty flags, smoothing towards the role, estimator contract."""
from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
from sklearn.base import clone

from esxi_anomaly.features.baseline import BASELINE_FEATURES, EntityBaseline


def history():
    rows = []
    for i in range(100):
        rows.append(("vm-web-01", "web", "93.184.216.34", 443, "example.com", 3600.0 * 9 + i, 1000.0, 1.0))
    for i in range(50):
        rows.append(("vm-web-02", "web", "93.184.216.34", 443, "example.com", 3600.0 * 10 + i, 1200.0, 1.2))
    rows.append(("vm-web-02", "web", "10.0.0.9", 8443, "corp.local", 3600.0 * 10, 500.0, 0.5))
    return pd.DataFrame(rows, columns=["entity", "role", "dst_ip", "dst_port", "domain", "ts", "bytes_out", "duration"]).assign(proto="tcp")


def probe(*rows):
    return pd.DataFrame(list(rows), columns=["entity", "role", "dst_ip", "dst_port", "domain", "ts", "bytes_out", "duration"]).assign(proto="tcp")


def test_novelty_flags_exact():
    b = EntityBaseline().fit(history())
    out = b.transform(probe(
        ("vm-web-01", "web", "93.184.216.34", 443, "example.com", 3600.0 * 9, 1000.0, 1.0),   # usual
        ("vm-web-01", "web", "93.184.216.34", 1117, "example.com", 3600.0 * 9, 1000.0, 1.0),  # new port
        ("vm-web-01", "web", "10.0.0.9", 8443, "corp.local", 3600.0 * 9, 1000.0, 1.0),       # role saw it, entity not
        ("vm-new-09", "web", "10.0.0.9", 8443, "corp.local", 3600.0 * 9, 1000.0, 1.0),       # new entity: role fallback
        ("vm-new-09", "web", "19.57.34.8", 1117, "evil.net", 3600.0 * 3, 9e6, 100.0),         # new for the role too
    ))
    assert list(out.columns) == BASELINE_FEATURES
    assert out["port_never_seen"].tolist() == [0, 1, 1, 0, 1]
    assert out["dst_never_seen"].tolist() == [0, 0, 1, 0, 1]
    assert out["dstport_never_seen"].tolist() == [0, 1, 1, 0, 1]
    assert out["domain_never_seen"].tolist() == [0, 0, 1, 0, 1]
    assert out["entity_known"].tolist() == [1, 1, 1, 0, 0]
    r = out["port_rarity"].to_numpy()
    assert r[0] < r[2] < r[1]          # seen by the role is less rare than never seen anywhere
    assert r[3] < r[4]
    assert out["port_prevalence"].tolist()[:2] == [1.0, 0.0]  # both entities used 443
    assert out["bytes_out_z"].iloc[4] > 5 and out["duration_z"].iloc[4] > 5
    assert out["hour_rarity"].iloc[4] > out["hour_rarity"].iloc[0]


def test_estimator_contract():
    b = EntityBaseline(alpha=2.0)
    assert clone(b).get_params() == {"alpha": 2.0}
    fitted = b.fit(history())
    assert fitted is b and hasattr(b, "entity_totals_")
    again = pickle.loads(pickle.dumps(b))
    x = probe(("vm-web-01", "web", "93.184.216.34", 1117, "example.com", 1.0, 1.0, 1.0))
    pd.testing.assert_frame_equal(again.transform(x), b.transform(x))


def test_missing_column_is_named():
    import pytest

    with pytest.raises(ValueError, match="domain"):
        EntityBaseline().fit(history().drop(columns=["domain"]))


def test_connection_rate_z_counts_the_trailing_five_minutes_per_entity():
    b = EntityBaseline().fit(history())
    # vm-web-01's history: 100 connections one second apart, so trailing counts 1..100
    hist = np.log1p(np.arange(1, 101))
    centre = np.median(hist)
    scale = max(np.median(np.abs(hist - centre)), 0.25)
    burst = [("vm-web-01", "web", "93.184.216.34", 443, "example.com", 3600.0 * 9 + i * 0.1, 1000.0, 1.0)
             for i in range(200)]
    z = b.transform(probe(*burst))["conn_rate_z"].to_numpy()
    expected = (np.log1p(np.arange(1, 201)) - centre) / (1.4826 * scale)
    np.testing.assert_allclose(z, expected, rtol=1e-12)
    # given counts take precedence over counting within X (the pipeline counts across batches)
    given = b.transform(probe(*burst[:2]).assign(conn_rate=[1.0, 1.0]))
    assert given["conn_rate_z"].iloc[0] == given["conn_rate_z"].iloc[1] == expected[0]
