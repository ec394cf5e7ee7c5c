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
