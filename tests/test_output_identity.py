"""Issue #17: a performance change leaves every scored output byte-identical, on the demo estate.

The demo estate (`demo.run`: 4 days, seed 7, attacks on the last day) is trained on its history as
the demo trains it, its bundle written and loaded back (`registry`), and its last day scored by
the local engine with 1 and with 2 workers: the ranked CSV, its entity roll-up and incidents, and
the ranked Parquet. The sha256 of each file, and of the feature matrix and the forest's raw scores
as float64 bytes (a change of one ulp that the CSV rounds away), must equal those of
`fixtures/output_identity/digests.json` recorded from the code before the change on a CPU like this
one: numpy takes other SIMD paths on other CPUs (AVX-512 or not), whose last bits differ, so the
features, the model trained on them and every output differ from one kind of CPU to another. Each
record names the SIMD extensions numpy found (`cpu`); the record without one (the first) was made
on an AMD EPYC with AVX2 and serves any CPU no record names. The Parquet file holds the pandas and
pyarrow versions that wrote it, so it is compared only under the versions recorded (`VERSIONED`; the
CSVs hold the same values and are always compared).

Re-record only when an output change is intended (and say why in the commit):

    ESXI_ANOMALY_RECORD_DIGESTS=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_output_identity.py

writes this CPU's record (replacing an earlier one of the same CPU) with the commit and library versions
it was recorded under, then fails with "recorded ...: rerun without ESXI_ANOMALY_RECORD_DIGESTS", so a
recording run never counts as a pass. To add a CPU, record from a checkout of the commit the other
records name (the code before the change), with this test file copied into it.
`ESXI_ANOMALY_IDENTITY_OUT=DIR` keeps the outputs in DIR (to diff them against another checkout's).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import warnings
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest

from esxi_anomaly import registry, scoring, training
from esxi_anomaly.features.scope import scoped_history
from esxi_anomaly.ingest import read_connections, read_dns, read_inventory
from esxi_anomaly.schema import Frames
from esxi_anomaly.scoring import incidents_path, rollup_path
from esxi_anomaly.training import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
DIGESTS = ROOT / "tests" / "fixtures" / "output_identity" / "digests.json"
RECORD = "ESXI_ANOMALY_RECORD_DIGESTS"
KEEP_OUT = "ESXI_ANOMALY_IDENTITY_OUT"
LIBRARIES = ("numpy", "pandas", "pyarrow", "scikit-learn", "scipy", "joblib")
SEED, DAYS = 7, 4   # demo.run's defaults
# outputs that hold the versions of the libraries that wrote them (Parquet's pandas metadata and
# creator): compared only under the versions recorded (the CSVs hold the same values, always compared)
VERSIONED = {"parquet/ranked.parquet": ("pandas", "pyarrow")}


def library_versions() -> dict[str, str]:
    return {"python": platform.python_version(), **{name: version(name) for name in LIBRARIES}}


def cpu_kind() -> str:
    """The machine and the SIMD extensions numpy dispatches to on it: outputs are equal to the bit
    only between CPUs of one kind."""
    simd = np.show_config(mode="dicts").get("SIMD Extensions", {})
    return " ".join([platform.machine(), *simd.get("found", [])])


def records() -> list[dict]:
    """The recorded digests: one record per CPU kind (`cpu`; the first has none)."""
    data = json.loads(DIGESTS.read_text())
    return data["records"] if "records" in data else [data]


def record_for(cpu: str) -> dict:
    """This CPU kind's record, else the one recorded without a CPU kind."""
    found = records()
    return next((r for r in found if r.get("cpu") == cpu), None) or next(r for r in found if "cpu" not in r)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_float64(values) -> str:
    """Of the values as C-ordered float64 bytes: one ulp anywhere changes it."""
    return hashlib.sha256(np.ascontiguousarray(values, dtype=np.float64).tobytes()).hexdigest()


def demo_estate(folder: Path) -> tuple[Path, Path]:
    """The demo's history and today as Zeek logs, generated and sliced as `demo.run` does."""
    from esxi_anomaly.demo import _slice
    from esxi_anomaly.synth import generate, write_zeek

    ds = generate(days=DAYS, seed=SEED, scenario="default", attack_days=1)
    history, today = folder / "history", folder / "today"
    write_zeek(_slice(ds, ds.start, ds.train_end), history)
    write_zeek(_slice(ds, ds.train_end, ds.end + 1), today)
    return history, today


def read_frames(folder: Path) -> Frames:
    return Frames(read_connections(folder / "conn.log"), read_dns(folder / "dns.log"),
                  read_inventory(folder / "inventory.csv"))


def trained_bundle(history: Path, models: Path) -> Path:
    """The demo's training (no tuning trials: the default config tunes none), written as a bundle."""
    config = TrainConfig().replace(env="demo", seed=SEED, trials=0,
                                   feedback_path=str(registry.feedback_path(models, "demo")))
    trained = training.train_environment(read_frames(history), config)
    return registry.write_model(trained.model, trained.config, models, trained.metrics, trained.tuning)


def output_digests(folder: Path) -> dict[str, str]:
    """Every digest the identity is checked on, by name: `<run>/<file>` and `today/<array>`."""
    history, today = demo_estate(folder)
    bundle = trained_bundle(history, folder / "models")
    model, _ = registry.load_model(bundle)   # verified, then loaded, as a scoring job does
    inventory = read_inventory(today / "inventory.csv")
    suppressions = registry.bundle_feedback(bundle).suppressions()
    digests = {}
    for run, fmt, workers in (("workers1", "csv", 1), ("workers2", "csv", 2), ("parquet", "parquet", 1)):
        out = folder / run / f"ranked.{fmt}"
        out.parent.mkdir()
        scoring.score(model, [today / "conn.log"], [today / "dns.log"], out, inventory=inventory, fmt=fmt,
                      suppressions=suppressions, progress=False, workers=workers, rollup=fmt == "csv")
        files = (out, rollup_path(out), incidents_path(out)) if fmt == "csv" else (out,)
        digests.update({f"{run}/{path.name}": sha256_file(path) for path in files})
    # below the CSV's rounding: the features of today's in-scope rows and the forest's raw scores
    # (reached through the model's internals: when they are renamed, the digest names the error, and
    # the files' digests are still compared)
    try:
        scoped = scoped_history(read_frames(today), model.scope_)[0]
        feats = model.features(scoped)[1]
        matrix = feats[list(model.detector_.feature_names_in_)].to_numpy(dtype=np.float64)
        digests["today/feature_names"] = hashlib.sha256("\n".join(feats.columns).encode()).hexdigest()
        digests["today/features.float64"] = sha256_float64(matrix)
        digests["today/forest_raw_score.float64"] = sha256_float64(model.detector_.forest_.raw_score(matrix))
    except (AttributeError, KeyError, TypeError) as exc:
        digests["today/features.float64"] = f"not computed ({exc!r}): update output_digests"
    return digests


def git_commit() -> str:
    """The commit of the checkout the package was imported from (+ "-dirty" with uncommitted changes)."""
    import esxi_anomaly

    root = Path(esxi_anomaly.__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "esxi_anomaly"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


@pytest.fixture(scope="module")
def digests(tmp_path_factory) -> dict[str, str]:
    kept = os.environ.get(KEEP_OUT)
    folder = Path(kept) if kept else tmp_path_factory.mktemp("output_identity")
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        pytest.fail(f"{KEEP_OUT}={folder} is not empty: name a new folder")
    return output_digests(folder)


def short(digest: str | None) -> str:
    return f"sha256 {digest[:16]}..." if digest and len(digest) == 64 else str(digest)


def moved_versions(recorded: dict, running: dict) -> str:
    """The libraries whose version differs, "numpy 2.4.6 -> 2.5.0, ..." ("" when none)."""
    return ", ".join(f"{name} {recorded.get(name)} -> {now}" for name, now in running.items()
                     if recorded.get(name) != now)


def mismatch_message(recorded: dict, digests: dict, versions: dict) -> str:
    changed = sorted(k for k in recorded["digests"] if digests.get(k) != recorded["digests"][k])
    added = sorted(set(digests) - set(recorded["digests"]))
    on = f"on a CPU of kind {recorded['cpu']!r}" if "cpu" in recorded else \
        f"on another CPU (this one, {cpu_kind()!r}, has no record: see this module's docstring)"
    lines = [f"scored outputs differ from those recorded at {recorded['commit']} {on} ({DIGESTS.name}):"]
    lines += [f"  {k}: {short(digests.get(k))}, recorded {short(recorded['digests'][k])}" for k in changed]
    lines += [f"  {k}: not recorded (re-record)" for k in added]
    test = f"tests/{Path(__file__).name}"
    lines += [
        "To see the difference, keep the outputs of this checkout and of the recorded commit, and diff them:",
        f"  {KEEP_OUT}=/tmp/after .venv/bin/python -m pytest -q -p no:cacheprovider {test}",
        f"  git worktree add /tmp/before-src {recorded['commit'].removesuffix('-dirty')}",
        f"  cp {test} /tmp/before-src/tests/; cp -r {DIGESTS.parent.relative_to(ROOT)} /tmp/before-src/tests/fixtures/",
        f"  (cd /tmp/before-src && {KEEP_OUT}=/tmp/before PYTHONPATH=/tmp/before-src $OLDPWD/.venv/bin/python "
        f"-m pytest -q -p no:cacheprovider --rootdir . {test})",
        "  diff /tmp/before/workers1/ranked.csv /tmp/after/workers1/ranked.csv | head   (the same for each file "
        "named above; Parquet: pandas.testing.assert_frame_equal of both read_parquet)",
        "A today/*.float64 digest alone: the features or the forest's raw scores moved below the CSV's rounding "
        "(compare model.detector_.forest_.raw_score of both checkouts with np.array_equal).",
    ]
    moved = moved_versions(recorded["versions"], versions)
    if moved:
        lines.insert(1, f"NOTE: running other library versions than those recorded, which may explain it: {moved}")
    return "\n".join(lines)


@pytest.mark.slow
def test_scored_outputs_are_byte_identical_to_recorded(digests):
    versions, cpu = library_versions(), cpu_kind()
    if os.environ.get(RECORD):
        DIGESTS.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in records() if r.get("cpu") != cpu] if DIGESTS.exists() else []
        record = {"commit": git_commit(), "versions": versions, "cpu": cpu, "digests": digests}
        DIGESTS.write_text(json.dumps({"records": kept + [record]}, indent=2, sort_keys=True) + "\n")
        pytest.fail(f"recorded {len(digests)} digests for a CPU of kind {cpu!r} in {DIGESTS}: rerun without {RECORD}")
    assert DIGESTS.exists(), f"{DIGESTS} is missing: record it with {RECORD}=1 (see this module's docstring)"
    recorded = record_for(cpu)
    # a file that writes the versions of the libraries that made it cannot equal one made by others
    moved_libraries = {name for name, now in versions.items() if recorded["versions"].get(name) != now}
    unequal = sorted(k for k, libraries in VERSIONED.items() if moved_libraries & set(libraries))
    expected = {k: v for k, v in recorded["digests"].items() if k not in unequal}
    compared = {k: v for k, v in digests.items() if k not in unequal}
    assert compared == expected, mismatch_message({**recorded, "digests": expected}, compared, versions)
    moved = moved_versions(recorded["versions"], versions)
    if moved:   # identical all the same: say so, the next library update may not be
        warnings.warn(f"outputs identical to those recorded, under other library versions: {moved}"
                      + (f"; not compared, as they write those versions: {', '.join(unequal)}" if unequal else ""))
