"""Analyst verdicts per environment: labelled validation data for training, and suppressions.

Verdicts live in `<models_dir>/<env>/feedback.csv` (where the registry says): event_id, verdict, note,
labelled_at, and, when known from a scored file, src_ip, query, dst_port. `malicious` verdicts become
positive labels in the next training's validation; `benign` ones become negatives and, with their
(src_ip, query, dst_port), suppressions that scoring applies and the report shows.

The file is safe to open in a spreadsheet and exact when read back: a cell starting with a formula
trigger or with a single quote gets one leading quote on write, and every leading quote is removed
on read. It is rewritten whole (under a lock, then atomically replaced): never half a row.
"""
from __future__ import annotations

import contextlib
import csv
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from esxi_anomaly.atomic import atomic_path
from esxi_anomaly.report.csv import FORMULA_TRIGGERS

try:
    import fcntl
except ImportError:  # not POSIX: writes stay atomic, concurrent writers are not serialised
    fcntl = None

COLUMNS = ["event_id", "verdict", "note", "labelled_at", "src_ip", "query", "dst_port"]
VERDICTS = ("benign", "malicious")
SUPPRESSION_FACTOR = 0.1  # a suppressed row keeps a tenth of its score: visible, never on top
CONTEXT = ("src_ip", "query", "dst_port")  # what a benign verdict needs to suppress anything

def _escape(values: pd.Series) -> pd.Series:
    """Formula-safe and reversible: a quote before every value that starts a formula or a quote."""
    values = values.astype(str)
    hit = values.str.startswith(FORMULA_TRIGGERS + ("'",))
    return values.where(~hit, "'" + values)


def _unescape(values: pd.Series) -> pd.Series:
    return values.where(~values.str.startswith("'"), values.str.slice(1))


class FeedbackStore:
    def __init__(self, path: str | os.PathLike):
        """The verdicts kept in the file `path`; `registry.feedback_store` opens an environment's (and
        checks its name: the folder is created on the first write), `registry.bundle_feedback` the one
        next to a bundle. Reading creates nothing."""
        self.path = Path(path)

    def read(self) -> pd.DataFrame:
        if not self.path.exists():
            return pd.DataFrame({c: pd.Series([], dtype="str") for c in COLUMNS})
        table = pd.read_csv(self.path, dtype="str", keep_default_na=False)
        table = table.reindex(columns=COLUMNS, fill_value="")
        return table.apply(_unescape) if len(table) else table

    def add(self, event_id: str, verdict: str, note: str = "", context: dict | None = None) -> None:
        self.add_many([{**(context or {}), "event_id": event_id, "verdict": verdict, "note": note}])

    def add_many(self, rows: list[dict]) -> int:
        """Validate every row, then store all of them or none."""
        table = pd.DataFrame(list(rows)).reindex(columns=COLUMNS)
        table = table.where(table.notna(), "").astype(str)
        bad_verdict = ~table["verdict"].isin(VERDICTS)
        no_id = table["event_id"].str.strip() == ""
        if bad_verdict.any() or no_id.any():
            first = int(np.flatnonzero((bad_verdict | no_id).to_numpy())[0])
            what = (f"verdict must be one of {VERDICTS}, not {table['verdict'].iloc[first]!r}"
                    if bad_verdict.iloc[first] else "event_id is empty")
            raise ValueError(f"row {first + 1}: {what} ({int(bad_verdict.sum())} bad verdicts, "
                             f"{int(no_id.sum())} empty event ids in {len(table)} rows); nothing stored")
        if not len(table):
            return 0
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        table["labelled_at"] = table["labelled_at"].where(table["labelled_at"] != "", now)  # imports keep theirs
        with self._locked():
            stored = self.read()
            out = pd.concat([stored, table], ignore_index=True) if len(stored) else table
            with atomic_path(self.path) as staging:
                out.apply(_escape).to_csv(staging, index=False, quoting=csv.QUOTE_MINIMAL)
        return len(table)

    @contextlib.contextmanager
    def _locked(self):
        """Serialise writers of this file: each rewrites it whole, so two at once would lose a row."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            yield
            return
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def import_csv(self, path: str) -> int:
        """Verdicts from a CSV (event_id, verdict[, note, src_ip, query, dst_port]): all or none.
        Text cells are read as a scored CSV's are (see `report.csv.restore_formulas`), so rows cut
        from `score` output suppress exactly the rows they came from."""
        from esxi_anomaly.report.csv import restore_formulas

        table = pd.read_csv(path, dtype="str", keep_default_na=False)
        if not {"event_id", "verdict"} <= set(table.columns):
            raise ValueError(f"{path}: needs columns event_id and verdict")
        table = table.apply(restore_formulas) if len(table) else table
        table["verdict"] = table["verdict"].str.strip().str.lower()
        try:
            return self.add_many(table.to_dict("records"))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

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
        return FeedbackStore(path).labels()


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
