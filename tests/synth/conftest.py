"""Shared small generated estates (session-scoped: each costs about a second)."""
from __future__ import annotations

import pytest

from esxi_anomaly.synth import ATTACK_FAMILIES, generate

ALL_FAMILIES = sorted(ATTACK_FAMILIES)


@pytest.fixture(scope="session")
def small_ds():
    """2 days of the small estate; day 2 carries one campaign of every attack family."""
    return generate(days=2, seed=3, scenario="small", families=ALL_FAMILIES)


@pytest.fixture(scope="session")
def benign_ds():
    """The same estate without attacks (for injection tests)."""
    return generate(days=2, seed=3, scenario="small", families=[])
