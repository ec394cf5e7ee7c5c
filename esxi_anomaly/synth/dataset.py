"""`generate`: a labelled synthetic vSphere estate (benign traffic, look-alikes, attack day)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from esxi_anomaly.synth._common import sort_by_ts
from esxi_anomaly.synth.attacks import inject_attacks_detailed, labels_frame
from esxi_anomaly.synth.engine import benign_traffic, to_frames
from esxi_anomaly.synth.estate import build_estate
from esxi_anomaly.synth.scenario import Scenario, load_scenario

DAY = 86400.0


def attack_seed(seed: int) -> int:
    """The `inject_attacks` seed `generate(seed=...)` uses (independent of the benign stream)."""
    return int(np.random.SeedSequence([seed, 2]).generate_state(1)[0])


@dataclass
class SynthDataset:
    """Canonical frames of a generated estate plus ground truth.

    `labels`: event_id, label ("attack" | "lookalike"), family (attack family id or look-alike kind),
    entity (source IP); connections absent from it are normal. Attacks only occur in
    [train_end, end). `campaigns`: one row per (attack campaign, victim) with the C2 query name.
    """

    connections: pd.DataFrame
    dns_answers: pd.DataFrame
    inventory: pd.DataFrame
    labels: pd.DataFrame
    start: float
    end: float
    train_end: float
    scenario: str = "default"
    seed: int = 0
    families: tuple[str, ...] = ()
    campaigns: pd.DataFrame = field(default_factory=pd.DataFrame)

    def summary(self) -> dict:
        lab = self.labels.groupby(["label", "family"]).size()
        return {"connections": len(self.connections), "dns_rows": len(self.dns_answers),
                "dns_responses": int(self.dns_answers["event_id"].nunique()), "inventory": len(self.inventory),
                "labels": {f"{a}/{b}": int(n) for (a, b), n in lab.items()}}


def generate(days: int = 4, seed: int = 7, scenario: str | Scenario = "default", attack_days: int = 1,
             families=None, scale: float = 1.0) -> SynthDataset:
    """Generate `days` days of an estate; the last `attack_days` days carry the attack campaigns.

    `families=None` uses the scenario's default families; a list restricts (or extends) them;
    an empty list gives a benign-only dataset. `scale` multiplies every benign traffic rate.
    Same arguments -> identical frames.
    """
    sc = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
    if days < 1 or not 0 <= attack_days <= days:
        raise ValueError(f"need days >= 1 and 0 <= attack_days <= days (got days={days}, attack_days={attack_days})")
    start = sc.start
    end = start + days * DAY
    train_end = end - attack_days * DAY
    fams = tuple(sc.default_families if families is None else families)
    estate = build_estate(sc, new_service_from=train_end if attack_days else np.inf)
    rng = np.random.default_rng([seed, 1])
    conns, dns, lookalike = benign_traffic(estate, start, end, rng, scale)
    conn_df, dns_df = to_frames(conns, dns, rng)
    is_look = lookalike != ""
    look_labels = labels_frame(pd.DataFrame({
        "event_id": conn_df["event_id"].to_numpy()[is_look], "label": "lookalike",
        "family": lookalike[is_look], "entity": conn_df["src_ip"].to_numpy()[is_look]}))
    dns_df = sort_by_ts(dns_df)
    inventory = estate.inventory()
    campaigns = pd.DataFrame()
    if fams and attack_days:
        rate = sc.campaigns_per_family / 2.0
        conn_df, dns_df, att_labels, campaigns = inject_attacks_detailed(
            conn_df, dns_df, inventory, fams, train_end, end, seed=attack_seed(seed), rate=rate)
        labels = pd.concat([look_labels, att_labels], ignore_index=True)
    else:
        conn_df = sort_by_ts(conn_df)
        labels = look_labels
    return SynthDataset(conn_df, dns_df, inventory, labels_frame(labels), start, end, train_end, sc.name, seed,
                        fams if attack_days else (), campaigns)
