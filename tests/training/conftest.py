"""The estate the training tests fit on: three days of the default scenario, split at its attack day."""
from __future__ import annotations

import pytest

from esxi_anomaly.schema import Frames


@pytest.fixture(scope="session")
def estate():
    """(history, today): the days before the attack day, and the attack day with the hour of DNS before it."""
    from esxi_anomaly.synth import generate

    ds = generate(days=3, seed=2, scenario="default", attack_days=1, scale=0.05)
    c, d = ds.connections, ds.dns_answers
    history = Frames(c[c["ts"] < ds.train_end], d[d["ts"] < ds.train_end], ds.inventory)
    today = Frames(c[c["ts"] >= ds.train_end], d[d["ts"] >= ds.train_end - 3700], ds.inventory)
    return history, today
