"""The local engine: chunked = one-shot, resume after an interruption, atomic outputs."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from esxi_anomaly.scoring import core, local, output, write
from esxi_anomaly.report.csv import write_csv
from esxi_anomaly.schema import Frames


@pytest.fixture(scope="module")
def setting(small_day):
    from esxi_anomaly.ingest import read_connections, read_dns, read_inventory

    model, folder = small_day
    frames = Frames(read_connections(folder / "conn.log"), read_dns(folder / "dns.log"),
                    read_inventory(folder / "inventory.csv"))
    return model, folder, frames


def read(path):
    return pd.read_csv(path, dtype={"event_id": "str"}, keep_default_na=False)


def test_chunked_stream_equals_one_shot(tmp_path, setting, monkeypatch):
    model, folder, frames = setting
    monkeypatch.setattr(write, "WRITE_BLOCK", 1000)   # many output blocks, prepared two at a time
    one_shot = model.score(frames)
    write_csv(one_shot, tmp_path / "one.csv")
    out = tmp_path / "streamed.csv"
    # small chunks and half-hour buckets: many chunk borders, state carried across all of them
    summary = local.run(model, [folder / "conn.log"], [folder / "dns.log"], out, inventory=frames.inventory,
                        chunk_rows=600, bucket_s=1800, progress=False)
    assert summary.connections == len(frames.connections) == summary.written
    a, b = read(tmp_path / "one.csv"), read(out)
    assert len(frames.connections) > 10 * 600
    pd.testing.assert_frame_equal(a, b)
    assert (tmp_path / "one.csv").read_bytes() == out.read_bytes()   # same encoder, same bytes
    assert not (tmp_path / "streamed.csv.work").exists()


def killed_run(monkeypatch, model, folder, frames, out, **args) -> None:
    """Run `local.run` and kill it (KeyboardInterrupt) at its 5th chunk, as an interrupted job."""
    calls, real = {"n": 0}, local.merge_top

    def interrupt(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(local, "merge_top", interrupt)
    with pytest.raises(KeyboardInterrupt):
        local.run(model, [folder / "conn.log"], [folder / "dns.log"], out, inventory=frames.inventory, **args)
    monkeypatch.setattr(local, "merge_top", real)


def test_resume_after_interruption_gives_the_same_output(tmp_path, setting, monkeypatch):
    model, folder, frames = setting
    args = dict(chunk_rows=900, bucket_s=1800, progress=False)
    full = tmp_path / "full.csv"
    local.run(model, [folder / "conn.log"], [folder / "dns.log"], full, inventory=frames.inventory, **args)

    out = tmp_path / "resumed.csv"
    killed_run(monkeypatch, model, folder, frames, out, **args)
    assert not out.exists()  # never a half-written output under the final name
    cp = core.load_checkpoint(tmp_path / "resumed.csv.work", 0)
    assert 0 < len(cp.done_buckets)
    summary = local.run(model, [folder / "conn.log"], [folder / "dns.log"], out,
                        inventory=frames.inventory, resume=True, **args)
    assert summary.chunks_resumed == len(cp.done_buckets)
    pd.testing.assert_frame_equal(read(full), read(out))


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_other_formats_and_top(tmp_path, setting, fmt):
    model, folder, frames = setting
    out = tmp_path / f"top.{fmt}"
    local.run(model, [folder / "conn.log"], [folder / "dns.log"], out,
              inventory=frames.inventory, top=50, progress=False)
    if fmt == "parquet":
        table = pd.read_parquet(out)
        assert table["rank"].tolist() == list(range(1, 51))
        assert table["score"].is_monotonic_decreasing
    else:
        lines = out.read_text().splitlines()
        assert len(lines) == 50
        from esxi_anomaly.report.ecs import validate_ecs_record
        import json

        for line in lines:
            validate_ecs_record(json.loads(line))


def test_entity_rollup_written_next_to_the_output_covers_every_row(tmp_path, setting):
    from esxi_anomaly.report.rollup import entity_rollup

    model, folder, frames = setting
    out = tmp_path / "ranked.csv"
    summary = local.run(model, [folder / "conn.log"], [folder / "dns.log"], out, inventory=frames.inventory, top=30,
                        chunk_rows=700, bucket_s=1800, progress=False)
    assert summary.written == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ranked.csv", "ranked.entities.csv",
                                                          "ranked.incidents.csv"]  # no temp files
    expected = entity_rollup(model.score(frames))  # one shot, over all rows; alerts: the rows' alert flags
    write_csv(expected, tmp_path / "expected" / "entities.csv")
    got = read(tmp_path / "ranked.entities.csv")
    pd.testing.assert_frame_equal(got, read(tmp_path / "expected" / "entities.csv"))
    assert summary.entities == len(got) == frames.connections["src_ip"].nunique()
    assert got["connections"].sum() == len(frames.connections) and got["alerts"].sum() == summary.alerts > 0
    assert got["max_score"].is_monotonic_decreasing


def test_rollup_path_and_switching_it_off(tmp_path, setting):
    assert output.rollup_path(tmp_path / "r.csv") == tmp_path / "r.entities.csv"
    assert output.rollup_path(tmp_path / "report.html") == tmp_path / "report.entities.csv"
    assert output.rollup_path(tmp_path / "out") == tmp_path / "out.entities.csv"
    model, folder, frames = setting
    summary = local.run(model, [folder / "conn.log"], [folder / "dns.log"], tmp_path / "r.jsonl",
                        inventory=frames.inventory, top=5, progress=False, rollup=False)
    assert summary.entities == 0 and [p.name for p in tmp_path.iterdir()] == ["r.jsonl"]


def test_html_output_holds_the_default_top_rows_explained_and_the_rollup_all(tmp_path, setting, monkeypatch):
    model, folder, frames = setting
    monkeypatch.setattr(write, "HTML_DEFAULT_TOP", 40)
    monkeypatch.setattr(write, "WRITE_BLOCK", 16)     # several blocks in flight, written in order
    out = tmp_path / "report.html"
    summary = local.run(model, [folder / "conn.log"], [folder / "dns.log"], out,
                        inventory=frames.inventory, progress=False)
    expected = model.score(frames, top=40)
    assert summary.written == 40 and summary.entities == frames.connections["src_ip"].nunique()
    page = out.read_text(encoding="utf-8")
    embedded = [json.dumps(text[:150], ensure_ascii=True)[1:-1].replace("<", "\\u003c").replace(">", "\\u003e")
                .replace("&", "\\u0026") for text in expected["explanation"]]
    assert all(event_id in page for event_id in expected["event_id"])
    assert all(text in page for text in embedded)   # the sentences of the rows shown, as the page embeds them
    assert read(tmp_path / "report.entities.csv")["connections"].sum() == len(frames.connections)


def test_chunk_bounds_never_split_equal_times():
    ts = np.array([1, 1, 2, 2, 2, 3, 4, 4, 5], dtype=float)
    assert core.chunk_bounds(ts, 2) == [(0, 2), (2, 5), (5, 8), (8, 9)]
    assert core.chunk_bounds(ts, 100) == [(0, 9)]


def test_worker_processes_give_the_same_output(tmp_path, setting, monkeypatch):
    model, folder, frames = setting
    monkeypatch.setattr(write, "WRITE_BLOCK", 1000)   # several CSV blocks, built by the workers
    args = dict(chunk_rows=800, bucket_s=1800, progress=False)
    one = local.run(model, [folder / "conn.log"], [folder / "dns.log"], tmp_path / "one.csv",
                    inventory=frames.inventory, **args)
    two = local.run(model, [folder / "conn.log"], [folder / "dns.log"], tmp_path / "two.csv",
                    inventory=frames.inventory, workers=2, **args)
    assert (one.partitions, two.partitions) == (1, 2)
    assert (tmp_path / "one.csv").read_bytes() == (tmp_path / "two.csv").read_bytes()
    assert (tmp_path / "one.entities.csv").read_bytes() == (tmp_path / "two.entities.csv").read_bytes()
    # with workers, the roll-up and incidents are made while the workers build the CSV blocks
    assert (tmp_path / "one.incidents.csv").read_bytes() == (tmp_path / "two.incidents.csv").read_bytes()
    assert (one.written, one.alerts, one.entities, one.incidents) == (two.written, two.alerts, two.entities,
                                                                      two.incidents)


def test_a_block_that_fails_stops_the_run_and_replaces_nothing(tmp_path, setting, monkeypatch):
    model, folder, frames = setting
    monkeypatch.setattr(write, "WRITE_BLOCK", 1000)
    appended = []

    def disk_full(path, out):
        appended.append(path)
        if len(appended) == 2:
            raise OSError(28, "No space left on device", str(path))
        return real_append(path, out)

    real_append = write.append_file
    monkeypatch.setattr(write, "append_file", disk_full)
    out = tmp_path / "r.csv"
    with pytest.raises(OSError, match="No space left"):
        local.run(model, [folder / "conn.log"], [folder / "dns.log"], out, inventory=frames.inventory,
                  chunk_rows=800, bucket_s=1800, progress=False, workers=2)
    assert list(tmp_path.iterdir()) == []   # no output, roll-up, incidents, staged file or work folder


def test_partitions_balance_skewed_sources():
    weight = np.zeros(core.N_SLOTS, dtype="int64")
    weight[[3, 70, 900, 4000, 65535]] = [100, 60, 50, 30, 20]
    balanced = core.assign_partitions(weight, np.zeros_like(weight), 2)
    assert sorted(np.bincount(balanced, weights=weight)) == [130, 130]   # 100+30 and 60+50+20
    dns = np.zeros_like(weight)
    dns[[3, 5]] = [1000, 1000]   # answers to a source without connections weigh nothing
    part_of = core.assign_partitions(weight, dns, 2)
    loads = np.bincount(part_of, weights=weight + np.where(weight > 0, dns, 0))
    assert sorted(loads) == [160, 1100]                   # the heavy source alone, the rest together
    assert core.assign_partitions(weight, dns, 8).max() == 4  # never more partitions than used slots
    assert (core.assign_partitions(weight, dns, 1) == 0).all()


def test_resume_with_workers_after_the_run_was_killed(tmp_path, setting, monkeypatch):
    model, folder, frames = setting
    args = dict(chunk_rows=700, bucket_s=1800, progress=True, workers=2)
    local.run(model, [folder / "conn.log"], [folder / "dns.log"], tmp_path / "full.csv",
              inventory=frames.inventory, **args)
    out = tmp_path / "resumed.csv"
    real, calls = local.Progress.update, {"n": 0}

    def killed(self, n):   # the parent is stopped while the workers are scoring
        calls["n"] += 1
        if calls["n"] == 8:   # after some groups of each worker are checkpointed
            raise KeyboardInterrupt("killed")
        real(self, n)

    monkeypatch.setattr(local.Progress, "update", killed)
    with pytest.raises(KeyboardInterrupt):
        local.run(model, [folder / "conn.log"], [folder / "dns.log"], out, inventory=frames.inventory, **args)
    assert not out.exists()
    done = [cp.done_buckets for cp in (core.load_checkpoint(tmp_path / "resumed.csv.work", k) for k in (0, 1)) if cp]
    assert done and sum(map(len, done)) > 0
    monkeypatch.setattr(local.Progress, "update", real)
    summary = local.run(model, [folder / "conn.log"], [folder / "dns.log"], out,
                        inventory=frames.inventory, resume=True, **args)
    assert summary.chunks_resumed == sum(map(len, done)) and summary.partitions == 2
    assert (tmp_path / "full.csv").read_bytes() == out.read_bytes()


def test_workers_read_files_in_parallel_keeping_quarantine_and_errors(tmp_path, setting):
    from esxi_anomaly import ingest

    model, folder, frames = setting
    lines = (folder / "conn.log").read_text().splitlines(keepends=True)
    header = [line for line in lines if line.startswith("#")]
    rows = [line for line in lines if not line.startswith("#")]
    half = len(rows) // 2
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "conn.a.log").write_text("".join(header + rows[:half] + ["not\ta\tvalid\trow\n"]))
    (logs / "conn.b.log").write_text("".join(header + ["\x00\x01garbage\n"] + rows[half:]))
    got = {}
    for workers in (1, 2):
        quarantine, summary = ingest.Quarantine(), ingest.ReadSummary()
        out = tmp_path / f"w{workers}.csv"
        result = local.run(model, [logs], [folder / "dns.log"], out, inventory=frames.inventory, progress=False,
                           quarantine=quarantine, summary=summary, workers=workers)
        got[workers] = (out.read_bytes(), quarantine.to_frame(), [(f.path, f.kept, f.quarantined) for f in summary.files])
        assert result.connections == len(rows) and result.quarantined == 2
    assert got[1][0] == got[2][0]
    pd.testing.assert_frame_equal(got[1][1], got[2][1])
    assert got[1][2] == got[2][2] and [q for _, _, q in got[2][2][:2]] == [1, 1]
    with pytest.raises(ingest.IngestError, match="dns.log.*not"):   # an explicit file of the wrong kind
        local.run(model, [folder / "dns.log"], [folder / "dns.log"], tmp_path / "x.csv", inventory=frames.inventory,
                  progress=False, workers=2)


def test_resume_refuses_a_damaged_scored_file(tmp_path, setting, monkeypatch):
    model, folder, frames = setting
    args = dict(chunk_rows=900, bucket_s=1800, progress=False)
    out = tmp_path / "damaged.csv"
    killed_run(monkeypatch, model, folder, frames, out, **args)
    scored = sorted((tmp_path / "damaged.csv.work" / "scored").iterdir())
    scored[0].write_bytes(scored[0].read_bytes()[:100])   # what a machine crash can leave
    with pytest.raises(ValueError, match="damaged"):
        local.run(model, [folder / "conn.log"], [folder / "dns.log"], out,
                  inventory=frames.inventory, resume=True, **args)
    assert not (tmp_path / "damaged.csv.work").exists()   # refused and useless: removed
    killed_run(monkeypatch, model, folder, frames, out, **args)
    checkpoint = tmp_path / "damaged.csv.work" / "checkpoint-0.json"
    checkpoint.write_bytes(checkpoint.read_bytes()[:10])
    with pytest.raises(ValueError, match="checkpoint-0.json is damaged"):
        local.run(model, [folder / "conn.log"], [folder / "dns.log"], out,
                  inventory=frames.inventory, resume=True, **args)
