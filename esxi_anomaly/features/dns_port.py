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
* IP transforms: `dst_ip` derived from an answer (byte order, permutations, Nymaim2, TXT literals);
* response-level evidence on the IP-link answer's response: reached through a CNAME (I6), and a
  checksum record among its A records (P10, Nymaim).

Consistency counts are causal (only earlier and current connections count) and their state can be
carried across batches (`stream_state.StreamState`), so a batch split in time gives the same values.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from esxi_anomaly.features import transforms as T
from esxi_anomaly.features.columns import Coded, ConnColumns, DnsColumns, distinct, expand, gather
from esxi_anomaly.features.dns_join import DnsJoin
from esxi_anomaly.features.hashing import combine as _hash
from esxi_anomaly.features.stream_state import StreamState, distinct_running_count

NO_DNS_DELAY_LOG = float(np.log1p(86_400.0))  # "no answer seen": as far as a day away
MAX_DISTANCE_LOG = float(np.log1p(65_535.0))
ANNOUNCED_TRANSFORMS = ("P12_srv", "P12_svcb")  # legitimate DNS-carried ports: informative, not suspicious

RELATIONSHIP_FEATURES = [
    "dst_is_answer", "dns_delay_log", "answer_ttl_log", "answer_count", "via_cname", "answer_checksum",
    "match_significance", "match_on_ip_answer", "arith_distance_log", "byte_match",
    "port_announced", "consistency_ports", "keyed_consistency", "ip_derived", "ip_significance",
]


def match_keys(left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All (i, j) with left[i] == right[j], for integer keys: a sort-based equi-join in numpy."""
    order = np.argsort(right, kind="stable")
    sorted_right = right[order]
    lo = np.searchsorted(sorted_right, left, side="left")
    hi = np.searchsorted(sorted_right, left, side="right")
    li, at = expand(np.arange(len(left)), lo, hi - lo)
    return li, order[at]


PORT_SPAN = 65_537  # ports 0..65535, and one slot for anything outside
COMBO_CHUNK = 200_000  # bounds the (combinations x transforms) comparison matrix to ~70 MB
ANNOUNCED_CODES = T.transform_codes(ANNOUNCED_TRANSFORMS)
_TRANSFORM_TEXT = Coded(np.zeros(0, dtype=np.int64), T.TRANSFORM_IDS)  # decodes transform codes to ids


def _port_slot(port: np.ndarray) -> np.ndarray:
    return np.where((port >= 0) & (port <= 65_535), port, 65_536)


class _ATable:
    """The A-record port derivations of each distinct answer value, computed once per batch."""

    def __init__(self, dns: DnsColumns):
        values = dns.answer.values
        self.octets, self.valid = T.parse_ipv4(values)
        ports = T.a_record_ports(self.octets)
        ports[~self.valid] = -1
        self.ports = ports
        self._ips = None

    @property
    def ips(self) -> np.ndarray:
        """Per distinct value, its A-record IP derivations (I1, I4, I5) as int64, -1 where none: invalid
        answers, and results equal to the answer itself (never offered as derivations)."""
        if self._ips is None:
            ips = T.a_record_ips(self.octets).astype(np.int64)
            ips[ips == T.octets_to_int(self.octets)[:, None]] = -1
            ips[~self.valid] = -1
            self._ips = ips
        return self._ips


def _dense_hits(value: np.ndarray, target: np.ndarray, derived: np.ndarray, span: int, codes: np.ndarray):
    """For items (answer value code, target in 0..span-1): the items where a column of `derived[value]`
    (one row per distinct answer value, -1 = nothing derived) equals the target, and that column's
    transform code, sorted by (item, column). Distinct (value, target) combinations are compared
    once; items repeat them heavily."""
    if not len(value):
        return np.zeros(0, dtype=np.int64), codes[:0]
    key = value * span + target
    inverse, combos = pd.factorize(key)
    combo_value, combo_target = combos // span, combos % span
    hit_combo, hit_t = [], []
    for start in range(0, len(combos), COMBO_CHUNK):
        sel = slice(start, start + COMBO_CHUNK)
        k, t = np.nonzero(derived[combo_value[sel]] == combo_target[sel, None])
        hit_combo.append(k + start)
        hit_t.append(t)
    hit_combo, hit_t = np.concatenate(hit_combo), np.concatenate(hit_t)  # sorted by (combo, transform)
    n_hits = np.bincount(hit_combo, minlength=len(combos))
    first = np.cumsum(n_hits) - n_hits
    items = np.flatnonzero(n_hits[inverse] > 0)
    item, at = expand(items, first[inverse[items]], n_hits[inverse[items]])
    return item, codes[hit_t[at]]


def _dense_a_hits(value: np.ndarray, port: np.ndarray, table: _ATable):
    """For items (answer value code, port): the items where an A transform gives the port, and which."""
    return _dense_hits(value, _port_slot(port), table.ports, PORT_SPAN, T.A_PORT_CODES)


def _distinct_values(dns: DnsColumns, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the code of its (record type, answer) value, and per value the first row holding it:
    the long-form derivations run once per value."""
    codes, first = distinct(dns.rtype.codes[rows] * max(len(dns.answer.values), 1) + dns.answer.codes[rows])
    return codes, rows[first]


def _port_hits(pc, pa, dst_port, dns: DnsColumns, table: _ATable):
    """Every (connection, answer row, transform code) where the transform of the answer equals
    dst_port, in pair order then transform order.

    A records, the bulk, are compared densely against `_ATable`; other record types go through the
    long-form `derive_ports`, once per distinct (record type, answer) value."""
    out_c, out_r, out_t = [], [], []
    is_a = dns.rtype.codes[pa] == dns.rtype.code_of("A")
    a_pairs = np.flatnonzero(is_a)
    if len(a_pairs):
        item, tcode = _dense_a_hits(dns.answer.codes[pa[a_pairs]], dst_port[pc[a_pairs]], table)
        pairs = a_pairs[item]
        out_c.append(pc[pairs]); out_r.append(pa[pairs]); out_t.append(tcode)
    other = np.flatnonzero(~is_a)
    if len(other):
        rows = pa[other]
        inverse, first_row = _distinct_values(dns, rows)
        derived = T.derive_ports(dns.rtype.strings(first_row), dns.answer.strings(first_row))
        if len(derived):
            key_d = derived["row"].to_numpy(dtype="int64") * PORT_SPAN + derived["port"].to_numpy(dtype="int64")
            key_p = inverse.astype("int64") * PORT_SPAN + _port_slot(dst_port[pc[other]])
            hp, hd = match_keys(key_p, key_d)
            out_c.append(pc[other][hp]); out_r.append(rows[hp])
            out_t.append(derived["transform"].array.codes[hd].astype(np.int16))
    if not out_c:
        return np.zeros(0, dtype="int64"), np.zeros(0, dtype="int64"), np.zeros(0, dtype=np.int16)
    return np.concatenate(out_c), np.concatenate(out_r), np.concatenate(out_t)


def _ip_hits(pc: np.ndarray, pa: np.ndarray, conns: ConnColumns, dns: DnsColumns, table: _ATable):
    """Every (pair, transform code) where an IP transform of the answer equals the connection's dst_ip,
    sorted by (pair, transform). A records are compared as integers against `_ATable.ips`; other
    record types go through `derive_ips`, once per distinct (record type, answer) value."""
    dst_int, dst_valid = T.ipv4_to_int(conns.dst.values)   # per distinct destination
    is_a = dns.rtype.codes[pa] == dns.rtype.code_of("A")
    a_items = np.flatnonzero(is_a & dst_valid[conns.dst.codes[pc]])
    item, code = _dense_hits(dns.answer.codes[pa[a_items]], dst_int.astype(np.int64)[conns.dst.codes[pc[a_items]]],
                             table.ips, 1 << 32, T.A_IP_CODES)
    items, codes = [a_items[item]], [code.astype(np.int16)]
    other = np.flatnonzero(~is_a)
    if len(other):
        inverse, first_row = _distinct_values(dns, pa[other])
        derived = T.derive_ips(dns.rtype.strings(first_row), dns.answer.strings(first_row))
        if len(derived):
            li, ri = match_keys(_hash(inverse.astype("int64"), conns.dst.keys[pc[other]]),
                                _hash(derived["row"].to_numpy(dtype="int64"), Coded.of(derived["ip"]).keys))
            items.append(other[li])
            codes.append(derived["transform"].array.codes[ri].astype(np.int16))
    items, codes = np.concatenate(items), np.concatenate(codes)
    order = np.argsort(items, kind="stable")   # an item's hits all come from one side, in order
    return items[order], codes[order]


def _response_any(dns: DnsColumns, flag: np.ndarray) -> np.ndarray:
    """Per DNS row, 1.0 if any row of its response has `flag`."""
    return (np.bincount(dns.response, weights=flag.astype("float64"))[dns.response] > 0).astype("float64")


def _checksum_rows(dns: DnsColumns, table: "_ATable") -> np.ndarray:
    """Valid A rows that are P10 checksum records of their response."""
    a_rows = np.flatnonzero(dns.has_data & dns.is_rtype("A") & table.valid[dns.answer.codes])
    a_rows = a_rows[np.bincount(dns.response[a_rows])[dns.response[a_rows]] >= 3]  # P10 needs 3 or more
    out = np.zeros(dns.n, dtype=bool)
    out[a_rows] = T.a_checksum_rows(table.octets[dns.answer.codes[a_rows]], dns.response[a_rows])
    return out


def _first_per_group(group: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Index of the highest `score` per `group` (ties: the earliest)."""
    order = np.lexsort((-score, group))
    g = group[order]
    return order[np.r_[True, g[1:] != g[:-1]]]


def relationship_features(conns, dns, j: DnsJoin,
                          state: StreamState | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Features (one row per connection, in order) and the evidence behind the best match.

    `conns` and `dns` are canonical frames or their `columns` views. Evidence columns: transform,
    answer, rtype, query ("" where none), dns_delay, consistency (for explanations),
    answer_row (the row of `dns` behind it, -1 if none).
    """
    conns, dns = ConnColumns.of(conns), DnsColumns.of(dns)
    n = conns.n
    dst_port = conns.dst_port
    conn_ts = conns.ts
    dns_ts = dns.ts
    qcode = dns.query.codes
    src_key = conns.src.keys

    feats = {}
    ip_row = j.ip_answer_row
    linked = ip_row >= 0
    feats["dst_is_answer"] = linked.astype("float64")
    delay = np.full(n, np.nan)
    delay[linked] = conn_ts[linked] - dns_ts[ip_row[linked]]
    feats["dns_delay_log"] = np.where(linked, np.log1p(np.maximum(delay, 0)), NO_DNS_DELAY_LOG)
    feats["answer_ttl_log"] = np.log1p(np.nan_to_num(gather(dns.ttl, ip_row, 0.0), nan=0.0))
    feats["answer_count"] = gather(dns.response_size.astype("float64"), ip_row, 0.0)
    table = _ATable(dns)
    feats["via_cname"] = gather(_response_any(dns, dns.is_rtype("CNAME")), ip_row, 0.0)
    feats["answer_checksum"] = gather(_response_any(dns, _checksum_rows(dns, table)), ip_row, 0.0)

    ev_transform = np.full(n, -1, dtype=np.int16)
    ev_answer_row = np.where(linked, ip_row, -1)
    linked_query = gather(qcode, ip_row, -1)  # the name that gave the destination IP

    # --- exact port derivations over all candidate pairs -----------------------------------
    pc, pa = j.pairs_conn, j.pairs_answer
    sig = np.zeros(n)
    on_ip = np.zeros(n)
    announced = np.zeros(n)
    consistency = np.zeros(n)
    if len(pc):
        hconn, hrow, htrans = _port_hits(pc, pa, dst_port, dns, table)
        if len(hconn):
            is_announced = np.isin(htrans, ANNOUNCED_CODES)
            announced[hconn[is_announced]] = 1.0
            tests_per_conn = np.bincount(pc, minlength=n) * T.N_TESTS_A
            chance = T.port_chance(pd.Categorical.from_codes(htrans, dtype=T.transform_dtype(), validate=False),
                                   dst_port[hconn])
            prior = T.TRANSFORM_PRIORS[htrans]
            p_corr = np.clip(chance * tests_per_conn[hconn] / np.maximum(prior, 1e-9), 1e-300, 1.0)
            hsig = np.where(is_announced, 0.0, -np.log10(p_corr))
            # consistency: distinct ports one transform explained for (client, query), counting only
            # derivations from the name that gave the destination IP (how port-calculating C2 works);
            # otherwise every recent answer of a busy client would collect coincidences
            counted = (qcode[hrow] == linked_query[hconn]) & ~is_announced
            cnt = np.zeros(len(hconn), dtype="int64")
            c_conn, c_row = hconn[counted], hrow[counted]
            g = _hash(src_key[c_conn], dns.query.keys[c_row], T.TRANSFORM_KEYS[htrans[counted]])
            cnt[counted] = distinct_running_count(g, dst_port[c_conn].astype("uint64"), conn_ts[c_conn], state, "ports")
            bk = _first_per_group(hconn, hsig + 10.0 * (cnt - 1))
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
    a_linked = np.flatnonzero(linked & (gather(dns.rtype.codes, ip_row, -1) == dns.rtype.code_of("A")))
    if len(a_linked):
        value = dns.answer.codes[ip_row[a_linked]]
        key = value * PORT_SPAN + _port_slot(dst_port[a_linked])
        inverse, combos = pd.factorize(key)
        cv, cp = combos // PORT_SPAN, (combos % PORT_SPAN)[:, None]
        ports, valid, o = table.ports[cv].astype("int64"), table.valid[cv], table.octets[cv].astype("int64")
        d = np.where(ports < 0, 65_535, np.abs(ports - cp)).min(axis=1)
        combo_dist = np.where(valid, np.log1p(d), MAX_DISTANCE_LOG)
        be = np.stack([o[:, 0] * 256 + o[:, 1], o[:, 1] * 256 + o[:, 2], o[:, 2] * 256 + o[:, 3]], axis=1)
        le = np.stack([o[:, 1] * 256 + o[:, 0], o[:, 2] * 256 + o[:, 1], o[:, 3] * 256 + o[:, 2]], axis=1)
        combo_byte = (valid & ((be == cp).any(axis=1) | (le == cp).any(axis=1))).astype("float64")
        dist[a_linked] = combo_dist[inverse]
        byte[a_linked] = combo_byte[inverse]
    feats["arith_distance_log"] = dist
    feats["byte_match"] = byte

    # --- keyed variants: a constant XOR / offset between port and a base across answers -----
    keyed = np.zeros(n)
    if len(pc):
        a_pairs = np.flatnonzero((dns.rtype.codes[pa] == dns.rtype.code_of("A")) & (qcode[pa] == linked_query[pc]))
        value = dns.answer.codes[pa[a_pairs]]
        a_pairs = a_pairs[table.valid[value]]
        if len(a_pairs):
            kc, kr = pc[a_pairs], pa[a_pairs]
            o = table.octets[dns.answer.codes[kr]].astype("int64")
            base = o[:, 2] * 256 + o[:, 3]
            port = dst_port[kc]
            group_src = _hash(src_key[kc], dns.query.keys[kr])
            for name, key in T.port_keys(base, port).items():
                nonzero = (key != 0) & (port > 0)
                g = _hash(group_src[nonzero], np.full(nonzero.sum(), T.TRANSFORM_KEYS[T.transform_codes([name])[0]]),
                          key[nonzero].astype("int64"))
                cnt = distinct_running_count(g, base[nonzero].astype("uint64"), conn_ts[kc[nonzero]], state,
                                              f"keyed_{name}")
                np.maximum.at(keyed, kc[nonzero], cnt.astype("float64"))
                strong = cnt >= 2
                if strong.any():
                    idx = kc[nonzero][strong]
                    take = consistency[idx] < 2  # an exact repeated derivation explains better
                    ev_transform[idx[take]] = T.transform_codes([name])[0]
                    ev_answer_row[idx[take]] = kr[nonzero][strong][take]
    feats["keyed_consistency"] = keyed

    # --- IP derived from an answer, for connections whose dst_ip was not itself an answer ----
    ip_derived = np.zeros(n)
    ip_sig = np.zeros(n)
    if len(pc):
        unl = ~linked[pc]
        upc, upa = pc[unl], pa[unl]
        if len(upc):
            li, hit_transform = _ip_hits(upc, upa, conns, dns, table)
            if len(li):
                hc = upc[li]
                hit_row = upa[li]
                ip_derived[hc] = 1.0
                # a derived IPv4 coincides with probability ~2^-32 per test
                tests = np.bincount(upc, minlength=n)[hc] * 32
                ip_sig[hc] = -np.log10(np.clip(tests / 2.0**32, 1e-300, 1))
                take = (ev_transform[hc] < 0) | (ip_sig[hc] > sig[hc])
                ev_transform[hc[take]] = hit_transform[take]
                ev_answer_row[hc[take]] = hit_row[take]
    feats["ip_derived"] = ip_derived
    feats["ip_significance"] = ip_sig

    evidence = pd.DataFrame({
        "transform": _TRANSFORM_TEXT.text(ev_transform),
        "answer": dns.answer.text(gather(dns.answer.codes, ev_answer_row, -1)),
        "rtype": dns.rtype.text(gather(dns.rtype.codes, ev_answer_row, -1)),
        "query": dns.query.text(gather(dns.query.codes, ev_answer_row, -1)),
        "dns_delay": conn_ts - gather(dns_ts, ev_answer_row, np.nan),
        "consistency": np.maximum(consistency, keyed),
        "answer_row": ev_answer_row,
    })
    # copy=False: one block per column, no consolidation copy (`pipeline.extract` copies each column once)
    return pd.DataFrame({name: feats[name] for name in RELATIONSHIP_FEATURES}, copy=False), evidence
