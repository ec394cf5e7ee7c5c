"""Rules as data: which rules are evidence (what may back an alert), checked like every rule field."""
from __future__ import annotations

import numpy as np
import pytest

from esxi_anomaly.detect import rules as R

COLS = ["x", "y"]


def test_default_rules_declare_their_evidence_kind():
    kinds = {r["id"]: r.get("evidence") for r in R.default_rules()}
    assert kinds == {"repeated_derivation": "dns_calculation", "keyed_derivation": "dns_calculation",
                     "apt12_formula_new_port": "dns_calculation", "port_derived_from_client_answer": "dns_calculation",
                     "formula_on_known_port": "dns_calculation",
                     "ip_derived_from_answer": "dns_calculation", "unexpected_mgmt_egress": "mgmt_plane",
                     "new_high_port_after_dns": None}   # weak: moves the score, never backs an alert


def test_unknown_evidence_kind_is_refused_naming_the_rule_and_the_kinds():
    rule = {"id": "a", "weight": 0.5, "when": [["x", ">", 1]], "evidence": "hunch"}
    with pytest.raises(R.RuleError, match=r"rule a: evidence 'hunch' is not one of dns_calculation, mgmt_plane"):
        R.validate_rules([rule], COLS)
    for fine in ("dns_calculation", "mgmt_plane", "", None):
        R.validate_rules([{**rule, "evidence": fine}], COLS)
    R.validate_rules([{k: v for k, v in rule.items() if k != "evidence"}], COLS)


def test_overrides_set_or_clear_the_evidence_kind():
    rules = R.apply_overrides(R.default_rules(), {"new_high_port_after_dns": {"evidence": "dns_calculation"},
                                                  "unexpected_mgmt_egress": {"evidence": ""},
                                                  "mine": {"weight": 0.4, "when": [["x", ">", 1]], "evidence": "bad"}})
    mask = dict(zip([r["id"] for r in rules], R.evidence_mask(rules)))
    assert mask["new_high_port_after_dns"] and not mask["unexpected_mgmt_egress"] and mask["repeated_derivation"]
    with pytest.raises(R.RuleError, match="rule mine: evidence 'bad'"):
        R.validate_rules(rules, [c for r in rules for c, _, _ in r["when"]])


def test_evidence_mask_per_rule():
    rules = [{"id": "a", "evidence": "mgmt_plane"}, {"id": "b"}, {"id": "c", "evidence": ""},
             {"id": "d", "evidence": "dns_calculation"}]
    assert R.evidence_mask(rules).tolist() == [True, False, False, True]
    assert R.evidence_mask([]).shape == (0,) and R.evidence_mask([]).dtype == np.bool_
