"""Acceptance on real captures (issue #16): trained on the first 60 % of a real day, scoring the rest
raises no alert, and the run summary names the DNS-coverage gap.

The Stratosphere captures (`../shared/samples/stratosphere-real-traffic/`, skipped where absent):
two benign days of a university host (ctu-normal-43-day1 with an almost empty dns.log,
ctu-normal-40-day1 without one), the Simda bot and an Android RAT (neither calculates ports from
DNS answers). The days are split by time into two Zeek TSV files each and run through the CLI, as
a user would. When an alert remains, the failure lists its rows (rules, explanation).
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pytest

from esxi_anomaly import cli
from esxi_anomaly.console import EXIT_OK, EXIT_QUARANTINE

CAPTURES = "stratosphere-real-traffic"
TRAIN_FRACTION = 0.6


def _split_day(folder: Path, out: Path) -> tuple[list[str], list[str], list[str], list[str]]:
    """conn.log.gz (and dns.log.gz when there is one) of `folder` cut at 60 % of the connections'
    time span: (train conn, train dns, test conn, test dns) Zeek TSV files, headers kept. Without a
    dns.log, the DNS files are empty (the capture has none)."""
    def lines(name: str) -> tuple[list[bytes], list[bytes]]:
        path = folder / name
        if not path.exists():
            return [], []
        text = gzip.decompress(path.read_bytes()).split(b"\n")
        return ([line for line in text if line.startswith(b"#") and not line.startswith(b"#close")],
                [line for line in text if line and not line.startswith(b"#")])

    conn_head, conn_rows = lines("conn.log.gz")
    ts = [float(row.split(b"\t", 1)[0]) for row in conn_rows]
    cut = min(ts) + (max(ts) - min(ts)) * TRAIN_FRACTION
    paths = []
    for name in ("conn", "dns"):
        head, rows = (conn_head, conn_rows) if name == "conn" else lines("dns.log.gz")
        for part, keep in (("train", lambda t: t < cut), ("test", lambda t: t >= cut)):
            path = out / f"{part}-{name}.log"
            chosen = [row for row in rows if keep(float(row.split(b"\t", 1)[0]))]
            path.write_bytes(b"\n".join(head + chosen) + b"\n" if head else b"")
            paths.append(str(path))
    conn_train, conn_test, dns_train, dns_test = paths
    return [conn_train], [dns_train], [conn_test], [dns_test]


def _train_and_score(samples: Path, tmp_path: Path, capture: str, *extra: str) -> tuple[int, dict, pd.DataFrame]:
    train_conn, train_dns, test_conn, test_dns = _split_day(samples / CAPTURES / capture, tmp_path)
    models = str(tmp_path / "models")
    assert cli.main(["train", "--env", "real", "--models-dir", models, "--conn", *train_conn, "--dns", *train_dns,
                     "--allow-odd-history"]) == EXIT_OK
    out, stats = tmp_path / "ranked.csv", tmp_path / "stats.json"
    rc = cli.main(["score", "--env", "real", "--models-dir", models, "--conn", *test_conn, "--dns", *test_dns,
                   "--out", str(out), "--stats-json", str(stats), "--workers", "1", "--no-progress", *extra])
    ranked = pd.read_csv(out, dtype={"event_id": "str"}, keep_default_na=False)
    return rc, json.loads(stats.read_text()), ranked


def _alerts(ranked: pd.DataFrame) -> str:
    """The alerting rows, for the failure message: whose part they fall in (rules, evidence)."""
    rows = ranked[ranked["alert"].astype(str) == "True"]
    cols = ["rank", "score", "src_ip", "dst_ip", "dst_port", "proto", "query", "transform", "rules", "explanation"]
    return rows[cols].head(20).to_string()


@pytest.mark.parametrize("capture", ["ctu-normal-43-day1", "ctu-normal-40-day1"])
def test_benign_day_has_no_alert_and_names_the_dns_gap(samples, tmp_path, capsys, capture):
    rc, stats, ranked = _train_and_score(samples, tmp_path, capture)
    assert rc == EXIT_OK
    assert not (ranked["alert"].astype(str) == "True").any(), f"alerts on a benign day:\n{_alerts(ranked)}"
    # every row read is scored or counted out of scope, by reason; inbound scans are not ranked
    assert stats["connections"] == stats["in_scope"] + sum(stats["out_of_scope"].values())
    assert stats["out_of_scope"]["inbound"] > 0 and stats["connections_merged"] == len(ranked)
    # the run summary names the DNS-coverage gap, in the stats and on stderr
    gap = [line for line in stats["diagnostics"] if "joined to a DNS answer" in line]
    assert gap and stats["coverage"]["dns_share"] < 0.5, stats["diagnostics"]
    assert gap[0] in capsys.readouterr().err


@pytest.mark.parametrize("capture", ["simda-005", "android-rat-003"])
def test_malware_that_calculates_no_port_raises_no_alert(samples, tmp_path, capture):
    rc, stats, ranked = _train_and_score(samples, tmp_path, capture)
    assert rc == EXIT_OK
    assert not (ranked["alert"].astype(str) == "True").any(), f"alerts on {capture}:\n{_alerts(ranked)}"
    assert stats["connections"] == stats["in_scope"] + sum(stats["out_of_scope"].values())
    # the lookups to the resolvers and ICMP are counted out of scope, not ranked
    assert stats["out_of_scope"]["resolver_lookup"] > 0 and stats["out_of_scope"]["icmp"] > 0
    assert not ranked["proto"].isin(["icmp"]).any() and not ranked["dst_port"].isin([53]).any()


def test_strict_fails_on_the_dns_gap(samples, tmp_path):
    rc, stats, _ = _train_and_score(samples, tmp_path, "ctu-normal-43-day1", "--strict")
    assert rc == EXIT_QUARANTINE and stats["diagnostics"]


def test_the_scope_given_to_train_is_the_default_of_score(samples, tmp_path):
    """`train --local-nets` records the scope in the bundle (model and config); `score` uses it
    unless told otherwise; `--all-directions` keeps every row."""
    from esxi_anomaly import registry

    train_conn, train_dns, test_conn, test_dns = _split_day(samples / CAPTURES / "simda-005", tmp_path)
    models = str(tmp_path / "models")
    assert cli.main(["train", "--env", "real", "--models-dir", models, "--conn", *train_conn, "--dns", *train_dns,
                     "--allow-odd-history", "--local-nets", "192.168.1.0/25"]) == EXIT_OK
    model, manifest = registry.load_model(registry.newest_version(models, "real"))
    assert model.scope_.local_nets == ("192.168.1.0/25",) and "8.8.8.8" in model.scope_.resolvers
    assert manifest["config"]["scope"]["local_nets"] == ["192.168.1.0/25"]
    runs = {}
    for name, extra in (("default", []), ("all", ["--all-directions"])):
        stats = tmp_path / f"{name}.json"
        assert cli.main(["score", "--env", "real", "--models-dir", models, "--conn", *test_conn, "--dns", *test_dns,
                         "--out", str(tmp_path / f"{name}.csv"), "--stats-json", str(stats), "--workers", "1",
                         "--no-progress", *extra]) == EXIT_OK
        runs[name] = json.loads(stats.read_text())
    assert runs["default"]["scope"]["local_nets"] == ["192.168.1.0/25"] and not runs["default"]["scope"]["all_directions"]
    assert "8.8.8.8" in runs["default"]["scope"]["resolvers"] and runs["default"]["out_of_scope"]["resolver_lookup"]
    assert runs["all"]["scope"]["all_directions"] and runs["all"]["scope"]["local_nets"] == ["192.168.1.0/25"]
    assert runs["all"]["out_of_scope"] == {} and runs["all"]["in_scope"] == runs["all"]["connections"]
