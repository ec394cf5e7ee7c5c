"""Scenario definitions: the estate's size and shape, loaded from TOML.

Built-in scenarios ship inside the package (`esxi_anomaly/synth/scenarios/*.toml`); a path to
a TOML file with the same keys defines a custom one.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator

from esxi_anomaly.config import ConfigError, StrictModel, parse

ROLES = ("web", "app", "db", "vdi", "build", "file", "mon")


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    domain: str
    start: float                      # epoch seconds of the first generated day
    esxi_hosts: int
    vms: dict[str, int]               # role -> count
    volume: float = 1.0
    browse_sites: int = 300
    default_families: tuple[str, ...] = ()
    campaigns_per_family: int = 2


Count = Annotated[int, Field(ge=0)]


class VmCounts(StrictModel):
    """[vms]: role -> number of VMs (a role left out has none)."""

    web: Count = 0
    app: Count = 0
    db: Count = 0
    vdi: Count = 0
    build: Count = 0
    file: Count = 0
    mon: Count = 0


class ScenarioFile(StrictModel):
    """A scenario TOML file, as written: every key checked (unknown keys and wrong types refused)."""

    name: str = ""
    description: str = ""
    domain: str = "corp.example"
    start: str = "2024-03-04T00:00:00Z"
    esxi_hosts: Annotated[int, Field(ge=1)] = 4
    vms: VmCounts = VmCounts()
    volume: Annotated[float, Field(gt=0)] = 1.0
    browse_sites: Annotated[int, Field(ge=1)] = 300
    default_families: list[str] = []
    campaigns_per_family: Annotated[int, Field(ge=0)] = 2

    @field_validator("volume", mode="before")
    @classmethod
    def _whole_volume(cls, value):   # `volume = 1` is a number too (strict mode refuses an int for a float)
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("start")
    @classmethod
    def _iso_time(cls, value: str) -> str:
        try:
            datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"expected an ISO 8601 time such as 2024-03-04T00:00:00Z, got {value!r}") from None
        return value


def builtin_scenarios() -> list[str]:
    folder = resources.files("esxi_anomaly.synth.scenarios")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_scenario(name_or_path: str | Path) -> Scenario:
    """A built-in scenario by name ("default", "large", "small") or a TOML file by path."""
    text = None
    if str(name_or_path) in builtin_scenarios():
        text = resources.files("esxi_anomaly.synth.scenarios").joinpath(f"{name_or_path}.toml").read_text()
    elif Path(name_or_path).is_file():
        text = Path(name_or_path).read_text()
    else:
        raise ConfigError(f"unknown scenario {name_or_path!r}: not one of {builtin_scenarios()} nor a TOML file")
    source = str(name_or_path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML ({exc})") from None
    spec = parse(ScenarioFile, raw, source)
    start = datetime.fromisoformat(spec.start.replace("Z", "+00:00"))
    if start.tzinfo is None:   # a time without a zone is UTC, as every time in the tool
        start = start.replace(tzinfo=timezone.utc)
    return Scenario(
        name=spec.name or Path(source).stem,
        description=spec.description,
        domain=spec.domain,
        start=start.timestamp(),
        esxi_hosts=spec.esxi_hosts,
        vms={role: getattr(spec.vms, role) for role in ROLES},
        volume=spec.volume,
        browse_sites=spec.browse_sites,
        default_families=tuple(spec.default_families),
        campaigns_per_family=spec.campaigns_per_family,
    )
