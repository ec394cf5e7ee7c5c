"""Integrity-checked model bundles: a folder of artefacts and a manifest, verified before anything is loaded.

Where bundles live (`models/<env>/<version>/`) is `registry`'s business; this module knows one folder.

A bundle holds the joblib artefacts of a fitted model, optional text files (model card, JSON
config) and `manifest.json`: the caller's manifest plus format version, creation time, library
versions and the sha256 and size of every file. `load_bundle` verifies all of that *before*
unpickling anything, and unpickles exactly the bytes it verified.

The manifest is not signed: hashes catch corruption, truncation and edits of an artefact, not
an attacker who can rewrite the whole folder. Protect `models/` with file permissions, and
load bundles only from folders you trust (joblib files are pickles).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import re
import shutil
import uuid
from datetime import date, datetime, timezone
from pathlib import Path

import joblib
import numpy as np
import pandas as pd

import esxi_anomaly

BUNDLE_FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = frozenset({1})
MANIFEST_NAME = "manifest.json"
JOBLIB_SUFFIX = ".joblib"
TEXT_SUFFIXES = (".md", ".json")
RESERVED_MANIFEST_KEYS = frozenset({"format_version", "created", "library_versions", "files"})

# A version folder's name: its UTC creation time, `-2`, `-3` ... when taken (`registry` lays them out)
VERSION_NAME = re.compile(r"^(\d{8}T\d{6}Z)(?:-(\d+))?$")
_HASH_CHUNK = 1 << 20
MAX_MANIFEST_BYTES = 64 << 20   # a manifest lists files and metrics: kilobytes; refuse absurd ones unread
MAX_MANIFEST_DEPTH = 64         # nesting of JSON arrays/objects; ours is a handful of levels
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


class BundleError(Exception):
    """A bundle is missing, damaged, tampered with or incompatible; the message says what to do."""


class BundleExistsError(BundleError, FileExistsError):
    """save_bundle refuses to overwrite an existing bundle folder."""


def sklearn_version() -> str:
    """The installed scikit-learn's version, read from its metadata: importing scikit-learn costs
    more than a small scoring run (`estimator`), and loading a model need not import it."""
    from importlib.metadata import version

    return version("scikit-learn")


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose changes can alter a fitted model or its pickles."""
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "scikit-learn": sklearn_version(),
        "joblib": joblib.__version__,
        "esxi_anomaly": esxi_anomaly.__version__,
    }


def _retrain_hint(directory: Path) -> str:
    # models/<env>/<timestamp> tells us the environment; elsewhere we cannot guess it.
    env = directory.parent.name if VERSION_NAME.match(directory.name) else "ENV"
    return f"retrain with `esxi-anomaly train --env {env} ...`"


def _check_file_name(name: str) -> None:
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or name.startswith(".") or name == MANIFEST_NAME):
        raise ValueError(f"artifact name {name!r} is not a plain file name (or is reserved)")


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"manifest value of type {type(value).__name__} is not JSON-serialisable")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def save_bundle(directory: str | os.PathLike, artifacts: dict[str, object], manifest: dict) -> Path:
    """Write a bundle to `directory` (which must not exist) and return its path.

    Artefacts are joblib files `<name>.joblib` (compress=3), except str artefacts whose name ends
    in .md or .json, written as UTF-8 text under that name. The bundle is assembled in a hidden
    temporary folder next to the target and renamed into place, so the final name never holds a
    half-written bundle.
    """
    target = Path(directory)
    if target.exists():
        raise BundleExistsError(f"{target} already exists; bundles are never overwritten -- "
                                f"use registry.new_version_dir() for a fresh version folder")
    clash = RESERVED_MANIFEST_KEYS & set(manifest)
    if clash:
        raise ValueError(f"manifest keys {sorted(clash)} are set by save_bundle; remove them from the manifest")
    if not artifacts:
        raise ValueError("a bundle needs at least one artifact")
    for name in artifacts:
        _check_file_name(name)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        files: dict[str, dict[str, object]] = {}
        for name, value in artifacts.items():
            if isinstance(value, str) and name.endswith(TEXT_SUFFIXES):
                file_name = name
                (staging / file_name).write_bytes(value.encode("utf-8"))
            else:
                file_name = name + JOBLIB_SUFFIX
                joblib.dump(value, staging / file_name, compress=3)
            path = staging / file_name
            _fsync_file(path)
            files[file_name] = {"sha256": _sha256_file(path), "size": path.stat().st_size}

        full_manifest = dict(manifest)
        full_manifest.update({
            "format_version": BUNDLE_FORMAT_VERSION,
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "library_versions": library_versions(),
            "files": files,
        })
        text = json.dumps(full_manifest, indent=2, sort_keys=True, default=_json_default)
        (staging / MANIFEST_NAME).write_text(text + "\n", encoding="utf-8")
        _fsync_file(staging / MANIFEST_NAME)

        if target.exists():  # someone else took the name while we were writing
            raise BundleExistsError(f"{target} appeared while the bundle was being written; not overwriting it")
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _json_depth(data: bytes) -> int:
    """The deepest nesting of arrays/objects in JSON text, found without parsing it (a parser recurses
    per level: 100,000 nested lists would end in RecursionError). Brackets inside strings do not count;
    for invalid JSON the number is only an upper bound, and the parser rejects it anyway."""
    codes = np.frombuffer(_JSON_STRING.sub(b'""', data), dtype=np.uint8)
    step = np.isin(codes, (ord("["), ord("{"))).astype(np.int64) - np.isin(codes, (ord("]"), ord("}")))
    return int(np.cumsum(step).max(initial=0))


def _read_manifest(directory: Path) -> dict:
    hint = _retrain_hint(directory)
    if not directory.is_dir():
        raise BundleError(f"bundle folder {directory} does not exist; pass an existing bundle or {hint}")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{path} is missing, so {directory} is not a complete bundle; {hint}")
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path} has {size} bytes (at most {MAX_MANIFEST_BYTES} expected); the bundle is "
                          f"damaged or not ours, {hint}")
    data = path.read_bytes()
    depth = _json_depth(data)
    if depth > MAX_MANIFEST_DEPTH:
        raise BundleError(f"{path} nests {depth} levels deep (at most {MAX_MANIFEST_DEPTH} expected); the bundle "
                          f"is damaged or not ours, {hint}")
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}); the bundle is damaged, {hint}") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path} is not a JSON object; the bundle is damaged, {hint}")
    version = manifest.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS or isinstance(version, bool):
        raise BundleError(f"{path}: bundle format_version {version!r} is not supported by this esxi_anomaly "
                          f"(supports {sorted(SUPPORTED_FORMAT_VERSIONS)}); {hint}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{path} lists no files; the bundle is damaged, {hint}")
    for name, entry in files.items():
        try:
            _check_file_name(name)
        except ValueError:
            raise BundleError(f"{path} lists {name!r}, which is not a plain file name; refusing the bundle") from None
        if (not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str)
                or not isinstance(entry.get("size"), int) or isinstance(entry.get("size"), bool)):
            raise BundleError(f"{path}: entry for {name!r} needs a sha256 string and an integer size; {hint}")
    return manifest


def _check_files(directory: Path, manifest: dict, *, keep_bytes: bool) -> dict[str, bytes]:
    hint = _retrain_hint(directory)
    files = manifest["files"]
    contents: dict[str, bytes] = {}
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            raise BundleError(f"bundle file {name} is missing from {directory}; {hint}")
        size = path.stat().st_size
        if size != entry["size"]:
            raise BundleError(f"bundle file {name} has {size} bytes, manifest says {entry['size']} "
                              f"(truncated or replaced); {hint}")
        if keep_bytes:
            data = path.read_bytes()
            # Re-check length: the file may have changed between stat and read.
            ok = len(data) == entry["size"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
            contents[name] = data
        else:
            ok = _sha256_file(path) == entry["sha256"]
        if not ok:
            raise BundleError(f"bundle file {name} does not match its sha256 in the manifest "
                              f"(corrupted or tampered with); {hint}")
    unlisted = sorted(p.name for p in directory.glob("*" + JOBLIB_SUFFIX) if p.name not in files)
    if unlisted:
        raise BundleError(f"{directory} holds joblib files not listed in the manifest: {', '.join(unlisted)}; "
                          f"refusing to load an altered bundle, {hint}")
    return contents


def _check_versions(directory: Path, manifest: dict) -> None:
    versions = manifest.get("library_versions")
    saved = versions.get("scikit-learn") if isinstance(versions, dict) else None
    if not isinstance(saved, str):
        raise BundleError(f"{directory / MANIFEST_NAME} does not record the scikit-learn version; "
                          f"{_retrain_hint(directory)}")
    saved_mm = ".".join(saved.split(".")[:2])
    running = sklearn_version()
    if saved_mm != ".".join(running.split(".")[:2]):
        raise BundleError(f"bundle {directory} is version-incompatible: fitted with scikit-learn {saved}, "
                          f"running {running}; {_retrain_hint(directory)} "
                          f"or install scikit-learn=={saved_mm}")


def verify_bundle(directory: str | os.PathLike) -> dict:
    """Run every check load_bundle runs, without unpickling; return the manifest."""
    path = Path(directory)
    manifest = _read_manifest(path)
    _check_files(path, manifest, keep_bytes=False)
    _check_versions(path, manifest)
    return manifest


def load_bundle(directory: str | os.PathLike) -> tuple[dict[str, object], dict]:
    """Verify, then load a bundle: (artifacts by name, manifest). BundleError on any failed check."""
    path = Path(directory)
    manifest = _read_manifest(path)
    contents = _check_files(path, manifest, keep_bytes=True)
    _check_versions(path, manifest)
    artifacts: dict[str, object] = {}
    for file_name, data in contents.items():
        if file_name.endswith(JOBLIB_SUFFIX):
            artifacts[file_name[: -len(JOBLIB_SUFFIX)]] = joblib.load(io.BytesIO(data))
        else:
            try:
                artifacts[file_name] = data.decode("utf-8")
            except UnicodeDecodeError:
                raise BundleError(f"bundle file {file_name} is not UTF-8 text; {_retrain_hint(path)}") from None
    return artifacts, manifest
