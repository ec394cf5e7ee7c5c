"""What the command line says when something goes wrong: one escaped line and an exit code, never a
traceback (unless ESXI_ANOMALY_DEBUG=1) (issue #13 item 8)."""
from __future__ import annotations

import errno
import importlib.metadata
import os
import shutil
import signal
import sys

import pandas as pd
import pytest

from esxi_anomaly import cli
from esxi_anomaly.console import EXIT_INPUT, EXIT_INTERNAL, Interrupted
from esxi_anomaly.ingest import IngestError
from esxi_anomaly.scoring.workers import WorkerError

HOSTILE = "x\x1b[2Jy.log"   # a file name that would clear the analyst's screen


@pytest.fixture(scope="module")
def bundle(small_day, tmp_path_factory):
    from esxi_anomaly.registry import write_model
    from esxi_anomaly.training import TrainConfig

    return write_model(small_day[0], TrainConfig(env="t"), tmp_path_factory.mktemp("models"))


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"esxi-anomaly {command}: error: ")
    return lines[0][len(f"esxi-anomaly {command}: error: "):]


def test_evaluate_without_event_id_names_the_file_and_the_column(tmp_path, capsys):
    scores, labels = tmp_path / "scores.csv", tmp_path / "labels.csv"
    scores.write_text("rank,score\n1,0.9\n")
    labels.write_text("event_id,label\nC1,attack\n")
    assert cli.main(["evaluate", "--scores", str(scores), "--labels", str(labels)]) == EXIT_INPUT
    assert one_error_line(capsys, "evaluate") == (f"{scores}: no event_id column; is it a file written by "
                                                  "`esxi-anomaly score`?")


def test_evaluate_of_an_empty_or_foreign_file_names_it(tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    labels.write_text("event_id,label\nC1,attack\n")
    (tmp_path / "empty.csv").write_text("")
    assert cli.main(["evaluate", "--scores", str(tmp_path / "empty.csv"), "--labels", str(labels)]) == EXIT_INPUT
    assert one_error_line(capsys, "evaluate").startswith(f"{tmp_path / 'empty.csv'}: not a readable scored file")
    (tmp_path / "other.jsonl").write_text('{"x": 1}\n')
    assert cli.main(["evaluate", "--scores", str(tmp_path / "other.jsonl"), "--labels", str(labels)]) == EXIT_INPUT
    assert one_error_line(capsys, "evaluate").startswith(f"{tmp_path / 'other.jsonl'}: no event_id or score column")


def test_dask_engine_without_distributed_says_which_extra_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "distributed", None)   # `import distributed` now fails
    rc = cli.main(["score", "--engine", "dask", "--model", str(tmp_path / "bundle"), "--conn", "c.log",
                   "--dns", "d.log", "--out", str(tmp_path / "ranked.csv")])
    assert rc == EXIT_INPUT
    message = one_error_line(capsys, "score")   # said at once, before the model or any input is read
    assert message.startswith("--engine dask needs Dask's `distributed`, which is not installed")
    assert message.endswith("install the extra with: pip install 'esxi-anomaly[dask]'")


@pytest.mark.parametrize("command", ["generate", "demo"])
def test_an_unusable_output_folder_is_a_message_and_exit_input(command, capsys):
    assert cli.main([command, "--out", "/dev/null/x"]) == EXIT_INPUT
    assert one_error_line(capsys, command) == "/dev/null/x: cannot create the output folder: Not a directory"


def test_a_deeply_nested_manifest_is_a_bundle_error_not_a_recursion_error(tmp_path, capsys):
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    rc = cli.main(["score", "--model", str(folder), "--conn", "c.log", "--dns", "d.log",
                   "--out", str(tmp_path / "ranked.csv"), "--workers", "1"])
    assert rc == EXIT_INPUT
    assert one_error_line(capsys, "score").startswith(f"{folder / 'manifest.json'} nests 100000 levels deep")


def test_control_characters_in_file_names_are_escaped_by_score_and_inspect(small_day, bundle, tmp_path, capsys):
    _, folder = small_day
    hostile = tmp_path / HOSTILE
    shutil.copy(folder / "conn.log", hostile)
    assert cli.main(["score", "--model", str(bundle), "--conn", str(hostile), "--dns", str(folder / "dns.log"),
                     "--out", str(tmp_path / "ranked.csv"), "--workers", "1", "--no-progress"]) == 0
    captured = capsys.readouterr()
    escaped = str(tmp_path / "x\\x1b[2Jy.log")
    assert escaped in captured.err   # the read summary names the file
    assert cli.main(["score", "--model", str(bundle), "--conn", str(tmp_path / ("missing-" + HOSTILE)),
                     "--dns", str(folder / "dns.log"), "--out", str(tmp_path / "r2.csv"), "--workers", "1"]) == EXIT_INPUT
    missing = capsys.readouterr()
    assert "missing-x\\x1b[2Jy.log" in missing.err
    assert cli.main(["inspect", str(hostile)]) == 0
    inspected = capsys.readouterr()
    assert escaped in inspected.out
    for text in (captured.out, captured.err, missing.out, missing.err, inspected.out, inspected.err):
        assert "\x1b" not in text


def test_demo_escapes_names_and_explanations_from_the_logs(tmp_path, monkeypatch, capsys):
    from esxi_anomaly import demo, scoring, synth

    real_generate, real_score = synth.generate, scoring.score

    def small_generate(**kw):
        return real_generate(**kw, scale=0.05)

    def hostile_score(model, conn, dns, out, **kw):   # the real run, then a hostile VM name in its output
        result = real_score(model, conn, dns, out, **{**kw, "workers": 1})
        ranked = pd.read_csv(out, dtype="str", keep_default_na=False)
        ranked.loc[0, "src_name"] = "vm\x1b]0;owned\x07"
        ranked.loc[0, "explanation"] = "query \u202egnp.exe"
        ranked.to_csv(out, index=False)
        return result

    monkeypatch.setattr(synth, "generate", small_generate)
    monkeypatch.setattr(scoring, "score", hostile_score)
    assert demo.run(tmp_path / "demo", seed=5, days=2) == 0
    captured = capsys.readouterr()
    assert "vm\\x1b]0;owned\\x07 -> " in captured.out and "query \\u202egnp.exe" in captured.out
    assert "\x1b" not in captured.out + captured.err and "\u202e" not in captured.out + captured.err


def test_version_prints_the_package_version_and_exits_0(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out == f"esxi-anomaly {importlib.metadata.version('esxi-anomaly')}\n"


def _raising(monkeypatch, exc: BaseException):
    def command(args):
        raise exc
    monkeypatch.setattr(cli, "cmd_evaluate", command)
    return ["evaluate", "--scores", "s.csv", "--labels", "l.csv"]


@pytest.mark.parametrize("exc, message", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/ranked.csv"), "/data/ranked.csv: No space left on device"),
    (PermissionError(errno.EACCES, "Permission denied", "/data/ranked.csv"), "/data/ranked.csv: Permission denied"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/data"), "/data: Is a directory"),
    (IngestError("conn.log: \x1b[2J not a log"), "conn.log: \\x1b[2J not a log"),
    (ValueError("first line\nsecond line"), "first line; second line"),
    (WorkerError("a job failed in worker 1:\nTraceback ...", IngestError("dns.log: unreadable")), "dns.log: unreadable"),
])
def test_expected_errors_are_one_escaped_line_and_exit_input(exc, message, monkeypatch, capsys):
    assert cli.main(_raising(monkeypatch, exc)) == EXIT_INPUT
    assert one_error_line(capsys, "evaluate") == message


def test_os_error_of_a_real_command_names_the_path(tmp_path, capsys):
    (tmp_path / "labels.csv").write_text("event_id,label\n")
    assert cli.main(["evaluate", "--scores", str(tmp_path), "--labels", str(tmp_path / "labels.csv")]) == EXIT_INPUT
    assert one_error_line(capsys, "evaluate") == f"{tmp_path}: Is a directory"


BUG = " -- this is a bug; rerun with ESXI_ANOMALY_DEBUG=1 for the traceback"


@pytest.mark.parametrize("exc, first", [
    (KeyError("event_id"), "KeyError: 'event_id'"),
    (RuntimeError("boom\nmore"), "RuntimeError: boom"),
    (WorkerError("worker process esxi-anomaly-worker-0 exited with code -9 before finishing its job"),
     "WorkerError: worker process esxi-anomaly-worker-0 exited with code -9 before finishing its job"),
])
def test_an_unexpected_error_is_one_line_saying_it_is_a_bug_and_exit_internal(exc, first, monkeypatch, capsys):
    monkeypatch.delenv("ESXI_ANOMALY_DEBUG", raising=False)
    assert cli.main(_raising(monkeypatch, exc)) == EXIT_INTERNAL
    assert one_error_line(capsys, "evaluate") == first + BUG


def test_debug_variable_shows_the_traceback(monkeypatch, capsys):
    monkeypatch.setenv("ESXI_ANOMALY_DEBUG", "1")
    assert cli.main(_raising(monkeypatch, RuntimeError("boom"))) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "raise exc" in err
    assert err.endswith("esxi-anomaly evaluate: error: RuntimeError: boom" + BUG + "\n")


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_unwinds_the_command_and_exits_128_plus_its_number(signum, code, monkeypatch, capsys):
    cleaned = []

    def command(args):
        try:
            os.kill(os.getpid(), signum)
            for _ in range(1000):   # the handler runs between bytecodes, at once
                pass
            raise AssertionError("the signal did not interrupt the command")
        finally:
            cleaned.append(True)   # as WorkerPool.close in cmd_score

    monkeypatch.setattr(cli, "cmd_evaluate", command)
    before = signal.getsignal(signum)
    assert cli.main(["evaluate", "--scores", "s.csv", "--labels", "l.csv"]) == code
    assert cleaned == [True]
    assert capsys.readouterr().err == f"interrupted ({signal.Signals(signum).name})\n"
    assert signal.getsignal(signum) is before   # the caller's handlers are back


def test_keyboard_interrupt_from_a_command_exits_130(monkeypatch, capsys):
    assert cli.main(_raising(monkeypatch, KeyboardInterrupt())) == 130
    assert cli.main(_raising(monkeypatch, Interrupted(signal.SIGTERM))) == 143
