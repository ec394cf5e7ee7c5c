"""Detection quality: esxi-anomaly against reference baselines on generated estates.

    .venv/bin/python benchmarks/quality.py                 # full run, full volume (see RUN TIME below)
    .venv/bin/python benchmarks/quality.py --trials 0      # the untuned detector only (~10 min)
    .venv/bin/python benchmarks/quality.py --scenario default:4:0.3 --scenario large:7:0.12  # reduced volume
    .venv/bin/python benchmarks/quality.py --quick         # smoke run: one tiny estate, 1 seed, 2 trials
    .venv/bin/python benchmarks/quality.py --views zeek,real   # the same estates through Zeek and real formats

Views (`--views`, default `zeek`): `zeek` scores the generated frames as Zeek shows them; `real` writes
the estate as NSX DFW per host + esxcli snapshots + Sysmon EID 3/22 + Infoblox (`synth.write_formats`),
reads it back with `esxi_anomaly.ingest` and scores what was read. A real-format row is labelled by
5-tuple and time (`synth.labels_5tuple`: the generated connection with the same 5-tuple starting at most
`LABEL_SLACK_S` before it, the nearest one), so a connection seen at two vantage points is two rows
with the same label. Each view is trained and scored on its own; the tables put them side by side.

For every scenario x seed an estate is generated with `synth.generate`; all attacks fall on the last
day. Every method learns from the days before `train_end` only and scores every connection of the
attack day (DNS answers from one hour before the day on are visible to the join). Positives are the
connections labelled "attack"; look-alikes and normal traffic are negatives.

Methods (all scores: higher = more anomalous):
  esxi-anomaly N=k   `DnsCalcDetector` from `training.train_environment` with `TrainConfig(trials=k)`
                     (its self-validation fit skipped: it does not change the model); Optuna injects
                     only `INJECTED` families into the newest slice of the training days, while the
                     attack day also carries the `HELD_OUT` families. "tuned AP" in the per-estate
                     table is the best trial's AP on that self-supervised holdout.
  iforest-raw        plain IsolationForest on raw conn.log columns, fitted on the training days.
  apt12-query        df00tech's public APT12 query on the destination IP: 1 when
                     dst_port == o1*o2+o3, 4096 <= dst_port <= 49151, destination not RFC1918 and
                     the port not on df00tech's exclusion list; else 0 (ties are left as ties).
  port-rarity        -log P(dst_port | src_ip), Laplace-smoothed over the 65536 ports, from the
                     training days.

Alerts: the detector's `alert` flag (an evidence rule fired and the score reached the alert level)
is measured as alert recall (share of the attack day's attack connections that alert) and alert
precision (share of alerts that are attacks), per view, on the estate above and on the same estate
generated with attacks on its last two days, trained on every day but the last (so the training
history holds a day of attacks: "attacks in history"). Target (issue #16): recall >= 0.95 and
precision >= 0.9 in both.

Metrics: average precision over all connections of the attack day with all attack families as
positives ("AP"), AP with only the injected (tuned-for) families as positives and the held-out
families' rows removed ("AP seen"), the converse ("AP held-out"), and per family the recall within
the top 1% of the day's ranking (`evaluate.evaluate`). Baseline rows are shuffled with a fixed seed
before ranking so that ties are broken at random, not by generation order.

Writes `benchmarks/results/quality.md` (git-ignored) and prints the same tables.
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from sklearn.ensemble import IsolationForest
from sklearn.metrics import average_precision_score

from esxi_anomaly.evaluate import evaluate
from esxi_anomaly.report.incidents import name_candidates, name_keys, raised_by_name
from esxi_anomaly.schema import Frames
from esxi_anomaly.ingest import Quarantine, read_connections, read_dns
from esxi_anomaly.synth import ATTACK_FAMILIES, generate, labels_5tuple, write_formats
from esxi_anomaly.training import TrainConfig, fit_model, train_environment

INJECTED = ("apt12", "low16_mgmt", "xor_key", "offset_key")
HELD_OUT = ("aaaa_port", "txt_port", "nymaim_ip")
EVAL_FAMILIES = INJECTED + HELD_OUT
DNS_LOOKBACK_S = 3600.0        # DNS answers visible to the attack day's join (as training.split_holdout)
DAY_S = 86_400.0
HISTORY_ATTACKS = " attacks in history"   # method suffix: trained on a history holding a day of attacks
ALERT_RECALL_TARGET, ALERT_PRECISION_TARGET = 0.95, 0.9
ALERT_FRACTION = 0.01
RECALL_K = 1000           # issue #14's per-family bar between views: recall within the first 1000 rows
RESULTS = Path(__file__).resolve().parent / "results"
VIEWS = ("zeek", "real")
REAL_FORMATS = ("nsx", "esxcli", "sysmon", "infoblox")
LABEL_SLACK_S = 121.0   # an esxcli row starts at its first snapshot (60 s period) after a socket's TIME_WAIT start
FIVE = ["src_ip", "src_port", "dst_ip", "dst_port", "proto"]

# df00tech T1568.003 queries: ports excluded as common alternative service ports
DF00TECH_EXCLUDED_PORTS = (8080, 8443, 8000, 8888, 9090, 9200, 9300, 9418, 27017, 27018, 28017)
DF00TECH_PORT_RANGE = (4096, 49151)
RAW_NUMERIC = ("dst_port", "duration", "bytes_out", "bytes_in", "packets_out", "packets_in")
_IPV4 = r"^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$"


@dataclass(frozen=True)
class Scenario:
    name: str
    days: int
    scale: float = 1.0

    @property
    def label(self) -> str:
        s = f"{self.name} {self.days}d"
        return s if self.scale == 1.0 else f"{s} x{self.scale:g}"


# Full benign volume: scaling benign traffic down (synth does not scale attacks) made attacks 2-8% of
# the attack day instead of ~0.7-1.1% and flattered AP. RUN TIME (2-core VM shared with other jobs,
# load 3-4, 2026-11-28): N=0 plus baselines ~10 min for all 6 estates; N=5 adds ~2.5 min per default
# and ~7 min per large estate, nearly all of it feature preparation (once per join window tried),
# so ~40 min in all; it shrinks with the feature pipeline.
FULL = (Scenario("default", 4, 1.0), Scenario("large", 7, 1.0))
FULL_TRIALS = [0, 5]
QUICK = (Scenario("small", 3, 1.0),)


# -- reference baselines -------------------------------------------------------------------------
def ipv4_octets(ips: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(n x 4 int64 octets, valid mask); rows that are not dotted IPv4 are invalid (octets 0)."""
    parts = pd.Series(ips, dtype="str").reset_index(drop=True).str.extract(_IPV4)
    octets = parts.apply(pd.to_numeric, errors="coerce").to_numpy(dtype="float64")
    valid = ~np.isnan(octets).any(axis=1)
    valid &= (np.nan_to_num(octets, nan=0.0) <= 255).all(axis=1)
    return np.where(valid[:, None], np.nan_to_num(octets, nan=0.0), 0).astype("int64"), valid


def rfc1918(octets: np.ndarray) -> np.ndarray:
    o1, o2 = octets[:, 0], octets[:, 1]
    return (o1 == 10) | ((o1 == 172) & (o2 >= 16) & (o2 <= 31)) | ((o1 == 192) & (o2 == 168))


def apt12_query_scores(connections: pd.DataFrame) -> np.ndarray:
    """df00tech's APT12 query on the destination IP: 1.0 for a hit, else 0.0."""
    octets, valid = ipv4_octets(connections["dst_ip"])
    port = connections["dst_port"].to_numpy(dtype="int64")
    calc = octets[:, 0] * octets[:, 1] + octets[:, 2]
    lo, hi = DF00TECH_PORT_RANGE
    hit = (valid & ~rfc1918(octets) & (port == calc) & (port >= lo) & (port <= hi)
           & ~np.isin(port, DF00TECH_EXCLUDED_PORTS))
    return hit.astype("float64")


def port_rarity_scores(train: pd.DataFrame, test: pd.DataFrame, alpha: float = 1.0,
                       n_ports: int = 65536) -> np.ndarray:
    """-log((n(src, port) + alpha) / (n(src) + alpha * n_ports)), counts from `train`."""
    pair = train.groupby(["src_ip", "dst_port"], observed=True).size()
    per_src = train.groupby("src_ip", observed=True).size()
    key = pd.MultiIndex.from_arrays([test["src_ip"].to_numpy(), test["dst_port"].to_numpy()])
    n_pair = pair.reindex(key).to_numpy(dtype="float64")
    n_src = per_src.reindex(test["src_ip"].to_numpy()).to_numpy(dtype="float64")
    n_pair = np.nan_to_num(n_pair, nan=0.0)
    n_src = np.nan_to_num(n_src, nan=0.0)
    return -np.log((n_pair + alpha) / (n_src + alpha * n_ports))


def raw_matrix(connections: pd.DataFrame, protos: list[str]) -> np.ndarray:
    """Raw conn.log columns (missing -> 0) plus a one-hot of the training protocols."""
    num = connections[list(RAW_NUMERIC)].to_numpy(dtype="float64")
    num = np.nan_to_num(num, nan=0.0)
    proto = connections["proto"].to_numpy(dtype=object)
    onehot = np.column_stack([proto == p for p in protos]).astype("float64") if protos else np.empty((len(num), 0))
    return np.hstack([num, onehot])


def iforest_raw_scores(train: pd.DataFrame, test: pd.DataFrame, seed: int = 0) -> np.ndarray:
    protos = sorted(set(train["proto"].dropna().astype(str)) - {""})
    forest = IsolationForest(n_estimators=100, random_state=seed).fit(raw_matrix(train, protos))
    return -forest.score_samples(raw_matrix(test, protos))


# -- one estate ----------------------------------------------------------------------------------
def split(ds) -> tuple[Frames, Frames]:
    c, d = ds.connections, ds.dns_answers
    train = Frames(c[c["ts"] < ds.train_end].reset_index(drop=True),
                   d[d["ts"] < ds.train_end].reset_index(drop=True), ds.inventory)
    test = Frames(c[c["ts"] >= ds.train_end].reset_index(drop=True),
                  d[d["ts"] >= ds.train_end - DNS_LOOKBACK_S].reset_index(drop=True), ds.inventory)
    return train, test


def shuffled_ranking(connections: pd.DataFrame, scores: np.ndarray, seed: int) -> pd.DataFrame:
    """A ranking frame in random row order (ties broken at random by evaluate's stable sort)."""
    perm = np.random.default_rng([seed, 99]).permutation(len(connections))
    return pd.DataFrame({"event_id": connections["event_id"].to_numpy()[perm], "score": scores[perm],
                         "src_ip": connections["src_ip"].to_numpy()[perm]})


def detector_ranking(model, test: Frames) -> pd.DataFrame:
    """`model.score` without explanations: same scores and alerts, same tie-break (event_id)."""
    prepared, feats = model.features(test)
    components = model.detector_.components(feats)
    alert = model.detector_.alerts(components)
    keys = pa.table({"src_ip": pa.array(prepared.conns["src_ip"].to_numpy(dtype=object).astype(str)),
                     "rules": pa.array(components["rules"].to_numpy(dtype=object).astype(str))}
                    | {c: pa.array(prepared.evidence[c].to_numpy(dtype=object).astype(str)) for c in ("query", "transform")})
    alert = alert | raised_by_name(name_keys(keys), alert, name_candidates(keys))   # as `score` writes them
    out = pd.DataFrame({"event_id": prepared.conns["event_id"].to_numpy(dtype=object).astype(str),
                        "score": components["score"].to_numpy(), "alert": alert,
                        "src_ip": prepared.conns["src_ip"].to_numpy(dtype=object)})
    return out.sort_values(["score", "event_id"], ascending=[False, True], kind="stable", ignore_index=True)


def subset_ap(ranked: pd.DataFrame, labels: pd.DataFrame, families) -> float:
    """AP with attacks of `families` as positives, other attack rows removed."""
    lab = labels.drop_duplicates("event_id").set_index("event_id")
    is_attack = ranked["event_id"].map(lab["label"]).fillna("").to_numpy() == "attack"
    fam = ranked["event_id"].map(lab["family"]).fillna("").to_numpy()
    pos = is_attack & np.isin(fam, list(families))
    keep = ~is_attack | pos
    if not pos.any():
        return float("nan")
    return float(average_precision_score(pos[keep], ranked["score"].to_numpy(dtype="float64")[keep]))


def metrics(ranked: pd.DataFrame, labels: pd.DataFrame) -> dict:
    ev = evaluate(ranked, labels, ks=(), alert_fraction=ALERT_FRACTION)
    key = f"recall_top_{ALERT_FRACTION:g}"
    return {"ap": ev.get("average_precision", float("nan")),
            "ap_seen": subset_ap(ranked, labels, INJECTED),
            "ap_held_out": subset_ap(ranked, labels, HELD_OUT),
            "recall": {f: v[key] for f, v in ev["families"].items()},
            "recall_1000": recall_at(ranked, labels, RECALL_K),
            "attacks": ev["attacks"], "connections": ev["connections"],
            **({"alerts": ev["alerts"], "alert_recall": ev["alert_recall"], "alert_precision": ev["alert_precision"],
                "alert_recall_family": {f: v["alert_recall"] for f, v in ev["families"].items()}}
               if "alerts" in ev else {})}


def recall_at(ranked: pd.DataFrame, labels: pd.DataFrame, k: int) -> dict[str, float]:
    """Per attack family, the share of its rows among the first `k` of the ranking (score, then event_id)."""
    lab = labels.drop_duplicates("event_id").set_index("event_id")
    order = np.lexsort((ranked["event_id"].to_numpy(dtype=str), -ranked["score"].to_numpy(dtype="float64")))
    top = np.zeros(len(ranked), dtype=bool)
    top[order[:k]] = True
    is_attack = ranked["event_id"].map(lab["label"]).fillna("").to_numpy() == "attack"
    fam = ranked["event_id"].map(lab["family"]).fillna("").to_numpy()
    return {f: float(top[is_attack & (fam == f)].mean()) for f in sorted(set(fam[is_attack]))}


def run_baselines(train: Frames, test: Frames, labels: pd.DataFrame, seed: int) -> dict[str, dict]:
    out = {}
    scorers = {
        "iforest-raw": lambda: iforest_raw_scores(train.connections, test.connections, seed),
        "apt12-query": lambda: apt12_query_scores(test.connections),
        "port-rarity": lambda: port_rarity_scores(train.connections, test.connections),
    }
    for name, fn in scorers.items():
        t0 = time.perf_counter()
        m = metrics(shuffled_ranking(test.connections, fn(), seed), labels)
        m["seconds"] = time.perf_counter() - t0
        out[name] = m
    return out


def run_detector(train: Frames, test: Frames, labels: pd.DataFrame, seed: int, trials: int,
                 env: str, storage_dir: Path) -> dict:
    t0 = time.perf_counter()
    config = TrainConfig(env=env, seed=seed, trials=trials, inject_families=list(INJECTED),
                         study_storage=f"sqlite:///{(storage_dir / 'optuna.db').as_posix()}")
    if trials > 0:
        trained = train_environment(train, config, validation=False)
        model, tuning = trained.model, trained.tuning
    else:   # the model train_environment returns for trials=0
        model, tuning = fit_model(train, config), {}
    m = metrics(detector_ranking(model, test), labels)
    m["seconds"] = time.perf_counter() - t0
    m["tuned_ap"] = tuning.get("best_average_precision", float("nan"))
    return m


def match_labels(connections: pd.DataFrame, labels5: pd.DataFrame, slack: float = LABEL_SLACK_S) -> pd.DataFrame:
    """Labels (event_id, label, family, entity) of rows read from any view, by 5-tuple and time: the
    labelled connection with the row's 5-tuple that started at most `slack` s before the row (or 1 s
    after: the logs cut times to the millisecond), the nearest one."""
    rows = connections[["event_id", "ts"] + FIVE].astype({"src_port": "int64", "dst_port": "int64"})
    lab = labels5.astype({"src_port": "int64", "dst_port": "int64"}).reset_index(drop=True)
    lab["label_row"] = np.arange(len(lab))
    m = rows.merge(lab, on=FIVE, suffixes=("", "_label"))
    m["lag"] = m["ts"] - m["ts_label"]
    m = m[(m["lag"] >= -1.0) & (m["lag"] <= slack)].assign(lag=lambda d: d["lag"].abs())
    m = m.sort_values(["event_id", "lag"], kind="stable").drop_duplicates("event_id")
    return pd.DataFrame({"event_id": m["event_id"].to_numpy(), "label": m["label"].to_numpy(),
                         "family": m["family"].to_numpy(), "entity": m["src_ip"].to_numpy(),
                         "label_row": m["label_row"].to_numpy()})   # which labelled connection


def real_view(ds, folder: Path) -> tuple[Frames, pd.DataFrame, dict]:
    """The estate written in the real formats, read back: (frames, labels by 5-tuple and time, counts)."""
    write_formats(ds, folder, REAL_FORMATS)
    q = Quarantine()
    conns = read_connections([str(folder / f) for f in ("nsx", "esxcli", "sysmon")], q)
    dns = read_dns([str(folder / f) for f in ("sysmon", "infoblox")], q)
    labels = match_labels(conns, labels_5tuple(ds))
    attacks = ds.labels[ds.labels["label"] == "attack"]
    seen = labels[labels["label"] == "attack"]
    counts = {"quarantined": len(q), "attack_rows": len(seen), "attacks_seen": seen["label_row"].nunique(),
              "attacks_zeek": len(attacks)}
    return Frames(conns, dns, ds.inventory), labels, counts


def history_attacks_estate(sc: Scenario, seed: int):
    """The estate of `sc`/`seed` with attacks on its last two days: trained on every day but the
    last, the training history holds a day of attacks."""
    ds = generate(days=sc.days, seed=seed, scenario=sc.name, attack_days=2, families=list(EVAL_FAMILIES),
                  scale=sc.scale)
    return ds, ds.end - DAY_S


def split_frames(frames: Frames, train_end: float) -> tuple[Frames, Frames]:
    c, d = frames.connections, frames.dns_answers
    train = Frames(c[c["ts"] < train_end].reset_index(drop=True), d[d["ts"] < train_end].reset_index(drop=True),
                   frames.inventory)
    test = Frames(c[c["ts"] >= train_end].reset_index(drop=True),
                  d[d["ts"] >= train_end - DNS_LOOKBACK_S].reset_index(drop=True), frames.inventory)
    return train, test


def run_estate(sc: Scenario, seed: int, trials: list[int], storage_dir: Path, log=print,
               views=("zeek",)) -> list[dict]:
    t0 = time.perf_counter()
    ds = generate(days=sc.days, seed=seed, scenario=sc.name, attack_days=1, families=list(EVAL_FAMILIES),
                  scale=sc.scale)
    dirty, dirty_end = history_attacks_estate(sc, seed) if sc.days > 2 else (None, None)
    rows = []
    for view in views:
        if view == "zeek":
            (train, test), labels = split(ds), ds.labels
            note = ""
        else:
            frames, labels, counts = real_view(ds, storage_dir / f"{sc.name}-{sc.days}d-s{seed}-{view}")
            train, test = split_frames(frames, ds.train_end)
            note = (f", {counts['attack_rows']} attack rows read for {counts['attacks_seen']} of the "
                    f"{counts['attacks_zeek']} attack connections, {counts['quarantined']} quarantined")
        tag = "" if views == ("zeek",) else f" [{view}]"
        log(f"[{sc.label} seed {seed}{tag}] {len(train.connections):,} training / {len(test.connections):,} "
            f"attack-day connections, {int((labels['label'] == 'attack').sum())} attacks, top 1% = "
            f"{max(1, int(np.ceil(ALERT_FRACTION * len(test.connections))))} rows{note} "
            f"({time.perf_counter() - t0:.0f} s so far)")
        for n in trials:
            m = run_detector(train, test, labels, seed, n, f"quality-{sc.name}-{sc.days}d-s{seed}-{view}", storage_dir)
            rows.append({"method": f"esxi-anomaly N={n}{tag}", "view": view, **m})
            tuned = f", tuned AP {m['tuned_ap']:.4f}" if n else ""
            log(f"  esxi-anomaly N={n}: AP {m['ap']:.4f} (held-out {m['ap_held_out']:.4f}{tuned}), "
                f"{m['alerts']} alerts: recall {m['alert_recall']:.4f}, precision {m['alert_precision']:.4f} "
                f"in {m['seconds']:.0f} s")
        if dirty is not None:   # the same estate with a day of attacks in the training history
            if view == "zeek":
                frames, dirty_labels = Frames(dirty.connections, dirty.dns_answers, dirty.inventory), dirty.labels
            else:
                frames, dirty_labels, _ = real_view(dirty, storage_dir / f"{sc.name}-{sc.days}d-s{seed}-{view}-hist")
            d_train, d_test = split_frames(frames, dirty_end)
            d_labels = dirty_labels[dirty_labels["event_id"].isin(set(d_test.connections["event_id"]))]
            for n in trials:
                m = run_detector(d_train, d_test, d_labels, seed, n,
                                 f"quality-{sc.name}-{sc.days}d-s{seed}-{view}-hist", storage_dir)
                rows.append({"method": f"esxi-anomaly N={n}{HISTORY_ATTACKS}{tag}", "view": view, **m})
                log(f"  esxi-anomaly N={n}{HISTORY_ATTACKS} ({int((dirty_labels['label'] == 'attack').sum()) - m['attacks']}"
                    f" attacks in the history): AP {m['ap']:.4f}, {m['alerts']} alerts: recall "
                    f"{m['alert_recall']:.4f}, precision {m['alert_precision']:.4f} in {m['seconds']:.0f} s")
        for name, m in run_baselines(train, test, labels, seed).items():
            rows.append({"method": f"{name}{tag}", "view": view, **m})
            log(f"  {name}: AP {m['ap']:.4f} (held-out {m['ap_held_out']:.4f}) in {m['seconds']:.0f} s")
    for r in rows:
        r.update(scenario=sc.label, seed=seed)
    return rows


def views_table(rows: list[dict], views, recall: str = "recall") -> str:
    """Mean AP and recall per family (`recall`: "recall" = within the top 1%, "recall_1000" = within the
    first 1000 rows) of each method, one column group per view, side by side; the last view's AP as a
    share of the first's."""
    df = pd.DataFrame([{"scenario": r["scenario"], "method": r["method"].split(" [")[0], "view": r["view"],
                        "AP": r["ap"], **{f: r[recall].get(f, np.nan) for f in EVAL_FAMILIES}} for r in rows])
    mean = df.groupby(["scenario", "method", "view"], sort=False).mean(numeric_only=True)
    head = ["scenario", "method"] + [f"AP {v}" for v in views]
    if len(views) > 1:
        head.append(f"AP {views[-1]}/{views[0]}")
    head += [f"{_fam_header(f)} ({'/'.join(views)})" for f in EVAL_FAMILIES]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for (scen, method), _ in df.groupby(["scenario", "method"], sort=False):
        got = {v: mean.loc[(scen, method, v)] if (scen, method, v) in mean.index else None for v in views}
        cells = [scen, method] + [_f(got[v]["AP"] if got[v] is not None else None) for v in views]
        if len(views) > 1:
            a, b = (got[views[0]], got[views[-1]])
            cells.append(_f(b["AP"] / a["AP"]) if a is not None and b is not None and a["AP"] else "–")
        cells += ["/".join(_f(got[v][f] if got[v] is not None else None) for v in views) for f in EVAL_FAMILIES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- tables --------------------------------------------------------------------------------------
def alerts_table(rows: list[dict]) -> tuple[str, list[str]]:
    """Per scenario, detector method (clean history / attacks in history) and view, the mean over
    seeds of alerts, alert recall and precision, and alert recall per family; and the target checked."""
    det = [r for r in rows if "alert_recall" in r]
    if not det:
        return "(no detector rows)", []
    df = pd.DataFrame([{"scenario": r["scenario"], "method": r["method"].split(" [")[0], "view": r["view"],
                        "attacks": r["attacks"], "alerts": r["alerts"], "recall": r["alert_recall"],
                        "precision": r["alert_precision"],
                        **{f: r["alert_recall_family"].get(f, np.nan) for f in EVAL_FAMILIES}} for r in det])
    g = df.groupby(["scenario", "method", "view"], sort=False)
    mean, n = g.mean(numeric_only=True), g.size()
    head = ["scenario", "method", "view", "seeds", "attacks", "alerts", "alert recall", "alert precision"]
    head += [f"{_fam_header(f)} alert recall" for f in EVAL_FAMILIES]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)]
    checks = []
    for key, r in mean.iterrows():
        lines.append("| " + " | ".join([*key, str(int(n[key])), f"{r['attacks']:.0f}", f"{r['alerts']:.0f}",
                                        _f(r["recall"]), _f(r["precision"]), *(_f(r[f]) for f in EVAL_FAMILIES)]) + " |")
        ok = r["recall"] >= ALERT_RECALL_TARGET and r["precision"] >= ALERT_PRECISION_TARGET
        missed = [f for f in EVAL_FAMILIES if r[f] == r[f] and r[f] < ALERT_RECALL_TARGET]
        checks.append(f"- {key[0]}, {key[1]} [{key[2]}]: alert recall {_f(r['recall'])}, precision "
                      f"{_f(r['precision'])} -> target {'met' if ok else 'NOT met'}"
                      + (f"; families under {ALERT_RECALL_TARGET:g}: {', '.join(missed)}" if missed else ""))
    return "\n".join(lines), checks


def _f(x) -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.3f}"


def _fam_header(fam: str) -> str:
    return f"{fam}*" if fam in HELD_OUT else fam


def results_table(rows: list[dict]) -> str:
    head = ["scenario", "seed", "connections", "attacks", "top 1%", "method", "AP", "AP seen", "AP held-out",
            "tuned AP"]
    head += [_fam_header(f) for f in EVAL_FAMILIES]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * 3 + "---|" + "---:|" * (len(head) - 6)]
    for r in rows:
        cutoff = max(1, int(np.ceil(ALERT_FRACTION * r["connections"])))
        cells = [r["scenario"], str(r["seed"]), f"{r['connections']:,}", str(r["attacks"]), str(cutoff), r["method"],
                 _f(r["ap"]), _f(r["ap_seen"]), _f(r["ap_held_out"]), _f(r.get("tuned_ap"))]
        cells += [_f(r["recall"].get(f)) for f in EVAL_FAMILIES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_table(rows: list[dict]) -> tuple[str, pd.DataFrame]:
    df = pd.DataFrame([{"scenario": r["scenario"], "method": r["method"], "AP": r["ap"], "AP seen": r["ap_seen"],
                        "AP held-out": r["ap_held_out"], **{f: r["recall"].get(f, np.nan) for f in EVAL_FAMILIES}}
                       for r in rows])
    order = {c: {v: i for i, v in enumerate(dict.fromkeys(df[c]))} for c in ("scenario", "method")}
    g = df.groupby(["scenario", "method"], sort=False)
    mean = g.mean(numeric_only=True)
    std = g[["AP"]].std(ddof=0).rename(columns={"AP": "AP sd"})
    n = g.size().rename("seeds")
    out = pd.concat([mean, std, n], axis=1).reset_index()
    out = out.sort_values(["scenario", "method"], key=lambda s: s.map(order[s.name]), kind="stable",
                          ignore_index=True)   # run order
    head = ["scenario", "method", "seeds", "mean AP", "AP sd", "mean AP seen", "mean AP held-out"]
    head += [f"recall@1% {_fam_header(f)}" for f in EVAL_FAMILIES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for _, r in out.iterrows():
        cells = [r["scenario"], r["method"], str(int(r["seeds"])), _f(r["AP"]), _f(r["AP sd"]), _f(r["AP seen"]),
                 _f(r["AP held-out"])] + [_f(r[f]) for f in EVAL_FAMILIES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), out


def readme_table(mean: pd.DataFrame) -> str:
    """Mean AP per method (rows) per scenario (columns): all families and held-out families."""
    scen = list(dict.fromkeys(mean["scenario"]))
    methods = list(dict.fromkeys(mean["method"]))
    head = ["method"] + [f"{s}: AP (held-out)" for s in scen]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(scen)]
    for m in methods:
        cells = [m]
        for s in scen:
            r = mean[(mean["scenario"] == s) & (mean["method"] == m)]
            cells.append(f"{_f(r['AP'].iloc[0])} ({_f(r['AP held-out'].iloc[0])})" if len(r) else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(mean: pd.DataFrame) -> list[str]:
    """The issue's target, checked per scenario: mean AP >= 0.9 and above every baseline."""
    out = []
    baselines = ("iforest-raw", "apt12-query", "port-rarity")
    mean = mean[~mean["method"].str.contains(HISTORY_ATTACKS, regex=False)]   # another split: not comparable
    view = mean["method"].str.extract(r"( \[[a-z]+\])$", expand=False).fillna("")
    for (s, _v), g in mean.groupby(["scenario", view], sort=False):   # baselines of the same view
        best_base = g[g["method"].str.replace(r" \[[a-z]+\]$", "", regex=True).isin(baselines)]["AP"].max()
        for _, r in g[g["method"].str.startswith("esxi-anomaly")].iterrows():
            ok = r["AP"] >= 0.9 and r["AP"] > best_base
            out.append(f"- {s}, {r['method']}: mean AP {r['AP']:.3f} (held-out {r['AP held-out']:.3f}); best "
                       f"baseline {best_base:.3f} -> target {'met' if ok else 'NOT met'}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one tiny estate, one seed, 2 trials (smoke run)")
    p.add_argument("--seeds", type=int, nargs="+", help="estate seeds (default 0 1 2; --quick: 0)")
    p.add_argument("--trials", type=int, nargs="+", help="Optuna trial counts to compare (default 0 5)")
    p.add_argument("--scenario", action="append", metavar="NAME:DAYS[:SCALE]",
                   help="override the scenarios, e.g. --scenario default:4:0.5 (repeatable)")
    p.add_argument("--views", default="zeek",
                   help="comma-separated views of each estate: zeek, real (NSX DFW + esxcli + Sysmon + Infoblox)")
    p.add_argument("--out", type=Path, default=RESULTS / "quality.md")
    args = p.parse_args(argv)
    views = tuple(v.strip() for v in args.views.split(",") if v.strip())
    if not views or set(views) - set(VIEWS):
        p.error(f"--views: choose from {', '.join(VIEWS)}")
    scenarios = QUICK if args.quick else FULL
    if args.scenario:
        scenarios = tuple(Scenario(s.split(":")[0], int(s.split(":")[1]),
                                   float(s.split(":")[2]) if s.count(":") > 1 else 1.0) for s in args.scenario)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    trials = args.trials or ([0, 2] if args.quick else FULL_TRIALS)
    unknown = set(EVAL_FAMILIES) - set(ATTACK_FAMILIES)
    if unknown:
        p.error(f"synth does not know families {sorted(unknown)}")

    t0 = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="esxi-quality-") as tmp:
        for sc in scenarios:
            for seed in seeds:
                rows.extend(run_estate(sc, seed, trials, Path(tmp), views=views))
    elapsed = time.perf_counter() - t0

    detail = results_table(rows)
    mean_md, mean = mean_table(rows)
    readme = readme_table(mean)
    checks = verdict(mean)
    alerts_md, alert_checks = alerts_table(rows)
    cmd = "benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    fams = ", ".join(EVAL_FAMILIES)
    doc = "\n".join([
        "# Detection quality: esxi-anomaly vs reference baselines", "",
        f"Command: `.venv/bin/python {cmd.strip()}` ({elapsed / 60:.1f} min, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}).",
        f"Scenarios: {', '.join(s.label for s in scenarios)} (xS = benign volume scale); seeds {seeds}; "
        f"attacks on the last day; families on the attack day: {fams}.",
        f"Tuning injects only {', '.join(INJECTED)}; held-out families (marked *): {', '.join(HELD_OUT)}.",
        "AP = average precision over all attack-day connections (all attack families positive); "
        "AP seen / held-out = positives restricted to injected / held-out families, other attack rows removed; "
        "tuned AP = the best Optuna trial's AP on the self-supervised holdout of the training days; "
        "family columns = recall within the top 1% of the day's ranking. When a day has more attack "
        "connections than its top 1% holds (column `top 1%` < `attacks`), no method can reach recall 1 on "
        "every family; compare methods, not absolute recall.", "",
        "## Mean over seeds", "", mean_md, "",
        *(["## Views side by side (mean over seeds; recall@1% per family per view)", "",
           views_table(rows, views), "",
           f"## Views side by side (mean over seeds; recall@{RECALL_K} per family per view)", "",
           views_table(rows, views, "recall_1000"), ""] if len(views) > 1 else []), "## Target (mean AP >= 0.9 and above every baseline)", "",
        *checks, "",
        f"## Alerts (mean over seeds; target: recall >= {ALERT_RECALL_TARGET:g}, precision >= "
        f"{ALERT_PRECISION_TARGET:g}, with a clean history and with attacks in it)", "", alerts_md, "", *alert_checks, "",
        "## README summary (mean AP, held-out families' AP in parentheses)", "", readme, "",
        "## Per estate", "", detail, "",
    ])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(doc, encoding="utf-8")
    side = ("\n\nViews side by side (recall@1%):\n\n" + views_table(rows, views)
            + f"\n\nViews side by side (recall@{RECALL_K}):\n\n" + views_table(rows, views, "recall_1000")) \
        if len(views) > 1 else ""
    print("\n" + detail + "\n\nMean over seeds:\n\n" + mean_md + side + "\n\n" + "\n".join(checks)
          + "\n\nAlerts:\n\n" + alerts_md + "\n\n" + "\n".join(alert_checks)
          + "\n\nREADME summary (paste):\n\n" + readme + f"\n\nwrote {args.out} ({elapsed / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
