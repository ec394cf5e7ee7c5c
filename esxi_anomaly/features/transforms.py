"""Transform library: enumerable functions f(DNS answer) -> port / IP (threat-notes §5.2).

Every transform has a stable id, a formula for explanations, a prior weight and an exact
chance rate P(f(uniform random answer) == port), used to judge whether a match is a coincidence.
Octet notation: A record ``a.b.c.d`` in dotted order, ``N = a<<24|b<<16|c<<8|d`` (network order),
``L = d<<24|c<<16|b<<8|a`` (little-endian read of in_addr).

Families (see docs/transforms.md for the full table and counts):
  P1-P6 octet formulas, P7 16-bit windows, P8 a fixed arithmetic grammar (A records);
  P9 keyed variants (constant key across answers, see ``port_keys``);
  P11 AAAA groups and AAAA-embedded IPv4; P12 ports in TXT/CNAME text, SRV, SVCB/HTTPS, MX;
  I1 byte reversal, I2/I3 keyed (``ip_keys``), I4 octet permutations, I5 Nymaim2,
  I7 IPs literally in TXT text, I8 IPv4 embedded in AAAA.
Response-level evidence (features, not per-answer transforms): P10 checksum records
(``checksum_rows``); P10's other half, IP from one record and port from another, is covered by
testing every record of the recent responses; I6, the IP reached through a CNAME, is the
``via_cname`` feature.
"""
from __future__ import annotations

import base64
import binascii
import functools
import itertools
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

# Bump when any transform, its id, order or chance model changes (a_record_ports columns are versioned).
TRANSFORM_LIBRARY_VERSION = "1.0.0"

PORT_SPACE = 65536  # chance model for non-enumerable sources: one candidate number ~ uniform 16-bit value


@dataclass(frozen=True)
class Transform:
    id: str
    name: str
    formula: str
    output: str  # "port" | "ip"
    rtypes: tuple
    prior: float


# --------------------------------------------------------------------------------------------
# Input coercion and IPv4 parsing
# --------------------------------------------------------------------------------------------

_IPV4_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4_FULL = rf"^{_IPV4_OCTET}\.{_IPV4_OCTET}\.{_IPV4_OCTET}\.{_IPV4_OCTET}$"


def _to_arrow_strings(values) -> pa.Array:
    """Any list/array/Series of answers -> arrow string array; non-strings become strings or null."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        return values if pa.types.is_string(values.type) else pc.cast(values, pa.string(), safe=False)
    if isinstance(values, str) or values is None:
        values = [values]
    series = values if isinstance(values, pd.Series) else pd.Series(values, dtype=object)
    if series.dtype != "str":
        # object input may hold None, numbers, bytes: the "str" dtype stores None/NaN as null.
        series = series.astype("str")
    arr = pa.array(series.array)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return arr.cast(pa.string())


def _broadcast_rtypes(rtype, n: int) -> np.ndarray:
    if isinstance(rtype, str) or rtype is None:
        return np.full(n, (rtype or "").strip().upper(), dtype=object)
    arr = _to_arrow_strings(rtype)
    arr = pc.utf8_upper(pc.utf8_trim_whitespace(pc.fill_null(arr, "")))
    out = np.asarray(arr.to_numpy(zero_copy_only=False), dtype=object)
    if len(out) != n:
        raise ValueError(f"rtype has {len(out)} values for {n} answers")
    return out


def parse_ipv4(answers) -> tuple[np.ndarray, np.ndarray]:
    """Strict dotted quads (no leading zeros, no spaces) -> ((n,4) uint8 octets a,b,c,d; bool valid)."""
    arr = _to_arrow_strings(answers)
    valid = np.asarray(pc.fill_null(pc.match_substring_regex(arr, _IPV4_FULL), False).to_numpy(zero_copy_only=False), dtype=bool)
    octets = np.zeros((len(arr), 4), dtype=np.uint8)
    if valid.any():
        good = arr.filter(pa.array(valid))
        parts = pc.list_flatten(pc.split_pattern(good, "."))
        octets[valid] = np.asarray(pc.cast(parts, pa.uint8()).to_numpy(zero_copy_only=False)).reshape(-1, 4)
    return octets, valid


_IPV4_ONE = re.compile(_IPV4_FULL)


def _ipv4_octets(answer) -> np.ndarray | None:
    """One strict dotted quad -> (1,4) uint8 octets, or None (`parse_ipv4` for a single value)."""
    if not isinstance(answer, str) or not _IPV4_ONE.fullmatch(answer):
        return None
    return np.array([[int(x) for x in answer.split(".")]], dtype=np.uint8)


def octets_to_int(octets: np.ndarray) -> np.ndarray:
    """(n,4) octets a,b,c,d -> uint32 network-order N = a<<24|b<<16|c<<8|d."""
    o = octets.astype(np.uint32)
    return (o[:, 0] << 24) | (o[:, 1] << 16) | (o[:, 2] << 8) | o[:, 3]


def _int_to_octets(values: np.ndarray) -> np.ndarray:
    """uint32 network order -> (n,4) uint8 a,b,c,d (big-endian byte view, one pass)."""
    return np.ascontiguousarray(np.asarray(values).astype(">u4")).view(np.uint8).reshape(-1, 4)


def ipv4_to_int(answers) -> tuple[np.ndarray, np.ndarray]:
    """Dotted quads -> (uint32 network-order N, valid mask); invalid rows are 0."""
    octets, valid = parse_ipv4(answers)
    return octets_to_int(octets), valid


@functools.lru_cache(maxsize=1)
def _octet_text() -> pa.Array:
    return pa.array([str(i) for i in range(256)], type=pa.string())


def _octets_to_arrow(octets: np.ndarray) -> pa.Array:
    """(n,4) octets -> arrow dotted strings, without Python string objects."""
    cols = [_octet_text().take(pa.array(np.ascontiguousarray(octets[:, i]))) for i in range(4)]
    return pc.binary_join_element_wise(*cols, ".")


def _octets_to_strings(octets: np.ndarray) -> np.ndarray:
    return np.asarray(_octets_to_arrow(octets).to_numpy(zero_copy_only=False), dtype=object)


def int_to_ipv4(values: np.ndarray) -> np.ndarray:
    """uint32 network-order values -> dotted strings (object array)."""
    return _octets_to_strings(_int_to_octets(values))


# --------------------------------------------------------------------------------------------
# A-record port transforms (P1-P8): definitions, fixed column order
# --------------------------------------------------------------------------------------------

_A = ("A",)
_AAAA = ("AAAA",)
_TEXT = ("TXT", "CNAME")

# id -> vectorised function over {a,b,c,d: int32, N,L: uint32} (see _octet_dict)
_A_PORT_FUNCS: dict[str, Callable[[dict], np.ndarray]] = {}
# id -> chance "shape": octets are iid uniform, so the output distribution depends only on the formula shape
_CHANCE_SHAPE: dict[str, str] = {}
_A_PORT_TRANSFORM_LIST: list[Transform] = []


def _add_a_port(tid: str, name: str, formula: str, prior: float, shape: str, func) -> None:
    _A_PORT_TRANSFORM_LIST.append(Transform(tid, name, formula, "port", _A, prior))
    _A_PORT_FUNCS[tid] = func
    _CHANCE_SHAPE[tid] = shape


_add_a_port("P1", "APT12 a*b+c", "a*b+c", 1.0, "x*y+z", lambda o: o["a"] * o["b"] + o["c"])
_add_a_port("P2", "unsourced variant a*(b+c)", "a*(b+c)", 0.3, "(x+y)*z", lambda o: o["a"] * (o["b"] + o["c"]))
_add_a_port("P3", "low 16 bits c*256+d", "c*256+d", 0.2, "uniform16", lambda o: o["c"] * 256 + o["d"])
_add_a_port("P4", "byte-swapped low half d*256+c", "d*256+c", 0.2, "uniform16", lambda o: o["d"] * 256 + o["c"])
_add_a_port("P5", "high 16 bits a*256+b", "a*256+b", 0.2, "uniform16", lambda o: o["a"] * 256 + o["b"])
_add_a_port("P6", "little-endian low half b*256+a", "b*256+a", 0.2, "uniform16", lambda o: o["b"] * 256 + o["a"])
for _order, _word in (("be", "N"), ("le", "L")):
    for _k in range(1, 16):
        _add_a_port(
            f"P7_{_order}_k{_k}",
            f"16-bit window of {'network' if _order == 'be' else 'little-endian'} word at bit {_k}",
            f"({_word}>>{_k})&0xFFFF",
            0.05,
            "uniform16",
            (lambda w, k: lambda o: (o[w] >> k) & 0xFFFF)(_word, _k),
        )


def _p8_candidates():
    """The fixed P8 grammar, canonical under symmetry of + and *; duplicates of earlier columns removed later."""
    letters = "abcd"
    for x, y in itertools.combinations(letters, 2):  # x*y+z, x*y-z: {x,y} unordered
        for z in [c for c in letters if c not in (x, y)]:
            yield f"P8_x*y+z_{x}{y}{z}", f"{x}*{y}+{z}", "x*y+z", (lambda x, y, z: lambda o: o[x] * o[y] + o[z])(x, y, z)
    for x, y in itertools.combinations(letters, 2):
        for z in [c for c in letters if c not in (x, y)]:
            yield f"P8_x*y-z_{x}{y}{z}", f"{x}*{y}-{z}", "x*y-z", (lambda x, y, z: lambda o: o[x] * o[y] - o[z])(x, y, z)
    for x, y in itertools.combinations(letters, 2):
        yield f"P8_x*y_{x}{y}", f"{x}*{y}", "x*y", (lambda x, y: lambda o: o[x] * o[y])(x, y)
    for x, y in itertools.combinations(letters, 2):
        for z in [c for c in letters if c not in (x, y)]:
            yield f"P8_(x+y)*z_{x}{y}{z}", f"({x}+{y})*{z}", "(x+y)*z", (lambda x, y, z: lambda o: (o[x] + o[y]) * o[z])(x, y, z)
    for x, y in itertools.permutations(letters, 2):
        yield f"P8_x*256+y_{x}{y}", f"{x}*256+{y}", "uniform16", (lambda x, y: lambda o: o[x] * 256 + o[y])(x, y)
    for x, y, z in itertools.combinations(letters, 3):
        yield f"P8_x+y+z_{x}{y}{z}", f"{x}+{y}+{z}", "x+y+z", (lambda x, y, z: lambda o: o[x] + o[y] + o[z])(x, y, z)
    yield "P8_a+b+c+d", "a+b+c+d", "a+b+c+d", lambda o: o["a"] + o["b"] + o["c"] + o["d"]


def _octet_dict(octets: np.ndarray) -> dict[str, np.ndarray]:
    """int32 octets (every grammar value fits: max 510*255) and uint32 words N, L for the windows."""
    o = np.ascontiguousarray(octets.T).astype(np.int32)
    a, b, c, d = o[0], o[1], o[2], o[3]
    u = o.astype(np.uint32)
    return {
        "a": a, "b": b, "c": c, "d": d,
        "N": (u[0] << 24) | (u[1] << 16) | (u[2] << 8) | u[3],
        "L": (u[3] << 24) | (u[2] << 16) | (u[1] << 8) | u[0],
    }


def _fingerprint(values: np.ndarray) -> bytes:
    v = np.where((values >= 1) & (values <= 65535), values, -1)
    return v.astype(np.int32).tobytes()


# Fixed probe set: every column is compared on it, so identical transforms (e.g. x*256+y on (c,d) == P3) are dropped.
_PROBE = np.random.default_rng(20240917).integers(0, 256, size=(4096, 4), dtype=np.uint8)
_PROBE_DICT = _octet_dict(_PROBE)
_seen = {_fingerprint(f(_PROBE_DICT)) for f in _A_PORT_FUNCS.values()}
P8_DROPPED_DUPLICATES: list[str] = []  # grammar members identical to an earlier transform (documented count)
for _tid, _formula, _shape, _func in _p8_candidates():
    _fp = _fingerprint(_func(_PROBE_DICT))
    if _fp in _seen:
        P8_DROPPED_DUPLICATES.append(_tid)
        continue
    _seen.add(_fp)
    _add_a_port(_tid, f"grammar {_formula}", _formula, 0.05, _shape, _func)
del _seen, _tid, _formula, _shape, _func, _fp

A_PORT_TRANSFORMS: list[Transform] = list(_A_PORT_TRANSFORM_LIST)
N_TESTS_A: int = len(A_PORT_TRANSFORMS)
_A_PORT_INDEX = {t.id: i for i, t in enumerate(A_PORT_TRANSFORMS)}


def a_record_ports(octets: np.ndarray) -> np.ndarray:
    """(n,4) uint8 octets -> (n, N_TESTS_A) int32 ports in A_PORT_TRANSFORMS order; -1 where not in 1..65535."""
    octets = np.asarray(octets, dtype=np.uint8).reshape(-1, 4)
    o = _octet_dict(octets)
    out = np.empty((N_TESTS_A, len(octets)), dtype=np.int32)  # transposed: each column write is contiguous
    for j, t in enumerate(A_PORT_TRANSFORMS):
        out[j] = _A_PORT_FUNCS[t.id](o)
    out[(out < 1) | (out > 65535)] = -1
    return out.T


# --------------------------------------------------------------------------------------------
# Other port transforms (AAAA, text, SRV, SVCB, MX, keyed)
# --------------------------------------------------------------------------------------------

_P11_V4_BASES = ("P1", "P2", "P4", "P6")  # P3/P5 on h6:h7 equal h7/h6, already P11_g7/P11_g6
_OTHER_PORT_TRANSFORMS: list[Transform] = (
    [Transform(f"P11_g{i}", f"AAAA 16-bit group h{i}", f"h{i}", "port", _AAAA, 0.1) for i in range(8)]
    + [
        Transform(f"P11_v4_{base}", f"{TRANSFORM_NAME} on AAAA-embedded IPv4 (h6:h7)", f"{formula} on h6:h7 as a.b.c.d", "port", _AAAA, prior)
        for base, TRANSFORM_NAME, formula, prior in [
            ("P1", "APT12 a*b+c", "a*b+c", 0.5),
            ("P2", "a*(b+c)", "a*(b+c)", 0.1),
            ("P4", "d*256+c", "d*256+c", 0.1),
            ("P6", "b*256+a", "b*256+a", 0.1),
        ]
    ]
    + [
        Transform("P12_txt", "port in text", "ip:port | [v6]:port | host:port | p=/port= | standalone integer", "port", _TEXT, 0.3),
        Transform("P12_txt_b64", "port in base64-decoded text", "text rules on base64-decoded tokens", "port", _TEXT, 0.3),
        Transform("P12_txt_hex", "port in hex-decoded text", "text rules on hex-decoded tokens", "port", _TEXT, 0.3),
        Transform("P12_srv", "SRV port field (legitimate, informative)", "prio weight PORT target", "port", ("SRV",), 0.1),
        Transform("P12_svcb", "SVCB/HTTPS port= (legitimate, informative)", "port=PORT", "port", ("SVCB", "HTTPS"), 0.1),
        Transform("P12_mx", "MX preference as port (speculative)", "PREF exchange", "port", ("MX",), 0.02),
        Transform("P9_xor", "keyed XOR of a base port (constant key across answers)", "port ^ K", "port", _A + _AAAA, 0.1),
        Transform("P9_add", "keyed offset of a base port (constant key across answers)", "(port + K) mod 65536", "port", _A + _AAAA, 0.1),
    ]
)
for _i in range(8):
    _CHANCE_SHAPE[f"P11_g{_i}"] = "uniform16"
for _base in _P11_V4_BASES:
    _CHANCE_SHAPE[f"P11_v4_{_base}"] = _CHANCE_SHAPE[_base]
for _t in _OTHER_PORT_TRANSFORMS:
    _CHANCE_SHAPE.setdefault(_t.id, "uniform16")


# --------------------------------------------------------------------------------------------
# IP transforms (I1-I8)
# --------------------------------------------------------------------------------------------

_PERMUTATIONS = [p for p in itertools.permutations(range(4)) if p not in ((0, 1, 2, 3), (3, 2, 1, 0))]
NYMAIM2_XOR1, NYMAIM2_SUB, NYMAIM2_XOR2, NYMAIM2_ROUNDS = 0x87568289, 0x78643587, 0x18482642, 16

A_IP_TRANSFORMS: list[Transform] = (
    [Transform("I1", "byte-reversed IP", "d.c.b.a", "ip", _A, 0.2)]
    + [
        Transform(f"I4_{''.join('abcd'[i] for i in p)}", "octet permutation", ".".join("abcd"[i] for i in p), "ip", _A, 0.05)
        for p in _PERMUTATIONS
    ]
    + [
        Transform("I5_nymaim2", "Nymaim2 IP transform (16 rounds, little-endian)", "T^16(L), T(v)=((v^0x87568289)-0x78643587)^0x18482642", "ip", _A, 1.0),
        Transform("I5_nymaim2_inv", "inverse Nymaim2 IP transform", "T^-16(L)", "ip", _A, 0.5),
    ]
)
_OTHER_IP_TRANSFORMS: list[Transform] = [
    Transform("I2_xor", "keyed XOR of the answer IP (constant key across answers)", "N ^ K", "ip", _A, 0.1),
    Transform("I3_add", "keyed offset of the answer IP (constant key across answers)", "(N + K) mod 2^32", "ip", _A, 0.1),
    Transform("I7_txt", "IP literally in text", "IPv4/IPv6 literal in text", "ip", _TEXT, 0.5),
    Transform("I7_txt_b64", "IP in base64-decoded text", "IPv4/IPv6 literal in base64-decoded token", "ip", _TEXT, 0.5),
    Transform("I7_txt_hex", "IP in hex-decoded text", "IPv4/IPv6 literal in hex-decoded token", "ip", _TEXT, 0.5),
    Transform("I8_aaaa_v4", "IPv4 embedded in AAAA (h6:h7)", "h6:h7 as a.b.c.d", "ip", _AAAA, 0.2),
]

TRANSFORMS: dict[str, Transform] = {t.id: t for t in A_PORT_TRANSFORMS + _OTHER_PORT_TRANSFORMS + A_IP_TRANSFORMS + _OTHER_IP_TRANSFORMS}
_TRANSFORM_IDS = list(TRANSFORMS)
# Integer transform codes (positions in TRANSFORM_IDS): what hot paths carry instead of id strings.
TRANSFORM_IDS = np.array(_TRANSFORM_IDS, dtype=object)
TRANSFORM_PRIORS = np.array([t.prior for t in TRANSFORMS.values()], dtype=np.float64)
TRANSFORM_KEYS = pd.util.hash_array(TRANSFORM_IDS)  # = hashing.hash_column of the id strings


def transform_codes(ids) -> np.ndarray:
    """The integer codes of transform ids."""
    return np.array([_TRANSFORM_IDS.index(t) for t in ids], dtype=np.int16)


def is_ip_transform(transform_id) -> bool:
    """True when the transform derives an IP address (its target is the connection's dst_ip),
    False for port transforms and for anything that is not a transform id."""
    t = TRANSFORMS.get(transform_id) if isinstance(transform_id, str) else None
    return t is not None and t.output == "ip"


# Keyed variants: derived from a key constant across answers (`port_keys`, `ip_keys`), not from
# one answer, so `describe` names them without deriving.
KEYED_TRANSFORMS = ("P9_xor", "P9_add", "I2_xor", "I3_add")


@dataclass(frozen=True)
class OctetFormula:
    """How a port transform reads an IPv4's octets, for explanations that fill in the numbers.

    `formula` is written in the octet letters a, b, c, d, or, when `word` is "N" (network order)
    or "L" (little-endian), in that 32-bit word, shown in hex; `embedded`: the IPv4 is h6:h7 of
    an AAAA answer rather than an A record."""

    formula: str
    word: str | None
    embedded: bool


def _octet_formulas() -> dict[str, OctetFormula]:
    out = {}
    for t in A_PORT_TRANSFORMS:
        word = ("N" if "_be_" in t.id else "L") if t.id.startswith("P7_") else None
        out[t.id] = OctetFormula(t.formula, word, False)
    for base in _P11_V4_BASES:
        out[f"P11_v4_{base}"] = OctetFormula(TRANSFORMS[base].formula, None, True)
    return out


_OCTET_FORMULAS = _octet_formulas()


def octet_formula(transform_id) -> OctetFormula | None:
    """The octet formula of an A-record port transform (P1-P8) or of one on AAAA-embedded IPv4
    (P11_v4_*); None for every other transform."""
    return _OCTET_FORMULAS.get(transform_id) if isinstance(transform_id, str) else None


# --------------------------------------------------------------------------------------------
# Chance rates
# --------------------------------------------------------------------------------------------

def _uniform_octet_counts() -> np.ndarray:
    return np.ones(256, dtype=np.int64)


def _product_counts() -> np.ndarray:
    """counts[v] = #{(x,y) in 256^2 : x*y == v}."""
    x = np.arange(256, dtype=np.int64)
    return np.bincount((x[:, None] * x[None, :]).ravel(), minlength=255 * 255 + 1)


@functools.lru_cache(maxsize=None)
def _shape_chance(shape: str) -> np.ndarray:
    """65536-vector: P(f(uniform octets) == port) for ports 0..65535 (port 0 set to 0: never a valid port)."""
    ones = _uniform_octet_counts()
    if shape == "uniform16":
        counts, domain = np.ones(PORT_SPACE, dtype=np.int64), PORT_SPACE
    elif shape == "x*y":
        counts, domain = _product_counts(), 256**2
    elif shape == "x*y+z":  # exact: product counts convolved with the uniform third octet
        counts, domain = np.convolve(_product_counts(), ones), 256**3
    elif shape == "x*y-z":  # values v - z, offset so index 0 is -255
        shifted = np.convolve(_product_counts(), ones)  # index i  <->  x*y - z = i - 255
        counts, domain = shifted[255:], 256**3
    elif shape == "(x+y)*z":
        sums = np.convolve(ones, ones)  # counts of s = x+y, 0..510
        s = np.arange(511, dtype=np.int64)
        z = np.arange(256, dtype=np.int64)
        counts = np.bincount((s[:, None] * z[None, :]).ravel(), weights=np.repeat(sums, 256).astype(np.float64))
        counts, domain = np.rint(counts).astype(np.int64), 256**3
    elif shape == "x+y+z":
        counts, domain = np.convolve(np.convolve(ones, ones), ones), 256**3
    elif shape == "a+b+c+d":
        counts, domain = np.convolve(np.convolve(np.convolve(ones, ones), ones), ones), 256**4
    else:  # pragma: no cover - guarded by the registry
        raise KeyError(shape)
    out = np.zeros(PORT_SPACE, dtype=np.float64)
    m = min(len(counts), PORT_SPACE)
    out[:m] = counts[:m] / domain
    out[0] = 0.0
    out.flags.writeable = False
    return out


def chance_vector(transform_id: str) -> np.ndarray:
    """Read-only 65536-vector of exact chance rates per port for one port transform (cached)."""
    if transform_id not in _CHANCE_SHAPE:
        raise KeyError(f"no port chance model for transform {transform_id!r}")
    return _shape_chance(_CHANCE_SHAPE[transform_id])


def port_chance(transform_ids, ports) -> np.ndarray:
    """Element-wise P(f(uniform random answer) == port); 0 for ports outside 1..65535.

    A transforms: exact enumeration. AAAA groups, text, SRV, SVCB, MX and keyed transforms: one candidate
    number modelled as a uniform 16-bit value (1/65536). Raises KeyError for unknown or IP transforms.
    ``transform_ids`` may be a str, an array/Series of str, or a categorical (fastest: no string hashing).
    """
    if isinstance(transform_ids, pd.Series):
        transform_ids = transform_ids.array
    if isinstance(transform_ids, pd.Categorical):
        codes, uniques = transform_ids.codes, list(transform_ids.categories)
        if (codes < 0).any():
            raise KeyError("missing transform id")
    elif isinstance(transform_ids, str):
        codes, uniques = np.zeros((), dtype=np.int32), [transform_ids]
    else:
        ids = np.asarray(transform_ids, dtype=object)
        flat_codes, uniques = pd.factorize(ids.ravel())
        codes, uniques = flat_codes.reshape(ids.shape), list(uniques)
    shape_names = sorted({_CHANCE_SHAPE[t] for t in uniques if t in _CHANCE_SHAPE})
    shape_of_unique = np.array([shape_names.index(_CHANCE_SHAPE[t]) if t in _CHANCE_SHAPE else -1 for t in uniques], dtype=np.int32)
    ports = np.asarray(ports)
    if ports.dtype.kind not in "iu" or ports.dtype.itemsize > 4:
        ports = ports.astype(np.int64)
    codes, ports = np.broadcast_arrays(codes, ports)
    if codes.size == 0:
        return np.zeros(ports.shape, dtype=np.float64)
    flat_index = shape_of_unique[codes]  # int32: shape row, then row*65536 + port
    if (flat_index < 0).any():  # categories may list IP transforms; only ids actually used must have a model
        missing = sorted({uniques[i] for i in np.unique(codes[flat_index < 0])})
        raise KeyError(f"no port chance model for transforms {missing}")
    flat_index <<= 16
    valid = (ports >= 1) & (ports <= 65535)
    flat_index += np.where(valid, ports, 0).astype(np.int32, copy=False)  # port 0: chance 0 in every row
    table = np.concatenate([_shape_chance(name) for name in shape_names])
    return table[flat_index]


def ip_chance(transform_ids) -> np.ndarray:
    """P(f(uniform random A record) == a given IPv4) for IP transforms: all are bijections of 2^32, so 2^-32."""
    ids = np.asarray(transform_ids, dtype=object)
    unknown = set(pd.unique(ids.ravel())) - {t.id for t in TRANSFORMS.values() if t.output == "ip"}
    if unknown:
        raise KeyError(f"not IP transforms: {sorted(unknown)}")
    return np.full(ids.shape, 2.0**-32)


# --------------------------------------------------------------------------------------------
# IPv6 parsing (vectorised) and A-record IP transforms
# --------------------------------------------------------------------------------------------

_HEX_VALUE = np.full(256, 255, dtype=np.uint8)
for _ch in "0123456789":
    _HEX_VALUE[ord(_ch)] = int(_ch)
for _ch in "abcdef":
    _HEX_VALUE[ord(_ch)] = _HEX_VALUE[ord(_ch.upper())] = int(_ch, 16)


@functools.lru_cache(maxsize=1)
def _hex16_strings() -> pa.Array:
    return pa.array([f"{v:x}" for v in range(65536)], type=pa.string())


def _fixed_width_ascii(arr: pa.Array, width: int) -> np.ndarray:
    """Arrow strings all exactly ``width`` ASCII chars -> (n, width) uint8 codes."""
    joined = pc.binary_join_element_wise(arr, "")  # fresh contiguous buffer, no slicing offsets
    joined = pa.concat_arrays([joined]) if len(joined) else joined
    buffers = joined.buffers()
    if len(arr) == 0:
        return np.zeros((0, width), dtype=np.uint8)
    offsets = np.frombuffer(buffers[1], dtype=np.int32)[joined.offset : joined.offset + len(joined) + 1]
    data = np.frombuffer(buffers[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    return data.reshape(len(arr), width)


def parse_ipv6(answers) -> tuple[np.ndarray, np.ndarray]:
    """IPv6 text (compressed, full, or with a dotted IPv4 tail; no zone id) -> ((n,8) uint16 groups; valid)."""
    arr = pc.fill_null(_to_arrow_strings(answers), "")
    n = len(arr)
    groups = np.zeros((n, 8), dtype=np.uint16)
    # Rewrite a dotted IPv4 tail into two hex groups so one grammar remains.
    tail = pc.extract_regex(arr, r"^[0-9A-Fa-f:]*:(?P<v4>[0-9]+\.[0-9.]+)$")
    tail_text = pc.struct_field(tail, [0])
    has_tail = np.asarray(pc.is_valid(tail_text).to_numpy(zero_copy_only=False), dtype=bool)
    ok = np.ones(n, dtype=bool)
    if has_tail.any():
        v4_int, v4_ok = ipv4_to_int(tail_text.filter(pa.array(has_tail)))
        hex16 = _hex16_strings()
        tail_idx = np.flatnonzero(has_tail)
        ok[tail_idx[~v4_ok]] = False
        prefix = pc.replace_substring_regex(arr.filter(pa.array(has_tail)), r"[0-9.]+$", "")
        rewritten = pc.binary_join_element_wise(
            prefix, hex16.take(pa.array(v4_int >> 16)), pa.array([":"] * len(tail_idx)), hex16.take(pa.array(v4_int & 0xFFFF)), ""
        )
        full = np.asarray(arr.to_numpy(zero_copy_only=False), dtype=object)
        full[tail_idx] = np.asarray(rewritten.to_numpy(zero_copy_only=False), dtype=object)
        arr = pa.array(full, type=pa.string())
    shape_ok = pc.and_(
        pc.match_substring_regex(arr, r"^[0-9A-Fa-f:]+$"),
        pc.invert(pc.match_substring(arr, ":::")),
    )
    double = pc.count_substring(arr, "::")
    ok &= np.asarray(pc.and_(shape_ok, pc.less_equal(double, 1)).to_numpy(zero_copy_only=False), dtype=bool)
    ok &= np.asarray(pc.utf8_length(arr).to_numpy(zero_copy_only=False)) <= 39
    # Leading ':' must be '::' and so must a trailing ':'.
    ok &= ~np.asarray(pc.match_substring_regex(arr, r"^:[^:]|[^:]:$").to_numpy(zero_copy_only=False), dtype=bool)
    idx = np.flatnonzero(ok)
    if len(idx) == 0:
        return groups, ok
    sub = arr.take(pa.array(idx))
    halves = pc.split_pattern(sub, "::")
    n_halves = np.asarray(pc.list_value_length(halves).to_numpy(zero_copy_only=False))
    left = pc.list_element(halves, 0)
    right = _second(halves, n_halves)
    parts = []
    for side in (left, right):
        side = pc.if_else(pc.equal(pc.fill_null(side, ""), ""), pa.scalar(None, pa.string()), side)
        lists = pc.split_pattern(side, ":")
        lengths = np.asarray(pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False), dtype=np.int64)
        flat = pc.list_flatten(lists)
        parts.append((lengths, flat))
    (nl, left_flat), (nr, right_flat) = parts
    count_ok = np.where(n_halves == 2, nl + nr <= 7, nl == 8)
    flat_all = pa.concat_arrays([left_flat, right_flat])
    group_len = np.asarray(pc.utf8_length(flat_all).to_numpy(zero_copy_only=False))
    owner = np.concatenate([np.repeat(np.arange(len(idx)), nl), np.repeat(np.arange(len(idx)), nr)])
    bad_group = np.zeros(len(idx), dtype=bool)
    np.logical_or.at(bad_group, owner, (group_len < 1) | (group_len > 4))
    good = count_ok & ~bad_group
    keep_group = good[owner]
    padded = pc.utf8_lpad(flat_all.filter(pa.array(keep_group)), 4, "0")
    digits = _HEX_VALUE[_fixed_width_ascii(padded, 4)].astype(np.uint16)
    values = (digits[:, 0] << 12) | (digits[:, 1] << 8) | (digits[:, 2] << 4) | digits[:, 3]
    # position of each group: left groups count up from 0, right groups end at 7
    pos_left = np.arange(nl.sum()) - np.repeat(np.cumsum(nl) - nl, nl)
    pos_right = 8 - np.repeat(nr, nr) + (np.arange(nr.sum()) - np.repeat(np.cumsum(nr) - nr, nr))
    pos = np.concatenate([pos_left, pos_right])[keep_group]
    rows = idx[owner[keep_group]]
    groups[rows, pos] = values
    ok[idx[~good]] = False
    groups[~ok] = 0
    return groups, ok


def _second(halves: pa.Array, n_halves: np.ndarray) -> pa.Array:
    """Second element of 1- or 2-element lists (null where absent)."""
    padded = pc.list_slice(halves, 1, 2)
    flat = pc.list_flatten(padded)
    out = np.full(len(halves), None, dtype=object)
    out[n_halves == 2] = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=object)
    return pa.array(out, type=pa.string())


def _nymaim2_forward(little_endian: np.ndarray) -> np.ndarray:
    v = little_endian.astype(np.uint32)
    for _ in range(NYMAIM2_ROUNDS):
        v = ((v ^ np.uint32(NYMAIM2_XOR1)) - np.uint32(NYMAIM2_SUB)) ^ np.uint32(NYMAIM2_XOR2)
    return v


def _nymaim2_inverse(little_endian: np.ndarray) -> np.ndarray:
    v = little_endian.astype(np.uint32)
    for _ in range(NYMAIM2_ROUNDS):
        v = ((v ^ np.uint32(NYMAIM2_XOR2)) + np.uint32(NYMAIM2_SUB)) ^ np.uint32(NYMAIM2_XOR1)
    return v


def _byteswap32(v: np.ndarray) -> np.ndarray:
    return v.astype(np.uint32).byteswap()


def checksum_rows(words: np.ndarray, group: np.ndarray, min_records: int = 3) -> np.ndarray:
    """P10 checksum record (Nymaim): True where a row's 32-bit word equals the sum of the other words
    of its group (one DNS response) mod 2^32, in groups of at least `min_records` rows."""
    words, group = np.asarray(words, dtype=np.uint64), np.asarray(group)
    out = np.zeros(len(words), dtype=bool)
    if not len(words):
        return out
    order = np.argsort(group, kind="stable")
    g, w = group[order], words[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    sizes = np.diff(np.r_[starts, len(g)])
    total = np.repeat(np.add.reduceat(w, starts) % 2**32, sizes)  # < 2^64 for < 2^32 rows
    out[order] = ((2 * w) % 2**32 == total) & (np.repeat(sizes, sizes) >= min_records)
    return out


def a_checksum_rows(octets: np.ndarray, group: np.ndarray) -> np.ndarray:
    """P10 on A records: the checksum over the raw addresses (N) or over their Nymaim2 decodings."""
    little = _byteswap32(octets_to_int(octets))
    return checksum_rows(octets_to_int(octets), group) | checksum_rows(_nymaim2_forward(little), group)


def a_record_ips(octets: np.ndarray) -> np.ndarray:
    """(n,4) octets -> (n, len(A_IP_TRANSFORMS)) uint32 network-order IPs in A_IP_TRANSFORMS order."""
    octets = np.asarray(octets, dtype=np.uint8).reshape(-1, 4)
    out = np.empty((len(A_IP_TRANSFORMS), len(octets)), dtype=np.uint32)
    out[0] = octets_to_int(octets[:, ::-1])
    for j, perm in enumerate(_PERMUTATIONS, start=1):
        out[j] = octets_to_int(octets[:, list(perm)])
    little = octets_to_int(octets[:, ::-1])  # L: a is the low byte
    # result v is written back little-endian, i.e. its low byte becomes the first dotted octet
    out[len(_PERMUTATIONS) + 1] = _byteswap32(_nymaim2_forward(little))
    out[len(_PERMUTATIONS) + 2] = _byteswap32(_nymaim2_inverse(little))
    return out.T


def ip_keys(answer_int: np.ndarray, dst_int: np.ndarray) -> dict[str, np.ndarray]:
    """Keys that stay constant across answers if dst = answer XOR K or answer + K (I2, I3)."""
    a = np.asarray(answer_int).astype(np.uint32)
    d = np.asarray(dst_int).astype(np.uint32)
    return {"I2_xor": a ^ d, "I3_add": d - a}  # uint32 arithmetic wraps mod 2^32


def port_keys(base_port: np.ndarray, dst_port: np.ndarray) -> dict[str, np.ndarray]:
    """Keys that stay constant across answers if port = base XOR K or base + K (P9); -1 where a port is invalid."""
    b = np.asarray(base_port).astype(np.int64)
    p = np.asarray(dst_port).astype(np.int64)
    ok = (b >= 0) & (b <= 65535) & (p >= 0) & (p <= 65535)
    return {
        "P9_xor": np.where(ok, p ^ b, -1).astype(np.int32),
        "P9_add": np.where(ok, (p - b) % 65536, -1).astype(np.int32),
    }


# --------------------------------------------------------------------------------------------
# Text rules (TXT / CNAME), SRV, SVCB/HTTPS, MX
# --------------------------------------------------------------------------------------------

# Ports in text: only these rules, so SPF/DKIM/DMARC text does not spray junk numbers.
TEXT_PORT_PATTERNS: dict[str, str] = {
    # host:port / ip:port / URL authority; host has a letter or a dot; not part of an IPv6 literal or "ip4:1.2..."
    "host_port": r"(?<![\w.:\-\[])(?=[\w.\-]*[A-Za-z_.][\w.\-]*:)[\w.\-]+:(?P<port>\d{1,5})(?![\w.:])",
    "v6_port": r"\[[0-9A-Fa-f:.]+\]:(?P<port>\d{1,5})(?![\w.:])",
    "key_value": r"(?i)(?<![\w\-])(?:p|port)\s*[=:]\s*\"?(?P<port>\d{1,5})(?![\w.:])",
    # a whole token of digits: not inside a word, an IP, a CIDR suffix, a key=value or a signed number
    "standalone": r"(?<![\w.:=/\-+@#%$])(?P<port>\d{1,5})(?![\w.:=\-+%])",
}
_TEXT_IPV4 = rf"(?<![\w.])(?P<ip>{_IPV4_OCTET}\.{_IPV4_OCTET}\.{_IPV4_OCTET}\.{_IPV4_OCTET})(?![\w]|\.\d)"
_TEXT_IPV6 = r"(?:(?<=ip6:)|(?<![\w:.]))(?P<ip>[0-9A-Fa-f]{0,4}:[0-9A-Fa-f:]*:[0-9A-Fa-f.]*)"
_B64_TOKEN = r"(?<![A-Za-z0-9+/_\-])(?P<tok>[A-Za-z0-9+/_\-]{6,}={0,2})(?![A-Za-z0-9+/=_\-])"
_HEX_TOKEN = r"(?<![0-9A-Fa-f])(?P<tok>(?:[0-9A-Fa-f]{2}){4,})(?![0-9A-Fa-f])"
_ZEEK_TXT_PREFIX = r"^TXT\s+\d+\s+"  # Zeek logs TXT rdata as "TXT <len> <text>"
_SRV = r"^\s*(?P<prio>\d{1,5})\s+(?P<weight>\d{1,5})\s+(?P<port>\d{1,5})\s+\S+\s*$"
_SVCB_PORT = r"(?i)(?<![\w\-])port\s*=\s*\"?(?P<port>\d{1,5})(?![\w.])"
_MX = r"^\s*(?P<port>\d{1,5})\s+\S+\s*$"
_PRINTABLE = re.compile(rb"^[\x20-\x7e\t\r\n]+$")


def _texts(texts: pa.Array, rows: np.ndarray) -> tuple[list, list]:
    """(rows, texts) as Python lists, Zeek's "TXT <len> " prefix removed. The text rules run once per
    distinct answer value, with `re` directly: few texts per batch, where pandas' per-call set-up
    cost ~1000x more than the matching."""
    return list(rows), pc.replace_substring_regex(pc.fill_null(texts, ""), _ZEEK_TXT_PREFIX, "").to_pylist()


@functools.lru_cache(maxsize=None)
def _regex(pattern: str) -> re.Pattern:
    return re.compile(pattern)


def _matches(rows: list, texts: list, pattern: str, group: str) -> tuple[list, list]:
    """Every match of ``group`` in each text, with its row (one entry per match, as
    `Series.str.extractall` finds them)."""
    finditer = _regex(pattern).finditer
    found_rows, found = [], []
    for row, text in zip(rows, texts):
        for match in finditer(text):
            found_rows.append(row)
            found.append(match.group(group))
    return found_rows, found


def _decode_token(token: str, kind: str) -> str | None:
    try:
        if kind == "hex":
            raw = binascii.unhexlify(token)
        else:
            padded = token + "=" * (-len(token) % 4)
            raw = base64.urlsafe_b64decode(padded) if ("-" in token or "_" in token) else base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.decode("ascii") if len(raw) >= 4 and _PRINTABLE.match(raw) else None


def _decoded_texts(rows: list, texts: list, kind: str) -> tuple[list, list]:
    """Printable decodings of base64 or hex tokens in each text, with the owning row; one decoding per
    distinct token."""
    token_rows, tokens = _matches(rows, texts, _HEX_TOKEN if kind == "hex" else _B64_TOKEN, "tok")
    decoded = {t: _decode_token(t, kind) for t in set(tokens)}
    kept = [(row, decoded[t]) for row, t in zip(token_rows, tokens) if decoded[t] is not None]
    return [row for row, _ in kept], [text for _, text in kept]


def _first_seen(pairs) -> list:
    """The distinct pairs, in order of first appearance (`drop_duplicates`)."""
    return list(dict.fromkeys(pairs))


def _ports_from_text(rows: list, texts: list) -> tuple[np.ndarray, np.ndarray]:
    """(rows, ports) found by the TEXT_PORT_PATTERNS, in pattern then row order, ports in 1..65535,
    each (row, port) once."""
    pairs = []
    for pattern in TEXT_PORT_PATTERNS.values():
        found_rows, found = _matches(rows, texts, pattern, "port")
        pairs += [(row, int(port)) for row, port in zip(found_rows, found) if 1 <= int(port) <= 65535]
    pairs = _first_seen(pairs)
    return np.asarray([r for r, _ in pairs], dtype=np.int64), np.asarray([p for _, p in pairs], dtype=np.int64)


def _text_port_frames(texts: pa.Array, rows: np.ndarray) -> list[pd.DataFrame]:
    rows, texts = _texts(texts, rows)
    frames = []
    for tid, (r, t) in (("P12_txt", (rows, texts)), ("P12_txt_b64", _decoded_texts(rows, texts, "b64")),
                        ("P12_txt_hex", _decoded_texts(rows, texts, "hex"))):
        found_rows, ports = _ports_from_text(r, t)
        frames.append(_port_frame(found_rows, np.full(len(ports), _TRANSFORM_IDS.index(tid)), ports))
    return frames


def _field_port_frame(texts: pa.Array, rows: np.ndarray, pattern: str, tid: str) -> pd.DataFrame:
    rows, texts = _texts(texts, rows)
    search = _regex(pattern).search   # the first match per text, as `Series.str.extract`
    matches = [(row, search(text)) for row, text in zip(rows, texts)]
    found = [(row, int(m.group("port"))) for row, m in matches if m is not None]
    at = np.asarray([row for row, _ in found], dtype=np.int64)
    ports = np.asarray([port for _, port in found], dtype=np.int64)
    keep = (ports >= 1) & (ports <= 65535)
    return _port_frame(at[keep], np.full(keep.sum(), _TRANSFORM_IDS.index(tid)), ports[keep])


def _ips_from_text(rows: list, texts: list) -> tuple[np.ndarray, np.ndarray]:
    """(rows, IPs) of the IPv4 then IPv6 literals in each text (IPv6 in RFC 5952 form), each
    (row, ip) once."""
    v4_rows, v4 = _matches(rows, texts, _TEXT_IPV4, "ip")
    v6_rows, v6 = _matches(rows, texts, _TEXT_IPV6, "ip")
    pairs = list(zip(v4_rows, v4))
    if v6:
        groups, ok = parse_ipv6(pd.Series(v6, dtype="str"))
        pairs += list(zip(np.asarray(v6_rows, dtype=np.int64)[ok].tolist(), _format_ipv6(groups[ok]).tolist()))
    pairs = _first_seen(pairs)
    return np.asarray([r for r, _ in pairs], dtype=np.int64), np.asarray([ip for _, ip in pairs], dtype=object)


def _format_ipv6(groups: np.ndarray) -> np.ndarray:
    """(n,8) uint16 -> RFC 5952 text (lowercase, longest run of >=2 zero groups compressed); per distinct value."""
    import ipaddress

    if len(groups) == 0:
        return np.empty(0, dtype=object)
    as_bytes = groups.astype(">u2").tobytes()
    values = [as_bytes[i * 16 : (i + 1) * 16] for i in range(len(groups))]
    cache: dict[bytes, str] = {}
    return np.array([cache.setdefault(v, str(ipaddress.IPv6Address(v))) for v in values], dtype=object)


# --------------------------------------------------------------------------------------------
# derive_ports / derive_ips
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def transform_dtype() -> pd.CategoricalDtype:
    """The categorical dtype of transform ids, codes = positions in TRANSFORM_IDS (what
    `derive_ports`/`derive_ips` return and `port_chance` takes)."""
    return pd.CategoricalDtype(categories=pd.Index(_TRANSFORM_IDS, dtype="str"))


def _port_frame(rows: np.ndarray, tcodes: np.ndarray, ports: np.ndarray) -> pd.DataFrame:
    codes = np.asarray(tcodes, dtype=np.int16)  # always built from _TRANSFORM_IDS positions
    return pd.DataFrame(
        {
            "row": np.asarray(rows, dtype=np.int64),
            "transform": pd.Categorical.from_codes(codes, dtype=transform_dtype(), validate=False),
            "port": np.asarray(ports, dtype=np.int32),
        },
        copy=False,
    )


def _ip_frame(rows: np.ndarray, tcodes: np.ndarray, ips) -> pd.DataFrame:
    codes = np.asarray(tcodes, dtype=np.int16)
    ip_values = ips if isinstance(ips, pa.Array) else pa.array(np.asarray(ips, dtype=object), type=pa.string())
    return pd.DataFrame(
        {
            "row": np.asarray(rows, dtype=np.int64),
            "transform": pd.Categorical.from_codes(codes, dtype=transform_dtype(), validate=False),
            "ip": pd.array(ip_values, dtype="str"),
        },
        copy=False,
    )


A_PORT_CODES = transform_codes([t.id for t in A_PORT_TRANSFORMS])
A_IP_CODES = transform_codes([t.id for t in A_IP_TRANSFORMS])   # the columns of a_record_ips
_P11_GROUP_CODES = transform_codes([f"P11_g{i}" for i in range(8)])
_P11_V4_CODES = transform_codes([f"P11_v4_{b}" for b in _P11_V4_BASES])


def _a_ports_long(rows: np.ndarray, octets: np.ndarray) -> pd.DataFrame:
    ports = np.ascontiguousarray(a_record_ports(octets))  # row-major: output ordered by (row, transform)
    hit = ports >= 0
    # boolean compress + repeat instead of nonzero/divmod: ~3x faster at ~85 rows per answer
    return _port_frame(
        np.repeat(rows, hit.sum(axis=1)), np.broadcast_to(A_PORT_CODES, ports.shape)[hit], ports[hit]
    )


def _aaaa_embedded_octets(groups: np.ndarray) -> np.ndarray:
    h6, h7 = groups[:, 6].astype(np.uint32), groups[:, 7].astype(np.uint32)
    return np.stack([h6 >> 8, h6 & 0xFF, h7 >> 8, h7 & 0xFF], axis=1).astype(np.uint8)


def _aaaa_ports_long(rows: np.ndarray, groups: np.ndarray) -> pd.DataFrame:
    o = _octet_dict(_aaaa_embedded_octets(groups))
    v4 = np.stack([_A_PORT_FUNCS[b](o) for b in _P11_V4_BASES], axis=1)
    ports = np.concatenate([groups.astype(np.int64), v4], axis=1)
    codes = np.concatenate([_P11_GROUP_CODES, _P11_V4_CODES])
    r, j = np.nonzero((ports >= 1) & (ports <= 65535))
    return _port_frame(rows[r], codes[j], ports[r, j])


def _split_by_rtype(rtype, answer):
    answers = _to_arrow_strings(answer)
    n = len(answers)
    rtypes = _broadcast_rtypes(rtype, n)
    for rt in pd.unique(rtypes):
        rows = np.flatnonzero(rtypes == rt)
        yield rt, rows, (answers.take(pa.array(rows)) if len(rows) != n else answers)


def _finish(frames: list[pd.DataFrame], empty: pd.DataFrame) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    if not frames:
        return empty
    if len(frames) == 1:
        return frames[0].reset_index(drop=True)
    out = pd.concat(frames, ignore_index=True)
    return out.sort_values(["row", "transform"], kind="stable", ignore_index=True)


def derive_ports(rtype, answer) -> pd.DataFrame:
    """Long form (row, transform, port) of every candidate port derived from each answer.

    ``rtype`` is one record type for all answers or one per answer (case-insensitive). ``row`` indexes the
    inputs; ``transform`` is a categorical of str ids (categories = all of TRANSFORMS, so ~90 rows per A answer
    stay cheap); ``port`` is int32 in 1..65535. Invalid or unsupported answers yield no rows and never raise.
    """
    frames = []
    for rt, rows, sub in _split_by_rtype(rtype, answer):
        if rt == "A":
            octets, valid = parse_ipv4(sub)
            frames.append(_a_ports_long(rows[valid], octets[valid]))
        elif rt == "AAAA":
            groups, valid = parse_ipv6(sub)
            frames.append(_aaaa_ports_long(rows[valid], groups[valid]))
        elif rt in ("TXT", "CNAME"):
            frames.extend(_text_port_frames(sub, rows))
        elif rt == "SRV":
            frames.append(_field_port_frame(sub, rows, _SRV, "P12_srv"))
        elif rt in ("SVCB", "HTTPS"):
            frames.append(_field_port_frame(sub, rows, _SVCB_PORT, "P12_svcb"))
        elif rt == "MX":
            frames.append(_field_port_frame(sub, rows, _MX, "P12_mx"))
    return _finish(frames, _port_frame(np.empty(0), np.empty(0), np.empty(0)))


def derive_ips(rtype, answer) -> pd.DataFrame:
    """Long form (row, transform, ip) of candidate C2 IPs derived from each answer (IPv4 dotted, IPv6 RFC 5952).

    A: I1, I4 (22 permutations), I5 Nymaim2 forward/inverse, omitting results equal to the answer itself;
    AAAA: I8 embedded IPv4 (h6:h7); TXT/CNAME: I7 literals in the text and in decoded base64/hex tokens.
    """
    frames = []
    for rt, rows, sub in _split_by_rtype(rtype, answer):
        if rt == "A":
            octets, valid = parse_ipv4(sub)
            ips = np.ascontiguousarray(a_record_ips(octets[valid]))
            keep = ips != octets_to_int(octets[valid])[:, None]
            frames.append(
                _ip_frame(
                    np.repeat(rows[valid], keep.sum(axis=1)),
                    np.broadcast_to(A_IP_CODES, ips.shape)[keep],
                    _octets_to_arrow(_int_to_octets(ips[keep])),
                )
            )
        elif rt == "AAAA":
            groups, valid = parse_ipv6(sub)
            frames.append(
                _ip_frame(rows[valid], np.full(valid.sum(), _TRANSFORM_IDS.index("I8_aaaa_v4")), _octets_to_arrow(_aaaa_embedded_octets(groups[valid])))
            )
        elif rt in ("TXT", "CNAME"):
            text_rows, texts = _texts(sub, rows)
            for tid, (r, t) in (("I7_txt", (text_rows, texts)), ("I7_txt_b64", _decoded_texts(text_rows, texts, "b64")),
                                ("I7_txt_hex", _decoded_texts(text_rows, texts, "hex"))):
                found_rows, ips = _ips_from_text(r, t)
                frames.append(_ip_frame(found_rows, np.full(len(ips), _TRANSFORM_IDS.index(tid)), ips))
    return _finish(frames, _ip_frame(np.empty(0), np.empty(0), np.empty(0, dtype=object)))


# --------------------------------------------------------------------------------------------
# Explanations
# --------------------------------------------------------------------------------------------

_LETTER = re.compile(r"\b[abcd]\b")


def _a_formula_text(t: Transform, octets: np.ndarray) -> str:
    values = {k: int(v[0]) for k, v in _octet_dict(octets).items()}
    f = _OCTET_FORMULAS[t.id]
    if f.word is not None:
        return f.formula.replace(f.word, f"0x{values[f.word]:08X}")
    return _LETTER.sub(lambda m: str(values[m.group(0)]), f.formula)


@functools.lru_cache(maxsize=65_536)
def describe(transform_id: str, answer: str, port_or_ip) -> str:
    """Human text for an explanation, e.g. describe("P1", "19.57.34.8", 1117) -> "1117 = 19*57+34 (APT12 a*b+c)".

    When the transform does not give ``port_or_ip`` for this answer the text says so instead of "=".
    Memoised: explanations repeat the same (transform, answer, port) many times.
    """
    t = TRANSFORMS[transform_id]
    rtype = t.rtypes[0]
    if transform_id in _A_PORT_INDEX:  # the bulk: one column of a_record_ports, no long frame
        octets = _ipv4_octets(answer)
        port = int(a_record_ports(octets)[0, _A_PORT_INDEX[transform_id]]) if octets is not None else -1
        got = [port] if port >= 1 else []
    elif t.output == "port" and transform_id not in KEYED_TRANSFORMS:
        derived = derive_ports(rtype, [answer])
        got = derived.loc[derived["transform"] == transform_id, "port"].astype(int).tolist()
    elif t.output == "ip" and transform_id not in KEYED_TRANSFORMS:
        derived = derive_ips(rtype, [answer])
        got = derived.loc[derived["transform"] == transform_id, "ip"].tolist()
    else:
        return f"{port_or_ip} from {answer!r} via {t.formula} ({t.name})"
    target = int(port_or_ip) if t.output == "port" else str(port_or_ip)
    matched = target in got
    if transform_id in _OCTET_FORMULAS:
        if not _OCTET_FORMULAS[transform_id].embedded:
            octets = _ipv4_octets(answer)
            valid = [octets is not None]
            where = ""
        else:
            groups, valid = parse_ipv6([answer])
            octets = _aaaa_embedded_octets(groups)
            where = f" on embedded IPv4 {_octets_to_strings(octets)[0]}"
        if not valid[0]:
            return f"{port_or_ip}: {answer!r} is not an {rtype} answer ({t.name})"
        text = _a_formula_text(t, octets)
        if matched:
            return f"{port_or_ip} = {text}{where} ({t.name})"
        actual = got[0] if got else "no valid port"
        return f"{port_or_ip} != {text} = {actual}{where} ({t.name})"
    if transform_id.startswith("P11_g"):
        verb = "=" if matched else "!="
        return f"{port_or_ip} {verb} {t.formula} of {answer} ({t.name})"
    if t.output == "ip" and rtype == "A":
        verb = "=" if matched else "!="
        return f"{port_or_ip} {verb} {t.formula} of {answer} ({t.name})"
    verb = "found" if matched else "not found"
    return f"{port_or_ip} {verb} in {rtype} answer {answer!r} via {t.formula} ({t.name})"
