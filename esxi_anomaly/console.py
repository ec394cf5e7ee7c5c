"""What the command line says and how it ends: exit codes, stderr messages, terminal-safe text.

Log text and file names are attacker-controlled: a name holding escape sequences could rewrite an
analyst's terminal, so everything printed goes through `printable` first.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading

EXIT_OK = 0
EXIT_INTERNAL = 1      # a bug: an unexpected exception (its traceback goes to the log, not the screen)
EXIT_USAGE = 2         # argparse: the command line itself is wrong
EXIT_QUARANTINE = 3    # --strict and some record or file was quarantined or not read
EXIT_INPUT = 4         # an input, model bundle, config or output path cannot be used; nothing written
EXIT_BUSY = 5          # the output is locked by another run
EXIT_INTERRUPTED = 130  # SIGINT (128 + 2); SIGTERM gives 143 (128 + 15)
EXIT_ERROR = EXIT_INPUT  # former name

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: object) -> str:
    """`text` with control characters (ESC, CR, BEL, bidi overrides, ...) shown as escapes; newlines
    and tabs are kept."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


def log(msg: object) -> None:
    print(printable(msg), file=sys.stderr, flush=True)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised in the main thread so that every `finally` runs (worker processes are
    stopped, temporary files removed) before the process exits with `exit_code` (128 + the signal)."""

    def __init__(self, signum: int):
        super().__init__(f"{signal.Signals(signum).name}")
        self.signum = signum
        self.exit_code = 128 + signum


@contextlib.contextmanager
def unwind_on_signals():
    """While inside: SIGINT and SIGTERM raise `Interrupted`; a second signal during the cleanup exits at
    once (workers die with their parent). Outside the main thread it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hit: list[int] = []

    def handler(signum, frame):
        if hit:
            os._exit(128 + hit[0])
        hit.append(signum)
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            if old is not None:   # None: set outside Python, cannot be restored from here
                signal.signal(sig, old)
