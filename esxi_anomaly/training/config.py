"""The training config of one environment (`training/<env>.toml`): strict, validated, frozen.

Every key is checked when the file is read, before any log is read: an unknown key or a value of the
wrong type is refused with the file, the key and the expected type (`ConfigError`, exit 4), not
found an hour into tuning. The tuning search space is part of the config (`[tuning.search_space]`);
without it, the space below is tuned, as before it was configurable.

A config is frozen: code that needs another one (the CLI's overrides, tuned parameters) gets a
validated copy from `replace`, so a caller's config never changes under it.
"""
from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import (Field, PlainValidator, create_model, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from esxi_anomaly.config import ConfigError, StrictModel, parse, read_toml
from esxi_anomaly.features.scope import Scope
from esxi_anomaly.model import DnsCalcDetector
from esxi_anomaly.registry import check_env_name

DETECTOR_DEFAULTS = DnsCalcDetector().get_params()
# parameters tuning may search: the numeric ones, except the seed and the forest's training rows
# (each trial sets its own, `tune.TRIAL_FOREST_ROWS`)
TUNABLE = tuple(name for name in inspect.signature(DnsCalcDetector).parameters
                if type(DETECTOR_DEFAULTS[name]) in (int, float) and name not in ("random_state", "max_forest_rows"))


def _number(value: Any) -> Any:
    """An int or float, kept as written: a bundle's manifest records the config as it was given."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PydanticCustomError("float_type", "Input should be a valid number")
    return value


Number = Annotated[Any, PlainValidator(_number)]


# -- the search space --------------------------------------------------------------------------

class _Spec(StrictModel):
    """One tuned parameter: a range (`low`, `high`, optional `log` or `step`) or a list of `choices`."""

    log: bool = False

    @model_validator(mode="after")
    def _consistent(self):
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.step is not None or self.log:
                raise PydanticCustomError("spec", "choices: expected either choices or low/high, not both")
            if not self.choices:
                raise PydanticCustomError("spec", "choices: expected at least one value, got []")
            return self
        if self.low is None or self.high is None:
            raise PydanticCustomError("spec", "expected choices = [...] or both low and high")
        if self.low > self.high:
            raise PydanticCustomError("spec", f"low: expected at most high ({self.high}), got {self.low}")
        if self.log and self.low <= 0:
            raise PydanticCustomError("spec", f"low: expected above 0 with log = true, got {self.low}")
        if self.step is not None and self.step <= 0:
            raise PydanticCustomError("spec", f"step: expected above 0, got {self.step}")
        if self.step is not None and self.log:
            raise PydanticCustomError("spec", "step: expected no step with log = true (Optuna takes one or the other)")
        return self

    def spec(self) -> list | tuple:
        """As `optuna.Trial.suggest_*` takes it: a list of choices, or (low, high, keyword arguments)."""
        if self.choices is not None:
            return list(self.choices)
        extra = {"log": True} if self.log else {}
        if self.step is not None:
            extra["step"] = self.step
        return (self.low, self.high, extra)


class IntSpec(_Spec):
    low: int | None = None
    high: int | None = None
    step: int | None = None
    choices: list[int] | None = None


class FloatSpec(_Spec):
    low: float | None = None
    high: float | None = None
    step: float | None = None
    choices: list[float] | None = None


# one optional key per tunable detector parameter, of the parameter's type (an integer parameter takes
# integer bounds); the keys' order is the detector's, in which trials suggest them
SearchSpace = create_model(
    "SearchSpace", __base__=StrictModel,
    **{name: ((IntSpec if type(DETECTOR_DEFAULTS[name]) is int else FloatSpec) | None, None) for name in TUNABLE})

DEFAULT_SEARCH_SPACE = {
    # join parameters each cost one preparation of history and validation: keep their choices few
    "min_window_s": {"choices": [120.0, 300.0, 900.0]},
    "baseline_alpha": {"low": 0.5, "high": 20.0, "log": True},
    "forest_weight": {"low": 0.2, "high": 0.9},
    "forest_floor": {"low": 0.8, "high": 0.995},
    "n_estimators": {"low": 50, "high": 300, "step": 50},
    "max_samples": {"choices": [128, 256, 512]},
}


class TuningConfig(StrictModel):
    search_space: SearchSpace = Field(default_factory=lambda: SearchSpace.model_validate(DEFAULT_SEARCH_SPACE))

    def space(self) -> dict[str, list | tuple]:
        """Tuned parameter -> its spec (`_Spec.spec`), in the detector's parameter order."""
        return {name: spec.spec() for name, spec in self.search_space if spec is not None}


# -- the scope ---------------------------------------------------------------------------------

class ScopeConfig(StrictModel):
    """`[scope]`: which connections are trained on and, by default, scored (`features.scope.Scope`)."""

    local_nets: list[str] = []     # CIDRs of the monitored networks ([]: RFC 1918 and ULA)
    resolvers: list[str] = []      # the DNS resolvers' addresses, besides those the DNS answers name
    all_directions: bool = False   # keep every row: inbound, ICMP, multicast, lookups, ...

    @model_validator(mode="after")
    def _valid(self):
        try:
            self.scope()
        except ValueError as exc:
            raise PydanticCustomError("scope", str(exc)) from None
        return self

    def scope(self) -> Scope:
        return Scope(tuple(self.local_nets), tuple(self.resolvers), self.all_directions)


# -- the config --------------------------------------------------------------------------------

def _param_type(name: str, default: Any):
    if name == "random_state":
        return int | None
    if type(default) is int:
        return int
    if type(default) is float:
        return Number
    return Any   # rule_overrides, mgmt_allow: set from [rules] and mgmt_allow, accepted for old bundles


DetectorParams = create_model(
    "DetectorParams", __base__=StrictModel,
    **{name: (_param_type(name, default), None) for name, default in DETECTOR_DEFAULTS.items()})

MgmtAllowRow = Annotated[list[str | int], Field(min_length=6, max_length=6)]  # process, peer_class, proto,
#                                                                                port_from, port_to, ruleset

# the keys a bundle's manifest has always recorded; `tuning` joins them only when it is not the default
RECORDED = ("env", "seed", "model", "rules", "mgmt_allow", "trials", "holdout_fraction", "inject_families",
            "study_storage", "feedback_path", "labels_path")


class TrainConfig(StrictModel):
    """What a data scientist sets per environment (all optional)."""

    env: str = "default"
    seed: int = Field(0, ge=0)
    model: DetectorParams = Field(default_factory=DetectorParams)   # DnsCalcDetector params
    rules: dict[str, dict[str, Any]] = {}                           # rule overrides by id
    mgmt_allow: list[MgmtAllowRow] = []                             # extra allow-list rows
    trials: int = Field(0, ge=0)
    holdout_fraction: float = Field(0.25, gt=0.0, lt=1.0)
    inject_families: list[str] = ["apt12", "low16_mgmt", "xor_key", "offset_key"]
    study_storage: str = ""      # Optuna storage URL; "" -> sqlite under training/
    feedback_path: str = ""      # analyst verdicts (set from --models-dir/--env)
    labels_path: str = ""        # known labels of this history (CSV: event_id, label)
    tuning: TuningConfig = Field(default_factory=TuningConfig)
    scope: ScopeConfig = Field(default_factory=ScopeConfig)

    @field_validator("env")
    @classmethod
    def _env(cls, value: str) -> str:
        try:
            return check_env_name(value)
        except ValueError as exc:
            raise PydanticCustomError("env", str(exc)) from None

    @field_validator("inject_families")
    @classmethod
    def _families(cls, value: list[str]) -> list[str]:
        from esxi_anomaly.synth.attacks import ATTACK_FAMILIES

        unknown = [f for f in value if f not in ATTACK_FAMILIES]
        if unknown:
            raise PydanticCustomError("families", f"expected attack families of {sorted(ATTACK_FAMILIES)}, "
                                                  f"got {unknown}")
        return value

    @model_validator(mode="after")
    def _something_to_tune(self):
        if self.trials > 0 and not self.search_space():
            raise PydanticCustomError("spec", "[tuning] search_space: expected at least one parameter to tune "
                                              "with trials > 0")
        return self

    # -- reading ---------------------------------------------------------------------------------
    @classmethod
    def parse(cls, data: Any, source: str = "config") -> "TrainConfig":
        """A validated config from a mapping; ConfigError naming `source`, the key and the expected type."""
        return parse(cls, data, source)

    @classmethod
    def from_toml(cls, path: str | Path) -> "TrainConfig":
        return cls.parse(read_toml(path), str(path))

    @classmethod
    def from_manifest(cls, manifest: dict, source: str = "manifest.json") -> "TrainConfig":
        """The config a bundle was trained with (its manifest's `config`)."""
        recorded = manifest.get("config")
        if not isinstance(recorded, dict):
            raise ConfigError(f"{source}: no training config recorded; retrain with `esxi-anomaly train`")
        return cls.parse({k: v for k, v in recorded.items() if k in cls.model_fields}, f"{source}: config")

    def replace(self, **changes) -> "TrainConfig":
        """A validated copy with `changes`; this config is left as it is."""
        return self.parse({**self.model_dump(exclude_unset=True), **changes}, "config")

    # -- using -----------------------------------------------------------------------------------
    def detector_params(self) -> dict:
        """The [model] parameters as given (a dict of DnsCalcDetector parameters)."""
        return self.model.model_dump(exclude_unset=True)

    def search_space(self) -> dict[str, list | tuple]:
        return self.tuning.space()

    def record(self) -> dict:
        """The config as a bundle's manifest records it and `digest` hashes it; `tuning` only when it is
        not the default, so a default config gives the bytes and hash it always gave."""
        out = {name: getattr(self, name) for name in RECORDED}
        out["model"] = self.detector_params()
        out["mgmt_allow"] = [list(row) for row in self.mgmt_allow]
        if self.scope != ScopeConfig():   # only when set: a default config keeps its bytes and hash
            out["scope"] = self.scope.model_dump()
        if self.search_space() != TuningConfig().space():
            out["tuning"] = {"search_space": {name: spec.model_dump(exclude_defaults=True)
                                              for name, spec in self.tuning.search_space if spec is not None}}
        return out

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.record(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    def detector(self, **overrides) -> DnsCalcDetector:
        params = {"random_state": self.seed, **self.detector_params(), **overrides}
        params["rule_overrides"] = self.rules or None
        params["mgmt_allow"] = tuple(tuple(r) for r in self.mgmt_allow)
        return DnsCalcDetector(**params)
