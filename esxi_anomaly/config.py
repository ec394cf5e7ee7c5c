"""Strict config files: unknown keys and wrong types are refused with the file, the key and the
expected type, before anything else is read. The training config (`training.config`) and the
generated estate's scenarios (`synth.scenario`) are read through here."""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from esxi_anomaly.console import EXIT_INPUT


class ConfigError(ValueError):
    """A config that cannot be used: the message names the file, the key and what was expected."""

    exit_code = EXIT_INPUT


class StrictModel(BaseModel):
    """A config table: unknown keys refused, no type coercion, frozen."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def read_toml(path: str | Path) -> dict:
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc})") from None


def parse(model: type[BaseModel], data: Any, source: str = "config"):
    """`data` validated as `model`; ConfigError naming `source`, each bad key and what it expects."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("; ".join(f"{source}: {describe(e, model)}" for e in exc.errors())) from None


# -- messages ----------------------------------------------------------------------------------

_EXPECTED = {"int_type": "an integer", "float_type": "a number", "string_type": "a string",
             "bool_type": "true or false", "list_type": "a list", "dict_type": "a table", "model_type": "a table"}


def _known_keys(loc: tuple, root: type[BaseModel]) -> list[str]:
    """The keys allowed in the table at `loc` (for an unknown-key message), when it is a model's."""
    cls: Any = root
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        args = getattr(field.annotation, "__args__", ())
        cls = next((a for a in (field.annotation, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if cls is None:
            return []
    return list(cls.model_fields)


def describe(error: dict, root: type[BaseModel]) -> str:
    """One pydantic error as `[table] key: expected ..., got ...`."""
    loc = tuple(error["loc"])
    names = [i for i, part in enumerate(loc) if isinstance(part, str)]
    last = names[-1] if names else len(loc)
    table = "".join(f".{p}" if isinstance(p, str) else f"[{p}]" for p in loc[:last]).lstrip(".")
    key = "".join([str(loc[last]) if names else ""] + [f"[{p}]" for p in loc[last + 1:]])
    kind, got = error["type"], error.get("input")
    if kind == "extra_forbidden":
        known = _known_keys(loc[:last], root)
        what = f"unknown key; known: {', '.join(known)}" if known else "unknown key"
    elif kind in _EXPECTED:
        what = f"expected {_EXPECTED[kind]}, got {got!r}"
    elif kind in ("too_short", "too_long"):
        ctx = error["ctx"]
        bound = f"at least {ctx['min_length']}" if kind == "too_short" else f"at most {ctx['max_length']}"
        what = f"expected {bound} items, got {ctx['actual_length']}"
    elif error["msg"].startswith("Input should be"):
        what = f"expected{error['msg'][len('Input should be'):]}, got {got!r}"
    else:
        what = error["msg"]
    if kind == "spec":   # a table's own check: its message starts with the key it is about
        return f"[{table + ('.' if table and key else '') + key}] {what}" if table or key else what
    return f"[{table}] {key}: {what}" if table else f"{key}: {what}"
