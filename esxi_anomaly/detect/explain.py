"""One human sentence per ranked row: the formula, the DNS answer and query, the delay, the
baseline fact that made it rare, and what the fired rules add.

Vectorised: derivation texts are built once per distinct (transform, answer, target) by
`describe_many` (the text of `transforms.describe`, with one batched derivation per record type
instead of one per answer), and sentences are assembled with Arrow string kernels, each branch
on its own rows only. Per-value Python runs only per distinct value (float formats, repr).
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from esxi_anomaly.detect.rules import EVIDENCE_KINDS
from esxi_anomaly.features import transforms as T
from esxi_anomaly.features.hashing import row_groups


KEYED = {"P9_xor": "XOR", "P9_add": "+"}
# columns `DnsCalcDetector.score_rows` carries for the sentence only (not part of the ranked output)
SENTENCE_ONLY = ("consistency", "port_never_seen", "dst_never_seen", "dst_is_answer")
_TEXT = pa.large_string()
# keyed transforms without a text of their own here: describe says "<target> from <answer> via ..."
_NOT_DERIVED = tuple(t for t in T.KEYED_TRANSFORMS if t not in KEYED)
_DIGITS = re.compile(r"[0-9]+")         # targets describe can int() the same way numpy does


def _keyed(transform: str, answer: str, port: str) -> str:
    """e.g. "54708 = (231*256+201) XOR 0x5a5a" for a keyed variant of the low 16 bits."""
    c, d = (int(x) for x in answer.split(".")[2:4])
    base, p = c * 256 + d, int(port)
    if transform == "P9_xor":
        return f"{p} = ({c}*256+{d}) XOR 0x{p ^ base:04x} (keyed low 16 bits)"
    return f"{p} = ({c}*256+{d}) + {(p - base) % 65536} mod 65536 (keyed low 16 bits)"


def _one(t: str, a: str, p: str) -> str:
    """The text of one derivation, computed alone (the reference path; never raises)."""
    try:
        return _keyed(t, a, p) if t in KEYED else T.describe(t, a, p)
    except Exception:  # an explanation must never fail a run
        return f"{p} from {a} via {t}"


# -- Arrow string helpers --------------------------------------------------------------------

def _arrow(values) -> pa.Array:
    """Text values (a str Series, a list or object array of str, an Arrow array) as large_string."""
    if isinstance(values, pd.Series):
        values = values.array
    if not isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = pa.array(values, _TEXT) if isinstance(values, (list, np.ndarray)) else pa.array(values)
    if isinstance(values, pa.ChunkedArray):
        values = values.chunk(0) if values.num_chunks == 1 else values.combine_chunks()
    return values if values.type == _TEXT else pc.cast(values, _TEXT)


def _text(values: pd.Series) -> pa.Array:
    """`values.astype("str")` (how a sentence shows a column), as a large_string Arrow array."""
    dtype = values.dtype
    if isinstance(dtype, np.dtype) and dtype.kind in "iu":
        return pc.cast(pa.array(values.to_numpy()), _TEXT)      # as str(int)
    if pd.api.types.is_string_dtype(dtype) and not pd.api.types.is_object_dtype(dtype):
        return _arrow(values)
    return _arrow(values.astype("str").to_numpy(dtype=object))


def _const(text: str, n: int) -> pa.Array:
    return pa.array([text], _TEXT).take(pa.array(np.zeros(n, dtype=np.int64)))


def _cat(*parts) -> pa.Array:
    """Element-wise concatenation of arrays and str constants (null in, null out)."""
    return pc.binary_join_element_wise(*(pa.scalar(p, _TEXT) if isinstance(p, str) else p for p in parts),
                                       pa.scalar("", _TEXT))


def _scatter(n: int, pieces: list[tuple[np.ndarray, pa.Array]], fill: str = "") -> pa.Array:
    """n texts: the values of pieces[k][1] at the rows pieces[k][0], `fill` everywhere else."""
    pieces = [(rows, values) for rows, values in pieces if len(rows)]
    if len(pieces) == 1 and len(pieces[0][0]) == n and (np.diff(pieces[0][0]) == 1).all():
        return pieces[0][1]
    where = np.full(n, sum(len(rows) for rows, _ in pieces), dtype=np.int64)  # default: the fill value
    offset = 0
    for rows, _ in pieces:
        where[rows] = offset + np.arange(len(rows))
        offset += len(rows)
    return pa.concat_arrays([values for _, values in pieces] + [pa.array([fill], _TEXT)]).take(pa.array(where))


def _per_distinct(values: np.ndarray, fmt) -> pa.Array:
    """fmt(v) for every value, computed once per distinct value (floats by bit pattern, so -0.0
    and 0.0 stay apart)."""
    values = np.asarray(values)
    key = values.view(np.int64) if values.dtype == np.float64 else values
    codes = pd.factorize(key, use_na_sentinel=False)[0]
    first = np.unique(codes, return_index=True)[1]
    return pa.array([fmt(v) for v in values[first]], _TEXT).take(pa.array(codes))


def _distinct_rows(*columns: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(code per row, first row of each code) of the distinct tuples of the columns."""
    encoded = [pc.dictionary_encode(column, null_encoding="encode") for column in columns]
    return row_groups([e.indices.to_numpy(zero_copy_only=False).astype(np.int64) for e in encoded],
                      [len(e.dictionary) for e in encoded])


# -- derivations ------------------------------------------------------------------------------

def _numbers(values: np.ndarray) -> pa.Array:
    return pc.cast(pa.array(np.asarray(values, dtype=np.int64)), _TEXT)


def _formula_text(t, octets: np.ndarray) -> pa.Array:
    """What `transforms.describe` shows of an octet formula, for many answers of one transform:
    `transforms.octet_formula` with the octets (or, for the bit windows, the 32-bit word in hex)
    filled in."""
    formula = T.octet_formula(t.id)
    word = formula.word
    if word is not None:
        u = octets.astype(np.uint32)
        value = (u[:, 0] << 24 | u[:, 1] << 16 | u[:, 2] << 8 | u[:, 3]) if word == "N" else \
            (u[:, 3] << 24 | u[:, 2] << 16 | u[:, 1] << 8 | u[:, 0])
        nibbles = (value[:, None] >> np.arange(28, -1, -4, dtype=np.uint32)) & 0xF
        digits = np.ascontiguousarray(np.array(list("0123456789ABCDEF"))[nibbles])
        hex_text = _cat("0x", pa.array(digits.view("<U8").ravel(), _TEXT))
        pieces = formula.formula.split(word)                 # str.replace(word, hex) of describe
        parts: list = [pieces[0]]
        for piece in pieces[1:]:
            parts += [hex_text, piece]
    else:
        pieces = re.split(r"\b([abcd])\b", formula.formula)  # the letters describe fills in
        parts = [pieces[0]]
        for k in range(1, len(pieces), 2):
            parts += [_numbers(octets[:, "abcd".index(pieces[k])]), pieces[k + 1]]
    return _cat(*parts) if len(parts) > 1 else _const(parts[0], len(octets))


def _matched(codes: np.ndarray, tids: list[str], a: np.ndarray, p: np.ndarray, output: str, rtype: str) -> np.ndarray:
    """Whether transform tids[codes[i]] derives p[i] from answer a[i] (one derivation call): each
    (answer, transform, value) asked and derived coded as one integer, then a set membership."""
    row, uniq = pd.factorize(a)
    derived = (T.derive_ports if output == "port" else T.derive_ips)(rtype, list(uniq))
    got_t = pd.Index(tids).get_indexer(derived["transform"].astype(str)).astype(np.int64)   # -1: not asked
    wanted = got_t >= 0
    if output == "port":
        got_v = derived["port"].to_numpy(dtype=np.int64)[wanted]
        asked_v = np.array([int(x) for x in p], dtype=np.int64)
    else:
        got_v = derived["ip"].astype(str).to_numpy(dtype=object)[wanted]
        asked_v = p
    values = pd.factorize(np.concatenate([asked_v, got_v]))[0].astype(np.int64)
    width = max(int(values.max()) + 1, 1) if len(values) else 1

    def keys(rows: np.ndarray, transform: np.ndarray, value: np.ndarray) -> np.ndarray:
        return (rows.astype(np.int64) * len(tids) + transform) * width + value

    return np.isin(keys(row, codes.astype(np.int64), values[:len(p)]),
                   keys(derived["row"].to_numpy(dtype=np.int64)[wanted], got_t[wanted], values[len(p):]))


def _formula_texts(codes: np.ndarray, tids: list[str], octets: np.ndarray) -> pa.Array:
    """`_formula_text` for rows of several transforms (codes into tids), in row order."""
    pieces = []
    for k in np.unique(codes):
        rows = np.flatnonzero(codes == k)
        pieces.append((rows, _formula_text(T.TRANSFORMS[tids[k]], octets[rows])))
    return _scatter(len(codes), pieces)


def describe_many(transforms, answers, targets) -> np.ndarray:
    """The derivation text of each (transform, answer, target) triple of str: what `_one` gives
    (`transforms.describe`, the keyed text, or the fallback), with one derivation call per record
    type instead of one per triple. Keyed transforms, non-numeric ports, unmatched formulas,
    unparsable answers and non-str values take the reference path, triple by triple."""
    t, a, p = (np.asarray(x, dtype=object) for x in (transforms, answers, targets))
    pieces, rest = _described(t, a, p)
    out = np.empty(len(t), dtype=object)
    for rows, texts in pieces:
        out[rows] = np.asarray(texts.to_pylist(), dtype=object)
    for i in rest:
        out[i] = _one(t[i], a[i], p[i])
    return out


def _described(t: np.ndarray, a: np.ndarray, p: np.ndarray) -> tuple[list[tuple[np.ndarray, pa.Array]], np.ndarray]:
    """`describe_many` of object arrays as (rows, their texts) of each batch derived, and the rows
    left for `_one`."""
    pieces: list[tuple[np.ndarray, pa.Array]] = []
    todo = np.ones(len(t), dtype=bool)
    strings = np.array([isinstance(x, str) and isinstance(y, str) and isinstance(z, str) for x, y, z in zip(t, a, p)],
                       dtype=bool)
    digits = np.array([isinstance(x, str) and _DIGITS.fullmatch(x) is not None for x in p], dtype=bool)
    codes, tids = pd.factorize(np.where(strings, t, ""))
    tids = list(tids)
    spec = [T.TRANSFORMS.get(x) if x not in KEYED else None for x in tids]
    ok = np.array([tr is not None for tr in spec] or [False], dtype=bool)[codes] & strings
    is_port = np.array([tr is not None and tr.output == "port" for tr in spec] or [False], dtype=bool)[codes]
    ok &= digits | ~is_port                                   # describe int()s a port target
    groups: dict[tuple, list[int]] = {}
    for k, tr in enumerate(spec):
        if tr is not None:
            kind = ("raw",) if tr.id in _NOT_DERIVED else (tr.output, tr.rtypes[0])
            groups.setdefault(kind, []).append(k)

    def done(rows: np.ndarray, texts: pa.Array) -> None:
        pieces.append((rows, texts))
        todo[rows] = False

    def per_row(rows: np.ndarray, field: str) -> pa.Array:
        values = pa.array([getattr(tr, field) if tr is not None else "" for tr in spec], _TEXT)
        return values.take(pa.array(codes[rows]))

    for kind, members in groups.items():
        rows = np.flatnonzero(ok & np.isin(codes, members))
        if not len(rows):
            continue
        try:
            if kind == ("raw",):       # "<target> from '<answer>' via <formula> (<name>)"
                done(rows, _cat(_arrow(p[rows]), " from ", _per_distinct(a[rows], repr), " via ",
                                per_row(rows, "formula"), " (", per_row(rows, "name"), ")"))
                continue
            output, rtype = kind
            hit = _matched(codes[rows], tids, a[rows], p[rows], output, rtype)
            a_formula = np.array([tr is not None and T.octet_formula(tr.id) is not None
                                  for tr in spec], dtype=bool)[codes[rows]]
            if a_formula.any():        # "<port> = <formula with octets>[ on embedded IPv4 a.b.c.d] (<name>)"
                sub = rows[a_formula]
                if rtype == "A":
                    octets, valid = T.parse_ipv4(list(a[sub]))
                else:
                    groups6, valid = T.parse_ipv6(list(a[sub]))
                    h6, h7 = groups6[:, 6].astype(np.uint32), groups6[:, 7].astype(np.uint32)
                    octets = np.stack([h6 >> 8, h6 & 0xFF, h7 >> 8, h7 & 0xFF], axis=1).astype(np.uint8)
                good = hit[a_formula] & valid
                sub, octets = sub[good], octets[good]
                if len(sub):
                    parts = [_arrow(p[sub]), " = ", _formula_texts(codes[sub], tids, octets)]
                    if rtype != "A":
                        dotted = pc.binary_join_element_wise(*(_numbers(octets[:, k]) for k in range(4)),
                                                             pa.scalar(".", _TEXT))
                        parts += [" on embedded IPv4 ", dotted]
                    done(sub, _cat(*parts, " (", per_row(sub, "name"), ")"))
            rest = ~a_formula
            if rest.any():
                sub, sub_hit = rows[rest], hit[rest]
                if output == "ip" and rtype == "A" or rtype == "AAAA" and output == "port":
                    # P11_g* and A-derived IPs: "<target> = <formula> of <answer> (<name>)", "!=" when it does not
                    verb = pa.array(np.where(sub_hit, " = ", " != "), _TEXT)
                    done(sub, _cat(_arrow(p[sub]), verb, per_row(sub, "formula"), " of ", _arrow(a[sub]),
                                   " (", per_row(sub, "name"), ")"))
                else:                  # "<target> [not ]found in <rtype> answer '<answer>' via <formula> (<name>)"
                    verb = pa.array(np.where(sub_hit, " found", " not found"), _TEXT)
                    done(sub, _cat(_arrow(p[sub]), verb, f" in {rtype} answer ", _per_distinct(a[sub], repr), " via ",
                                   per_row(sub, "formula"), " (", per_row(sub, "name"), ")"))
        except Exception:  # a surprise in the batched path: these triples go one by one
            continue
    return pieces, np.flatnonzero(todo)


def _derivation(transform: pa.Array, answer: pa.Array, target: pa.Array) -> pa.Array:
    """Derivation text per row ("" where there is no transform), built once per distinct triple."""
    rows = np.flatnonzero(pc.fill_null(pc.not_equal(transform, ""), True).to_numpy(zero_copy_only=False))
    if not len(rows):
        return _const("", len(transform))
    take = pa.array(rows)
    t, a, p = transform.take(take), answer.take(take), target.take(take)
    code, first = _distinct_rows(t, a, p)
    first = pa.array(first)
    t, a, p = (np.asarray(x.take(first).to_numpy(zero_copy_only=False), dtype=object) for x in (t, a, p))
    pieces, rest = _described(t, a, p)   # kept in Arrow: `describe_many`'s Python strings cost ~10 % here
    pieces.append((rest, pa.array([_one(t[i], a[i], p[i]) for i in rest], _TEXT)))
    return _scatter(len(transform), [(rows, _scatter(len(t), pieces).take(pa.array(code)))])


# -- sentences --------------------------------------------------------------------------------

def _ip_transforms(transform: pa.Array) -> pa.Array:
    """Per row, whether the transform derives an IP (`transforms.is_ip_transform`), decided once
    per distinct id; null -> False."""
    encoded = pc.dictionary_encode(transform)
    flags = pa.array([T.is_ip_transform(v) for v in encoded.dictionary.to_pylist()], pa.bool_())
    return pc.fill_null(flags.take(encoded.indices), False)


def _is_one(values: pd.Series) -> np.ndarray:
    return np.asarray(values.to_numpy() == 1, dtype=bool)


def sentences(rows: pd.DataFrame, history_days: float, rules: list[dict] = ()) -> pd.Series:
    """`rows` carries: transform, answer, rtype, query, dns_delay, consistency, dst_port, dst_ip,
    src_name, port_never_seen, dst_never_seen, dst_is_answer, rules (and seen_by, when there); `rules`
    are the model's rule definitions, whose `explain` templates are appended for the rules that fired,
    and which say which rules are evidence: a row none of them backs says it cannot be an alert."""
    n = len(rows)
    if not n:
        return pd.Series([], dtype="str")
    transform, answer = _text(rows["transform"]), _text(rows["answer"])
    dst_ip, dst_port = _text(rows["dst_ip"]), _text(rows["dst_port"])
    is_ip = _ip_transforms(transform)
    deriv = _derivation(transform, answer, pc.if_else(is_ip, dst_ip, dst_port))
    has = pc.fill_null(pc.not_equal(deriv, ""), True).to_numpy(zero_copy_only=False)
    answered = _is_one(rows["dst_is_answer"])
    query = _text(rows["query"])

    # "port <derivation> from A <answer> for <query> answered <delay> earlier" | "no derivation ..." |
    # "no DNS answer ..."
    pieces = []
    i1, i2, i3 = np.flatnonzero(has), np.flatnonzero(~has & answered), np.flatnonzero(~has & ~answered)
    if len(i1):
        take = pa.array(i1)
        what = pa.array(np.where(is_ip.to_numpy(zero_copy_only=False)[i1], "IP ", "port "), _TEXT)
        delay = _per_distinct(rows["dns_delay"].to_numpy(dtype=np.float64)[i1],
                              lambda d: f"{d:.1f} s" if d == d else "")
        pieces.append((i1, _cat(what, deriv.take(take), " from ", _text(rows["rtype"]).take(take), " ",
                                answer.take(take), " for ", query.take(take), " answered ", delay, " earlier")))
    if len(i2):
        take = pa.array(i2)
        pieces.append((i2, _cat("no derivation of port ", dst_port.take(take), "; ", dst_ip.take(take),
                                " was answered for ", query.take(take))))
    if len(i3):
        take = pa.array(i3)
        pieces.append((i3, _cat("no DNS answer explains ", dst_ip.take(take), ":", dst_port.take(take))))
    part1 = _scatter(n, pieces)

    # "; <source> never used port <port> in <days>" | "; <source> never contacted <ip> in <days>" | ""
    days = f"{history_days:.0f} days" if history_days >= 1 else f"{history_days * 24:.0f} h"
    never_port = _is_one(rows["port_never_seen"])
    j1, j2 = np.flatnonzero(never_port), np.flatnonzero(~never_port & _is_one(rows["dst_never_seen"]))
    pieces = []
    if len(j1) or len(j2):
        src_name = _text(rows["src_name"])
        for j, middle, what in ((j1, " never used port ", dst_port), (j2, " never contacted ", dst_ip)):
            if len(j):
                take = pa.array(j)
                pieces.append((j, _cat("; ", src_name.take(take), middle, what.take(take), " in " + days)))
    text = _cat(part1, _scatter(n, pieces), _rule_clauses(rows, rules), _evidence_clause(rows, rules),
                _seen_by_clause(rows))
    out = text.to_pandas()
    out.index = rows.index
    return out.astype("str")


NO_EVIDENCE = "; no DNS-calculation evidence: not an alert, ranked by the forest alone"
NO_EVIDENCE_WEAK = "; no DNS-calculation evidence: not an alert, ranked by the forest and weak rules"


def _evidence_clause(rows: pd.DataFrame, rules: list[dict]) -> pa.Array:
    """`NO_EVIDENCE` (or `NO_EVIDENCE_WEAK` when rules that are not evidence fired) on the rows no
    evidence rule backs (`rules.EVIDENCE_KINDS`), which can never be alerts; "" elsewhere, and
    everywhere when no rule definitions are given. Decided once per distinct `rules` value."""
    n = len(rows)
    if not rules:
        return _const("", n)
    evidence_ids = {r["id"] for r in rules if r.get("evidence") in EVIDENCE_KINDS}
    codes, distinct = pd.factorize(rows["rules"].astype("str"), use_na_sentinel=False)
    fired = [[i for i in str(v).split(";") if i] for v in distinct]
    texts = [("" if evidence_ids.intersection(ids) else NO_EVIDENCE_WEAK if ids else NO_EVIDENCE) for ids in fired]
    return pa.array(texts, _TEXT).take(pa.array(codes))


def _seen_by_clause(rows: pd.DataFrame) -> pa.Array:
    """"; seen by nsx_dfw:esx01, nsx_dfw:esx03" when more than one vantage point logged the
    connection (`features.merge`: `seen_by` lists them separated by spaces)."""
    if "seen_by" not in rows.columns:
        return _const("", len(rows))
    encoded = pc.dictionary_encode(pc.fill_null(_text(rows["seen_by"]), ""))   # a clause per distinct list
    distinct = encoded.dictionary
    several = pc.match_substring(distinct, " ")
    if not pc.any(several).as_py():
        return _const("", len(rows))      # one vantage point everywhere (most estates)
    clause = pc.if_else(several, _cat("; seen by ", pc.replace_substring(distinct, " ", ", ")), _const("", len(distinct)))
    return clause.take(encoded.indices)


def _render(template: str, rows: pd.DataFrame) -> pa.Array:
    """`template` with {field} placeholders filled from `rows` (floats as {:g}, NaN as ""), vectorised."""
    pieces = re.split(r"\{(\w+)\}", template)
    parts: list = [pieces[0]]
    for k in range(1, len(pieces), 2):
        name = pieces[k]
        if name not in rows.columns:
            field = ""
        elif pd.api.types.is_float_dtype(rows[name]):
            field = _per_distinct(rows[name].to_numpy(dtype=np.float64), lambda v: f"{v:g}" if v == v else "")
        else:
            field = _text(rows[name])
        parts += [field, pieces[k + 1]]
    return _cat(*parts) if any(not isinstance(x, str) for x in parts) else _const("".join(parts), len(rows))


def _rule_clauses(rows: pd.DataFrame, rules: list[dict]) -> pa.Array:
    """"; <explain>" for every rule that fired on the row, heaviest first. Rule membership is
    decided once per distinct `rules` value; templates are rendered on the rows that fired."""
    n = len(rows)
    codes, distinct = pd.factorize(rows["rules"].astype("str"), use_na_sentinel=False)
    fired = [str(v).split(";") for v in distinct]
    active = [r for r in sorted(rules, key=lambda r: -float(r["weight"])) if r.get("explain")]
    hits = [np.array([r["id"] in ids for ids in fired], dtype=bool)[codes] for r in active]
    any_hit = np.logical_or.reduce(hits) if hits else np.zeros(n, dtype=bool)
    if not any_hit.any():
        return _const("", n)
    sub_rows = np.flatnonzero(any_hit)
    sub = rows.iloc[sub_rows]
    clause = _const("", len(sub_rows))
    for rule, hit in zip(active, hits):
        mine = hit[sub_rows]
        if not mine.any():
            continue
        rendered = _scatter(len(sub_rows), [(np.flatnonzero(mine), _render(rule["explain"], sub[mine]))])
        clause = pc.if_else(pa.array(mine), _cat(clause, "; ", rendered), clause)
    return _scatter(n, [(sub_rows, clause)])


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
