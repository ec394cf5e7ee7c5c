"""Write DNS responses as an Infoblox NIOS `named` response log ("capture DNS responses").

One collector file, `<out>/infoblox/named.log`, for the responses of every client except those
given in `exclude` (the Windows guests, whose view is Sysmon). Lines as formats.md (f) shows them:
a BSD syslog header whose host is the grid member's IP (the resolver), `named[pid]:`, sometimes the
`infoblox-responses:` category tag, the BIND time to the millisecond, then

    client <ip>#<port>: UDP: query: <qname> IN <qtype> response: <RCODE> <flags> <owner> <ttl> IN <type> <rdata>; ...

Owner and target names are written with a trailing dot on some lines and without on others, as
real files mix both; TXT rdata is quoted; a response without records ends after its flags.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from esxi_anomaly.synth._text_writer import (answers_of_clients_but, col, hash64, iso_ms, ms_floor,
                                              write_in_time_order)

_QTYPES = ("A", "AAAA", "SRV", "TXT", "MX", "PTR", "NS", "HTTPS")
_NAME_TYPES = ("CNAME", "PTR", "NS", "SRV", "MX")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _bind_time(ms: np.ndarray) -> tuple[pd.Series, pd.Series]:
    """(`Mar  4 00:01:10`, `04-Mar-2024 00:01:10.142`) texts of epoch milliseconds."""
    iso = pd.Series(iso_ms(ms), dtype=object)             # 2024-03-04T00:01:10.142Z, sliced (strftime is slow)
    month = pd.Series(np.asarray(_MONTHS, dtype=object)[iso.str.slice(5, 7).astype(int).to_numpy() - 1], dtype=object)
    day, clock = iso.str.slice(8, 10), iso.str.slice(11, 19)
    syslog = month + " " + day.str.lstrip("0").str.rjust(2) + " " + clock
    bind = day + "-" + month + "-" + iso.str.slice(0, 4) + " " + iso.str.slice(11, 23)
    return syslog.astype(object), bind.astype(object)


def response_lines(dns: pd.DataFrame) -> pd.DataFrame:
    """One line per response: ms, text."""
    if not len(dns):
        return pd.DataFrame({"ms": np.array([], dtype=np.int64), "line": np.array([], dtype=object)})
    codes, _ = pd.factorize(dns["event_id"])
    d = dns.take(np.lexsort((dns["answer_index"].to_numpy(), codes))).reset_index(drop=True)
    uid = d["event_id"].to_numpy(dtype=object)
    starts = np.flatnonzero(np.r_[True, uid[1:] != uid[:-1]])
    dotted = (hash64(uid) % np.uint64(3)).astype(np.int64) == 0   # a third of the lines: FQDNs with the dot
    dot = np.where(dotted, ".", "").astype(object)
    rtype = d["rtype"].astype(object)
    answer = d["answer"].astype(object)
    rdata = np.where(rtype.isin(_NAME_TYPES), answer + dot, np.where(rtype == "TXT", '"' + answer + '"', answer))
    ttl = col(d["ttl"].fillna(300).round().astype(np.int64))
    # a record's owner is the target of the CNAME before it in the response, else the query name
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(d)]))
    cname_at = np.where((rtype == "CNAME").to_numpy(), np.arange(len(d)), -1)
    prev = np.maximum.accumulate(np.r_[-1, cname_at[:-1]])
    owner = np.where(prev >= group_start, answer.to_numpy()[np.maximum(prev, 0)], d["query"].to_numpy(dtype=object))
    rr = pd.Series(owner, dtype=object) + dot + " " + ttl + " IN " + rtype + " " + pd.Series(rdata, dtype=object) + ";"
    rr = np.where(answer == "", "", " " + rr).astype(object)
    rrs = np.add.reduceat(rr, starts)
    first = d.iloc[starts].reset_index(drop=True)
    # the query type: the first record type that is not a CNAME (A when none)
    real = np.where(rtype.isin(_QTYPES), np.arange(len(d)), len(d))
    first_real = np.minimum.reduceat(real, starts)
    last = np.r_[starts[1:] - 1, len(d) - 1]
    qtype = np.where(first_real <= last, rtype.to_numpy()[np.minimum(first_real, len(d) - 1)], "A")
    h = hash64(first["event_id"])
    ms = ms_floor(first["ts"])
    syslog_time, bind_time = _bind_time(ms)
    tag = np.where(h % np.uint64(4) == 0, "infoblox-responses: ", "").astype(object)
    flags = np.where(first["client_ip"].str.startswith("10.10.0."), "+E", "+ED").astype(object)
    rcode = first["rcode"].replace("", "NOERROR").astype(object)
    line = ("<30>" + syslog_time + " " + first["resolver_ip"].astype(object) + " named[" +
            col(17000 + (h % np.uint64(900)).astype(np.int64)) + "]: " + pd.Series(tag) + bind_time + " client "
            + first["client_ip"].astype(object) + "#" + col(1024 + (h >> np.uint64(16)) % np.uint64(64000))
            + ": UDP: query: " + first["query"].astype(object) + " IN " + pd.Series(qtype, dtype=object)
            + " response: " + rcode + " " + pd.Series(flags) + pd.Series(rrs, dtype=object))
    return pd.DataFrame({"ms": ms, "line": line})


def write_infoblox(ds, out_dir, exclude=()) -> list[Path]:
    """`<out_dir>/infoblox/named.log`: the responses to every client not in `exclude`, in time order."""
    lines = response_lines(answers_of_clients_but(ds, exclude))
    return [write_in_time_order(Path(out_dir) / "infoblox" / "named.log", lines)]


__all__ = ["write_infoblox", "response_lines"]
