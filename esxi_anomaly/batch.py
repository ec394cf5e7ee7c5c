"""Batch scoring: read, join, featurise, score, rank and write, with a run summary."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from esxi_anomaly import report
from esxi_anomaly.cli import Stages, finish_quarantine, log, read_inputs

FORMATS = {".csv": "csv", ".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".html": "html", ".htm": "html"}


def output_format(path: Path, fmt: str | None) -> str:
    if fmt:
        return fmt
    return FORMATS.get(path.suffix.lower(), "csv")


def score_command(args, model, manifest, directory) -> int:
    stages = Stages(quiet=getattr(args, "no_progress", False))
    frames, quarantine, summary = read_inputs(args, stages)
    ranked = stages.run("score", model.score, frames, top=args.top)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fmt = output_format(out, args.format)
    extra = {}
    if fmt == "html":
        extra = {"dns_answers": frames.dns_answers, "connections": frames.connections,
                 "summary": {"model": str(directory), "env": manifest.get("env", ""),
                             "threshold": manifest.get("threshold"), "connections": len(frames.connections)}}
    stages.run("write", report.write_outputs, ranked, str(out), fmt, **extra)
    run = {"connections": len(frames.connections), "dns_records": len(frames.dns_answers),
           "written": len(ranked), "alerts": int(ranked["alert"].sum()), "quarantined": len(quarantine),
           "stages_s": {k: round(v, 2) for k, v in stages.times.items()}}
    log(json.dumps(run))
    log(f"wrote {len(ranked)} rows to {out} ({fmt})")
    return finish_quarantine(quarantine, out, args.strict)
