"""From canonical frames to the feature matrix: DNS join, relationship features, entities, baselines.

`extract` is the one function the trainer, the batch scorer and the Dask engine all call, so the
features a model was fitted on are exactly the ones it scores.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd

from esxi_anomaly.features import dns_join, dns_port, identity, merge
from esxi_anomaly.features.baseline import BASELINE_FEATURES, RATE_WINDOW_S, EntityBaseline
from esxi_anomaly.features.columns import Coded, ConnColumns, DnsColumns, gather
from esxi_anomaly.features.dns_side import DNS_SIDE_FEATURES, dns_side_features
from esxi_anomaly.features.entities import entity_table, registered_domain
from esxi_anomaly.features.hashing import hash_column
from esxi_anomaly.features.mgmt_plane import MGMT_FEATURES, ManagementPlane
from esxi_anomaly.features.stream_state import StreamState, trailing_count

PORT_FEATURES = ["dst_port_log", "dst_port_ephemeral"]
FEATURES = dns_port.RELATIONSHIP_FEATURES + DNS_SIDE_FEATURES + BASELINE_FEATURES + MGMT_FEATURES + PORT_FEATURES


@dataclass
class Prepared:
    """Everything about a batch that does not depend on a fitted baseline.

    `conns` are the merged connections (`merge.merge_connections`: one row per connection, with
    `seen_by`). Sources are kept as `entity_table` (one row per distinct source, `entities.ENTITY_COLUMNS`) and
    each connection's row in it (`entity_codes`); `entities` gives them per connection."""

    conns: pd.DataFrame
    relationship: pd.DataFrame
    evidence: pd.DataFrame
    entity_table: pd.DataFrame
    entity_codes: np.ndarray
    baseline_input: pd.DataFrame
    dns_side: pd.DataFrame
    columns: ConnColumns | None = None  # the coded connection columns, reused by `extract`

    @cached_property
    def entities(self) -> pd.DataFrame:
        """The entity columns per connection, in connection order."""
        return self.entity_table.take(self.entity_codes).reset_index(drop=True)

    @property
    def entity_kinds(self) -> Coded:
        """Each connection's source kind, coded."""
        return Coded(self.entity_codes, self.entity_table["src_kind"].to_numpy(dtype=object))


def prepare(conns: pd.DataFrame, dns: pd.DataFrame, inventory: pd.DataFrame | None,
            join_params: dns_join.JoinParams = dns_join.JoinParams(),
            state: StreamState | None = None) -> Prepared:
    # one row per connection and per answer, however many vantage points logged it (`merge`)
    conns = merge.merge_connections(conns, state)
    dns = merge.merge_dns(identity.resolve_clients(dns, inventory))  # named clients (Sysmon EID 22) -> their IPs
    cc, dc = ConnColumns(conns), DnsColumns(dns.reset_index(drop=True))
    j = dns_join.join(cc, dc, join_params)
    rel, evidence = dns_port.relationship_features(cc, dc, j, state)
    # the name behind a connection: the one that resolved the destination, else the one behind the
    # best derivation; evidence without a name of its own takes it too
    queries = dc.query
    empty = queries.code_of("")
    link = gather(queries.codes, j.ip_answer_row, -1)
    behind = gather(queries.codes, evidence.pop("answer_row").to_numpy(), -1)
    link[link == empty], behind[behind == empty] = -1, -1
    evidence["query"] = queries.text(np.where(behind >= 0, behind, link))
    names = np.append(queries.values, "")
    name = Coded(np.where(link >= 0, link, np.where(behind >= 0, behind, len(names) - 1)), names)
    table = entity_table(cc.src.values, inventory)
    domain = np.where(names != "", registered_domain(names).to_numpy(dtype=object), "")
    base_in = pd.DataFrame({
        "entity": cc.src.per_value(hash_column(table["src_name"].to_numpy(dtype=object))),
        "role": cc.src.per_value(hash_column(table["src_role"].to_numpy(dtype=object))),
        "dst_ip": cc.dst.keys, "dst_port": cc.dst_port,
        "proto": conns["proto"].array, "domain": name.per_value(hash_column(domain)),
        "ts": cc.ts, "bytes_out": conns["bytes_out"].to_numpy(),
        "duration": conns["duration"].to_numpy(),
        "conn_rate": trailing_count(cc.src.keys, cc.ts, RATE_WINDOW_S, state, "conn_rate"),
    }, copy=False)
    side = dns_side_features(cc, dc, j, name, state)
    return Prepared(conns, rel, evidence, table, cc.src.codes, base_in, side, cc)


def extract(prepared: Prepared, baseline: EntityBaseline, mgmt: ManagementPlane) -> pd.DataFrame:
    """The numeric feature matrix, columns `FEATURES`, one row per connection."""
    port = prepared.conns["dst_port"].to_numpy(dtype="float64")
    parts = [
        prepared.relationship,
        prepared.dns_side,
        baseline.transform(prepared.baseline_input),
        mgmt.transform(prepared.conns, prepared.entity_kinds, prepared.columns),
        pd.DataFrame({
            "dst_port_log": np.log1p(np.maximum(port, 0)),
            "dst_port_ephemeral": (port >= 49_152).astype("float64"),
        }, copy=False),
    ]
    # one float64 block filled column by column: no concatenation or consolidation copies
    X = np.empty((len(port), len(FEATURES)), dtype="float64", order="F")
    where = {name: i for i, name in enumerate(FEATURES)}
    filled = [name for part in parts for name in part.columns]
    if sorted(filled) != sorted(FEATURES):
        raise RuntimeError(f"feature parts give {sorted(filled)}, expected {sorted(FEATURES)}")
    for part in parts:
        for name in part.columns:
            X[:, where[name]] = part[name].to_numpy(dtype="float64")
    return pd.DataFrame(X, columns=FEATURES, copy=False)
