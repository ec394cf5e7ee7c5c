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


def _octets_to_int(octets: np.ndarray) -> np.ndarray:
    o = octets.astype(np.uint32)
    return (o[:, 0] << 24) | (o[:, 1] << 16) | (o[:, 2] << 8) | o[:, 3]


def _int_to_octets(values: np.ndarray) -> np.ndarray:
    v = np.asarray(values).astype(np.uint32)
    return np.stack([(v >> 24) & 0xFF, (v >> 16) & 0xFF, (v >> 8) & 0xFF, v & 0xFF], axis=1).astype(np.uint8)


def ipv4_to_int(answers) -> tuple[np.ndarray, np.ndarray]:
    """Dotted quads -> (uint32 network-order N, valid mask); invalid rows are 0."""
    octets, valid = parse_ipv4(answers)
    return _octets_to_int(octets), valid


def _octets_to_strings(octets: np.ndarray) -> np.ndarray:
    cols = [pc.cast(pa.array(octets[:, i]), pa.string()) for i in range(4)]
    return np.asarray(pc.binary_join_element_wise(*cols, ".").to_numpy(zero_copy_only=False), dtype=object)


def int_to_ipv4(values: np.ndarray) -> np.ndarray:
    """uint32 network-order values -> dotted strings (object array)."""
    return _octets_to_strings(_int_to_octets(values))


# --------------------------------------------------------------------------------------------
# A-record port transforms (P1-P8): definitions, fixed column order
# --------------------------------------------------------------------------------------------

_A = ("A",)
_AAAA = ("AAAA",)
_TEXT = ("TXT", "CNAME")

# id -> vectorised function over a dict of int64 arrays {a,b,c,d,N,L}
_A_PORT_FUNCS: dict[str, Callable[[dict], np.ndarray]] = {}
# id -> chance "shape": octets are iid uniform, so the output distribution depends only on the formula shape
_CHANCE_SHAPE: dict[str, str] = {}
# id -> formula string over a,b,c,d (or N/L windows) used by describe()
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
    o = octets.astype(np.int64)
    a, b, c, d = o[:, 0], o[:, 1], o[:, 2], o[:, 3]
    return {"a": a, "b": b, "c": c, "d": d, "N": (a << 24) | (b << 16) | (c << 8) | d, "L": (d << 24) | (c << 16) | (b << 8) | a}


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
        v = _A_PORT_FUNCS[t.id](o)
        out[j] = np.where((v >= 1) & (v <= 65535), v, -1)
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
    """
    ids = np.asarray(transform_ids, dtype=object)
    ports = np.asarray(ports, dtype=np.int64)
    ids, ports = np.broadcast_arrays(ids, ports)
    out = np.zeros(ids.shape, dtype=np.float64)
    in_range = (ports >= 1) & (ports <= 65535)
    safe_ports = np.where(in_range, ports, 0)
    codes, uniques = pd.factorize(ids.ravel())
    codes = codes.reshape(ids.shape)
    for code, tid in enumerate(uniques):  # loop over distinct ids only
        sel = codes == code
        out[sel] = chance_vector(tid)[safe_ports[sel]]
    return np.where(in_range, out, 0.0)


def ip_chance(transform_ids) -> np.ndarray:
    """P(f(uniform random A record) == a given IPv4) for IP transforms: all are bijections of 2^32, so 2^-32."""
    ids = np.asarray(transform_ids, dtype=object)
    unknown = set(pd.unique(ids.ravel())) - {t.id for t in TRANSFORMS.values() if t.output == "ip"}
    if unknown:
        raise KeyError(f"not IP transforms: {sorted(unknown)}")
    return np.full(ids.shape, 2.0**-32)


# --------------------------------------------------------------------------------------------
# derive_ports / derive_ips
# --------------------------------------------------------------------------------------------

_PORT_COLUMNS = {"row": np.int64, "port": np.int32}


def _transform_dtype() -> pd.CategoricalDtype:
    return pd.CategoricalDtype(categories=pd.Index(_TRANSFORM_IDS, dtype="str"))


def _port_frame(rows: np.ndarray, transform_codes: np.ndarray, ports: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "row": np.asarray(rows, dtype=np.int64),
            "transform": pd.Categorical.from_codes(np.asarray(transform_codes, dtype=np.int16), dtype=_transform_dtype()),
            "port": np.asarray(ports, dtype=np.int32),
        }
    )


def _codes_for(ids) -> np.ndarray:
    return np.array([_TRANSFORM_IDS.index(t) for t in ids], dtype=np.int16)


_A_PORT_CODES = _codes_for([t.id for t in A_PORT_TRANSFORMS])


def _a_ports_long(rows: np.ndarray, octets: np.ndarray) -> pd.DataFrame:
    ports = a_record_ports(octets)
    r, j = np.nonzero(ports >= 0)
    return _port_frame(rows[r], _A_PORT_CODES[j], ports[r, j])


def derive_ports(rtype, answer) -> pd.DataFrame:
    """Long form (row, transform, port) of every candidate port derived from each answer.

    ``rtype`` is one record type for all answers or one per answer. ``transform`` is a categorical of str
    ids (all of TRANSFORMS as categories: cheap at ~90 rows per A answer). Invalid answers yield no rows.
    """
    answers = _to_arrow_strings(answer)
    n = len(answers)
    rtypes = _broadcast_rtypes(rtype, n)
    frames = []
    for rt in pd.unique(rtypes):
        rows = np.flatnonzero(rtypes == rt)
        sub = answers.take(pa.array(rows)) if len(rows) != n else answers
        if rt == "A":
            octets, valid = parse_ipv4(sub)
            frames.append(_a_ports_long(rows[valid], octets[valid]))
    frames = [f for f in frames if len(f)]
    if not frames:
        return _port_frame(np.empty(0), np.empty(0), np.empty(0))
    out = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    if len(frames) > 1:
        out = out.sort_values("row", kind="stable", ignore_index=True)
    return out


# --------------------------------------------------------------------------------------------
# Explanations
# --------------------------------------------------------------------------------------------

_LETTER = re.compile(r"\b[abcd]\b")


def describe(transform_id: str, answer: str, port_or_ip) -> str:
    """Human text for an explanation, e.g. describe("P1", "19.57.34.8", 1117) -> "1117 = 19*57+34 (APT12 a*b+c)"."""
    t = TRANSFORMS[transform_id]
    if transform_id in _A_PORT_INDEX:
        octets, valid = parse_ipv4([answer])
        if not valid[0]:
            return f"{port_or_ip}: {answer!r} is not an IPv4 answer ({t.name})"
        o = _octet_dict(octets)
        values = {k: int(v[0]) for k, v in o.items()}
        if transform_id.startswith("P7_"):
            word = "N" if "_be_" in transform_id else "L"
            text = t.formula.replace(word, f"0x{values[word]:08X}")
        else:
            text = _LETTER.sub(lambda m: str(values[m.group(0)]), t.formula)
        actual = int(a_record_ports(octets)[0, _A_PORT_INDEX[transform_id]])
        sign = "=" if actual == int(port_or_ip) else "!="
        suffix = "" if sign == "=" else f" = {actual}"
        return f"{port_or_ip} {sign} {text}{suffix} ({t.name})"
    return f"{port_or_ip} from {answer!r} via {t.formula} ({t.name})"
