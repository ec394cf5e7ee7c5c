"""Explanation sentences: the vectorised builder says exactly what a plain per-row reference says."""
from __future__ import annotations

import functools
import re

import numpy as np
import pandas as pd
import pytest

from esxi_anomaly.detect import explain
from esxi_anomaly.features import transforms as T

RULES = [
    {"id": "repeat", "weight": 0.9, "explain": "the same formula explained {consistency} different ports",
     "evidence": "dns_calculation"},
    {"id": "mgmt", "weight": 0.7, "explain": "management-plane source on {dst_port}/{proto} ({missing})",
     "evidence": "mgmt_plane"},
    {"id": "silent", "weight": 0.95, "explain": ""},
    {"id": "new_port", "weight": 0.3, "explain": "a port never used by this source"},
]


# -- the reference: one row at a time, straight from the sentence's definition ----------------

@functools.lru_cache(maxsize=None)
def _derivation(t: str, a: str, p: str) -> str:
    return explain._one(t, a, p)


def _field(row: dict, name: str) -> str:
    value = row.get(name, "")
    if isinstance(value, float):
        return f"{value:g}" if value == value else ""
    return str(value)


def reference(row: dict, history_days: float, rules: list[dict]) -> str:
    t = str(row["transform"])
    is_ip = T.is_ip_transform(t)
    target = str(row["dst_ip"]) if is_ip else str(row["dst_port"])
    deriv = _derivation(t, str(row["answer"]), target) if t != "" else ""
    if deriv:
        d = row["dns_delay"]
        delay = f"{d:.1f} s" if d == d else ""
        text = (f"{'IP ' if is_ip else 'port '}{deriv} from {row['rtype']} {row['answer']} for {row['query']} "
                f"answered {delay} earlier")
    elif row["dst_is_answer"] == 1:
        text = f"no derivation of port {row['dst_port']}; {row['dst_ip']} was answered for {row['query']}"
    else:
        text = f"no DNS answer explains {row['dst_ip']}:{row['dst_port']}"
    days = f"{history_days:.0f} days" if history_days >= 1 else f"{history_days * 24:.0f} h"
    if row["port_never_seen"] == 1:
        text += f"; {row['src_name']} never used port {row['dst_port']} in {days}"
    elif row["dst_never_seen"] == 1:
        text += f"; {row['src_name']} never contacted {row['dst_ip']} in {days}"
    fired = str(row["rules"]).split(";")
    for rule in sorted(rules, key=lambda r: -float(r["weight"])):
        if rule["id"] in fired and rule.get("explain"):
            text += "; " + re.sub(r"\{(\w+)\}", lambda m: _field(row, m.group(1)), rule["explain"])
    evidence = {r["id"] for r in rules if r.get("evidence")}
    if rules and not evidence & set(fired):   # no evidence: the row cannot alert, and says so
        weak = "the forest and weak rules" if any(fired) else "the forest alone"
        text += f"; no DNS-calculation evidence: not an alert, ranked by {weak}"
    return text


def crafted_rows() -> pd.DataFrame:
    rows = [
        # transform, answer, rtype, query, dns_delay, consistency, dst_port, dst_ip, src_name,
        # port_never_seen, dst_never_seen, dst_is_answer, rules, proto
        ("P1", "19.57.34.8", "A", "c2.evil.example", 2.25, 3.0, 1117, "19.57.34.8", "vm-web-01", 1, 0, 1,
         "repeat;new_port", "tcp"),
        ("P1", "19.57.34.8", "A", "c2.evil.example", 0.35, 2.5, 1118, "19.57.34.8", "vm-web-01", 0, 1, 1,
         "repeat", "tcp"),                                               # formula does not match: "!="
        ("P3", "165.131.193.77", "A", "relay.example", -0.0, np.nan, 49485, "165.131.193.77", "esx-01", 1, 1, 1,
         "mgmt;silent;repeat", "udp"),
        ("P7_be_k1", "1.2.3.4", "A", "w.example", np.nan, 1.0, 386, "1.2.3.4", "vm-a", 0, 0, 1, "", "tcp"),
        ("P11_v4_P1", "::1339:2208", "AAAA", "six.example", 0.05, 0.0, 1117, "10.0.0.9", "vm-b", 0, 0, 0, "mgmt",
         "tcp"),
        ("P11_g7", "::1339:2208", "AAAA", "six.example", 1e-7, 0.0, 8712, "10.0.0.9", "vm-b", 0, 0, 0, "", "tcp"),
        ("P12_txt", "v=1 port=8443 '\"", "TXT", "=cmd|' /C calc'!A0", 12.0, 0.0, 8443, "10.0.0.8", "vm-c", 1, 0, 0,
         "", "tcp"),
        ("P12_srv", "0 5 5060 sip.example.", "SRV", "_sip._udp.example", 0.4, 0.0, 5061, "10.0.0.7", "vm-c", 0, 0, 0,
         "", "udp"),                                                     # "not found"
        ("I1", "1.2.3.4", "A", "ip.example", 0.2, 0.0, 443, "4.3.2.1", "vm-d", 0, 1, 0, "", "tcp"),
        ("I1", "1.2.3.4", "A", "ip.example", 0.2, 0.0, 443, "4.3.2.9", "vm-d", 0, 1, 0, "", "tcp"),   # "!="
        ("I2_xor", "1.2.3.4", "A", "ip.example", 0.2, 0.0, 443, "5.6.7.8", "vm-d", 0, 0, 0, "", "tcp"),
        ("P9_xor", "10.0.231.201", "A", "k.example", 0.1, 2.0, 54708, "10.0.231.201", "vm-e", 0, 0, 1, "", "tcp"),
        ("P9_add", "10.0.231", "A", "k.example", 0.1, 2.0, 4000, "10.0.0.1", "vm-e", 0, 0, 1, "", "tcp"),  # fallback
        ("P1", "19.57.34", "A", "bad.example", 0.1, 0.0, 1117, "10.0.0.1", "vm-f", 0, 0, 0, "", "tcp"),  # invalid A
        ("no_such_transform", "1.2.3.4", "A", "x.example", 0.1, 0.0, 80, "1.2.3.4", "vm-f", 0, 0, 0, "", "tcp"),
        ("", "", "", "", np.nan, 0.0, 902, "10.10.0.10", "esx-02", 0, 0, 0, "", "tcp"),
        ("", "203.0.113.5", "A", "svc.example", 0.3, 0.0, 4318, "203.0.113.5", "vm-g", 1, 0, 1, "new_port", "tcp"),
    ]
    columns = ["transform", "answer", "rtype", "query", "dns_delay", "consistency", "dst_port", "dst_ip",
               "src_name", "port_never_seen", "dst_never_seen", "dst_is_answer", "rules", "proto"]
    frame = pd.DataFrame(rows, columns=columns)
    frame["dst_port"] = frame["dst_port"].astype("int32")
    for column in ("port_never_seen", "dst_never_seen", "dst_is_answer"):
        frame[column] = frame[column].astype("float64")
    return frame


def test_crafted_rows_exact_text():
    rows = crafted_rows()
    got = explain.sentences(rows, 2.0, RULES)
    assert got.iloc[0] == ("port 1117 = 19*57+34 (APT12 a*b+c) from A 19.57.34.8 for c2.evil.example answered 2.2 s "
                           "earlier; vm-web-01 never used port 1117 in 2 days; the same formula explained 3 different "
                           "ports; a port never used by this source")
    assert got.iloc[1].startswith("port 1118 != 19*57+34 = 1117 (APT12 a*b+c) from A 19.57.34.8 for c2.evil.example "
                                  "answered 0.3 s earlier; vm-web-01 never contacted 19.57.34.8 in 2 days")
    assert got.iloc[2].endswith("answered -0.0 s earlier; esx-01 never used port 49485 in 2 days; the same formula "
                                "explained  different ports; management-plane source on 49485/udp ()")
    assert got.iloc[3].startswith("port 386 = (0x01020304>>1)&0xFFFF (16-bit window of network word at bit 1) "
                                  "from A 1.2.3.4 for w.example answered  earlier")
    assert got.iloc[8] == ("IP 4.3.2.1 = d.c.b.a of 1.2.3.4 (byte-reversed IP) from A 1.2.3.4 for ip.example "
                           "answered 0.2 s earlier; vm-d never contacted 4.3.2.1 in 2 days; no DNS-calculation "
                           "evidence: not an alert, ranked by the forest alone")
    assert got.iloc[15] == ("no DNS answer explains 10.10.0.10:902; no DNS-calculation evidence: not an alert, "
                            "ranked by the forest alone")
    assert got.iloc[16] == ("no derivation of port 4318; 203.0.113.5 was answered for svc.example; vm-g never used "
                            "port 4318 in 2 days; a port never used by this source; no DNS-calculation evidence: "
                            "not an alert, ranked by the forest and weak rules")
    assert got.iloc[4].endswith("management-plane source on 1117/tcp ()")   # management-plane evidence: no clause
    assert explain.sentences(rows.iloc[:1], 0.5, [])[0].endswith("never used port 1117 in 12 h")


def test_seen_by_clause_names_the_vantage_points_only_where_there_are_several():
    rows = crafted_rows().iloc[:5].copy()
    rows["seen_by"] = pd.array(["zeek", "nsx_dfw:esx01 nsx_dfw:esx03", None, "", "nsx_dfw:esx01 nsx_dfw:esx03"],
                               dtype="string[pyarrow]")
    alone = explain.sentences(rows.drop(columns="seen_by"), 2.0, RULES)
    got = explain.sentences(rows, 2.0, RULES)
    assert (got.iloc[[0, 2, 3]] == alone.iloc[[0, 2, 3]]).all()
    for i in (1, 4):
        assert got.iloc[i] == alone.iloc[i] + "; seen by nsx_dfw:esx01, nsx_dfw:esx03"
    rows["seen_by"] = "zeek"
    assert explain.sentences(rows, 2.0, RULES).equals(alone)


@pytest.mark.parametrize("history_days", [2.0, 0.25])
def test_sentences_equal_the_per_row_reference(history_days):
    rows = crafted_rows()
    rows = pd.concat([rows, rows.iloc[::-1]], ignore_index=True)   # repeated triples, other order
    rows.index = rows.index * 10 + 3                                 # not a RangeIndex: kept as it is
    got = explain.sentences(rows, history_days, RULES)
    expected = [reference(r, history_days, RULES) for r in rows.to_dict("records")]
    assert got.index.equals(rows.index)
    assert got.tolist() == expected


def test_sentences_of_a_scored_generated_day_equal_the_reference(small_day):
    from esxi_anomaly.ingest import read_connections, read_dns, read_inventory
    from esxi_anomaly.schema import Frames

    model, folder = small_day
    frames = Frames(read_connections(folder / "conn.log"), read_dns(folder / "dns.log"),
                    read_inventory(folder / "inventory.csv"))
    prepared, feats = model.features(frames)
    rows = model.score_rows(prepared, feats)
    assert (rows["transform"] != "").sum() > 100 and (rows["rules"] != "").sum() > 10
    got = explain.sentences(rows, model.history_days_, model.detector_.rules_)
    expected = [reference(r, model.history_days_, model.detector_.rules_) for r in rows.to_dict("records")]
    assert got.tolist() == expected
    ranked = model.score(frames, top=50)
    assert ranked["explanation"].tolist() == [expected[i] for i in
                                              rows.reset_index().set_index("event_id").loc[ranked["event_id"], "index"]]


def _triples() -> list[tuple[str, str, str]]:
    ids = ["P1", "P3", "P5", "P7_be_k1", "P7_le_k12", "P8_(x+y)*z_acb", "P8_x*256+y_ac", "P11_g7", "P11_v4_P1",
           "P11_v4_P6", "P12_txt", "P12_txt_b64", "P12_srv", "P12_svcb", "P12_mx", "P9_xor", "P9_add", "I1", "I4_abdc",
           "I5_nymaim2", "I2_xor", "I3_add", "I7_txt", "I8_aaaa_v4", "no_such_transform"]
    answers = ["19.57.34.8", "1.2.3.4", "255.255.255.255", "0.0.0.0", "19.57.34", "01.2.3.4", "::1339:2208",
               "::ffff:19.57.34.8", "v=1 port=8443", "c2=19.57.34.8:1117", "MTkuNTcuMzQuODoxMTE3",
               "0 5 5060 sip.example.", "1 . alpn=h2 port=8443", "10 mail.example.", "", "it's \"odd\"\x00\n"]
    out = []
    for tid in ids:
        tr = T.TRANSFORMS.get(tid)
        for a in answers:
            targets = ["1117", "65535", "4.3.2.1", "", "x1"]
            if tr is not None and tid not in ("P9_xor", "P9_add"):
                derive = T.derive_ports if tr.output == "port" else T.derive_ips
                got = derive(tr.rtypes[0], [a])
                value = got.loc[got["transform"] == tid, "port" if tr.output == "port" else "ip"].astype(str)
                targets += value.tolist()[:2]
            out += [(tid, a, p) for p in targets]
    return out


def test_describe_many_equals_describe_one_by_one(monkeypatch):
    triples = _triples()
    t, a, p = (np.array(x, dtype=object) for x in zip(*triples))
    calls = []
    real = T.describe
    monkeypatch.setattr(T, "describe", lambda *x: calls.append(x) or real(*x))
    got = explain.describe_many(t, a, p)
    monkeypatch.undo()
    expected = [explain._one(*x) for x in triples]
    assert got.tolist() == expected
    matched = sum(1 for x in expected if " = " in x or " found in " in x)
    assert matched > 40
    # describe runs one by one only for the rare cases: an A/AAAA formula that does not give the
    # port or an answer that does not parse, port targets that are not numbers, unknown transforms
    a_formula = {x for x in triples if T.octet_formula(x[0]) is not None}
    batched = {x for x, text in zip(triples, expected) if x in a_formula and text.startswith(f"{x[2]} = ")}
    assert len(batched) > 20 and not batched & set(calls)
    assert all(c in a_formula or not c[2].isdigit() or c[0] not in T.TRANSFORMS for c in calls)


@pytest.mark.parametrize("odd", [None, float("nan"), 1117, b"1117", "\u0661\u0661\u0661\u0667", "1117\n", " 1117",
                                 "\ud800", pd.NA])
def test_describe_many_takes_values_other_than_plain_text_one_by_one(odd):
    """Values that are not str (or str that are not plain digits) anywhere in a triple: the same text
    as `_one`, whether the other values of the arrays are all str or not."""
    triples = _triples()[:200]
    t, a, p = (np.array(x, dtype=object) for x in zip(*triples))
    for column in (t, a, p):
        spoiled = column.copy()
        spoiled[::7] = odd
        arrays = [spoiled if c is column else c for c in (t, a, p)]
        got = explain.describe_many(*arrays)
        assert got.tolist() == [explain._one(*x) for x in zip(*arrays)]
