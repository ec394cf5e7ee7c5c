"""One human sentence per ranked row: the formula, the DNS answer and query, the delay, the
baseline fact that made it rare, and what the fired rules add.

Built per distinct (transform, answer, port) and joined with vectorised string operations; only
`describe` of the transform library is called per distinct derivation, never per connection.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

from esxi_anomaly.features import transforms as T


KEYED = {"P9_xor": "XOR", "P9_add": "+"}


def _keyed(transform: str, answer: str, port: str) -> str:
    """e.g. "54708 = (231*256+201) XOR 0x5a5a" for a keyed variant of the low 16 bits."""
    c, d = (int(x) for x in answer.split(".")[2:4])
    base, p = c * 256 + d, int(port)
    if transform == "P9_xor":
        return f"{p} = ({c}*256+{d}) XOR 0x{p ^ base:04x} (keyed low 16 bits)"
    return f"{p} = ({c}*256+{d}) + {(p - base) % 65536} mod 65536 (keyed low 16 bits)"


def _derivation(transform: pd.Series, answer: pd.Series, target: pd.Series) -> pd.Series:
    key = pd.DataFrame({"t": transform, "a": answer, "p": target})
    uniq = key.drop_duplicates()
    uniq = uniq[uniq["t"] != ""]
    texts = {}
    for t, a, p in uniq.itertuples(index=False):
        try:
            texts[(t, a, p)] = _keyed(t, a, p) if t in KEYED else T.describe(t, a, p)
        except Exception:  # an explanation must never fail a run
            texts[(t, a, p)] = f"{p} from {a} via {t}"
    return pd.Series([texts.get(k, "") for k in zip(key["t"], key["a"], key["p"])], index=key.index, dtype="str")


def sentences(rows: pd.DataFrame, history_days: float, rules: list[dict] = ()) -> pd.Series:
    """`rows` carries: transform, answer, rtype, query, dns_delay, consistency, dst_port, dst_ip,
    src_name, port_never_seen, dst_never_seen, dst_is_answer, rules; `rules` are the model's rule
    definitions, whose `explain` templates are appended for the rules that fired."""
    if not len(rows):
        return pd.Series([], dtype="str")
    is_ip = rows["transform"].astype("str").str.startswith("I")
    target = np.where(is_ip, rows["dst_ip"].astype("str"), rows["dst_port"].astype("str"))
    deriv = _derivation(rows["transform"].astype("str"), rows["answer"].astype("str"), pd.Series(target, index=rows.index))
    what = np.where(is_ip, "IP ", "port ")
    delay = rows["dns_delay"].map(lambda d: f"{d:.1f} s" if d == d else "")
    has = deriv != ""
    part1 = pd.Series(np.where(
        has,
        what + deriv + " from " + rows["rtype"].astype("str") + " " + rows["answer"].astype("str")
        + " for " + rows["query"].astype("str") + " answered " + delay + " earlier",
        np.where(rows["dst_is_answer"] == 1,
                 "no derivation of port " + rows["dst_port"].astype("str") + "; " + rows["dst_ip"].astype("str")
                 + " was answered for " + rows["query"].astype("str"),
                 "no DNS answer explains " + rows["dst_ip"].astype("str") + ":" + rows["dst_port"].astype("str")),
    ), index=rows.index)
    days = f"{history_days:.0f} days" if history_days >= 1 else f"{history_days * 24:.0f} h"
    base = np.where(rows["port_never_seen"] == 1,
                    "; " + rows["src_name"].astype("str") + " never used port " + rows["dst_port"].astype("str")
                    + " in " + days,
                    np.where(rows["dst_never_seen"] == 1,
                             "; " + rows["src_name"].astype("str") + " never contacted " + rows["dst_ip"].astype("str")
                             + " in " + days, ""))
    return (part1 + base + _rule_clauses(rows, rules)).astype("str")


def _render(template: str, rows: pd.DataFrame) -> pd.Series:
    """`template` with {field} placeholders filled from `rows`, vectorised."""
    pieces = re.split(r"\{(\w+)\}", template)
    out = pd.Series(pieces[0], index=rows.index, dtype="str")
    for k in range(1, len(pieces), 2):
        field = rows[pieces[k]] if pieces[k] in rows.columns else pd.Series("", index=rows.index)
        if pd.api.types.is_float_dtype(field):
            field = field.map(lambda v: f"{v:g}" if v == v else "")
        out = out + field.astype("str") + pieces[k + 1]
    return out


def _rule_clauses(rows: pd.DataFrame, rules: list[dict]) -> pd.Series:
    """"; <explain>" for every rule that fired on the row, heaviest first."""
    out = pd.Series("", index=rows.index, dtype="str")
    fired = rows["rules"].astype("str").str.split(";")
    for rule in sorted(rules, key=lambda r: -float(r["weight"])):
        hit = fired.map(lambda ids, rid=rule["id"]: rid in ids).to_numpy()
        if hit.any() and rule.get("explain"):
            out[hit] = out[hit] + "; " + _render(rule["explain"], rows[hit])
    return out


NOTABLE_CONTEXT = ("syslog_remote_failure", "syslog_stopped", "firewall_change", "ssh_enabled", "shell_enabled",
                   "vib_install")
CONTEXT_HORIZON_S = 86_400.0


def context_clauses(rows: pd.DataFrame, context: pd.DataFrame | None) -> pd.Series:
    """"; esx-01: syslog_stopped 2.1 h earlier" when the row's source (or its ESXi host) logged a
    notable event in the day before the connection (ESXi context frame, `ingest.read_context`)."""
    out = pd.Series("", index=rows.index, dtype="str")
    if context is None or not len(context) or not len(rows):
        return out
    notable = context[context["event"].isin(NOTABLE_CONTEXT)]
    if not len(notable):
        return out
    events = pd.DataFrame({"ts": notable["ts"].to_numpy(dtype="float64"),
                           "host": notable["host"].astype("str").str.lower().to_numpy(),
                           "event": notable["event"].to_numpy(dtype=object)}).dropna(subset=["ts"])
    events = events.sort_values("ts", kind="stable")
    for column in ("src_name", "esxi_host"):
        probe = pd.DataFrame({"ts": rows["ts"].to_numpy(dtype="float64"),
                              "host": rows[column].astype("str").str.lower().to_numpy(), "i": np.arange(len(rows))})
        probe = probe[probe["host"] != ""].sort_values("ts", kind="stable")
        hit = pd.merge_asof(probe, events.rename(columns={"ts": "ets"}), left_on="ts", right_on="ets", by="host",
                            direction="backward", tolerance=CONTEXT_HORIZON_S).dropna(subset=["event"])
        hit = hit[out.to_numpy()[hit["i"].to_numpy()] == ""]
        if not len(hit):
            continue
        hours = ((hit["ts"] - hit["ets"]) / 3600).map(lambda h: f"{h:.1f}").astype("str")
        text = "; " + hit["host"].astype("str") + ": " + hit["event"].astype("str") + " " + hours + " h earlier"
        out.iloc[hit["i"].to_numpy()] = text.to_numpy()
    return out
