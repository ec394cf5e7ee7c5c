"""Shared fixtures: the real samples folder (skipped with a reason where absent)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = Path(os.environ.get("ESXI_ANOMALY_SAMPLES", ROOT.parent / "shared" / "samples"))


@pytest.fixture(scope="session")
def samples() -> Path:
    if not SAMPLES.is_dir():
        pytest.skip(f"real samples folder {SAMPLES} is absent (set ESXI_ANOMALY_SAMPLES to use another)")
    return SAMPLES


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return ROOT / "tests" / "fixtures"


@pytest.fixture(scope="session")
def small_day(tmp_path_factory):
    """A small generated estate: a model fitted on its first day, its second day written as Zeek
    logs (with the hour of DNS before it) -- the input of the scoring-engine tests."""
    import dataclasses

    from esxi_anomaly.model import DnsCalcDetector
    from esxi_anomaly.schema import Frames
    from esxi_anomaly.synth import generate, write_zeek

    ds = generate(days=2, seed=5, scenario="default", attack_days=1, scale=0.05)
    c, d = ds.connections, ds.dns_answers
    history = Frames(c[c["ts"] < ds.train_end], d[d["ts"] < ds.train_end], ds.inventory)
    model = DnsCalcDetector(random_state=5, n_estimators=50).fit(history)
    today = dataclasses.replace(ds, connections=c[c["ts"] >= ds.train_end],
                                dns_answers=d[d["ts"] >= ds.train_end - 4000])
    folder = tmp_path_factory.mktemp("today")
    write_zeek(today, folder)
    return model, folder
