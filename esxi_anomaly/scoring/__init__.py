"""Scoring at scale: input files in, a ranked output and its entity roll-up out, on one engine or another.

`score` is the one engine switch. Both engines read the same inputs, cut the sources into
partitions by slot (`core`), score every block through `core.score_block` (features, forest and
rules, analysts' benign verdicts) and rank, explain and write through `write.rank_and_write`, so
their outputs are byte-identical; they differ in where the partitions run:

- `local`: worker processes of this machine (`workers`), time-ordered chunks of bounded memory,
  resumable after an interruption (`local`);
- `dask`: tasks on a Dask cluster, one per partition (`dask_engine`).

Modules: `core` (engine-neutral primitives), `rank` (the ranking and the ranked row, which
`model.score` uses too), `write` (rank and write the output and roll-up), `output` (lock, paths,
fingerprint, output folder), `local`, `dask_engine`, `workers`.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

    from esxi_anomaly import ingest
    from esxi_anomaly.scoring.core import RunSummary

ENGINES = ("local", "dask")
_FROM_CORE = ("RunSummary", "score_block")
_FROM_OUTPUT = ("OutputBusy", "OutputError", "ResumeRefused", "hold_output", "make_output_folder", "output_folder",
                "output_format", "quarantine_path", "rollup_path", "incidents_path")

__all__ = ["ENGINES", "score", *_FROM_CORE, *_FROM_OUTPUT]


def __getattr__(name: str):
    """The re-exported names, imported on first use: `scoring.workers` (which the CLI starts before it
    loads the model) must not wait for the whole scoring stack to import."""
    if name in _FROM_CORE:
        from esxi_anomaly.scoring import core

        return getattr(core, name)
    if name in _FROM_OUTPUT:
        from esxi_anomaly.scoring import output

        return getattr(output, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def score(model, conn_paths, dns_paths, out: Path, *, inventory: pd.DataFrame | None = None, engine: str = "local",
          suppressions: pd.DataFrame | None = None, context: pd.DataFrame | None = None, fmt: str | None = None,
          top: int | None = None, explain_top: int = 200, rollup: bool = True,
          quarantine: ingest.Quarantine | None = None, summary: ingest.ReadSummary | None = None,
          html_extra: dict | None = None, read_options: dict | None = None, progress: bool = True,
          alerts_only: bool = False, alert_budget: int | None = None, incidents: bool = False,
          **engine_options) -> RunSummary:
    """Score the connections of `conn_paths` against the DNS answers of `dns_paths` (files, globs or
    folders) with a fitted `model` into `out` (ranked rows, `fmt` or the format its name implies),
    and, with `rollup`, the per-entity roll-up of every scored row into `rollup_path(out)`.

    `inventory`, `context`: frames naming the sources and adding ESXi events to the explanations;
    `suppressions`: analysts' benign verdicts (`FeedbackStore.suppressions`), which sink the rows
    they match; `top`: rows written (all when None); `explain_top`: rows attributed; `quarantine`,
    `summary`: collect what the readers refused and read; `read_options`: of `ingest.iter_file`.
    With `rollup`, the incidents of every scored row go to `incidents_path(out)` too. `alert_budget`:
    at most that many alerts a day (the best ranked; the others stay ranked as non-alerts);
    `alerts_only`: only alerts written; `incidents`: `out` holds one ECS document per incident
    (`fmt` jsonl) instead of rows (`write.rank_and_write`).
    `scope` (`features.scope.Scope`, in `engine_options`): which connections are scored (default: the
    model's, from training); out-of-scope rows are counted by reason in the summary.
    The output does not depend on `engine` nor on its options (`engine_options`):
    local (`local.run`): chunk_rows, workers, pool, resume, model_id, work, bucket_s;
    dask (`dask_engine.run`): scheduler, partitions, partition_rows, work."""
    if alert_budget is not None and alert_budget < 0:
        raise ValueError(f"the alert budget is a number of alerts a day (0 or more), not {alert_budget}")
    if incidents:
        from esxi_anomaly.scoring.output import output_format

        if output_format(Path(out), fmt) != "jsonl":
            raise ValueError("incidents as the output are ECS documents: write them as JSON lines "
                             "(--format jsonl, or an --out ending in .jsonl)")
    if engine == "local":
        from esxi_anomaly.scoring.local import run
    elif engine == "dask":
        from esxi_anomaly.scoring.dask_engine import run
    else:
        raise ValueError(f"engine must be one of {ENGINES}, not {engine!r}")
    return run(model, conn_paths, dns_paths, out, inventory=inventory, suppressions=suppressions, context=context,
               fmt=fmt, top=top, explain_top=explain_top, rollup=rollup, quarantine=quarantine, summary=summary,
               html_extra=html_extra, read_options=read_options, progress=progress,
               output_options={"alerts_only": alerts_only, "alert_budget": alert_budget, "incidents": incidents},
               **engine_options)
