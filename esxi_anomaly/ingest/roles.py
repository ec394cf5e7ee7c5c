"""Role (peer-group) assignment for inventory rows, from TOML rules; shared by every inventory reader.

Rules match on vSphere folder, tag, or a name regex (optionally restricted to a kind); the first
rule that matches wins; a row that no rule matches gets its kind as role; a role already in the
input (the canonical CSV's role column) is kept. The default rules ship as package data
(`esxi_anomaly/data/inventory_roles.toml`, which documents the rule keys).

    inv = assign_roles(inv)                                   # default rules
    inv = assign_roles(inv, "site_roles.toml", extra=[{"role": "c2-lab", "tag": "Lab/Malware"}])
"""
from __future__ import annotations

import importlib.resources
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

DEFAULT_RULES = "inventory_roles.toml"
RULE_KEYS = {"role", "folder", "tag", "name_regex", "kind"}
TAG_SEPARATORS = r"[,;|]"


class RoleRulesError(ValueError):
    """A rules file or rule is invalid; the message names the rule and the problem."""


@dataclass(frozen=True)
class RoleRule:
    role: str
    folder: str = ""             # path segments, normalised: "infra/dns"
    tag: str = ""                # case-folded
    name_regex: re.Pattern | None = None
    kind: str = ""


def _rule(spec: dict, where: str) -> RoleRule:
    if not isinstance(spec, dict):
        raise RoleRulesError(f"{where}: a rule must be a table, not {type(spec).__name__}")
    unknown = set(spec) - RULE_KEYS
    if unknown:
        raise RoleRulesError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(RULE_KEYS)}")
    role = spec.get("role")
    if not isinstance(role, str) or not role.strip():
        raise RoleRulesError(f"{where}: 'role' must be a non-empty string")
    if not set(spec) & {"folder", "tag", "name_regex", "kind"}:
        raise RoleRulesError(f"{where}: a rule needs at least one of folder, tag, name_regex, kind")
    for key in ("folder", "tag", "name_regex", "kind"):
        if key in spec and not isinstance(spec[key], str):
            raise RoleRulesError(f"{where}: {key!r} must be a string")
    try:
        regex = re.compile(spec["name_regex"]) if "name_regex" in spec else None
    except re.error as exc:
        raise RoleRulesError(f"{where}: name_regex does not compile: {exc}") from None
    return RoleRule(role.strip(), _folder(spec.get("folder", "")), spec.get("tag", "").strip().casefold(),
                    regex, spec.get("kind", "").strip())


def _folder(text: str) -> str:
    return "/".join(p for p in str(text).casefold().split("/") if p)


def load_rules(rules_path: str | Path | None = None) -> list[RoleRule]:
    """The rules of a TOML file (`[[rule]]` tables); the packaged defaults when no path is given."""
    try:
        if rules_path is None:
            text = importlib.resources.files("esxi_anomaly").joinpath("data", DEFAULT_RULES).read_text("utf-8")
            where = f"package data {DEFAULT_RULES}"
        else:
            text = Path(rules_path).read_text("utf-8")
            where = str(rules_path)
        data = tomllib.loads(text)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RoleRulesError(f"{rules_path or DEFAULT_RULES}: cannot load role rules ({exc})") from None
    specs = data.get("rule", [])
    if not isinstance(specs, list):
        raise RoleRulesError(f"{where}: 'rule' must be an array of tables ([[rule]])")
    return [_rule(spec, f"{where} rule #{i + 1}") for i, spec in enumerate(specs)]


def assign_roles(inventory_df: pd.DataFrame, rules_path: str | Path | None = None,
                 extra: list[dict | RoleRule] | None = None) -> pd.DataFrame:
    """A copy of `inventory_df` whose empty `role` values are filled by the rules.

    Uses the columns name and kind, and optionally folder and tags (tags separated by , ; or |)
    when present. `extra` rules are tried before those of the file.
    """
    rules = [r if isinstance(r, RoleRule) else _rule(r, f"extra rule #{i + 1}") for i, r in enumerate(extra or [])]
    rules += load_rules(rules_path)
    df = inventory_df.copy()
    n = len(df)

    def text(col: str) -> pd.Series:
        if col in df.columns:
            return df[col].fillna("").astype("str")
        return pd.Series([""] * n, index=df.index, dtype="str")

    names, kinds = text("name"), text("kind")
    role = text("role").str.strip()
    folders = "/" + text("folder").str.casefold().str.strip("/") + "/"
    tag_lists = text("tags").str.casefold().str.split(TAG_SEPARATORS, regex=True)
    open_rows = role == ""
    for rule in rules:
        if not open_rows.any():
            break
        match = open_rows.copy()
        if rule.kind:
            match &= kinds == rule.kind
        if rule.folder:
            match &= folders.str.contains(f"/{rule.folder}/", regex=False)
        if rule.tag:
            match &= tag_lists.map(lambda tags, t=rule.tag: t in {x.strip() for x in tags}).astype(bool)
        if rule.name_regex is not None:
            match &= names.map(lambda name, rx=rule.name_regex: rx.search(name) is not None).astype(bool)
        role = role.mask(match, rule.role)
        open_rows &= ~match
    df["role"] = role.mask(role == "", kinds)
    return df
