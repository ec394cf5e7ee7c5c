"""Analyst feedback that never silently does nothing: exact suppressions, safe environment names,
benign verdicts that can suppress, imports stored whole or not at all."""
from __future__ import annotations

import csv

import pandas as pd
import pytest

from esxi_anomaly import registry
from esxi_anomaly.cli import main
from esxi_anomaly.console import EXIT_INPUT, EXIT_OK, EXIT_USAGE
from esxi_anomaly.feedback import apply_suppressions
from esxi_anomaly.report.csv import FORMULA_TRIGGERS, restore_formulas, write_csv

FORMULA = "=cmd|' /C calc'!A0"


def scored_rows() -> pd.DataFrame:
    """Ranked rows as `score` writes them: the formula row, and near misses of it."""
    return pd.DataFrame({
        "rank": [1, 2, 3, 4], "score": [0.9, 0.8, 0.7, 0.6], "event_id": ["E1", "E2", "E3", "-E4"],
        "src_ip": ["10.0.0.5", "10.0.0.6", "10.0.0.5", "10.0.0.5"],
        "query": [FORMULA, FORMULA, "cmd|' /C calc'!A0", "@sum(1)"],
        "dst_port": [4444, 4444, 4444, 4444], "alert": [True, True, True, True]})


def label(tmp_path, *argv) -> int:
    return main(["label", "--env", "lab", "--models-dir", str(tmp_path / "models"), *argv])


def test_benign_verdict_on_a_formula_name_suppresses_exactly_its_row(tmp_path):
    rows = scored_rows()
    write_csv(rows, tmp_path / "scored.csv")
    assert f"'{FORMULA}" in (tmp_path / "scored.csv").read_text()       # the writer neutralised it
    assert label(tmp_path, "--event-id", "E1", "--verdict", "benign", "--scores", str(tmp_path / "scored.csv")) == 0
    # an event id the writer escaped is found as it was scored
    assert label(tmp_path, "--event-id=-E4", "--verdict", "benign", "--scores", str(tmp_path / "scored.csv")) == 0
    store = registry.feedback_store(tmp_path / "models", "lab")
    # feedback.csv is itself safe to open in a spreadsheet ...
    with open(store.path, newline="", encoding="utf-8") as fh:
        cells = [cell for row in csv.reader(fh) for cell in row]
    assert f"'{FORMULA}" in cells and not any(c.startswith(FORMULA_TRIGGERS) for c in cells)
    # ... and exact when read back: the suppression hits the formula row and the @ row only
    assert store.suppressions().to_dict("records") == [
        {"src_ip": "10.0.0.5", "query": FORMULA, "dst_port": "4444"},
        {"src_ip": "10.0.0.5", "query": "@sum(1)", "dst_port": "4444"}]
    out = apply_suppressions(rows, store.suppressions())
    assert out["suppressed"].tolist() == [True, False, False, True]


def test_feedback_file_round_trips_every_text_exactly(tmp_path):
    store = registry.feedback_store(tmp_path, "lab")
    texts = [FORMULA, "'=already quoted", "'", "+1", "-", "@x", "\tTAB", "plain", "", "a,b\n\"c\""]
    for i, text in enumerate(texts):
        store.add(f"C{i}", "benign", text, {"src_ip": "10.0.0.1", "query": text, "dst_port": 53})
    with open(store.path, newline="", encoding="utf-8") as fh:
        assert not any(cell.startswith(FORMULA_TRIGGERS) for row in csv.reader(fh) for cell in row)
    table = store.read()
    assert table["note"].tolist() == texts and table["query"].tolist() == texts
    assert table["event_id"].tolist() == [f"C{i}" for i in range(len(texts))]


def test_restore_formulas_undoes_the_writer(tmp_path):
    values = pd.Series([FORMULA, "+1", "plain", "'quoted", None, "-"], dtype=object)
    write_csv(pd.DataFrame({"v": values}), tmp_path / "v.csv")
    back = pd.read_csv(tmp_path / "v.csv", dtype="str", keep_default_na=False)["v"]
    assert back.tolist() != [FORMULA, "+1", "plain", "'quoted", "", "-"]
    assert restore_formulas(back).tolist() == [FORMULA, "+1", "plain", "'quoted", "", "-"]
    numbers = pd.Series([1, 2])
    assert restore_formulas(numbers) is numbers


@pytest.mark.parametrize("name", ["../../x", "..", ".hidden", "a/b", "a\\b", "", "x\n", "/abs", "é", "a" * 129])
def test_environment_names_that_are_not_plain_folder_names_are_refused(tmp_path_factory, name, capsys):
    tmp_path = tmp_path_factory.mktemp("envs")
    csv_file = tmp_path_factory.mktemp("import") / "v.csv"
    csv_file.write_text("event_id,verdict\nE1,malicious\n")
    with pytest.raises(ValueError, match="environment name"):
        registry.check_env_name(name)
    with pytest.raises(ValueError, match="environment name"):
        registry.feedback_store(tmp_path / "models", name).add("E1", "malicious")
    with pytest.raises(ValueError, match="environment name"):
        registry.feedback_store(tmp_path / "models", name).import_csv(str(csv_file))
    with pytest.raises(ValueError, match="environment name"):
        registry.new_version_dir(tmp_path / "models", name)
    for argv in (["label", "--env", name, "--models-dir", str(tmp_path / "models"), "--event-id", "E1",
                  "--verdict", "malicious"],
                 ["score", "--env", name, "--models-dir", str(tmp_path / "models"), "--conn", "c", "--dns", "d",
                  "--out", str(tmp_path / "o.csv")],
                 ["train", "--env", name, "--models-dir", str(tmp_path / "models"), "--conn", "c", "--dns", "d"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == EXIT_USAGE
        assert "environment name" in capsys.readouterr().err
    assert not (tmp_path / "models").exists() and sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["prod", "lab-2", "eu_west.1", "A9", "-x"])
def test_plain_environment_names_are_accepted(name):
    assert registry.check_env_name(name) == name


def test_the_store_next_to_a_bundle_outside_any_environment_folder_reads_as_empty(tmp_path):
    """`score --model ./bundle`: the bundle's parent is no environment folder; nothing to suppress."""
    assert len(registry.bundle_feedback(tmp_path / "bundle").suppressions()) == 0


def test_benign_verdict_needs_the_scored_file_and_unknown_ids_are_refused(tmp_path, capsys):
    write_csv(scored_rows(), tmp_path / "scored.csv")
    store = registry.feedback_store(tmp_path / "models", "lab")
    assert label(tmp_path, "--event-id", "E1", "--verdict", "benign") == EXIT_INPUT
    assert "needs --scores" in capsys.readouterr().err and not store.path.exists()
    assert label(tmp_path, "--event-id", "nope", "--verdict", "benign",
                 "--scores", str(tmp_path / "scored.csv")) == EXIT_INPUT
    assert "no event nope" in capsys.readouterr().err and not store.path.exists()
    # JSON lines output has no source, name or port: a benign verdict from it could suppress nothing
    pd.DataFrame({"event": [{"id": "E1"}], "esxi_anomaly": [{"score": 0.9}]}).to_json(
        tmp_path / "scored.jsonl", orient="records", lines=True)
    assert label(tmp_path, "--event-id", "E1", "--verdict", "benign",
                 "--scores", str(tmp_path / "scored.jsonl")) == EXIT_INPUT
    assert "src_ip, query and dst_port" in capsys.readouterr().err and not store.path.exists()
    # a malicious verdict is a label only: stored without --scores, with a warning that it is unchecked
    assert label(tmp_path, "--event-id", "E9", "--verdict", "malicious") == EXIT_OK
    assert "not checked against a scored file" in capsys.readouterr().err
    assert store.read()[["event_id", "verdict"]].values.tolist() == [["E9", "malicious"]]
    assert label(tmp_path, "--verdict", "malicious") == EXIT_USAGE


def test_import_stores_every_row_or_none(tmp_path, capsys):
    store = registry.feedback_store(tmp_path / "models", "lab")
    store.add("E0", "malicious", "first")
    before = store.path.read_bytes()
    bad = tmp_path / "bad.csv"
    bad.write_text("event_id,verdict,note\nE1,benign,a\nE2,malicious,b\nE3,maybe,c\n")
    with pytest.raises(ValueError, match=r"row 3: verdict must be one of .*'maybe'.*nothing stored"):
        store.import_csv(str(bad))
    assert store.path.read_bytes() == before
    empty_id = tmp_path / "empty_id.csv"
    empty_id.write_text("event_id,verdict\nE1,benign\n ,benign\n")
    assert label(tmp_path, "--import-csv", str(empty_id)) == EXIT_INPUT
    assert "row 2: event_id is empty" in capsys.readouterr().err and store.path.read_bytes() == before
    good = tmp_path / "good.csv"
    good.write_text("event_id,verdict,note,src_ip,query,dst_port\nE1, Benign ,a,10.0.0.5,'=x,53\nE2,malicious,b,,,\n"
                    "E3,benign,c,,,\n")
    assert label(tmp_path, "--import-csv", str(good)) == EXIT_OK
    assert "1 benign verdicts have no src_ip/query/dst_port" in capsys.readouterr().err
    table = store.read()
    assert table[["event_id", "verdict", "note"]].values.tolist() == [
        ["E0", "malicious", "first"], ["E1", "benign", "a"], ["E2", "malicious", "b"], ["E3", "benign", "c"]]
    # rows cut from a scored CSV keep the name as it was scored
    assert store.suppressions().to_dict("records") == [{"src_ip": "10.0.0.5", "query": "=x", "dst_port": "53"}]
