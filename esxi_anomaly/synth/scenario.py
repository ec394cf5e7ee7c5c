"""Scenario definitions: the estate's size and shape, loaded from TOML.

Built-in scenarios ship inside the package (`esxi_anomaly/synth/scenarios/*.toml`); a path to
a TOML file with the same keys defines a custom one.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path

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
    extra: dict = field(default_factory=dict)


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
        raise ValueError(f"unknown scenario {name_or_path!r}: not one of {builtin_scenarios()} nor a TOML file")
    raw = tomllib.loads(text)
    vms = {role: int(raw.get("vms", {}).get(role, 0)) for role in ROLES}
    unknown = set(raw.get("vms", {})) - set(ROLES)
    if unknown:
        raise ValueError(f"scenario {name_or_path!r}: unknown VM roles {sorted(unknown)}; known: {ROLES}")
    start = datetime.fromisoformat(str(raw.get("start", "2024-03-04T00:00:00Z")).replace("Z", "+00:00"))
    known = {"name", "description", "domain", "start", "esxi_hosts", "vms", "volume", "browse_sites",
             "default_families", "campaigns_per_family"}
    return Scenario(
        name=str(raw.get("name", Path(str(name_or_path)).stem)),
        description=str(raw.get("description", "")),
        domain=str(raw.get("domain", "corp.example")),
        start=start.timestamp(),
        esxi_hosts=int(raw.get("esxi_hosts", 4)),
        vms=vms,
        volume=float(raw.get("volume", 1.0)),
        browse_sites=int(raw.get("browse_sites", 300)),
        default_families=tuple(raw.get("default_families", ())),
        campaigns_per_family=int(raw.get("campaigns_per_family", 2)),
        extra={k: v for k, v in raw.items() if k not in known},
    )
