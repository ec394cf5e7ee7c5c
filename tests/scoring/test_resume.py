"""`--resume` trusts nothing it did not write: a fingerprint of the run, checkpoints that are plain
data (never unpickled), the interrupted run's quarantine, and any workers / chunk_rows."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from esxi_anomaly import ingest
from esxi_anomaly.scoring import core, local, output
from esxi_anomaly.features.stream_state import StreamState


@pytest.fixture(scope="module")
def setting(small_day, tmp_path_factory):
    """The small day, its conn.log with two bad lines (so that something is quarantined)."""
    from esxi_anomaly.ingest import read_inventory

    model, folder = small_day
    logs = tmp_path_factory.mktemp("logs")
    lines = (folder / "conn.log").read_text().splitlines(keepends=True)
    body = [i for i, line in enumerate(lines) if not line.startswith("#")]
    lines.insert(body[10], "not\ta\tvalid\trow\n")
    lines.insert(body[500], "\x00\x01garbage\n")
    (logs / "conn.log").write_text("".join(lines))
    return model, logs / "conn.log", folder / "dns.log", read_inventory(folder / "inventory.csv")


ARGS = dict(chunk_rows=700, bucket_s=1800, progress=False)


def score(setting, out, quarantine=None, summary=None, **args):
    model, conn, dns, inventory = setting
    return local.run(model, [conn], [dns], out, inventory=inventory, quarantine=quarantine, summary=summary,
                     **{**ARGS, **args})


def killed(setting, out, monkeypatch, after: int = 6, **args) -> None:
    """A run stopped (KeyboardInterrupt, as SIGINT/SIGTERM end one) after `after` progress reports."""
    real, calls = local.Progress.update, {"n": 0}

    def update(self, n):
        calls["n"] += 1
        if calls["n"] == after:
            raise KeyboardInterrupt("killed")
        real(self, n)

    monkeypatch.setattr(local.Progress, "update", update)
    with pytest.raises(KeyboardInterrupt):
        score(setting, out, **{"progress": True, **args})
    monkeypatch.setattr(local.Progress, "update", real)
    assert not out.exists() and (out.parent / (out.name + ".work") / "spill.json").exists()


@pytest.fixture(scope="module")
def full(setting, tmp_path_factory):
    """The uninterrupted run: output, roll-up, quarantine and read summary."""
    out = tmp_path_factory.mktemp("full") / "full.csv"
    quarantine, summary = ingest.Quarantine(), ingest.ReadSummary()
    result = score(setting, out, quarantine, summary)
    assert result.quarantined == 2
    return out.read_bytes(), output.rollup_path(out).read_bytes(), quarantine, summary


@pytest.mark.parametrize("first, then", [(dict(workers=2), dict(workers=1, chunk_rows=300)),
                                         (dict(workers=1), dict(workers=2, chunk_rows=2000))])
def test_resume_with_other_workers_and_chunk_rows_gives_the_same_bytes(tmp_path, setting, full, monkeypatch,
                                                                       first, then):
    out = tmp_path / "r.csv"
    killed(setting, out, monkeypatch, **first)
    quarantine, summary = ingest.Quarantine(), ingest.ReadSummary()
    result = score(setting, out, quarantine, summary, resume=True, **then)
    assert result.chunks_resumed > 0 and result.partitions == (2 if first["workers"] == 2 else 1)
    assert out.read_bytes() == full[0] and output.rollup_path(out).read_bytes() == full[1]
    # the quarantine and read summary of the interrupted spill are reported again
    assert result.quarantined == 2
    pd.testing.assert_frame_equal(quarantine.to_frame(), full[2].to_frame())
    assert [(f.path, f.kept, f.quarantined) for f in summary.files] == \
        [(f.path, f.kept, f.quarantined) for f in full[3].files]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv", "r.entities.csv", "r.incidents.csv"]   # no work, lock, temp


def test_resume_refuses_other_inputs_model_or_options(tmp_path, setting, monkeypatch, full):
    out = tmp_path / "r.csv"
    killed(setting, out, monkeypatch)
    work = tmp_path / "r.csv.work"
    conn = setting[1]
    st = conn.stat()
    os.utime(conn, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))   # the log was rewritten meanwhile
    try:
        with pytest.raises(output.ResumeRefused, match=r"--conn changed: .*conn.log modified.*rerun without --resume"):
            score(setting, out, resume=True)
    finally:
        os.utime(conn, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (work / "spill.json").exists() and not out.exists()   # refused: the work is kept
    with pytest.raises(output.ResumeRefused, match=r"--model changed"):
        score(setting, out, resume=True, model_id="another bundle")
    with pytest.raises(output.ResumeRefused, match=r"--top changed: None -> 5"):
        score(setting, out, resume=True, top=5)
    with pytest.raises(output.ResumeRefused, match=r"--inventory changed"):
        score(setting[:3] + (setting[3].iloc[1:],), out, resume=True)
    assert score(setting, out, resume=True).chunks_resumed > 0   # the same run continues
    assert out.read_bytes() == full[0]


class Planted:
    """A pickle that, once loaded, would leave a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_pickle_in_the_work_folder_is_never_loaded(tmp_path, setting, monkeypatch, full):
    import pickle

    out = tmp_path / "r.csv"
    killed(setting, out, monkeypatch)
    work = tmp_path / "r.csv.work"
    marker = tmp_path / "owned"
    payload = pickle.dumps(Planted(marker))
    for name in ("checkpoint-0.pkl", "checkpoint-1.pkl", "spill.pkl", "state.pkl"):
        (work / name).write_bytes(payload)
    for folder in work.glob("checkpoint-0.*"):
        if folder.is_dir():
            (folder / "top_rows.pkl").write_bytes(payload)
    score(setting, out, resume=True)
    assert not marker.exists()
    assert out.read_bytes() == full[0]


def test_checkpoint_and_stream_state_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    state = StreamState(
        seen={"ports": np.sort(rng.integers(0, 2**63, 50, dtype=np.uint64)), "name_answers": np.zeros(0, np.uint64)},
        counts={"client_nx": pd.Series(rng.random(5), index=rng.integers(0, 2**63, 5, dtype=np.uint64))},
        dns_owned_until=1234.5,
        recent={"qps": (rng.integers(0, 2**63, 4, dtype=np.uint64), rng.random(4))})
    state.to_files(tmp_path / "state")
    back = StreamState.from_files(tmp_path / "state")
    assert back.dns_owned_until == 1234.5 and list(back.seen) == list(state.seen)
    for name in state.seen:
        np.testing.assert_array_equal(back.seen[name], state.seen[name])
        assert back.seen[name].dtype == state.seen[name].dtype
    pd.testing.assert_series_equal(back.counts["client_nx"], state.counts["client_nx"])
    for a, b in zip(back.recent["qps"], state.recent["qps"]):
        np.testing.assert_array_equal(a, b)
    assert StreamState.from_files(_saved(tmp_path / "empty", StreamState())).dns_owned_until == -np.inf

    rows = pd.DataFrame({"score": [0.9, 0.5], "event_id": ["C1", "C2"], "bucket": [3, 4], "row": [0, 7],
                         "query": ["a.example", None], "alert": [True, False]})
    feats = pd.DataFrame({"f1": [1.0, np.nan], "f2": [0, 3]})
    cp = core.Checkpoint(done_buckets=[-1, 0, 1], state=state, top_rows=rows, top_feats=feats, alerts=3,
                          scored=11, files={"0.scored.arrow": 11})
    cp.to_files(tmp_path / "cp")
    got = core.Checkpoint.from_files(tmp_path / "cp")
    assert (got.version, got.done_buckets, got.alerts, got.scored, got.files) == \
        (core.CHECKPOINT_VERSION, [-1, 0, 1], 3, 11, {"0.scored.arrow": 11})
    pd.testing.assert_frame_equal(got.top_rows, rows)
    pd.testing.assert_frame_equal(got.top_feats, feats)
    np.testing.assert_array_equal(got.state.seen["ports"], state.seen["ports"])
    assert core.Checkpoint.from_files(_saved(tmp_path / "none", core.Checkpoint())).top_rows is None
    assert not list(tmp_path.rglob("*.pkl"))


def _saved(folder, obj):
    obj.to_files(folder)
    return folder


def test_a_resumed_cli_run_prints_the_dns_coverage_of_the_interrupted_spill(tmp_path, setting, monkeypatch, capsys):
    """The coverage of the spill (connection sources, DNS clients per source) is kept in reads.json:
    `score --resume` prints the same coverage lines as the uninterrupted run, Sysmon names included."""
    from esxi_anomaly import cli
    from esxi_anomaly.registry import write_model
    from esxi_anomaly.training import TrainConfig
    from tests.features.test_identity import named_sysmon

    model, conn, dns, _ = setting
    sysmon, _ = named_sysmon(dns.parent, tmp_path / "sysmon.json")
    bundle = write_model(model, TrainConfig(env="t"), tmp_path / "models")

    def score_cli(out, *more):
        code = cli.main(["score", "--model", str(bundle), "--conn", str(conn), "--dns", str(dns), str(sysmon),
                         "--inventory", str(dns.parent / "inventory.csv"), "--out", str(out), "--chunk-rows", "700",
                         "--workers", "1", "--no-progress", *more])
        return code, [line for line in capsys.readouterr().err.splitlines() if "DNS source" in line]

    code, expected = score_cli(tmp_path / "full.csv")
    assert code == 0 and expected == [
        "DNS source sysmon_dns: 8 of 8 clients (100.0 %) resolved to a connection source",
        "DNS source zeek_dns_tsv: 44 of 44 clients (100.0 %) resolved to a connection source"]
    real, calls = local.Progress.update, {"n": 0}

    def update(self, n):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt("killed")
        real(self, n)

    monkeypatch.setattr(local.Progress, "update", update)
    assert score_cli(tmp_path / "r.csv")[0] == 130
    monkeypatch.setattr(local.Progress, "update", real)
    assert (tmp_path / "r.csv.work" / "spill.json").exists()
    code, resumed = score_cli(tmp_path / "r.csv", "--resume")
    assert code == 0 and resumed == expected
    assert (tmp_path / "r.csv").read_bytes() == (tmp_path / "full.csv").read_bytes()
