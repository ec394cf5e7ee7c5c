"""Rules as data: conditions over named features, a weight, and an explanation template.

The default rules ship in `esxi_anomaly/data/rules.toml`; environments override them by id.
Conditions are (feature, operator, value) triples evaluated with numpy, never `eval`.
A rule's `evidence` names the kind of evidence it is (`EVIDENCE_KINDS`); a row is an alert only when
such a rule fired (`ensemble`). Rules without it (weak signals) only move the score.
"""
from __future__ import annotations

import copy
import operator
import tomllib
from importlib import resources

import numpy as np
import pandas as pd

OPERATORS = {"==": operator.eq, "!=": operator.ne, ">": operator.gt, ">=": operator.ge,
             "<": operator.lt, "<=": operator.le}


# what may back an alert: a DNS-calculation (the port or address derived from an answer the source
# got, beyond chance) or an ESXi management-plane violation
EVIDENCE_KINDS = ("dns_calculation", "mgmt_plane")


class RuleError(ValueError):
    pass


def default_rules() -> list[dict]:
    text = resources.files("esxi_anomaly").joinpath("data/rules.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)["rule"]


def apply_overrides(rules: list[dict], overrides: dict | None) -> list[dict]:
    """Override rules by id ({id: {weight, enabled, when, explain, evidence}}); unknown ids add new rules."""
    rules = copy.deepcopy(rules)
    by_id = {r["id"]: r for r in rules}
    for rid, change in (overrides or {}).items():
        if rid in by_id:
            by_id[rid].update(change)
        else:
            rules.append({"id": rid, **change})
    return [r for r in rules if r.get("enabled", True)]


def validate_rules(rules: list[dict], features: list[str]) -> None:
    seen = set()
    for r in rules:
        rid = r.get("id")
        if not rid or rid in seen:
            raise RuleError(f"rule without id or duplicated id: {rid!r}")
        seen.add(rid)
        if not 0.0 <= float(r.get("weight", -1)) <= 1.0:
            raise RuleError(f"rule {rid}: weight must be in [0, 1]")
        for cond in r.get("when", []):
            if len(cond) != 3 or cond[1] not in OPERATORS:
                raise RuleError(f"rule {rid}: condition {cond!r} is not [feature, operator, value]")
            if cond[0] not in features:
                raise RuleError(f"rule {rid}: unknown feature {cond[0]!r}")
        if not r.get("when"):
            raise RuleError(f"rule {rid}: no conditions")
        if r.get("evidence") not in (None, "", *EVIDENCE_KINDS):
            raise RuleError(f"rule {rid}: evidence {r['evidence']!r} is not one of {', '.join(EVIDENCE_KINDS)} "
                            "(leave it out, or \"\" in an override, for a rule that is not evidence)")


def evaluate(rules: list[dict], X: pd.DataFrame) -> np.ndarray:
    """Boolean matrix (rows x rules): which rules fired."""
    fired = np.ones((len(X), len(rules)), dtype=bool)
    for k, r in enumerate(rules):
        for feature, op, value in r["when"]:
            fired[:, k] &= OPERATORS[op](X[feature].to_numpy(), float(value))
    return fired


def evidence_mask(rules: list[dict]) -> np.ndarray:
    """Per rule, whether it is evidence (any of `EVIDENCE_KINDS`)."""
    return np.array([r.get("evidence") in EVIDENCE_KINDS for r in rules], dtype=bool)


def rule_score(rules: list[dict], fired: np.ndarray) -> np.ndarray:
    """Noisy-OR of the weights of the rules that fired, in [0, 1]."""
    w = np.array([float(r["weight"]) for r in rules])
    return 1.0 - np.prod(np.where(fired, 1.0 - w, 1.0), axis=1) if len(rules) else np.zeros(len(fired))
