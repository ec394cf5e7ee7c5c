"""`esxi-anomaly`: the command line (DESIGN section 9). Every command is a thin layer over the API."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from esxi_anomaly.console import (EXIT_BUSY, EXIT_ERROR, EXIT_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED,  # noqa: F401
                                  EXIT_OK, EXIT_QUARANTINE, EXIT_USAGE, log, printable)

if TYPE_CHECKING:
    import pandas as pd

    from esxi_anomaly import ingest
    from esxi_anomaly.schema import Frames

# pandas, the readers and the model are imported by the commands that use them: `--help` and a
# mistyped command line answer at once

class Stages:
    """Per-stage wall-clock timings, reported in the run summary."""

    def __init__(self, quiet: bool = False):
        self.times: dict[str, float] = {}
        self.quiet = quiet

    def run(self, name: str, fn, *args, **kw):
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0
        if not self.quiet:
            print(f"[{name}] {self.times[name]:.1f} s", file=sys.stderr)
        return out


# -- inputs --------------------------------------------------------------------------------

def read_inputs(args, stages: Stages) -> tuple[Frames, ingest.Quarantine, ingest.ReadSummary]:
    from esxi_anomaly import ingest
    from esxi_anomaly.schema import Frames

    quarantine, summary = ingest.Quarantine(), ingest.ReadSummary()
    options = read_options(args)
    conns = stages.run("read connections", ingest.read_connections, args.conn, quarantine, summary, options)
    dns = stages.run("read dns", ingest.read_dns, args.dns, quarantine, summary, options)
    inventory = ingest.read_inventory(args.inventory, quarantine, summary) if args.inventory else None
    for line in summary.lines():
        log(line)
    if not len(conns):
        raise ingest.IngestError("no connection records were read from --conn")
    return Frames(conns, dns, inventory), quarantine, summary


def read_options(args) -> dict:
    """The read options given on the command line (`ingest.iter_file`)."""
    value = getattr(args, "snapshot_time", None)
    return {} if value is None else {"snapshot_time": value}


def finish_quarantine(quarantine: ingest.Quarantine, out: Path, strict: bool) -> int:
    """Write `<out>.quarantine.jsonl` (atomically) and say what it holds; a clean run removes the file
    an earlier run left, so it never describes another run."""
    from esxi_anomaly.atomic import atomic_path
    from esxi_anomaly.scoring import quarantine_path

    path = quarantine_path(out)
    if not len(quarantine):
        path.unlink(missing_ok=True)
        return EXIT_OK
    with atomic_path(path) as tmp:
        quarantine.write(str(tmp))
    total, with_text = len(quarantine), len(quarantine.records)
    if total > with_text:   # beyond `max_records` only counts were kept: the file says how many per file
        log(f"{total:,} records quarantined ({with_text:,} with their text, {total - with_text:,} counted only) "
            f"-> {path}")
    else:
        log(f"{total:,} records quarantined -> {path}")
    return EXIT_QUARANTINE if strict else EXIT_OK


def finish_diagnostics(lines: list[str], strict: bool) -> int:
    """EXIT_QUARANTINE when `strict` and the run or training found blind spots (`features.scope.
    diagnostic_lines`: low DNS coverage, encrypted DNS, a short history, odd times, duplicates),
    which were logged as warnings already; else EXIT_OK."""
    if strict and lines:
        log(f"--strict: {len(lines)} coverage or sanity finding{'s' if len(lines) > 1 else ''} (warnings above)")
        return EXIT_QUARANTINE
    return EXIT_OK


def scope_option(args, default):
    """The scope of the command line: `default` (a `features.scope.Scope`: the model's, or the
    config's) with --local-nets and --all-directions applied when given."""
    from dataclasses import replace

    changes = {}
    if getattr(args, "local_nets", None):
        changes["local_nets"] = tuple(args.local_nets)
    if getattr(args, "all_directions", False):
        changes["all_directions"] = True
    return replace(default, **changes) if changes else default


# -- commands ------------------------------------------------------------------------------

def cmd_generate(args) -> int:
    from esxi_anomaly.scoring import make_output_folder
    from esxi_anomaly.synth import generate, parse_formats, write_formats

    try:
        formats = parse_formats(args.formats)
    except ValueError as exc:
        log(f"error: --formats: {exc}")
        return EXIT_USAGE
    make_output_folder(Path(args.out))   # before the minutes of generating
    ds = generate(days=args.days, seed=args.seed, scenario=args.scenario, attack_days=args.attack_days)
    write_formats(ds, args.out, formats, zeek_format=args.format, gzip=args.gzip)
    log(f"wrote {len(ds.connections)} connections, {ds.dns_answers['event_id'].nunique()} DNS responses, "
        f"{len(ds.inventory)} inventory rows, {len(ds.labels)} labels to {args.out}")
    return EXIT_OK


def _config(args):
    """The training config of the command line: `--config` (checked before any input is read) with
    --env, --trials, --seed and the environment's feedback file set."""
    from esxi_anomaly import registry
    from esxi_anomaly.training import TrainConfig

    cfg = TrainConfig.from_toml(args.config) if args.config else TrainConfig()
    changes = {"env": args.env, "feedback_path": str(registry.feedback_path(args.models_dir, args.env))}
    if args.trials is not None:
        changes["trials"] = args.trials
    if args.seed is not None:
        changes["seed"] = args.seed
    scope = scope_option(args, cfg.scope.scope())
    if scope != cfg.scope.scope():
        changes["scope"] = {**cfg.scope.model_dump(), "local_nets": list(scope.local_nets),
                            "all_directions": scope.all_directions}
    return cfg.replace(**changes)


def cmd_train(args) -> int:
    from esxi_anomaly import registry, training

    cfg = _config(args)   # a bad config is refused before the minutes of reading
    stages = Stages()
    frames, quarantine, _ = read_inputs(args, stages)
    trained = stages.run("fit", training.train_environment, frames, cfg, allow_odd_history=args.allow_odd_history)
    path = stages.run("write bundle", registry.write_model, trained.model, trained.config, args.models_dir,
                      trained.metrics, trained.tuning)
    log(f"bundle written: {path}")
    print(printable(path))
    from esxi_anomaly.features.scope import diagnostic_lines

    rc = finish_quarantine(quarantine, Path(path) / "training", args.strict)
    return rc or finish_diagnostics(diagnostic_lines(trained.model.scope_counts_, len(frames.dns_answers)),
                                    args.strict)


def cmd_refit(args) -> int:
    from esxi_anomaly import registry, training

    directory = registry.newest_version(args.models_dir, args.env)
    model, manifest = registry.load_model(directory)
    cfg = training.TrainConfig.from_manifest(manifest, str(directory))
    stages = Stages()
    frames, quarantine, _ = read_inputs(args, stages)
    if args.retune:
        trained = stages.run("fit", training.train_environment, frames,
                             cfg.replace(trials=args.trials or cfg.trials or 20),
                             allow_odd_history=args.allow_odd_history)
        model, metrics, tuning, cfg = trained
    else:
        model = stages.run("refit", training.refit_model, model, frames, allow_odd_history=args.allow_odd_history)
        metrics, tuning = manifest.get("metrics", {}), manifest.get("tuning", {})
    path = registry.write_model(model, cfg, args.models_dir, metrics, tuning)
    print(printable(path))
    return finish_quarantine(quarantine, Path(path) / "training", args.strict)


def _load_for_scoring(args):
    from esxi_anomaly import registry

    directory = Path(args.model) if args.model else registry.newest_version(args.models_dir, args.env)
    model, manifest = registry.load_model(directory)
    log(f"model: {directory}")
    return model, manifest, directory


def cmd_score(args) -> int:
    """`esxi-anomaly score`: either engine, through `scoring.score`. The output is checked, then
    locked, before any input is read; the local engine's workers start first."""
    from esxi_anomaly.scoring.workers import WorkerPool, workers_for

    if args.engine == "dask":
        from esxi_anomaly.scoring.dask_engine import require_distributed

        require_distributed()
    # the local engine's workers start first: they import while this process loads the model
    workers = args.workers or workers_for(_given_files(args.conn, args.dns))
    pool = WorkerPool(workers) if args.engine == "local" and workers > 1 else None
    try:
        model, manifest, directory = _load_for_scoring(args)
        return _score(args, model, manifest, directory, pool)
    finally:
        if pool is not None:
            pool.close()


def _given_files(*path_lists) -> list:
    """The input files named (`input_paths.input_files`); none when some cannot be listed: the run's own
    checks then say what is wrong."""
    from esxi_anomaly.input_paths import IngestError, input_files   # no pandas: the pool starts first

    try:
        return input_files(*path_lists)
    except (IngestError, OSError):
        return []


def _suppressions(directory: Path) -> pd.DataFrame:
    """Benign analyst verdicts of the bundle's environment (kept next to its versions): the
    suppressions both engines apply."""
    from esxi_anomaly.registry import bundle_feedback

    return bundle_feedback(directory).suppressions()


def _score(args, model, manifest: dict, directory: Path, pool) -> int:
    import hashlib

    from esxi_anomaly import ingest, scoring
    from esxi_anomaly.atomic import atomic_path
    from esxi_anomaly.input_paths import input_files
    from esxi_anomaly.scoring.core import model_scope
    from esxi_anomaly.scoring.output import check_output_paths

    out = Path(args.out)
    fmt = scoring.output_format(out, args.format)
    check_output_paths(out, input_files(args.conn, args.dns, args.inventory, args.context))
    with scoring.output_folder(out.parent), scoring.hold_output(out):
        quarantine, summary = ingest.Quarantine(), ingest.ReadSummary()
        inventory = ingest.read_inventory(args.inventory, quarantine, summary) if args.inventory else None
        context = ingest.read_context(args.context, quarantine, summary) if args.context else None
        html_extra = {"summary": {"model": str(directory), "env": manifest.get("env", ""),
                                  "threshold": manifest.get("threshold")}} if fmt == "html" else {}
        if args.engine == "dask":
            options = {"scheduler": args.scheduler}
        else:   # the bundle's identity (for --resume): its manifest lists the sha256 of every file of it
            options = {"chunk_rows": args.chunk_rows, "resume": args.resume, "pool": pool,
                       "model_id": hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()}
        options["scope"] = scope_option(args, model_scope(model))   # the model's, unless given
        result = scoring.score(model, args.conn, args.dns, out, inventory=inventory, engine=args.engine,
                               suppressions=_suppressions(directory), context=context, fmt=fmt, top=args.top,
                               quarantine=quarantine, summary=summary, html_extra=html_extra,
                               read_options=read_options(args), progress=not args.no_progress,
                               alerts_only=args.alerts_only, alert_budget=args.alert_budget, incidents=args.incidents,
                               **options)
        for line in summary.lines() + result.scope_lines() + [f"warning: {w}" for w in result.level_warnings()]:
            log(line)
        log(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in result.__dict__.items()
                        if k != "stages_s"} | {"stages_s": {k: round(v, 2) for k, v in result.stages_s.items()}}))
        log(f"wrote {result.written} {'incidents' if args.incidents else 'rows'}"
            f"{' (alerts only)' if args.alerts_only else ''} to {out} ({fmt})")
        log(f"wrote {result.entities} entities to {scoring.rollup_path(out)} (entity roll-up of all scored "
            "connections, csv)")
        log(f"wrote {result.incidents} incidents to {scoring.incidents_path(out)} (all scored connections, csv)")
        if getattr(args, "stats_json", None):
            stats = {**result.__dict__, "engine": args.engine, "out": str(out), "format": fmt,
                     "rollup": str(scoring.rollup_path(out)), "incidents_file": str(scoring.incidents_path(out)),
                     "files": _file_records(summary)}
            with atomic_path(args.stats_json) as tmp:
                Path(tmp).write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")
        return finish_quarantine(quarantine, out, args.strict) or finish_diagnostics(result.diagnostics, args.strict)


def _file_records(summary: ingest.ReadSummary) -> list[dict]:
    """Each input file's outcome for the JSON run summary: its format's frame kind added, no NaN."""
    import dataclasses

    from esxi_anomaly import ingest

    frame_of = {f.name: f.frame for f in ingest.formats()}
    records = []
    for stats in summary.outcomes():
        record = {k: (None if isinstance(v, float) and v != v else v) for k, v in dataclasses.asdict(stats).items()}
        records.append(record | {"frame": frame_of.get(stats.format, "")})
    return records


def cmd_evaluate(args) -> int:
    from esxi_anomaly.evaluate import evaluate, read_labels

    ranked = _read_table(args.scores, ("event_id", "score"))
    print(json.dumps(evaluate(ranked, read_labels(args.labels)), indent=2))
    return EXIT_OK


def _read_table(path: str, required: tuple[str, ...] = ("event_id",)) -> pd.DataFrame:
    """A scored file (CSV, Parquet or ECS JSON lines) as a table; ValueError naming the file when it is
    not one (unreadable, or without the `required` columns)."""
    import pandas as pd

    try:
        if path.endswith(".parquet"):
            table = pd.read_parquet(path)
        elif path.endswith(".jsonl"):
            rows = pd.read_json(path, lines=True, dtype=False)
            nested = {"event_id": ("event", "id"), "score": ("esxi_anomaly", "score")}
            table = pd.DataFrame({col: rows[outer].str.get(inner) if outer in rows.columns else None
                                  for col, (outer, inner) in nested.items()}, index=rows.index)
            table = table.dropna(axis="columns", how="all")
        else:
            table = pd.read_csv(path, dtype={"event_id": "str"}, keep_default_na=False)
    except OSError:
        raise
    except (ValueError, ImportError) as exc:   # empty, not CSV/Parquet/JSON, ...
        raise ValueError(f"{path}: not a readable scored file ({_one_line(exc)})") from None
    missing = [col for col in required if col not in table.columns]
    if missing:
        raise ValueError(f"{path}: no {' or '.join(missing)} column; is it a file written by `esxi-anomaly score`?")
    return table


def _when(ts: float) -> str:
    import pandas as pd

    return pd.Timestamp(ts, unit="s").strftime("%Y-%m-%d %H:%M:%S")


def cmd_inspect(args) -> int:
    """Per file and per frame kind it holds: format, outcome, records, time range, quarantine reasons;
    then, of all files together, the DNS coverage per DNS source (`ReadSummary.coverage_lines`).

    Every file is reported, whatever happens to the others; EXIT_INPUT when some file is
    unreadable or of no known format, else EXIT_OK."""
    import pandas as pd

    from esxi_anomaly import ingest
    from esxi_anomaly.ingest import PARTLY_READ, READ, UNREADABLE, FileStats
    from esxi_anomaly.schema import FRAMES

    rc = EXIT_OK
    view = ingest.ReadSummary()   # all files together: the DNS coverage, as `score` would see it
    for path in ingest.expand_paths(args.paths):
        found, problem = False, ""
        for frame in FRAMES:
            quarantine, summary = ingest.Quarantine(), ingest.ReadSummary()
            try:
                for _chunk in ingest.iter_file(path, frame, False, quarantine, summary, options=read_options(args)):
                    pass
            except Exception as exc:  # a reader's bug: this file is reported, the next ones still read
                summary.files.append(FileStats(path, "unknown", outcome=UNREADABLE,
                                               reason=f"reader failed ({type(exc).__name__}: {exc})"))
            view.merge_notes(summary)
            st = summary.files[-1]
            if st.outcome == UNREADABLE:
                problem = problem or st.reason
                if st.format == "unknown":
                    continue
            elif st.outcome not in (READ, PARTLY_READ):
                continue
            found = True
            if st.format == "empty":
                print(printable(f"{path}: empty file"))
                break
            span = f", {_when(st.ts_min)} .. {_when(st.ts_max)} UTC" if st.ts_min == st.ts_min else ""
            state = f", {st.outcome}: {st.reason}" if st.outcome != READ else (f", {st.reason}" if st.reason else "")
            print(printable(f"{path}: {st.format} ({frame}), {st.kept} records, {len(quarantine)} quarantined"
                            f"{span}{state}"))
            reasons = pd.Series([r.reason for r in quarantine.records], dtype="str").value_counts().head(3)
            for reason, n in reasons.items():
                print(printable(f"    {n} x {reason}"))
            if st.outcome == UNREADABLE:
                rc = EXIT_INPUT
        if not found:
            print(printable(f"{path}: unreadable ({problem or 'not a known format'})"))
            rc = EXIT_INPUT
    for line in view.coverage_lines():
        print(printable(line))
    return rc


def cmd_label(args) -> int:
    import pandas as pd

    from esxi_anomaly import feedback, registry
    from esxi_anomaly.report.csv import restore_formulas

    store = registry.feedback_store(args.models_dir, args.env)
    if args.import_csv:
        n = store.import_csv(args.import_csv)
        log(f"imported {n} verdicts into {store.path}")
        added = store.read().tail(n)
        cannot = int(((added["verdict"] == "benign") & (added["src_ip"] == "")).sum())
        if cannot:
            log(f"warning: {cannot} benign verdicts have no src_ip/query/dst_port: they suppress nothing")
        return EXIT_OK
    if not args.event_id or not args.verdict:
        log("esxi-anomaly label: error: give --event-id and --verdict, or --import-csv")
        return EXIT_USAGE
    if not args.scores:
        if args.verdict == "benign":  # stored without its context it would suppress nothing, silently
            raise ValueError("a benign verdict needs --scores (the scored file the event comes from): "
                             "its source, name and port are what scoring suppresses")
        log(f"warning: {args.event_id} not checked against a scored file (no --scores): an unknown id "
            "labels nothing")
        store.add(args.event_id, args.verdict, args.note or "")
        log(f"{args.event_id}: {args.verdict} stored in {store.path}")
        return EXIT_OK
    if args.scores.endswith((".parquet", ".jsonl")):
        scored = _read_table(args.scores)
    else:  # every column as text, as written (a name such as "1e5" must not become a number)
        scored = pd.read_csv(args.scores, dtype="str", keep_default_na=False,
                             usecols=lambda c: c in ("event_id",) + feedback.CONTEXT)
    if "event_id" not in scored.columns:
        raise ValueError(f"{args.scores}: no event_id column; is it a scored file?")
    # the CSV writer quoted cells that start a formula: compare and store them as they were
    match = scored[restore_formulas(scored["event_id"].astype("str")) == args.event_id]
    if not len(match):
        raise ValueError(f"{args.scores}: no event {args.event_id}")
    row = match.iloc[:1]
    context = {c: restore_formulas(row[c].astype("str")).iloc[0] for c in feedback.CONTEXT if c in row.columns}
    if args.verdict == "benign" and len(context) < len(feedback.CONTEXT):
        raise ValueError(f"{args.scores}: no src_ip, query and dst_port columns (JSON lines output has "
                         "none): a benign verdict needs them to suppress anything; use the CSV or Parquet output")
    store.add(args.event_id, args.verdict, args.note or "", context)
    log(f"{args.event_id}: {args.verdict} stored in {store.path}")
    return EXIT_OK


def cmd_demo(args) -> int:
    from esxi_anomaly import demo

    return demo.run(Path(args.out), seed=args.seed, days=args.days)


# -- parser --------------------------------------------------------------------------------

def _env_name(value: str) -> str:
    """argparse `type=` of every --env: it becomes a folder under --models-dir, so no path tricks."""
    from esxi_anomaly.registry import check_env_name

    try:
        return check_env_name(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _inputs(p, required=True):
    p.add_argument("--conn", nargs="+", required=required, help="connection logs: files, globs or folders")
    p.add_argument("--dns", nargs="+", required=required, help="DNS logs with answers: files, globs or folders")
    p.add_argument("--inventory", nargs="+", help="inventory (canonical CSV, PowerCLI CSV, govc JSON)")
    p.add_argument("--strict", action="store_true", help="exit 3 when any record was quarantined")
    _snapshot_time_arg(p)


def _scope_args(p) -> None:
    p.add_argument("--local-nets", nargs="+", metavar="CIDR",
                   help="the monitored networks: connections their addresses initiate are scored (with those of the "
                        "inventory and Zeek local_orig); default: RFC 1918 and ULA, or the model's (score)")
    p.add_argument("--all-directions", action="store_true",
                   help="score every connection: inbound, ICMP/IGMP, multicast, broadcast, link-local, DNS lookups "
                        "(out of scope, and counted by reason, otherwise)")


def _snapshot_time_arg(p) -> None:
    p.add_argument("--snapshot-time", type=_snapshot_time, metavar="TIME",
                   help="time of the esxcli connection tables that carry none (no '# <ISO time>' or `date` line "
                        "before them, no time column, no time in the file name): an ISO 8601 time (UTC without "
                        "a zone), or 'mtime' for each file's modification time; without it such tables are "
                        "quarantined")


def _snapshot_time(value: str):
    from esxi_anomaly.ingest.esxcli_connections import snapshot_time_option

    try:
        return snapshot_time_option(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("esxi-anomaly")
    except PackageNotFoundError:   # run from a source tree that was never installed
        from esxi_anomaly import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esxi-anomaly", description=__doc__)
    parser.add_argument("--version", action="version", version=f"esxi-anomaly {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="generate -> train -> score -> report on the embedded default estate")
    p.add_argument("--out", default="demo-out")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--days", type=int, default=4)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", help="write a generated vSphere estate as Zeek logs + inventory + labels")
    p.add_argument("--out", required=True)
    p.add_argument("--days", type=int, default=4)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--scenario", default="default")
    p.add_argument("--attack-days", type=int, default=1)
    p.add_argument("--format", choices=["tsv", "json"], default="tsv")
    p.add_argument("--gzip", action="store_true")
    p.add_argument("--formats", default="zeek",
                   help="comma-separated views to write: zeek, nsx (DFW per host), esxcli (60 s snapshots per host), "
                        "sysmon (EID 3/22 of Windows guests), ipfix (vDS IPFIX per host), and the DNS server logs "
                        "infoblox (responses), windows_dns (Analytical ETW, answers in PacketData), bind (query log, "
                        "no answers): the clients Sysmon does not cover are split among the DNS server logs asked "
                        "for, each client in one (by a hash of its IP); all = every one")
    p.set_defaults(func=cmd_generate)

    for name, func in (("train", cmd_train), ("refit", cmd_refit)):
        p = sub.add_parser(name, help=f"{name} an environment's model on its history")
        p.add_argument("--env", required=True, type=_env_name)
        _inputs(p)
        p.add_argument("--models-dir", default="models")
        p.add_argument("--config", help="training config TOML (training/<env>.toml)")
        p.add_argument("--trials", type=int,
                       help="Optuna trials in total (0 = no tuning): the environment's study for the same data, "
                            "config and search space is resumed and only the trials it lacks are run")
        p.add_argument("--seed", type=int)
        if name == "train":   # refit keeps the model's scope
            _scope_args(p)
        p.add_argument("--allow-odd-history", action="store_true",
                       help="train even on times before 2000, more than a day ahead, or spanning over 400 days "
                            "(refused otherwise: usually a broken clock or time unit); warns instead")
        if name == "refit":
            p.add_argument("--retune", action="store_true", help="re-run tuning instead of keeping tuned parameters")
        p.set_defaults(func=func)

    p = sub.add_parser("score", help="score connections with a fitted model")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--env", type=_env_name)
    g.add_argument("--model", help="a bundle folder")
    p.add_argument("--models-dir", default="models")
    _inputs(p)
    p.add_argument("--out", required=True,
                   help="ranked output; the per-entity roll-up (one row per VM/host, over all scored "
                        "connections, whatever --top) is written next to it as <out stem>.entities.csv, the "
                        "incidents (one per source, C2 name and derivation) as <out stem>.incidents.csv")
    p.add_argument("--context", nargs="+", help="ESXi/vCenter syslog (hostd, vobd, shell, ...) shown in explanations")
    p.add_argument("--format", choices=["csv", "parquet", "jsonl", "html"])
    p.add_argument("--engine", choices=["local", "dask"], default="local")
    p.add_argument("--scheduler", help="Dask scheduler address (default: a LocalCluster)")
    p.add_argument("--top", type=int, help="write only the N best-ranked rows (the roll-up still covers all)")
    _scope_args(p)
    p.add_argument("--alerts-only", action="store_true", help="write only alerts (rows, or incidents with --incidents)")
    p.add_argument("--incidents", action="store_true", help="write one ECS document per incident to --out (JSON lines)")
    p.add_argument("--alert-budget", type=int, metavar="N", help="at most N alerts a day, the best ranked; the others stay ranked as non-alerts")
    p.add_argument("--chunk-rows", type=int, default=500_000,
                   help="connections scored at once, over all workers (bounds memory)")
    p.add_argument("--workers", type=int,
                   help="local engine: processes scoring partitions of the sources (default: the usable cores; "
                        "this process alone for inputs under 32 MB; the output does not depend on it)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last chunk")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--stats-json", metavar="PATH",
                   help="also write the run summary (counts, per-stage seconds) as JSON to PATH")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("evaluate", help="quality of a ranking against labels")
    p.add_argument("--scores", required=True)
    p.add_argument("--labels", required=True)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("inspect", help="detected format, counts, time range and quarantine per file")
    p.add_argument("paths", nargs="+")
    _snapshot_time_arg(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "label", help="store an analyst verdict for a scored event",
        description="Store an analyst verdict. A benign verdict suppresses later rows with the same source, "
                    "name and port, so it needs --scores (the scored CSV or Parquet file the event comes "
                    "from) and is refused without it; with --scores an event id not in that file is refused. "
                    "A malicious verdict without --scores is stored unchecked (with a warning). --import-csv "
                    "stores all its rows or, when any row is invalid, none.")
    p.add_argument("--env", required=True, type=_env_name)
    p.add_argument("--models-dir", default="models")
    p.add_argument("--event-id")
    p.add_argument("--verdict", choices=["benign", "malicious"])
    p.add_argument("--note")
    p.add_argument("--import-csv", help="CSV with event_id,verdict[,note,src_ip,query,dst_port]; all rows or none "
                                        "are stored; benign rows without src_ip/query/dst_port suppress nothing")
    p.add_argument("--scores", help="the scored CSV/Parquet the event comes from: required for a benign verdict "
                                    "(its source, name and port are what is suppressed); unknown ids are refused")
    p.set_defaults(func=cmd_label)
    return parser


def _one_line(text: object) -> str:
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _os_error(exc: OSError) -> str:
    """`path: reason` (disk full, permission denied, is a directory, ...)."""
    if exc.filename is None:
        return _one_line(exc)
    paths = f"{exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
    return f"{paths}: {exc.strerror or exc}"


def _failure(exc: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) of a command that raised `exc`. Unusable inputs, bundles, configs
    and output paths are the user's to fix (EXIT_INPUT); anything else is a bug (EXIT_INTERNAL)."""
    from esxi_anomaly import ingest
    from esxi_anomaly.bundle import BundleError
    from esxi_anomaly.scoring.workers import WorkerError

    if isinstance(exc, WorkerError) and exc.original is not None:
        exc = exc.original   # the job's own exception, raised in a worker process
    code = getattr(exc, "exit_code", None)
    if code in (EXIT_INPUT, EXIT_QUARANTINE, EXIT_BUSY):   # an error class that names its own exit code
        return code, _one_line(exc)
    if isinstance(exc, OSError):
        return EXIT_INPUT, _os_error(exc)
    if isinstance(exc, (ingest.IngestError, BundleError, ValueError)):
        return EXIT_INPUT, _one_line(exc)
    lines = str(exc).splitlines()
    return EXIT_INTERNAL, (f"{type(exc).__name__}: {lines[0] if lines else ''} -- this is a bug; rerun with "
                           "ESXI_ANOMALY_DEBUG=1 for the traceback")


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit code (README "Exit codes"). Errors end as one escaped line on stderr,
    a traceback only with ESXI_ANOMALY_DEBUG=1; SIGINT/SIGTERM stop the workers, then exit 130/143."""
    import traceback

    from esxi_anomaly.console import Interrupted, unwind_on_signals

    args = None
    with unwind_on_signals():
        try:
            args = build_parser().parse_args(argv)
            from esxi_anomaly.scoring.workers import tune_allocator

            tune_allocator()
            return args.func(args)
        except KeyboardInterrupt as exc:
            log("interrupted" + (f" ({exc})" if isinstance(exc, Interrupted) else ""))
            return exc.exit_code if isinstance(exc, Interrupted) else EXIT_INTERRUPTED
        except Exception as exc:  # noqa: BLE001 - every failure ends as one line and an exit code
            if os.environ.get("ESXI_ANOMALY_DEBUG", "") not in ("", "0"):
                log(traceback.format_exc().rstrip())
            code, message = _failure(exc)
            command = " ".join(["esxi-anomaly"] + ([args.command] if args is not None else []))
            log(f"{command}: error: {message}")
            return code


if __name__ == "__main__":
    sys.exit(main())
