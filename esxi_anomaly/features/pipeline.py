"""From canonical frames to the feature matrix: DNS join, relationship features, entities, baselines.

`extract` is the one function the trainer, the batch scorer and the Dask engine all call, so the
features a model was fitted on are exactly the ones it scores.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from esxi_anomaly.features import dns_join, dns_port
from esxi_anomaly.features.baseline import BASELINE_FEATURES, EntityBaseline
from esxi_anomaly.features.dns_side import DNS_SIDE_FEATURES, dns_side_features
from esxi_anomaly.features.entities import attach_entities, registered_domain
from esxi_anomaly.features.mgmt_plane import MGMT_FEATURES, ManagementPlane
from esxi_anomaly.features.stream_state import StreamState

PORT_FEATURES = ["dst_port_log", "dst_port_ephemeral"]
FEATURES = dns_port.RELATIONSHIP_FEATURES + DNS_SIDE_FEATURES + BASELINE_FEATURES + MGMT_FEATURES + PORT_FEATURES


@dataclass
class Prepared:
    """Everything about a batch that does not depend on a fitted baseline."""

    conns: pd.DataFrame
    relationship: pd.DataFrame
    evidence: pd.DataFrame
    entities: pd.DataFrame
    baseline_input: pd.DataFrame
    dns_side: pd.DataFrame


def as_objects(frame: pd.DataFrame) -> pd.DataFrame:
    """String columns as numpy object arrays: the feature code indexes and hashes them many times,
    and each Arrow-to-Python conversion would otherwise be paid again at every use."""
    out = frame.reset_index(drop=True).copy(deep=False)
    for col in out.columns:
        if pd.api.types.is_string_dtype(out[col].dtype) and not pd.api.types.is_object_dtype(out[col].dtype):
            out[col] = out[col].to_numpy(dtype=object)
    return out


def prepare(conns: pd.DataFrame, dns: pd.DataFrame, inventory: pd.DataFrame | None,
            join_params: dns_join.JoinParams = dns_join.JoinParams(),
            state: StreamState | None = None) -> Prepared:
    conns = as_objects(conns)
    dns = as_objects(dns)
    j = dns_join.join(conns, dns, join_params)
    rel, evidence = dns_port.relationship_features(conns, dns, j, state)
    ent = attach_entities(conns, inventory)
    # the name that resolved the destination (else the name behind the best derivation)
    link_query = dns_port._gather(dns["query"].to_numpy(dtype=object), j.ip_answer_row, "")
    name = np.where(link_query != "", link_query, evidence["query"].to_numpy(dtype=object))
    evidence["query"] = np.where(evidence["query"].to_numpy(dtype=object) != "", evidence["query"].to_numpy(dtype=object), name)
    domain = registered_domain(pd.Series(name, dtype="str")).to_numpy(dtype=object)
    base_in = pd.DataFrame({
        "entity": ent["src_name"].to_numpy(), "role": ent["src_role"].to_numpy(),
        "dst_ip": conns["dst_ip"].to_numpy(), "dst_port": conns["dst_port"].to_numpy(),
        "proto": conns["proto"].to_numpy(), "domain": np.where(name != "", domain, ""),
        "ts": conns["ts"].to_numpy(), "bytes_out": conns["bytes_out"].to_numpy(),
        "duration": conns["duration"].to_numpy(),
    })
    side = dns_side_features(conns, dns, j, pd.Series(name, dtype="str"), state)
    return Prepared(conns, rel, evidence, ent, base_in, side)


def extract(prepared: Prepared, baseline: EntityBaseline, mgmt: ManagementPlane) -> pd.DataFrame:
    """The numeric feature matrix, columns `FEATURES`, one row per connection."""
    port = prepared.conns["dst_port"].to_numpy(dtype="float64")
    parts = [
        prepared.relationship,
        prepared.dns_side,
        baseline.transform(prepared.baseline_input),
        mgmt.transform(prepared.conns, prepared.entities),
        pd.DataFrame({
            "dst_port_log": np.log1p(np.maximum(port, 0)),
            "dst_port_ephemeral": (port >= 49_152).astype("float64"),
        }),
    ]
    X = pd.concat([p.reset_index(drop=True) for p in parts], axis=1)
    return X[FEATURES].astype("float64")
