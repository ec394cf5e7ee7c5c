"""The package's optional compiled routines: C files that setup.py builds at install when there is a C
compiler, reached through ctypes (which releases the GIL during a call). Each has a pure path beside it
that gives the same result (tested), so a package installed without a compiler works the same, slower:

* `detect/_heap_walk.c`: the isolation forest's tree walk (`detect.forest.HeapTrees`);
* `report/_csv_rows.c`: CSV rows from text columns (`report.csv.arrow_csv_parts`).
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util

POINTER, SIZE = ctypes.c_void_p, ctypes.c_int64   # the argument types the routines take


@functools.lru_cache(maxsize=None)
def routine(module: str, name: str, argtypes: tuple, restype=None):
    """Function `name` of the compiled extension `module`, with its argument and result types, or None
    when the package was installed without it."""
    try:
        spec = importlib.util.find_spec(module)
        function = getattr(ctypes.CDLL(spec.origin), name) if spec is not None and spec.origin else None
    except (ImportError, OSError, AttributeError):
        return None
    if function is not None:
        function.argtypes, function.restype = list(argtypes), restype
    return function
