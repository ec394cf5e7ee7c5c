"""Who is the source of a connection: inventory lookup of `src_ip` to name, kind, host and role.

Unknown sources get kind "unknown", their IP as name, and role "unknown" so that baselines can
fall back from the entity to its role to the whole population. Lookups run once per distinct
source IP.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from esxi_anomaly.features.columns import Coded

ENTITY_COLUMNS = ["src_name", "src_kind", "src_role", "src_esxi_host"]


def entity_table(src_ips: np.ndarray, inventory: pd.DataFrame | None) -> pd.DataFrame:
    """The entity columns for each of `src_ips` (distinct values), in their order."""
    src = pd.Series(np.asarray(src_ips, dtype=object), dtype="str")
    if inventory is None or not len(inventory):
        return pd.DataFrame({"src_name": src, "src_kind": "unknown", "src_role": "unknown", "src_esxi_host": ""},
                            dtype="str")
    inv = inventory.drop_duplicates("ip", keep="last").set_index("ip")
    name = src.map(inv["name"]).fillna(src)
    kind = src.map(inv["kind"]).fillna("unknown")
    role = src.map(inv["role"]).fillna("")
    role = role.where(role != "", kind)
    host = src.map(inv["esxi_host"]).fillna("")
    return pd.DataFrame({"src_name": name, "src_kind": kind, "src_role": role, "src_esxi_host": host}).astype("str")


def attach_entities(conns, inventory: pd.DataFrame | None, src: Coded | None = None) -> pd.DataFrame:
    """The entity columns for each connection (same row order as `conns`)."""
    src = src if src is not None else Coded.of(conns["src_ip"])
    table = entity_table(src.values, inventory)
    out = table.take(src.codes).reset_index(drop=True)
    return out.set_axis(conns.index) if isinstance(conns, pd.DataFrame) else out


def registered_domain(query) -> pd.Series:
    """The last two labels of a name ("a.b.example.net" -> "example.net"); cheap eTLD+1 stand-in."""
    q = pd.Series(query).astype("str").str.lower().str.rstrip(".")
    return q.str.extract(r"([^.]+\.[^.]+)$", expand=False).fillna(q)
