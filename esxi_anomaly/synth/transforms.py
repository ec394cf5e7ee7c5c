"""The attack families' DNS-answer transforms (ports and IPs), vectorised over uint32 A records.

These are the generator's own definitions; the detector has its own library in
`esxi_anomaly.features.transforms`, and the tests check these against independent code.
"""
from __future__ import annotations

import numpy as np

MASK32 = 0xFFFFFFFF
NYMAIM_XOR1, NYMAIM_SUB, NYMAIM_XOR2, NYMAIM_ROUNDS = 0x87568289, 0x78643587, 0x18482642, 16


def apt12_port(ip: np.ndarray) -> np.ndarray:
    """APT12 / DNSCALC (threat-notes P1): a*b + c of the A record a.b.c.d."""
    v = np.asarray(ip, dtype=np.int64)
    return ((v >> 24) & 255) * ((v >> 16) & 255) + ((v >> 8) & 255)


def low16_port(ip: np.ndarray) -> np.ndarray:
    """P3: c*256 + d, the low 16 bits of the address in network order."""
    return np.asarray(ip, dtype=np.int64) & 0xFFFF


def xor_key_port(ip: np.ndarray, key: int) -> np.ndarray:
    """P9 keyed: (c*256 + d) XOR K."""
    return low16_port(ip) ^ int(key)


def offset_key_port(ip: np.ndarray, key: int) -> np.ndarray:
    """P9 additive: (c*256 + d + K) mod 65536."""
    return (low16_port(ip) + int(key)) % 65536


def _bswap32(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.uint64)
    return (((v & 0xFF) << 24) | (((v >> 8) & 0xFF) << 16) | (((v >> 16) & 0xFF) << 8) | ((v >> 24) & 0xFF))


def nymaim_ip(ip: np.ndarray) -> np.ndarray:
    """Nymaim2 IP transform (threat-notes §1.4, §5.2 I5) of network-order uint32 addresses.

    The A record is read little-endian, 16 rounds of xor/subtract/xor are applied, and the result is
    written back little-endian.
    """
    v = _bswap32(ip)
    for _ in range(NYMAIM_ROUNDS):
        v = v ^ np.uint64(NYMAIM_XOR1)
        v = (v - np.uint64(NYMAIM_SUB)) & np.uint64(MASK32)
        v = v ^ np.uint64(NYMAIM_XOR2)
    return _bswap32(v).astype(np.uint32)
