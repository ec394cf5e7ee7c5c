"""Analyst verdicts per environment: labelled validation data for training, and suppressions.

Verdicts live in `<models_dir>/<env>/feedback.csv` (event_id, verdict, note, labelled_at, and, when
known from a scored file, src_ip, query, dst_port). `malicious` verdicts become positive labels in
the next training's validation; `benign` ones become negatives and, with their (src_ip, query,
dst_port), suppressions that scoring applies and the report shows.
"""
from __future__ import annotations

import csv
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

COLUMNS = ["event_id", "verdict", "note", "labelled_at", "src_ip", "query", "dst_port"]
VERDICTS = ("benign", "malicious")
SUPPRESSION_FACTOR = 0.1  # a suppressed row keeps a tenth of its score: visible, never on top


class FeedbackStore:
    def __init__(self, models_dir: str | os.PathLike, env: str):
        self.path = Path(models_dir) / env / "feedback.csv"

    def read(self) -> pd.DataFrame:
        if not self.path.exists():
            return pd.DataFrame({c: pd.Series([], dtype="str") for c in COLUMNS})
        table = pd.read_csv(self.path, dtype="str", keep_default_na=False)
        return table.reindex(columns=COLUMNS, fill_value="")

    def add(self, event_id: str, verdict: str, note: str = "", context: dict | None = None) -> None:
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, not {verdict!r}")
        row = {"event_id": event_id, "verdict": verdict, "note": note,
               "labelled_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        row.update({k: str(v) for k, v in (context or {}).items() if k in COLUMNS})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        with open(self.path, "a", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow({c: row.get(c, "") for c in COLUMNS})

    def import_csv(self, path: str) -> int:
        table = pd.read_csv(path, dtype="str", keep_default_na=False)
        if not {"event_id", "verdict"} <= set(table.columns):
            raise ValueError(f"{path}: needs columns event_id and verdict")
        for row in table.to_dict("records"):
            self.add(row["event_id"], row["verdict"].strip().lower(), row.get("note", ""), row)
        return len(table)

    def labels(self) -> pd.DataFrame:
        """Latest verdict per event as evaluation labels (malicious -> attack)."""
        table = self.read().drop_duplicates("event_id", keep="last")
        return pd.DataFrame({
            "event_id": table["event_id"],
            "label": np.where(table["verdict"] == "malicious", "attack", "benign"),
            "family": "analyst",
        })

    def suppressions(self) -> pd.DataFrame:
        table = self.read().drop_duplicates("event_id", keep="last")
        table = table[(table["verdict"] == "benign") & (table["src_ip"] != "")]
        return table[["src_ip", "query", "dst_port"]].drop_duplicates().reset_index(drop=True)

    @staticmethod
    def labels_for(config) -> pd.DataFrame:
        path = getattr(config, "feedback_path", "")
        if not path or not Path(path).exists():
            return pd.DataFrame(columns=["event_id", "label", "family"])
        store = FeedbackStore.__new__(FeedbackStore)
        store.path = Path(path)
        return store.labels()


def apply_suppressions(rows: pd.DataFrame, suppressions: pd.DataFrame) -> pd.DataFrame:
    """Scale down rows matching a benign verdict's (src_ip, query, dst_port) and mark them
    `suppressed`; ranking happens afterwards, so suppressed rows sink but stay visible."""
    if not len(suppressions) or not len(rows):
        return rows
    rows = rows.copy()
    rows["suppressed"] = False
    key = rows["src_ip"].astype("str") + "|" + rows["query"].astype("str") + "|" + rows["dst_port"].astype("str")
    sup = set(suppressions["src_ip"] + "|" + suppressions["query"] + "|" + suppressions["dst_port"].astype("str"))
    hit = key.isin(sup).to_numpy()
    rows.loc[hit, "score"] = rows.loc[hit, "score"] * SUPPRESSION_FACTOR
    rows.loc[hit, "suppressed"] = True
    rows.loc[hit, "alert"] = False if "alert" in rows.columns else None
    return rows
