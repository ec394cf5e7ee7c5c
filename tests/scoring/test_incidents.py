"""`<out>.incidents.csv` beside every output, the alert budget, `--alerts-only` and `--incidents`, written
by `write.rank_and_write` for both engines: every scored row in exactly one incident, campaigns on top."""
from __future__ import annotations

import dataclasses
import errno
import json

import numpy as np
import pandas as pd
import pytest

from esxi_anomaly import cli, scoring
from esxi_anomaly.console import EXIT_INPUT, EXIT_OK
from esxi_anomaly.report.incidents import INCIDENTS
from esxi_anomaly.scoring import local, output, write


def read(path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"event_id": "str", "event_ids": "str", "top_event_id": "str",
                                    "incident_id": "str", "dst_ports": "str"}, keep_default_na=False)


@pytest.fixture(scope="module")
def bundle(small_day, tmp_path_factory):
    from esxi_anomaly.registry import write_model
    from esxi_anomaly.training import TrainConfig

    model, _ = small_day
    return write_model(model, TrainConfig(env="t"), tmp_path_factory.mktemp("models"))


def score(bundle, folder, out, *extra) -> int:
    return cli.main(["score", "--model", str(bundle), "--conn", str(folder / "conn.log"), "--dns",
                     str(folder / "dns.log"), "--inventory", str(folder / "inventory.csv"), "--out", str(out),
                     "--no-progress", "--workers", "1", *extra])


@pytest.fixture(scope="module")
def scored(small_day, bundle, tmp_path_factory):
    """One CSV run: its rows and incidents."""
    _, folder = small_day
    out = tmp_path_factory.mktemp("scored") / "ranked.csv"
    assert score(bundle, folder, out) == EXIT_OK
    return read(out), read(output.incidents_path(out)), out


def test_every_row_is_in_exactly_one_incident(scored):
    rows, incidents, _ = scored
    assert list(incidents.columns) == list(INCIDENTS)
    ids = " ".join(incidents["event_ids"]).split()
    assert sorted(ids) == sorted(rows["event_id"]) and len(ids) == len(set(ids))
    assert incidents["connections"].sum() == len(rows)
    assert list(incidents["rank"]) == list(range(1, len(incidents) + 1))
    # one incident per (source, C2 name or destination, derivation)
    key = rows.assign(name=rows["query"].where(rows["query"] != "", rows["dst_ip"]))
    assert len(incidents) == len(key.drop_duplicates(["src_ip", "name", "transform"]))
    assert not incidents.duplicated(["src_ip", "query", "dst_ips", "transform"]).any()
    # the incident of the top row is the first, described by that row
    top = rows.iloc[0]
    first = incidents.iloc[0]
    assert first["top_event_id"] == top["event_id"] and first["explanation"] == top["explanation"]
    assert first["event_ids"].split()[0] == top["event_id"]


def test_incident_values_agree_with_their_rows(scored):
    rows, incidents, _ = scored
    by_id = rows.set_index("event_id")
    for incident in incidents.head(20).itertuples(index=False):
        mine = by_id.loc[incident.event_ids.split()]
        assert incident.connections == len(mine)
        assert incident.score == pytest.approx(mine["score"].max())
        assert incident.alert == bool(mine["alert"].any()) and incident.alerts == int(mine["alert"].sum())
        assert incident.first_ts == pytest.approx(mine["ts"].min()) and incident.last_ts == pytest.approx(mine["ts"].max())
        assert incident.dst_ports.split() == [str(p) for p in sorted(set(mine["dst_port"]) - {-1})]
        assert set(incident.dst_ips.split()) == set(mine["dst_ip"]) - {""}


def test_incidents_rank_alerts_first_then_by_score(scored):
    _, incidents, _ = scored
    alert = incidents["alert"].to_numpy()
    assert alert.any() and not alert.all()
    assert not np.any(~alert[:-1] & alert[1:])          # no alert after a non-alert
    for part in (incidents[alert], incidents[~alert]):
        assert part["score"].is_monotonic_decreasing


def test_streamed_in_small_blocks_equals_one_block(small_day, tmp_path, scored, monkeypatch):
    model, folder = small_day
    from esxi_anomaly.report import incidents as report_incidents

    monkeypatch.setattr(report_incidents, "INCIDENT_BLOCK_ROWS", 7)   # many blocks of incidents
    out = tmp_path / "ranked.csv"
    local.run(model, [folder / "conn.log"], [folder / "dns.log"], out,
              inventory=pd.read_csv(folder / "inventory.csv", dtype=str, keep_default_na=False), chunk_rows=900,
              progress=False)
    assert output.incidents_path(out).read_bytes() == output.incidents_path(scored[2]).read_bytes()


def test_every_campaign_is_among_the_first_incidents(tmp_path):
    """The Done-when of issue 16: on a generated estate (fixed seed), every attack campaign is among the
    first 2 x (number of campaigns) incidents."""
    from esxi_anomaly.model import DnsCalcDetector
    from esxi_anomaly.schema import Frames
    from esxi_anomaly.synth import generate, write_zeek

    ds = generate(days=3, seed=7, scenario="default", attack_days=1, scale=0.05)
    c, d = ds.connections, ds.dns_answers
    model = DnsCalcDetector(random_state=7, n_estimators=50).fit(
        Frames(c[c["ts"] < ds.train_end], d[d["ts"] < ds.train_end], ds.inventory))
    write_zeek(dataclasses.replace(ds, connections=c[c["ts"] >= ds.train_end],
                                   dns_answers=d[d["ts"] >= ds.train_end - 4000]), tmp_path)
    out = tmp_path / "ranked.csv"
    scoring.score(model, [tmp_path / "conn.log"], [tmp_path / "dns.log"], out, inventory=ds.inventory,
                  progress=False)
    incidents = read(output.incidents_path(out))
    campaigns = ds.campaigns   # one row per (campaign, victim), with the C2 name
    assert campaigns["campaign"].nunique() >= 6
    ranks = campaigns.merge(incidents, left_on=["entity", "query"], right_on=["src_ip", "query"], how="left")
    best = ranks.groupby("campaign")["rank"].min()
    limit = 2 * campaigns["campaign"].nunique()
    assert best.notna().all(), f"campaigns without an incident: {sorted(best[best.isna()].index)}"
    assert (best <= limit).all(), f"first incident of each campaign (limit {limit}): {best.sort_values().to_dict()}"


# -- the alert budget, --alerts-only, --incidents ------------------------------------------------

def test_alert_budget_caps_alerts_per_day_and_keeps_the_rest_ranked(small_day, bundle, tmp_path, scored, capsys):
    _, folder = small_day
    rows, incidents, _ = scored
    alerts = int(rows["alert"].sum())
    budget = alerts // 3
    assert budget > 0
    out = tmp_path / "budget.csv"
    assert score(bundle, folder, out, "--alert-budget", str(budget), "--stats-json", str(tmp_path / "s.json")) == 0
    capped = read(out)
    day = np.floor(capped["ts"] / 86400)
    assert capped.groupby(day)["alert"].sum().max() <= budget
    assert capped["alert"].sum() == sum(min(budget, n) for n in rows.groupby(np.floor(rows["ts"] / 86400))["alert"].sum())
    held = capped["explanation"].str.contains("over the alert budget", regex=False)
    assert held.sum() == alerts - capped["alert"].sum() and not capped.loc[held, "alert"].any()
    # the held-back rows stay in the ranking, right below the alerts they were: same rows, same scores
    assert sorted(capped["event_id"]) == sorted(rows["event_id"])
    assert capped["alert"].iloc[:capped["alert"].sum()].all()
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["alerts_held_back"] == held.sum() and stats["alerts"] == capped["alert"].sum()
    assert f"{held.sum():,} alerts held back" in capsys.readouterr().err
    # the roll-up and the incidents count the alerts left
    assert read(output.rollup_path(out))["alerts"].sum() == capped["alert"].sum()
    assert read(output.incidents_path(out))["alerts"].sum() == capped["alert"].sum()


def test_alerts_only_writes_only_alerts(small_day, bundle, tmp_path, scored):
    _, folder = small_day
    rows, incidents, _ = scored
    out = tmp_path / "alerts.csv"
    assert score(bundle, folder, out, "--alerts-only") == 0
    alerts = read(out)
    assert len(alerts) == rows["alert"].sum() and alerts["alert"].all()
    assert list(alerts["rank"]) == list(range(1, len(alerts) + 1))
    # alerts rank first: the alerts-only output is the head of the full one, byte for byte
    full = scored[2].read_bytes().split(b"\r\n")
    assert out.read_bytes() == b"\r\n".join(full[:len(alerts) + 1]) + b"\r\n"
    assert output.incidents_path(out).read_bytes() == output.incidents_path(scored[2]).read_bytes()


def test_incidents_as_ecs_documents(small_day, bundle, tmp_path, scored):
    _, folder = small_day
    rows, incidents, _ = scored
    out = tmp_path / "incidents.jsonl"
    assert score(bundle, folder, out, "--incidents") == 0
    documents = [json.loads(line) for line in out.read_text(encoding="ascii").splitlines()]
    assert len(documents) == len(incidents)
    assert [d["event"]["id"] for d in documents] == list(incidents["incident_id"])
    assert [d["event"]["kind"] for d in documents] == ["alert" if a else "event" for a in incidents["alert"]]
    assert [len(d["esxi_anomaly"]["event_ids"]) for d in documents] == list(incidents["connections"])
    assert documents[0]["threat"]["technique"]["subtechnique"]["id"] == ["T1568.003"]
    only = tmp_path / "alerts.jsonl"
    assert score(bundle, folder, only, "--incidents", "--alerts-only") == 0
    assert len(only.read_text().splitlines()) == incidents["alert"].sum()


def test_incidents_need_json_lines(small_day, bundle, tmp_path, capsys):
    _, folder = small_day
    assert score(bundle, folder, tmp_path / "x.csv", "--incidents") != EXIT_OK
    assert "JSON lines" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_failed_run_keeps_the_old_incidents_whole(small_day, bundle, tmp_path, monkeypatch, capsys):
    _, folder = small_day
    out = tmp_path / "ranked.csv"
    for path, text in ((out, "old output\n"), (output.rollup_path(out), "old roll-up\n"),
                       (output.incidents_path(out), "old incidents\n")):
        path.write_text(text)

    def full(self, parts):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(write.BlockWriter, "write_parts", full)
    assert score(bundle, folder, out) == EXIT_INPUT
    assert output.incidents_path(out).read_text() == "old incidents\n"
    assert output.rollup_path(out).read_text() == "old roll-up\n" and out.read_text() == "old output\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ranked.csv", "ranked.entities.csv", "ranked.incidents.csv"]


def test_the_incidents_file_must_not_be_an_input(small_day, bundle, tmp_path, capsys):
    _, folder = small_day
    out = tmp_path / "conn.csv"
    (tmp_path / "conn.incidents.csv").write_bytes((folder / "conn.log").read_bytes())
    rc = cli.main(["score", "--model", str(bundle), "--conn", str(tmp_path / "conn.incidents.csv"), "--dns",
                   str(folder / "dns.log"), "--out", str(out), "--no-progress", "--workers", "1"])
    assert rc == EXIT_INPUT and "is one of the input files" in capsys.readouterr().err


def test_both_engines_write_the_same_incidents_under_a_budget(small_day, bundle, tmp_path, scored):
    distributed = pytest.importorskip("distributed")
    _, folder = small_day
    budget = str(max(1, int(scored[0]["alert"].sum()) // 2))
    local_out, dask_out = tmp_path / "local.csv", tmp_path / "dask.csv"
    assert score(bundle, folder, local_out, "--alert-budget", budget) == 0
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        assert score(bundle, folder, dask_out, "--alert-budget", budget, "--engine", "dask",
                     "--scheduler", cluster.scheduler_address) == 0
    assert local_out.read_bytes() == dask_out.read_bytes()
    assert output.incidents_path(local_out).read_bytes() == output.incidents_path(dask_out).read_bytes()
    assert output.rollup_path(local_out).read_bytes() == output.rollup_path(dask_out).read_bytes()


def test_the_html_report_describes_every_row_not_only_those_shown(small_day, bundle, tmp_path, scored):
    import re

    _, folder = small_day
    rows, incidents, _ = scored
    out = tmp_path / "report.html"
    assert score(bundle, folder, out, "--top", "10") == 0
    page = out.read_text(encoding="utf-8")
    data = json.loads(re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S)
                      .group(1))
    assert len(data["ranked"]["rows"]) == 10
    entities = read(output.rollup_path(out))
    assert len(data["entities"]["rows"]) == len(entities) > 10
    assert len(data["incidents"]["rows"]) == min(len(incidents), 500)
    assert data["incidents"]["id"] == incidents["incident_id"].head(500).tolist()
    assert sum(data["histogram"]["counts"]) == len(rows)
    assert data["histogram"]["level"] is not None
    assert ["alerts", f"{int(rows['alert'].sum()):,}"] in data["summary"]["cards"]


def _scored_files(tmp_path, rows: pd.DataFrame) -> write.ScoredFiles:
    from esxi_anomaly.scoring.core import SCORED_SUFFIX, scored_paths, write_scored

    (tmp_path / "scored").mkdir()
    write_scored(rows, tmp_path / "scored" / f"0{SCORED_SUFFIX}")
    return write.ScoredFiles(scored_paths(tmp_path))


def test_a_name_that_alerted_on_evidence_raises_its_sources_earlier_rows(tmp_path):
    # a keyed C2's first connections (no key evidence yet: no derivation, a weak rule), its later alert,
    # a row of the same source and name with nothing against it, another source's row, and a row with no name
    rows = pd.DataFrame({
        "score": [0.5, 0.95, 0.4, 0.5, 0.5], "event_id": ["a", "b", "c", "d", "e"], "ts": [1.0, 2.0, 3.0, 4.0, 5.0],
        "src_ip": ["10.0.0.5", "10.0.0.5", "10.0.0.5", "10.0.0.6", "10.0.0.5"],
        "query": ["c2.example"] * 4 + [""], "dst_ip": ["203.0.113.9"] * 5,
        "transform": ["", "K1_add", "", "K1_add", "K1_add"],
        "rules": ["new_high_port_after_dns", "keyed_derivation", "", "keyed_derivation", "new_high_port_after_dns"],
        "alert": [False, True, False, False, False],
    })
    tables = _scored_files(tmp_path, rows)
    ids = tables[0]["event_id"].to_pylist()
    promoted = write.name_promotions(tables, tables[0]["alert"].to_numpy(zero_copy_only=False).astype(bool))
    assert dict(zip(ids, promoted.tolist())) == {"a": True, "b": False, "c": False, "d": False, "e": False}
    keys = tables[0].select(["alert", "score", "event_id"])
    final, flipped, change, raised, held = write.alert_changes(tables, keys, None)
    assert (raised, held) == (1, 0) and int(final["alert"].to_numpy(zero_copy_only=False).sum()) == 2
    assert flipped is not None and flipped.sum() == 1 and (change == write.RAISED).sum() == 1


def test_no_alert_no_promotion(tmp_path):
    rows = pd.DataFrame({"score": [0.5, 0.6], "event_id": ["a", "b"], "ts": [1.0, 2.0], "src_ip": ["10.0.0.5"] * 2,
                         "query": ["x.example"] * 2, "dst_ip": ["203.0.113.9"] * 2, "transform": ["P1", "P1"],
                         "rules": ["r", "r"], "alert": [False, False]})
    tables = _scored_files(tmp_path, rows)
    assert not write.name_promotions(tables, np.zeros(2, dtype=bool)).any()


def test_model_score_raises_the_same_rows_as_the_writer(small_day, scored):
    model, folder = small_day
    from esxi_anomaly.ingest import read_connections, read_dns, read_inventory
    from esxi_anomaly.schema import Frames

    ranked = model.score(Frames(read_connections(folder / "conn.log"), read_dns(folder / "dns.log"),
                                read_inventory(folder / "inventory.csv")), explain_top=0)
    written, _, _ = scored
    assert ranked["alert"].sum() == written["alert"].sum()
    assert set(ranked.loc[ranked["alert"], "event_id"]) == set(written.loc[written["alert"], "event_id"])


def test_a_run_with_nothing_in_scope_still_writes_its_report(small_day, bundle, tmp_path):
    _, folder = small_day
    out = tmp_path / "report.html"
    rc = cli.main(["score", "--model", str(bundle), "--conn", str(folder / "conn.log"), "--dns", str(folder / "dns.log"),
                   "--local-nets", "192.0.2.0/24", "--out", str(out), "--no-progress", "--workers", "1"])
    assert rc == EXIT_OK
    assert "<table" in out.read_text(encoding="utf-8")
    assert read(output.incidents_path(out)).empty and list(read(output.incidents_path(out))) == list(INCIDENTS)
