"""Small vectorised text helpers shared by the real-format writers (NSX DFW, esxcli, Sysmon, Infoblox)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

VM_KINDS = ("vm", "infra", "vcenter")     # inventory kinds that are guests behind a vNIC (DFW sees them)
HOST_KIND = "esxi_mgmt"


def hash64(values) -> np.ndarray:
    """A stable uint64 per value (pandas' hash: no per-row Python)."""
    return pd.util.hash_pandas_object(pd.Series(np.asarray(values, dtype=object)), index=False).to_numpy()


def hex_of(values, digits: int) -> pd.Series:
    """The low `digits` hex digits of each value's hash (each distinct value formatted once)."""
    codes, uniques = pd.factorize(pd.Series(np.asarray(values, dtype=object)))
    mask = np.uint64((1 << (4 * digits)) - 1) if digits < 16 else np.uint64(0xFFFFFFFFFFFFFFFF)
    table = np.array([f"{v:0{digits}x}" for v in (hash64(uniques) & mask).tolist()], dtype=object)
    return pd.Series(table[codes] if len(codes) else np.array([], dtype=object), dtype=object)


def ms_floor(ts) -> np.ndarray:
    """Epoch seconds cut to whole milliseconds (int64 ms), as the logs print them."""
    return np.floor(np.asarray(ts, dtype=np.float64) * 1000.0 + 1e-6).astype(np.int64)


def iso_ms(ms: np.ndarray, sep: str = "T", zone: str = "Z") -> np.ndarray:
    """`2024-03-04T00:01:10.142Z` texts of int64 epoch milliseconds (object array)."""
    text = np.datetime_as_string(np.asarray(ms, dtype=np.int64).astype("datetime64[ms]"), unit="ms")
    out = pd.Series(text.astype(object)) + zone
    if sep != "T":
        out = out.str.replace("T", sep, n=1, regex=False)
    return out.to_numpy(dtype=object)


def col(values) -> pd.Series:
    """Values as a Series of text, for `+` concatenation (integers through Arrow: numpy's astype(str) is slow)."""
    arr = np.asarray(values)
    if not len(arr):
        return pd.Series(np.array([], dtype=object))
    if arr.dtype.kind in "iu":
        return pd.Series(pa.compute.cast(pa.array(arr), pa.string()).to_pandas(types_mapper=pd.ArrowDtype).astype("str"))
    return pd.Series(arr.astype(str).astype(object))


def write_lines(path: Path, lines) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = list(lines)
    path.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
    return path


def write_in_time_order(path: Path, lines: pd.DataFrame, *then: str) -> Path:
    """Write `lines["line"]` ordered by `lines["ms"]`, then by the columns `then` (stable)."""
    keys = [lines[c].to_numpy() for c in reversed(then)] + [lines["ms"].to_numpy()]
    return write_lines(path, lines["line"].to_numpy()[np.lexsort(keys)].tolist() if len(lines) else [])


def answers_of_clients_but(ds, exclude) -> pd.DataFrame:
    """The estate's DNS answers to every client not in `exclude` (those another log covers)."""
    return ds.dns_answers[~ds.dns_answers["client_ip"].isin(set(exclude))]


def entity_maps(inventory: pd.DataFrame) -> tuple[dict, dict, dict]:
    """ip -> inventory kind, ip -> ESXi host the entity runs on, ip -> name."""
    inv = inventory.drop_duplicates("ip", keep="last")
    return (dict(zip(inv["ip"], inv["kind"])), dict(zip(inv["ip"], inv["esxi_host"])), dict(zip(inv["ip"], inv["name"])))
