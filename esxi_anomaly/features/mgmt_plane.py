"""The ESXi management plane: is a connection from a management source expected management traffic?

Management sources (ESXi vmk IPs, vCenter) talk to a small set of peers and ports. The allow-list
(`esxi_anomaly/data/mgmt_allowlist.csv`, threat-notes section 3) is keyed on (process, peer class,
proto, port range); peer classes come from the inventory (kind for vcenter/esxi_mgmt, the infra
role otherwise). Environments extend it with `extra_allow`.
"""
from __future__ import annotations

import io
from importlib import resources

import numpy as np
import pandas as pd

from esxi_anomaly.estimator import Estimator, check_fitted
from esxi_anomaly.features.columns import Coded, ConnColumns, distinct
from esxi_anomaly.features.hashing import combine

MGMT_FEATURES = ["mgmt_source", "mgmt_expected", "mgmt_unexpected_egress"]
MGMT_KINDS = ("esxi_mgmt", "vcenter")
ALLOW_COLUMNS = ["process", "peer_class", "proto", "port_from", "port_to", "ruleset"]
_ROLE_CLASSES = [  # infra role text -> peer class (first match)
    ("dns", "dns"), ("ntp", "ntp"), ("syslog", "syslog"), ("log", "syslog"), ("loghost", "syslog"),
    ("dc", "dc"), ("ad", "dc"), ("domain", "dc"), ("controller", "dc"), ("kms", "kms"), ("nfs", "nfs"), ("iscsi", "iscsi"), ("replication", "vr"), ("depot", "depot"),
]


def default_allowlist() -> pd.DataFrame:
    text = resources.files("esxi_anomaly").joinpath("data/mgmt_allowlist.csv").read_text(encoding="utf-8")
    return parse_allowlist(text)


def parse_allowlist(text: str) -> pd.DataFrame:
    frame = pd.read_csv(io.StringIO(text), comment="#", dtype={"process": "str", "peer_class": "str", "proto": "str"})
    missing = [c for c in ALLOW_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"management allow-list lacks columns {missing}")
    return frame[ALLOW_COLUMNS]


def peer_classes(inventory: pd.DataFrame | None) -> pd.Series:
    """IP -> peer class, from the inventory."""
    if inventory is None or not len(inventory):
        return pd.Series(dtype="str")
    kind = inventory["kind"].astype("str")
    role = inventory["role"].astype("str").str.lower()
    cls = pd.Series("", index=inventory.index, dtype="str")
    tokens = role.str.split(r"[^a-z0-9]+", regex=True)  # whole words: "loadbalancer" is not "ad"
    for needle, name in reversed(_ROLE_CLASSES):
        cls = cls.mask(tokens.map(lambda words, n=needle: n in words), name)
    cls = cls.mask(kind.isin(MGMT_KINDS), kind)
    return pd.Series(cls.to_numpy(), index=inventory["ip"].astype("str").to_numpy()).loc[lambda s: s != ""]


class ManagementPlane(Estimator):
    """Flags management-plane egress that the allow-list does not explain.

    `extra_allow`: rows (process, peer_class, proto, port_from, port_to, ruleset) added per environment.
    """

    def __init__(self, extra_allow: tuple = ()):
        self.extra_allow = extra_allow

    def fit(self, inventory: pd.DataFrame | None, y=None):
        allow = default_allowlist()
        if self.extra_allow:
            allow = pd.concat([allow, pd.DataFrame(list(self.extra_allow), columns=ALLOW_COLUMNS)], ignore_index=True)
        self.allowlist_ = allow
        self.peer_class_ = peer_classes(inventory)
        return self

    def transform(self, conns: pd.DataFrame, entities: pd.DataFrame | Coded,
                  columns: ConnColumns | None = None) -> pd.DataFrame:
        """`entities`: the entity columns per connection, or just their `src_kind` coded; `columns`: the
        coded view of `conns` if the caller has one (`pipeline.prepare` does)."""
        check_fitted(self, "allowlist_")
        n = len(conns)
        kinds = entities if isinstance(entities, Coded) else Coded.of(entities["src_kind"])
        source = kinds.isin(MGMT_KINDS)
        expected = np.zeros(n, dtype=bool)
        idx = np.flatnonzero(source)
        if len(idx):
            # judge each distinct (destination, proto, port, process) once; only management
            # sources' processes are coded
            columns = columns if columns is not None else ConnColumns(conns)
            dst, proto = columns.dst, columns.proto
            proc = Coded.of(conns["process"].take(idx))
            port = conns["dst_port"].to_numpy(dtype="int64")[idx]
            combo, first = distinct(combine(dst.codes[idx], proto.codes[idx], proc.codes, port))
            rows = idx[first]
            sub = pd.DataFrame({
                "i": np.arange(len(rows)),
                "peer_class": pd.Series(dst.strings(rows)).map(self.peer_class_).fillna("other").to_numpy(dtype=object),
                "proto": np.char.lower(proto.strings(rows).astype(str)).astype(object),
                "port": port[first],
                "proc": proc.strings(first).astype(str).astype(object),
            })
            m = sub.merge(self.allowlist_, on=["peer_class", "proto"])
            ok = (m["port"] >= m["port_from"]) & (m["port"] <= m["port_to"]) & (
                (m["process"] == "*") | (m["process"] == m["proc"]))
            allowed = np.zeros(len(rows), dtype=bool)
            allowed[m.loc[ok, "i"].to_numpy()] = True
            expected[idx] = allowed[combo]
        return pd.DataFrame({
            "mgmt_source": source.astype("float64"),
            "mgmt_expected": expected.astype("float64"),
            "mgmt_unexpected_egress": (source & ~expected).astype("float64"),
        }, copy=False)
