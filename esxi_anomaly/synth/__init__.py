"""Synthetic vSphere estate: benign traffic, benign look-alikes and DNS-calculation attack families.

    from esxi_anomaly.synth import generate, write_zeek, inject_attacks, ATTACK_FAMILIES
    ds = generate(days=4, seed=7)                 # 3 benign days + 1 attack day
    write_zeek(ds, "out/")                        # conn.log, dns.log, inventory.csv, labels.csv
"""
from esxi_anomaly.synth.attacks import ATTACK_FAMILIES, AttackFamily, inject_attacks
from esxi_anomaly.synth.dataset import SynthDataset, generate
from esxi_anomaly.synth.estate import LOOKALIKE_KINDS
from esxi_anomaly.synth.scenario import builtin_scenarios, load_scenario
from esxi_anomaly.synth.zeek_writer import write_zeek

__all__ = ["ATTACK_FAMILIES", "AttackFamily", "LOOKALIKE_KINDS", "SynthDataset", "builtin_scenarios", "generate",
           "inject_attacks", "load_scenario", "write_zeek"]
