"""Who is the source of a connection: inventory lookup of `src_ip` to name, kind, host and role.

Unknown sources get kind "unknown", their IP as name, and role "unknown" so that baselines can
fall back from the entity to its role to the whole population.
"""
from __future__ import annotations

import pandas as pd

ENTITY_COLUMNS = ["src_name", "src_kind", "src_role", "src_esxi_host"]


def attach_entities(conns: pd.DataFrame, inventory: pd.DataFrame | None) -> pd.DataFrame:
    """The entity columns for each connection (same row order as `conns`)."""
    src = conns["src_ip"].astype("str")
    if inventory is None or not len(inventory):
        return pd.DataFrame({
            "src_name": src.to_numpy(), "src_kind": "unknown", "src_role": "unknown", "src_esxi_host": "",
        }, index=conns.index)
    inv = inventory.drop_duplicates("ip", keep="last").set_index("ip")
    name = src.map(inv["name"]).fillna(src)
    kind = src.map(inv["kind"]).fillna("unknown")
    role = src.map(inv["role"]).fillna("")
    role = role.where(role != "", kind)
    host = src.map(inv["esxi_host"]).fillna("")
    return pd.DataFrame({
        "src_name": name.to_numpy(), "src_kind": kind.to_numpy(), "src_role": role.to_numpy(),
        "src_esxi_host": host.to_numpy(),
    }, index=conns.index).astype("str")


def registered_domain(query: pd.Series) -> pd.Series:
    """The last two labels of a name ("a.b.example.net" -> "example.net"); cheap eTLD+1 stand-in."""
    q = query.astype("str").str.lower().str.rstrip(".")
    return q.str.extract(r"([^.]+\.[^.]+)$", expand=False).fillna(q)
