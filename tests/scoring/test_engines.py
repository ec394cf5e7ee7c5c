"""The two engines are one scoring: the same inputs, with an analyst's benign verdict recorded, give
byte-identical ranked output and roll-up through `--engine local` and `--engine dask`, and the
suppressed row sinks under both (`core.score_block` applies the verdicts for each engine)."""
from __future__ import annotations

import pandas as pd
import pytest

from esxi_anomaly import cli

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def bundle(small_day, tmp_path_factory):
    from esxi_anomaly.registry import write_model
    from esxi_anomaly.training import TrainConfig

    model, _ = small_day
    return write_model(model, TrainConfig(env="t"), tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def scheduler():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def score(bundle, folder, out, *engine) -> None:
    assert cli.main(["score", "--model", str(bundle), "--conn", str(folder / "conn.log"), "--dns",
                     str(folder / "dns.log"), "--inventory", str(folder / "inventory.csv"), "--out", str(out),
                     "--no-progress", *engine]) == 0


def read(path):
    return pd.read_csv(path, dtype={"event_id": "str"}, keep_default_na=False)


def test_local_and_dask_give_the_same_bytes_with_a_benign_verdict(tmp_path, small_day, bundle, scheduler):
    _, folder = small_day
    before = tmp_path / "before.csv"
    score(bundle, folder, before, "--workers", "1")
    first = read(before).iloc[0]
    assert first["query"] != "" and "suppressed" not in read(before).columns   # no verdicts yet
    # the analyst calls the top row benign: stored next to the bundle's versions, it becomes a suppression
    assert cli.main(["label", "--env", "t", "--models-dir", str(bundle.parent.parent), "--event-id",
                     first["event_id"], "--verdict", "benign", "--scores", str(before)]) == 0

    local, dask = tmp_path / "local.csv", tmp_path / "dask.csv"
    score(bundle, folder, local, "--workers", "2")
    score(bundle, folder, dask, "--engine", "dask", "--scheduler", scheduler)
    assert local.read_bytes() == dask.read_bytes()
    assert (tmp_path / "local.entities.csv").read_bytes() == (tmp_path / "dask.entities.csv").read_bytes()

    ranked = read(dask)
    same = ((ranked["src_ip"] == first["src_ip"]) & (ranked["query"] == first["query"])
            & (ranked["dst_port"] == first["dst_port"]))
    assert ranked.loc[same, "suppressed"].all() and ranked["suppressed"].sum() == same.sum()
    assert ranked.iloc[0]["event_id"] != first["event_id"] and not ranked.iloc[0]["suppressed"]
    row = ranked[ranked["event_id"] == first["event_id"]].iloc[0]
    assert row["score"] == pytest.approx(first["score"] * 0.1) and not row["alert"]
