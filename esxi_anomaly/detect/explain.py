"""One human sentence per ranked row: the formula, the DNS answer and query, the delay, the
baseline fact that made it rare, and what the fired rules add.

Built per distinct (transform, answer, port) and joined with vectorised string operations; only
`describe` of the transform library is called per distinct derivation, never per connection.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from esxi_anomaly.features import transforms as T


def _derivation(transform: pd.Series, answer: pd.Series, target: pd.Series) -> pd.Series:
    key = pd.DataFrame({"t": transform, "a": answer, "p": target})
    uniq = key.drop_duplicates()
    uniq = uniq[uniq["t"] != ""]
    texts = {}
    for t, a, p in uniq.itertuples(index=False):
        try:
            texts[(t, a, p)] = T.describe(t, a, p)
        except Exception:  # an explanation must never fail a run
            texts[(t, a, p)] = f"{p} from {a} via {t}"
    return pd.Series([texts.get(k, "") for k in zip(key["t"], key["a"], key["p"])], index=key.index, dtype="str")


def sentences(rows: pd.DataFrame, history_days: float) -> pd.Series:
    """`rows` carries: transform, answer, rtype, query, dns_delay, consistency, dst_port, dst_ip,
    src_name, port_never_seen, dst_never_seen, dst_is_answer, mgmt_unexpected_egress, rules."""
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
    cons = np.where(rows["consistency"] >= 2,
                    "; same rule held for " + rows["consistency"].astype("int64").astype("str") + " distinct answers", "")
    mgmt = np.where(rows["mgmt_unexpected_egress"] == 1, "; management-plane egress outside the ESXi allow-list", "")
    return (part1 + base + cons + mgmt).astype("str")
