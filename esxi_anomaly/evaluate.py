"""Quality of a ranking against labels: average precision, ROC-AUC, precision@k, recall per
attack family (within the top `alert_fraction`), entity-level recall, and, when the rows carry the
`alert` flag, how well the alerts cover the attacks (alert recall, overall and per family) and how
many of them are attacks (alert precision)."""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score


def evaluate(ranked: pd.DataFrame, labels: pd.DataFrame, ks=(10, 100, 1000), alert_fraction: float = 0.01) -> dict:
    """`ranked`: event_id, score (and src_ip, alert); `labels`: event_id, label ("attack" is positive), family."""
    lab = labels.drop_duplicates("event_id").set_index("event_id")
    # as objects: with no event labelled, `map` gives float NaN, which a text fill value must not meet
    attack = ranked["event_id"].map(lab["label"]).astype(object).fillna("normal").to_numpy() == "attack"
    family = ranked["event_id"].map(lab["family"]).astype(object).fillna("").to_numpy()
    score = ranked["score"].to_numpy(dtype="float64")
    order = np.argsort(-score, kind="stable")
    rank = np.empty(len(score), dtype="int64")
    rank[order] = np.arange(1, len(score) + 1)
    out: dict = {"connections": int(len(score)), "attacks": int(attack.sum())}
    if attack.any() and not attack.all():
        out["average_precision"] = round(float(average_precision_score(attack, score)), 4)
        out["roc_auc"] = round(float(roc_auc_score(attack, score)), 4)
    for k in ks:
        if k <= len(score):
            out[f"precision_at_{k}"] = round(float(attack[order[:k]].mean()), 4)
    cutoff = max(1, int(np.ceil(alert_fraction * len(score))))
    top = rank <= cutoff
    alert = ranked["alert"].to_numpy(dtype=bool) if "alert" in ranked.columns else None
    fams = {}
    for fam in sorted(set(family[attack])):
        m = attack & (family == fam)
        fams[fam] = {"n": int(m.sum()), f"recall_top_{alert_fraction:g}": round(float(top[m].mean()), 4),
                     "worst_rank": int(rank[m].max())}
        if alert is not None:
            fams[fam]["alert_recall"] = round(float(alert[m].mean()), 4)
    out["families"] = fams
    if alert is not None:   # share of attack rows that alert; share of alerts that are attacks
        out["alerts"] = int(alert.sum())
        out["alert_recall"] = round(float(alert[attack].mean()), 4) if attack.any() else float("nan")
        out["alert_precision"] = round(float(attack[alert].mean()), 4) if alert.any() else float("nan")
    if "src_ip" in ranked.columns and attack.any():
        ent = pd.DataFrame({"e": ranked["src_ip"].to_numpy(), "a": attack, "top": top})
        hit = ent[ent["a"]].groupby("e")["top"].any()
        out["entity_recall"] = round(float(hit.mean()), 4)
    return out


def read_labels(path: str) -> pd.DataFrame:
    labels = pd.read_csv(path, dtype="str", keep_default_na=False)
    missing = {"event_id", "label"} - set(labels.columns)
    if missing:
        raise ValueError(f"{path}: labels need columns event_id and label (missing {sorted(missing)})")
    if "family" not in labels.columns:
        labels["family"] = labels["label"]
    return labels
