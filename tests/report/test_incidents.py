"""Incidents (`report.incidents`): one per (source, C2 name or destination, derivation), ranked as rows
are, with every event id; the same whether the rows arrive at once or table by table, in any blocks."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from esxi_anomaly.report.incidents import (EVENT_PORTS, INCIDENTS, RANKED_INPUTS, StreamingIncidents,
                                           incident_frame, incident_ids)

from .conftest import make_ranked


def _rows() -> pd.DataFrame:
    ranked = make_ranked()
    ranked["alert"] = [True, True, False, False, False]
    ranked.loc[1, "query"] = ranked.loc[0, "query"]     # ranks 1, 2: one C2 name, one derivation
    return ranked


def test_grouping_by_source_name_and_derivation():
    incidents = incident_frame(_rows())
    assert list(incidents.columns) == [*INCIDENTS, EVENT_PORTS]
    assert incidents["event_ids"].tolist() == ["CxA1 CxA2", "CxB1", "CxC1", "CxC2"]
    first = incidents.iloc[0]
    assert (first["connections"], first["alerts"], first["alert"]) == (2, 2, True)
    assert first["dst_ips"] == "19.57.34.8 19.57.34.9" and first["dst_ports"] == "1117 1118"
    assert first[EVENT_PORTS] == "1117 1118" and first["top_event_id"] == "CxA1"
    assert (first["first_ts"], first["last_ts"]) == (1_795_000_010.0, 1_795_000_070.0)
    assert first["explanation"].startswith("port 1117 = 19*57+34")
    # no DNS name: the destination is the incident (rows 4 and 5 of one source are two incidents)
    assert incidents["dst_ips"].tolist()[2:] == ["10.0.0.53", "10.0.0.80"]
    assert incidents["incident_id"].str.fullmatch(r"[0-9a-f]{16}").all() and incidents["incident_id"].is_unique


def test_another_derivation_is_another_incident():
    ranked = _rows()
    ranked.loc[1, "transform"] = "xor_key"
    assert incident_frame(ranked)["connections"].tolist() == [1, 1, 1, 1, 1]


def test_ranked_alerts_first_then_by_highest_score():
    ranked = _rows()
    ranked["alert"] = [False, False, True, False, False]     # the 0.64 row is the only alert
    incidents = incident_frame(ranked)
    assert incidents["top_event_id"].tolist() == ["CxB1", "CxA1", "CxC1", "CxC2"]
    assert incidents["rank"].tolist() == [1, 2, 3, 4]
    assert incident_frame(ranked, alerts_only=True)["top_event_id"].tolist() == ["CxB1"]


def test_incident_ids_are_stable_and_distinguish_their_keys():
    a = incident_ids(["10.0.0.1", "10.0.0.1", "10.0.0.1"], ["x.example", "x.example", "y.example"], ["p", "q", "p"])
    assert len(set(a)) == 3
    assert list(incident_ids(["10.0.0.1"], ["x.example"], ["p"])) == [a[0]]


@pytest.mark.parametrize("parts, block_rows", [(1, 100_000), (3, 1), (5, 2), (1, 3)])
def test_streamed_in_parts_and_blocks_is_the_same(parts, block_rows):
    ranked = _rows()
    table = pa.Table.from_pandas(ranked[list(RANKED_INPUTS)], preserve_index=False)
    incidents = StreamingIncidents()
    cuts = np.linspace(0, len(ranked), parts + 1).astype(int)
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        incidents.add(table.slice(lo, hi - lo))
    order = np.argsort(ranked["rank"].to_numpy())
    asked = []
    blocks = list(incidents.finish(order, lambda idx: asked.append(len(idx)) or ranked.iloc[idx],
                                   lambda idx: table.select(["event_id", "dst_port"]).take(pa.array(idx)),
                                   block_rows=block_rows))
    pd.testing.assert_frame_equal(pd.concat(blocks, ignore_index=True), incident_frame(ranked))
    # each incident's best row read once, those of up to block_rows incidents at a time
    assert sum(asked) == len(incidents) and max(asked) <= block_rows
    if block_rows >= len(incidents):
        assert asked == [len(incidents)]


def test_the_best_rows_of_several_blocks_of_large_incidents_are_read_at_once():
    """Blocks of one large incident each: their best rows are read together, up to `block_rows`
    incidents a read (each read has a fixed cost), each once; the blocks as read one by one."""
    base = _rows()
    ranked = pd.concat([base.assign(event_id=base["event_id"] + f"-{k}", rank=base["rank"] + 10 * k) for k in range(3)],
                       ignore_index=True)
    table = pa.Table.from_pandas(ranked[list(RANKED_INPUTS)], preserve_index=False)
    incidents = StreamingIncidents()
    incidents.add(table)
    order = np.argsort(ranked["rank"].to_numpy())
    asked = {}
    for block_rows in (4, 1):
        asked[block_rows] = []
        blocks = list(incidents.finish(order, lambda idx: asked[block_rows].append(len(idx)) or ranked.iloc[idx],
                                       lambda idx: table.select(["event_id", "dst_port"]).take(pa.array(idx)),
                                       block_rows=block_rows))
        pd.testing.assert_frame_equal(pd.concat(blocks, ignore_index=True), incident_frame(ranked))
    assert incident_frame(ranked)["connections"].tolist() == [6, 3, 3, 3]   # blocks of 1, 1 and 2 incidents at 4 rows
    assert asked == {4: [4], 1: [1, 1, 1, 1]}


def test_rows_whose_alert_the_run_flipped_count_with_their_new_alert():
    """The run settles its alerts while the rows are counted: the rows whose alert changed are recounted."""
    ranked = _rows()
    table = pa.Table.from_pandas(ranked[list(RANKED_INPUTS)], preserve_index=False)
    incidents = StreamingIncidents()
    incidents.add(table.slice(0, 3))
    incidents.add(table.slice(3))
    # an alert held back (row 1, first table) and one raised (row 4, second table)
    incidents.flip(np.array([1, 4]), np.array([False, True]))
    frame = pd.concat(incidents.finish(np.arange(5), lambda idx: ranked.iloc[idx],
                                       lambda idx: table.select(["event_id", "dst_port"]).take(pa.array(idx))))
    assert frame["alerts"].tolist() == [1, 1, 0, 0] and frame["connections"].tolist() == [2, 1, 1, 1]
    assert frame["event_ids"].tolist()[:2] == ["CxA1 CxA2", "CxC2"]   # the raised row's incident ranks second
    incidents.flip(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool))   # nothing changed: nothing to do
    assert incidents._alerts.tolist() == [1, 0, 0, 1]


def test_nothing_scored_gives_no_incidents():
    assert incident_frame(_rows().iloc[:0]).empty
    with pytest.raises(ValueError, match="src_ip"):
        incident_frame(pd.DataFrame({"score": [1.0]}))
