"""Imported by the workers' forkserver only (`workers._PRELOAD`), before it starts serving.

* The forkserver hands its own SIGINT disposition to every worker it forks, so with this, workers
  ignore Ctrl-C from their first instruction (a terminal's Ctrl-C reaches the whole process group;
  the parent stops the workers). `workers._serve` sets the same again, for the *spawn* start method.
* It imports what every worker needs, once: the local engine, and scikit-learn's trees only when
  the package has no compiled heap walk of its own (`detect.forest`; they cost 0.7 s and ~80 MB).
  Then it freezes the garbage collector's view of those objects: a worker's collections would
  otherwise write to every page that holds one, turning ~25 MB of pages shared with the
  forkserver into private copies in each worker and in the forkserver (`gc.freeze`).
"""
import gc
import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)

import esxi_anomaly.scoring.local  # noqa: E402,F401
from esxi_anomaly.detect.forest import heap_walk_routine  # noqa: E402

if heap_walk_routine() is None:
    import sklearn.ensemble  # noqa: F401

gc.collect()
gc.freeze()
