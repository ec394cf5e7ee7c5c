"""Imported by the workers' forkserver only (`workers._PRELOAD`), before it starts serving: the
forkserver hands its own SIGINT disposition to every worker it forks, so with this, workers ignore
Ctrl-C from their first instruction (a terminal's Ctrl-C reaches the whole process group; the
parent stops the workers). `workers._serve` sets the same again, for the *spawn* start method."""
import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)
