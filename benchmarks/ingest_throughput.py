"""Ingest throughput: rows/s of the readers on large synthetic logs, against pyarrow's floor.

Generates (into a temporary folder, deleted afterwards) a Zeek TSV conn.log of 2M rows and a
dns.log of 1M responses, plain and gzip, then times `read_connections` / `read_dns` (the full
shared API: sniffing, streaming, conversion, concatenation and the sort by ts) and the bare
`pyarrow.csv.read_csv` on the same plain file (parse only, no conversion) as the floor.

    .venv/bin/python benchmarks/ingest_throughput.py [--conn-rows N] [--dns-rows N] [--only NAME...]

Wall time depends on what else runs on the machine; CPU time (all threads) is printed too.
To add a reader (e.g. NSX DFW): write a generator `def make_x(folder, rows) -> path` and append a
`Case` to CASES (section "Cases" below); nothing else changes.
"""
from __future__ import annotations

import argparse
import gzip
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from esxi_anomaly.ingest import Quarantine, read_connections, read_dns  # noqa: E402

CONN_FIELDS = ("ts uid id.orig_h id.orig_p id.resp_h id.resp_p proto service duration orig_bytes resp_bytes "
               "conn_state local_orig local_resp missed_bytes history orig_pkts orig_ip_bytes resp_pkts "
               "resp_ip_bytes tunnel_parents").split()
CONN_TYPES = ("time string addr port addr port enum string interval count count string bool bool count string "
              "count count count count set[string]").split()
DNS_FIELDS = ("ts uid id.orig_h id.orig_p id.resp_h id.resp_p proto trans_id rtt query qclass qclass_name qtype "
              "qtype_name rcode rcode_name AA TC RD RA Z answers TTLs rejected").split()
DNS_TYPES = ("time string addr port addr port enum count interval string count string count string count string "
             "bool bool bool bool count vector[string] vector[interval] bool").split()


# --- synthetic Zeek logs (vectorised: seconds for millions of rows) -------------------------

def _header(path: str, fields, types) -> bytes:
    lines = ["#separator \\x09", "#set_separator\t,", "#empty_field\t(empty)", "#unset_field\t-",
             f"#path\t{path}", "#open\t2024-04-12-19-29-12", "#fields\t" + "\t".join(fields),
             "#types\t" + "\t".join(types)]
    return ("\n".join(lines) + "\n").encode()


def _join(*parts, sep=""):
    return pc.binary_join_element_wise(*parts, sep)


def _num(values) -> pa.Array:
    return pc.cast(pa.array(values), pa.string())


def _fixed(values: np.ndarray, decimals: int) -> pa.Array:
    """Zeek's fixed-decimal text for floats ("%.6f"), vectorised via integer parts."""
    scale = 10 ** decimals
    whole = np.floor(values).astype(np.int64)
    frac = np.round((values - whole) * scale).astype(np.int64)
    carry = frac >= scale
    whole, frac = whole + carry, np.where(carry, 0, frac)
    return _join(_num(whole), pc.utf8_lpad(_num(frac), decimals, "0"), sep=".")


def _ip(prefix: str, rng, n: int, lo=1, hi=254) -> pa.Array:
    return _join(pa.array(np.full(n, prefix)), _num(rng.integers(lo, hi, n)), sep="")


def _uid(letter: str, n: int) -> pa.Array:
    return _join(pa.array(np.full(n, letter)), pc.utf8_lpad(_num(np.arange(n)), 17, "0"), sep="")


def _write_tsv(path: str, header: bytes, columns: dict) -> None:
    table = pa.table(columns)
    with open(path, "wb") as fh:
        fh.write(header)
        sink = pa.PythonFile(fh, mode="w")   # not closed here: closing it would close fh
        pacsv.write_csv(table, sink, pacsv.WriteOptions(include_header=False, delimiter="\t",
                                                        quoting_style="none"))
        sink.flush()
        fh.write(b"#close\t2024-04-12-20-29-12\n")


def make_zeek_conn(folder: str, rows: int, seed: int = 1) -> str:
    rng = np.random.default_rng(seed)
    n = rows
    const = lambda v: pa.array(np.full(n, v))  # noqa: E731
    proto = np.where(rng.random(n) < 0.8, "tcp", "udp")
    cols = {
        "ts": _fixed(1_700_000_000 + np.sort(rng.random(n)) * 3600, 6),
        "uid": _uid("C", n),
        "id.orig_h": _ip("10.0.", rng, n),
        "id.orig_p": _num(rng.integers(1024, 65535, n)),
        "id.resp_h": _ip("172.16.", rng, n),
        "id.resp_p": _num(rng.choice([443, 80, 53, 902, 1117, 5888], n)),
        "proto": pa.array(proto),
        "service": const("-"),
        "duration": _fixed(rng.exponential(2.0, n), 6),
        "orig_bytes": _num(rng.integers(0, 50_000, n)),
        "resp_bytes": _num(rng.integers(0, 500_000, n)),
        "conn_state": pa.array(rng.choice(["SF", "S0", "REJ", "RSTO"], n)),
        "local_orig": const("T"), "local_resp": const("F"), "missed_bytes": const("0"),
        "history": const("ShADadfF"),
        "orig_pkts": _num(rng.integers(1, 100, n)), "orig_ip_bytes": _num(rng.integers(40, 60_000, n)),
        "resp_pkts": _num(rng.integers(0, 400, n)), "resp_ip_bytes": _num(rng.integers(0, 600_000, n)),
        "tunnel_parents": const("-"),
    }
    path = os.path.join(folder, "conn.log")
    _write_tsv(path, _header("conn", CONN_FIELDS, CONN_TYPES), cols)
    return path


def make_zeek_dns(folder: str, rows: int, seed: int = 2) -> str:
    """1 row per response: 60% A (1-2 IPs), 20% CNAME+A, 20% NXDOMAIN without answers."""
    rng = np.random.default_rng(seed)
    n = rows
    const = lambda v: pa.array(np.full(n, v))  # noqa: E731
    kind = rng.random(n)
    ip1, ip2 = _ip("19.57.34.", rng, n), _ip("203.0.113.", rng, n)
    cname = _join(_num(rng.integers(0, 1000, n)), const("cdn.example.net"), sep=".")
    one = rng.random(n) < 0.5
    answers = pc.if_else(pa.array(kind < 0.6), pc.if_else(pa.array(one), ip1, _join(ip1, ip2, sep=",")),
                         pc.if_else(pa.array(kind < 0.8), _join(cname, ip1, sep=","), const("-")))
    ttls = pc.if_else(pa.array(kind < 0.6), pc.if_else(pa.array(one), const("300.000000"),
                                                       const("300.000000,300.000000")),
                      pc.if_else(pa.array(kind < 0.8), const("60.000000,20.000000"), const("-")))
    nx = kind >= 0.8
    cols = {
        "ts": _fixed(1_700_000_000 + np.sort(rng.random(n)) * 3600, 6),
        "uid": _uid("D", n),
        "id.orig_h": _ip("10.0.", rng, n), "id.orig_p": _num(rng.integers(1024, 65535, n)),
        "id.resp_h": const("10.0.0.53"), "id.resp_p": const("53"), "proto": const("udp"),
        "trans_id": _num(rng.integers(0, 65535, n)), "rtt": _fixed(rng.exponential(0.01, n), 6),
        "query": _join(_num(rng.integers(0, 100_000, n)), const("example.net"), sep="."),
        "qclass": const("1"), "qclass_name": const("C_INTERNET"), "qtype": const("1"), "qtype_name": const("A"),
        "rcode": pa.array(np.where(nx, "3", "0")), "rcode_name": pa.array(np.where(nx, "NXDOMAIN", "NOERROR")),
        "AA": const("F"), "TC": const("F"), "RD": const("T"), "RA": const("T"), "Z": const("0"),
        "answers": answers, "TTLs": ttls, "rejected": const("F"),
    }
    path = os.path.join(folder, "dns.log")
    _write_tsv(path, _header("dns", DNS_FIELDS, DNS_TYPES), cols)
    return path


def gzipped(path: str) -> str:
    out = path + ".gz"
    with open(path, "rb") as src, gzip.open(out, "wb", compresslevel=1) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return out


# --- timing ---------------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    make: Callable[[str, int], str]      # (folder, rows) -> path
    read: Callable                       # (path, quarantine) -> DataFrame
    rows_arg: str                        # which --*-rows option sizes it
    compress: bool = False
    floor: bool = False                  # also time bare pyarrow.csv.read_csv (Zeek TSV only)


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def pyarrow_floor(path: str) -> tuple[int, float, float]:
    """Bare pyarrow.csv.read_csv of a Zeek TSV (all columns as text, threads on): the parse floor."""
    with open(path, "rb") as fh:
        head = [fh.readline() for _ in range(8)]
    fields = head[6].rstrip(b"\n").split(b"\t")[1:]
    table, wall, cpu = _timed(lambda: pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=[f.decode() for f in fields], skip_rows=8),
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False, invalid_row_handler=lambda r: "skip"),
        convert_options=pacsv.ConvertOptions(column_types={f.decode(): pa.string() for f in fields}),
    ))
    return table.num_rows, wall, cpu


# --- Cases (add new readers here) -------------------------------------------------------------

CASES: list[Case] = [
    Case("zeek_conn_tsv", make_zeek_conn, read_connections, "conn_rows", floor=True),
    Case("zeek_conn_tsv.gz", make_zeek_conn, read_connections, "conn_rows", compress=True),
    Case("zeek_dns_tsv", make_zeek_dns, read_dns, "dns_rows", floor=True),
    Case("zeek_dns_tsv.gz", make_zeek_dns, read_dns, "dns_rows", compress=True),
    # NSX DFW and other readers: Case("nsx_dfw", make_nsx_dfw, read_connections, "nsx_rows"),
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conn-rows", type=int, default=2_000_000)
    parser.add_argument("--dns-rows", type=int, default=1_000_000)
    parser.add_argument("--only", nargs="*", help="case names to run (default: all)")
    args = parser.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="ingest-bench-")
    made: dict[tuple, str] = {}
    try:
        print(f"{'case':<20} {'input rows':>10} {'out rows':>10} {'MB':>7} {'wall s':>7} {'cpu s':>7} "
              f"{'rows/s (wall)':>14}  quarantined")
        for case in CASES:
            if args.only and case.name not in args.only:
                continue
            rows = getattr(args, case.rows_arg)
            key = (case.make, rows)
            if key not in made:
                sub = os.path.join(folder, f"{case.make.__name__}-{rows}")
                os.makedirs(sub, exist_ok=True)
                made[key] = case.make(sub, rows)
            path = made[key]
            if case.compress:
                path = made.setdefault(key + ("gz",), gzipped(path))
            quarantine = Quarantine()
            frame, wall, cpu = _timed(lambda: case.read(path, quarantine))
            size = os.path.getsize(path) / 1e6
            print(f"{case.name:<20} {rows:>10,} {len(frame):>10,} {size:>7.0f} {wall:>7.2f} {cpu:>7.2f} "
                  f"{rows / wall:>14,.0f}  {len(quarantine)}")
            del frame
            if case.floor:
                n, wall, cpu = pyarrow_floor(path)
                print(f"{'  pyarrow floor':<20} {n:>10,} {'':>10} {size:>7.0f} {wall:>7.2f} {cpu:>7.2f} "
                      f"{n / wall:>14,.0f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
