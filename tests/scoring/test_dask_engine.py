"""Dask engine: partitions by source on a LocalCluster give exactly the local engine's outputs."""
from __future__ import annotations


import numpy as np
import pandas as pd
import pytest

from esxi_anomaly.scoring import core, dask_engine, local

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def setting(small_day):
    from esxi_anomaly.ingest import read_connections, read_dns, read_inventory

    model, folder = small_day
    inventory = read_inventory(folder / "inventory.csv")  # as the CLI reads it
    local_csv = folder / "local.csv"
    local.run(model, [folder / "conn.log"], [folder / "dns.log"], local_csv, inventory=inventory, progress=False)
    counts = (len(read_connections(folder / "conn.log")), len(read_dns(folder / "dns.log")))
    return model, folder, inventory, local_csv, counts


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as c:
        yield c


def read(path):
    return pd.read_csv(path, dtype={"event_id": "str"}, keep_default_na=False)


def test_dask_equals_local_engine(tmp_path, setting, client):
    model, folder, inventory, local_csv, (n_conn, n_dns) = setting
    out = tmp_path / "dask.csv"
    summary = dask_engine.run(model, [folder / "conn.log"], [folder / "dns.log"], out, inventory=inventory,
                              scheduler=client, partitions=5)
    assert summary.connections == summary.written == n_conn
    assert summary.dns_records == n_dns
    assert summary.partitions == 5
    expected = read(local_csv)
    assert summary.alerts == int(expected["alert"].sum()) > 0
    assert {"read+spill connections", "read+spill dns", "cluster+broadcast", "score", "rank+write"} <= set(summary.stages_s)
    pd.testing.assert_frame_equal(expected, read(out))
    assert (read(out)["top_features"] != "").sum() == 200  # attributions merged from the partitions' tops
    assert summary.entities > 1
    pd.testing.assert_frame_equal(read(folder / "local.entities.csv"), read(tmp_path / "dask.entities.csv"))
    assert not (tmp_path / "dask.csv.work").exists()
    assert client.status == "running"  # a client passed in is left open


def test_dask_resolves_host_named_dns_clients_before_partitioning(tmp_path, setting, client):
    """Sysmon EID 22 clients named by host: resolved to the host's IP before the spill, so they land in
    the partition of its connections and join them, as under the local engine."""
    from tests.features.test_identity import named_joined, named_sysmon

    model, folder, inventory, _, _ = setting
    sysmon, events = named_sysmon(folder, tmp_path / "sysmon.json")
    conn, dns = [folder / "conn.log"], [folder / "dns.log", sysmon]
    local.run(model, conn, dns, tmp_path / "local.csv", inventory=inventory, progress=False)
    result = dask_engine.run(model, conn, dns, tmp_path / "dask.csv", inventory=inventory, scheduler=client,
                             partitions=5)
    assert result.partitions == 5
    expected, got = read(tmp_path / "local.csv"), read(tmp_path / "dask.csv")
    assert len(events) == 24 and named_joined(expected) == 8
    pd.testing.assert_frame_equal(expected, got)


def test_cli_engine_dask_starts_its_own_cluster_parquet_top(tmp_path, setting):
    from esxi_anomaly import cli
    from esxi_anomaly.registry import write_model
    from esxi_anomaly.training import TrainConfig

    model, folder, _, local_csv, _ = setting
    bundle = write_model(model, TrainConfig(env="t"), tmp_path / "models")
    out = tmp_path / "dask.parquet"
    assert cli.main(["score", "--model", str(bundle), "--conn", str(folder / "conn.log"), "--dns", str(folder / "dns.log"),
                     "--inventory", str(folder / "inventory.csv"), "--out", str(out), "--top", "50",
                     "--engine", "dask"]) == 0
    got, expected = pd.read_parquet(out), read(local_csv).head(50)
    assert got["rank"].tolist() == list(range(1, 51))
    assert got["event_id"].tolist() == expected["event_id"].tolist()
    np.testing.assert_allclose(got["score"].to_numpy(), expected["score"].to_numpy(), rtol=1e-12)
    assert got["top_features"].tolist() == expected["top_features"].tolist()
    assert got["explanation"].tolist() == expected["explanation"].tolist()
    assert not (tmp_path / "dask.parquet.work").exists()


def test_source_slot_is_stable_and_shared_by_connections_and_dns():
    ips = np.array(["10.0.0.1", "10.0.0.2", "fe80::1", "10.0.0.1", ""], dtype=object)
    slots = core.source_slot(ips)
    assert slots.dtype == np.int32 and ((slots >= 0) & (slots < core.N_SLOTS)).all()
    assert slots[0] == slots[3]
    # a value, not an accident of the process: pandas' stable hash, the same on every worker
    again = core.source_slot(pd.Series(["10.0.0.1"], dtype="str").to_numpy(dtype=object))
    assert again[0] == slots[0]
    assert len(set(core.source_slot(np.array([f"10.0.{i // 256}.{i % 256}" for i in range(4000)],
                                                    dtype=object)).tolist())) > 3500


def test_choose_partitions_balances_rows_and_skips_slots_without_connections():
    conn = np.zeros(core.N_SLOTS, dtype="int64")
    dns = np.zeros(core.N_SLOTS, dtype="int64")
    conn[[10, 20, 30, 40]] = 100
    dns[[10, 20, 30, 40, 50]] = 100  # slot 50: DNS of a source without connections
    ranges = dask_engine.choose_partitions(conn, dns, partitions=None, min_partitions=1, partition_rows=450)
    assert ranges == [(0, 31), (31, core.N_SLOTS)]  # 900 rows -> 2 cuts at the weighted middle
    covered = [s for lo, hi in ranges for s in (10, 20, 30, 40) if lo <= s < hi]
    assert sorted(covered) == [10, 20, 30, 40]  # every source slot in exactly one partition
    assert sum(int(conn[lo:hi].sum()) for lo, hi in ranges) == 400
    assert len(dask_engine.choose_partitions(conn, dns, partitions=3)) == 3
    many = dask_engine.choose_partitions(conn, dns, partitions=50)  # at most one per slot with connections
    assert 1 < len(many) <= 4 and all(conn[lo:hi].any() for lo, hi in many)
    assert dask_engine.choose_partitions(conn, dns, None, min_partitions=8) == \
        dask_engine.choose_partitions(conn, dns, 4)


def test_a_worker_that_cannot_see_the_work_folder_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="shared|filesystem"):
        dask_engine.score_partition(None, None, None, str(tmp_path / "elsewhere"), 0, 0, core.N_SLOTS, 200)
