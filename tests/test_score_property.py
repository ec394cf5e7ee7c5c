"""`esxi-anomaly score` end to end, as a hostile tester drives it: folders of random valid, damaged,
unreadable and hostile files. Whatever the folder holds, the run ends within a bound, prints no
traceback, and its summary accounts for every input file and every record (kept + quarantined =
present)."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from esxi_anomaly import console, ingest

BOUND_S = 90   # a run over a handful of small files takes a few seconds; a hang never ends
ZEEK_HEADER_LINES = 8


@pytest.fixture(scope="module")
def material(small_day, tmp_path_factory):
    """A model bundle and the pieces the random folders are made of: Zeek conn and DNS logs' header and
    data lines (a few hundred of each, enough to score)."""
    from esxi_anomaly.registry import write_model
    from esxi_anomaly.training import TrainConfig

    model, folder = small_day
    bundle = write_model(model, TrainConfig(env="t"), tmp_path_factory.mktemp("models"))

    def split(name: str, rows: int) -> tuple[list[str], list[str]]:
        lines = (folder / name).read_text().splitlines(keepends=True)
        header = [x for x in lines if x.startswith("#") and not x.startswith("#close")]
        data = [x for x in lines if not x.startswith("#")]
        return header, data[:rows]

    return {"bundle": bundle, "conn": split("conn.log", 400), "dns": split("dns.log", 400)}


# -- the files a folder may hold: (name, bytes, records present, kind) -----------------------

JUNK_LINES = st.lists(st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r#\t"), min_size=1, max_size=80),
    st.binary(min_size=1, max_size=60).map(lambda b: b.replace(b"\n", b" ").replace(b"\r", b" ")
                                           .decode("latin-1").lstrip("#") or "x"),
    st.just("=HYPERLINK(\"http://evil\")\t" * 3),
    st.just("A" * 300_000),                                   # a huge line
), max_size=4)


def clean_records(kind: str, lines: list[str]) -> int:
    if kind == "conn":
        return sum(1 for x in lines if not x.startswith("#"))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "dns.log"
        path.write_text("".join(lines))
        return len(ingest.read_dns(path))


@st.composite
def log_file(draw, material, index: int):
    kind = draw(st.sampled_from(["conn", "dns"]))
    header, data = material[kind]
    n = draw(st.integers(0, len(data)))
    start = draw(st.integers(0, len(data) - n))
    rows = data[start:start + n]
    junk = [line.lstrip("#") + "\n" for line in draw(JUNK_LINES) if line.strip().lstrip("#")]
    body = list(rows)
    for line in junk:   # junk anywhere after the header
        body.insert(draw(st.integers(0, len(body))), line)
    text = "".join(header + body)
    damage = draw(st.sampled_from(["none", "none", "gzip", "truncated_gzip", "utf16", "hostile_name"]))
    name = f"{kind}-{index}.log"
    # records present: for DNS, answers (a response line holds one row per answer), counted on the clean lines
    present = {"kept": clean_records(kind, header + rows), "quarantined": len(junk)}
    raw = text.encode("utf-8", "surrogatepass")
    if damage == "gzip":
        raw = gzip.compress(raw, mtime=0)
        name += ".gz"
    elif damage == "truncated_gzip":
        whole = gzip.compress(raw, mtime=0)
        cut = draw(st.integers(1, len(whole) - 1))
        raw = whole[:cut]
        name += ".gz"
        present = None   # counted from what the cut stream still holds, below
    elif damage == "utf16":
        raw = text.encode("utf-16")
    elif damage == "hostile_name":
        name = f"{kind}-\x1b[2J-{index}.log"
    return {"name": name, "bytes": raw, "present": present, "kind": kind, "damage": damage,
            "header": header, "rows": rows}


@st.composite
def other_file(draw, index: int):
    kind = draw(st.sampled_from(["binary", "empty", "broken_link", "unreadable"]))
    name = f"other-{index}.bin"
    raw = draw(st.binary(min_size=1, max_size=2000)) if kind == "binary" else b""
    return {"name": name, "bytes": raw, "present": None, "kind": kind, "damage": kind}


def folder_strategy(material):
    return st.lists(st.integers(0, 9), min_size=1, max_size=5).flatmap(
        lambda picks: st.tuples(*[log_file(material, i) if p < 7 else other_file(i) for i, p in enumerate(picks)]))


def recoverable_lines(cut: bytes) -> list[bytes]:
    """The complete lines a cut gzip stream still holds."""
    data = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(cut)
    return data.split(b"\n")[:-1]


def write_folder(folder: Path, files) -> None:
    folder.mkdir(parents=True)
    for f in files:
        path = folder / f["name"]
        if f["kind"] == "broken_link":
            os.symlink(folder / "nowhere", path)
            continue
        path.write_bytes(f["bytes"])
        if f["kind"] == "unreadable":
            os.chmod(path, 0)


def run_score(bundle: Path, folder: Path, out: Path) -> tuple[subprocess.CompletedProcess, dict | None]:
    stats = out.with_name("stats.json")
    cmd = [sys.executable, "-m", "esxi_anomaly.cli", "score", "--model", str(bundle), "--conn", str(folder),
           "--dns", str(folder), "--out", str(out), "--workers", "2", "--no-progress", "--stats-json", str(stats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BOUND_S, start_new_session=True,
                          errors="backslashreplace")
    return proc, json.loads(stats.read_text()) if stats.exists() else None


@pytest.mark.slow
def test_score_ends_and_accounts_for_every_file_and_record(material, tmp_path_factory):
    bundle = material["bundle"]

    # no shrinking: every example is a whole run of a few seconds, and the failing folder is printed as drawn
    @settings(max_examples=int(os.environ.get("SCORE_PROPERTY_EXAMPLES", 12)), deadline=None,
              derandomize=os.environ.get("SCORE_PROPERTY_EXAMPLES") is None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])
    @given(files=folder_strategy(material))
    def check(files):
        base = tmp_path_factory.mktemp("prop")
        folder = base / "logs"
        write_folder(folder, files)
        proc, stats = run_score(bundle, folder, base / "out" / "ranked.csv")
        output = proc.stdout + proc.stderr
        assert "Traceback" not in output, output
        assert "\x1b" not in output          # file names with control characters are escaped
        assert proc.returncode in (console.EXIT_OK, console.EXIT_INPUT), output
        if proc.returncode == console.EXIT_INPUT:   # only when no connection at all could be read
            assert "no connection records" in output, output
            return
        qpath = base / "out" / "ranked.csv.quarantine.jsonl"
        quarantine_text = qpath.read_text() if qpath.exists() else ""
        by_path = {}
        for f in stats["files"]:
            by_path.setdefault(f["path"], []).append(f)
        for f in files:
            path = str(folder / f["name"])
            assert path in by_path, (f["name"], sorted(by_path))      # every file appears
            reports = by_path[path]
            if f["damage"] in ("broken_link", "binary"):
                assert {r["outcome"] for r in reports} == {"unreadable"}, reports
                continue
            if f["damage"] in ("empty", "unreadable"):   # chmod 000 is still readable as root: empty then
                assert all(r["outcome"] == "unreadable" or (r["format"] == "empty" and r["kept"] == 0)
                           for r in reports), reports
                continue
            own = [r for r in reports if r["outcome"] != "other kind"]
            assert len(own) == 1, reports
            kept, quarantined = own[0]["kept"], own[0]["quarantined"]
            if f["present"] is not None:
                assert (kept, quarantined) == (f["present"]["kept"], f["present"]["quarantined"]), (f, own)
            else:   # a cut stream keeps every complete record before the cut, and quarantines the cut
                complete = [x for x in recoverable_lines(f["bytes"]) if x and not x.startswith(b"#")]
                if complete:
                    valid = set(f["rows"])
                    rows = [x.decode() + "\n" for x in complete if x.decode("utf-8", "replace") + "\n" in valid]
                    assert own[0]["outcome"] == "partly read", own
                    assert kept == clean_records(f["kind"], f["header"] + rows), (f["name"], own, quarantine_text)
                    assert quarantined == len(complete) - len(rows) + 1, (f["name"], own, quarantine_text)
                else:   # cut inside its header: nothing to read
                    assert own[0]["outcome"] in ("unreadable", "partly read") and kept == 0, own
        assert stats["connections"] == sum(r["kept"] for r in stats["files"] if r["frame"] == "connections")
        ranked = pd.read_csv(base / "out" / "ranked.csv", dtype="str", keep_default_na=False)
        # every record read is scored or counted out of scope; one row per connection (duplicates merged)
        assert stats["connections"] == stats["in_scope"] + sum(stats["out_of_scope"].values())
        assert len(ranked) == stats["written"] == stats["in_scope"] - stats["coverage"]["duplicates"] > 0
        leftovers = [p.name for p in (base / "out").iterdir()
                     if p.name not in ("ranked.csv", "ranked.entities.csv", "ranked.incidents.csv", "ranked.csv.quarantine.jsonl",
                                       "stats.json")]
        assert not leftovers

    check()
