"""DNS-response-to-port (and -to-IP) relationship features, per connection.

For each connection and each candidate answer of its DNS join, every transform of
`features.transforms` is tested against the connection's `dst_port` (and `dst_ip`). Per connection:

* the best exact derivation and its significance: -log10 of the chance that it is a coincidence,
  corrected for the number of (transform, answer) tests made and weighted by the transform's prior;
* the arithmetic distance from the port to the nearest derived value of the IP-link answer;
* byte-encoding matches (the port's two bytes adjacent in the answer, either byte order);
* consistency across answers, the strong signal: for the same (client, query), how many *distinct
  ports* one transform has explained so far (the port follows the answer; a CDN whose rotating
  answers all give 443 explains one port only), and how many distinct answers share one unknown
  key `port XOR base` or `port - base` (keyed variants);
* IP transforms: `dst_ip` derived from an answer (byte order, permutations, Nymaim2, TXT literals).

Consistency counts are causal (only earlier and current connections count) and their state can be
carried across batches (`stream_state.StreamState`), so a batch split in time gives the same values.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from esxi_anomaly.features import transforms as T
from esxi_anomaly.features.dns_join import DnsJoin, response_codes
from esxi_anomaly.features.stream_state import StreamState, distinct_running_count

NO_DNS_DELAY_LOG = float(np.log1p(86_400.0))  # "no answer seen": as far as a day away
MAX_DISTANCE_LOG = float(np.log1p(65_535.0))
ANNOUNCED_TRANSFORMS = ("P12_srv", "P12_svcb")  # legitimate DNS-carried ports: informative, not suspicious

RELATIONSHIP_FEATURES = [
    "dst_is_answer", "dns_delay_log", "answer_ttl_log", "answer_count",
    "match_significance", "match_on_ip_answer", "arith_distance_log", "byte_match",
    "port_announced", "consistency_ports", "keyed_consistency", "ip_derived", "ip_significance",
]


def _gather(values: np.ndarray, rows: np.ndarray, fill) -> np.ndarray:
    """values[rows] where rows >= 0, else `fill` (also when `values` is empty)."""
    out = np.full(len(rows), fill, dtype=values.dtype if len(values) else np.asarray(fill).dtype)
    ok = rows >= 0
    if len(values) and ok.any():
        out[ok] = values[rows[ok]]
    return out


def match_keys(left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All (i, j) with left[i] == right[j], for integer keys: a sort-based equi-join in numpy."""
    order = np.argsort(right, kind="stable")
    sorted_right = right[order]
    lo = np.searchsorted(sorted_right, left, side="left")
    hi = np.searchsorted(sorted_right, left, side="right")
    counts = hi - lo
    li = np.repeat(np.arange(len(left)), counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return li, order[np.repeat(lo, counts) + offsets]


A_PORT_IDS = np.array([t.id for t in T.A_PORT_TRANSFORMS], dtype=object)
PAIR_CHUNK = 100_000  # bounds the (pairs x transforms) comparison matrix to ~35 MB


def _port_hits(pc, pa, dst_port, rtype, answer):
    """Every (connection, answer row, transform) where the transform of the answer equals dst_port.

    A records, the bulk, are compared densely against `a_record_ports` of each distinct answer, in
    bounded chunks; other record types go through the long-form `derive_ports`."""
    out_c, out_r, out_t = [], [], []
    is_a = rtype[pa] == "A"
    a_pairs = np.flatnonzero(is_a)
    if len(a_pairs):
        rows, inverse = np.unique(pa[a_pairs], return_inverse=True)
        octets, valid = T.parse_ipv4(answer[rows])
        ports = T.a_record_ports(octets)
        ports[~valid] = -1
        for start in range(0, len(a_pairs), PAIR_CHUNK):
            sel = slice(start, start + PAIR_CHUNK)
            eq = ports[inverse[sel]] == dst_port[pc[a_pairs[sel]], None]
            k, t = np.nonzero(eq)
            pairs = a_pairs[sel][k]
            out_c.append(pc[pairs]); out_r.append(pa[pairs]); out_t.append(A_PORT_IDS[t])
    other = np.flatnonzero(~is_a)
    if len(other):
        rows = np.unique(pa[other])
        derived = T.derive_ports(rtype[rows], answer[rows])
        if len(derived):
            derived_row = rows[derived["row"].to_numpy()]
            key_d = derived_row.astype("int64") * 65536 + derived["port"].to_numpy(dtype="int64")
            key_p = pa[other] * 65536 + dst_port[pc[other]]
            hp, hd = match_keys(key_p, key_d)
            out_c.append(pc[other][hp]); out_r.append(pa[other][hp])
            out_t.append(derived["transform"].to_numpy(dtype=object)[hd])
    if not out_c:
        return np.zeros(0, dtype="int64"), np.zeros(0, dtype="int64"), np.zeros(0, dtype=object)
    return np.concatenate(out_c), np.concatenate(out_r), np.concatenate(out_t)


from esxi_anomaly.features.hashing import combine as _hash  # noqa: E402


def relationship_features(conns: pd.DataFrame, dns: pd.DataFrame, j: DnsJoin,
                          state: StreamState | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Features (one row per connection, in order) and the evidence behind the best match.

    Evidence columns: transform, answer, rtype, query, dns_delay, consistency (for explanations).
    """
    n = len(conns)
    dst_port = conns["dst_port"].to_numpy(dtype="int64")
    conn_ts = conns["ts"].to_numpy(dtype="float64")
    dns_ts = dns["ts"].to_numpy(dtype="float64")
    answer = dns["answer"].to_numpy(dtype=object)
    rtype = dns["rtype"].to_numpy(dtype=object)
    query = dns["query"].to_numpy(dtype=object)
    ttl = dns["ttl"].to_numpy(dtype="float64")

    feats = pd.DataFrame(index=pd.RangeIndex(n))
    ip_row = j.ip_answer_row
    linked = ip_row >= 0
    feats["dst_is_answer"] = linked.astype("float64")
    delay = np.full(n, np.nan)
    delay[linked] = conn_ts[linked] - dns_ts[ip_row[linked]]
    feats["dns_delay_log"] = np.where(linked, np.log1p(np.maximum(delay, 0)), NO_DNS_DELAY_LOG)
    feats["answer_ttl_log"] = np.log1p(np.nan_to_num(_gather(ttl, ip_row, 0.0), nan=0.0))
    per_response = np.bincount(response_codes(dns))[response_codes(dns)] if len(dns) else np.zeros(0, dtype="int64")
    feats["answer_count"] = _gather(per_response.astype("float64"), ip_row, 0.0)

    ev_transform = np.full(n, "", dtype=object)
    ev_answer_row = np.where(linked, ip_row, -1)

    # --- exact port derivations over all candidate pairs -----------------------------------
    pc, pa = j.pairs_conn, j.pairs_answer
    sig = np.zeros(n)
    on_ip = np.zeros(n)
    announced = np.zeros(n)
    consistency = np.zeros(n)
    if len(pc):
        hconn, hrow, htrans = _port_hits(pc, pa, dst_port, rtype, answer)
        if len(hconn):
            is_announced = np.isin(htrans, ANNOUNCED_TRANSFORMS)
            np.maximum.at(announced, hconn[is_announced], 1.0)
            tests_per_conn = np.bincount(pc, minlength=n) * T.N_TESTS_A
            chance = T.port_chance(htrans, dst_port[hconn])
            prior = pd.Series(htrans).map({t: tr.prior for t, tr in T.TRANSFORMS.items()}).to_numpy(dtype="float64")
            p_corr = np.clip(chance * tests_per_conn[hconn] / np.maximum(prior, 1e-9), 1e-300, 1.0)
            hsig = np.where(is_announced, 0.0, -np.log10(p_corr))
            # consistency: distinct ports one transform explained for (client, query), counting only
            # derivations from the name that gave the destination IP (how port-calculating C2 works);
            # otherwise every recent answer of a busy client would collect coincidences
            same_name = query[hrow] == _gather(query, ip_row[hconn], None)
            counted = same_name & ~is_announced
            cnt = np.zeros(len(hconn), dtype="int64")
            g = _hash(conns["src_ip"].to_numpy(dtype=object)[hconn[counted]], query[hrow[counted]], htrans[counted])
            cnt[counted] = distinct_running_count(g, dst_port[hconn[counted]].astype("uint64"),
                                                   conn_ts[hconn[counted]], state, "ports")
            best = pd.DataFrame({"c": hconn, "sig": hsig + 10.0 * (cnt - 1), "k": np.arange(len(hconn))})
            best = best.sort_values(["c", "sig"], ascending=[True, False], kind="stable").drop_duplicates("c")
            bk = best["k"].to_numpy()
            bc = hconn[bk]
            sig[bc] = hsig[bk]
            consistency[bc] = cnt[bk]
            ev_transform[bc] = htrans[bk]
            ev_answer_row[bc] = hrow[bk]
            on_ip[bc] = (hrow[bk] == ip_row[bc]).astype("float64")
    feats["match_significance"] = sig
    feats["match_on_ip_answer"] = on_ip
    feats["port_announced"] = announced
    feats["consistency_ports"] = consistency

    # --- arithmetic distance and byte encodings on the IP-link answer (A records) -------------
    dist = np.full(n, MAX_DISTANCE_LOG)
    byte = np.zeros(n)
    a_linked = np.flatnonzero(_gather(rtype, ip_row, "") == "A")
    if len(a_linked):
        octets, valid = T.parse_ipv4(answer[ip_row[a_linked]])
        ports = T.a_record_ports(octets).astype("int64")
        d = np.abs(ports - dst_port[a_linked, None])
        d = np.where(ports < 0, 65_535, d).min(axis=1)
        dist[a_linked] = np.where(valid, np.log1p(d), MAX_DISTANCE_LOG)
        o = octets.astype("int64")
        be = np.stack([o[:, 0] * 256 + o[:, 1], o[:, 1] * 256 + o[:, 2], o[:, 2] * 256 + o[:, 3]], axis=1)
        le = np.stack([o[:, 1] * 256 + o[:, 0], o[:, 2] * 256 + o[:, 1], o[:, 3] * 256 + o[:, 2]], axis=1)
        p = dst_port[a_linked, None]
        byte[a_linked] = (valid & ((be == p).any(axis=1) | (le == p).any(axis=1))).astype("float64")
    feats["arith_distance_log"] = dist
    feats["byte_match"] = byte

    # --- keyed variants: a constant XOR / offset between port and a base across answers -----
    keyed = np.zeros(n)
    if len(pc):
        linked_query = _gather(query, ip_row[pc], None)
        a_pairs = np.flatnonzero((rtype[pa] == "A") & (query[pa] == linked_query))
        if len(a_pairs):
            rows, inverse = np.unique(pa[a_pairs], return_inverse=True)
            octets, valid = T.parse_ipv4(answer[rows])
            octets, valid = octets[inverse], valid[inverse]
            a_pairs, octets = a_pairs[valid], octets[valid].astype("int64")
            kc, kr = pc[a_pairs], pa[a_pairs]
            base = octets[:, 2] * 256 + octets[:, 3]
            port = dst_port[kc]
            src = conns["src_ip"].to_numpy(dtype=object)[kc]
            for name, key in T.port_keys(base, port).items():
                nonzero = (key != 0) & (port > 0)
                g = _hash(src[nonzero], query[kr[nonzero]], np.full(nonzero.sum(), name, dtype=object),
                          key[nonzero].astype("int64"))
                cnt = distinct_running_count(g, base[nonzero].astype("uint64"), conn_ts[kc[nonzero]], state,
                                              f"keyed_{name}")
                np.maximum.at(keyed, kc[nonzero], cnt.astype("float64"))
                strong = cnt >= 2
                if strong.any():
                    idx = kc[nonzero][strong]
                    take = consistency[idx] < 2  # an exact repeated derivation explains better
                    ev_transform[idx[take]] = name
                    ev_answer_row[idx[take]] = kr[nonzero][strong][take]
    feats["keyed_consistency"] = keyed

    # --- IP derived from an answer, for connections whose dst_ip was not itself an answer ----
    ip_derived = np.zeros(n)
    ip_sig = np.zeros(n)
    if len(pc):
        unl = ~linked[pc]
        upc, upa = pc[unl], pa[unl]
        if len(upc):
            rows = np.unique(upa)
            derived = T.derive_ips(rtype[rows], answer[rows])
            if len(derived):
                drow = rows[derived["row"].to_numpy()]
                dst = conns["dst_ip"].to_numpy(dtype=object)
                li, ri = match_keys(_hash(upa, dst[upc]), _hash(drow, derived["ip"].to_numpy(dtype=object)))
                if len(li):
                    hc = upc[li]
                    hit_transform = derived["transform"].to_numpy(dtype=object)[ri]
                    hit_row = drow[ri]
                    ip_derived[hc] = 1.0
                    # a derived IPv4 coincides with probability ~2^-32 per test
                    tests = np.bincount(upc, minlength=n)[hc] * 32
                    ip_sig[hc] = -np.log10(np.clip(tests / 2.0**32, 1e-300, 1))
                    take = (ev_transform[hc] == "") | (ip_sig[hc] > sig[hc])
                    ev_transform[hc[take]] = hit_transform[take]
                    ev_answer_row[hc[take]] = hit_row[take]
    feats["ip_derived"] = ip_derived
    feats["ip_significance"] = ip_sig

    evidence = pd.DataFrame({
        "transform": ev_transform,
        "answer": _gather(answer, ev_answer_row, ""),
        "rtype": _gather(rtype, ev_answer_row, ""),
        "query": _gather(query, ev_answer_row, ""),
        "dns_delay": conn_ts - _gather(dns_ts, ev_answer_row, np.nan),
        "consistency": np.maximum(consistency, keyed),
    })
    return feats[RELATIONSHIP_FEATURES], evidence
