"""Ingest throughput: rows/s of the readers on large synthetic logs, against pyarrow's floor.

Generates (into a temporary folder, deleted afterwards) a Zeek TSV conn.log of 2M rows, a dns.log
of 1M responses and an NSX-T DFW packet log of 500k lines in RFC 5424 syslog envelopes, plain and
gzip, then times `read_connections` / `read_dns` (the full shared API: sniffing, streaming,
conversion, concatenation and the sort by ts). For Zeek TSV it also times
  * the bare `pyarrow.csv.read_csv` of the whole plain file, all columns as text (the parse floor),
  * the same with the reader's own column selection and types (the typed floor), and
  * the reader's canonical conversion alone (`_conn_frame` / `_dns_frame` on that typed table).

    .venv/bin/python benchmarks/ingest_throughput.py [--conn-rows N] [--dns-rows N] [--nsx-rows N]
                                                     [--repeat K] [--only NAME...]

Each case runs --repeat times (default 3) and the best wall time is printed, with the CPU time
(all threads) of that run; wall time depends on what else runs on the machine, so the load
average is printed before and after.
To add a reader: write a generator `def make_x(folder, rows) -> path` and append a `Case` to
CASES (section "Cases" below); nothing else changes.
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
from esxi_anomaly.ingest import zeek  # noqa: E402
from esxi_anomaly.ingest.base import DEFAULT_CHUNK_ROWS, formats  # noqa: E402

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
    """Dotted quads: `prefix` ("10.0." or "19.57.34.") completed with random octets."""
    missing = 4 - prefix.count(".")
    parts = [pa.array(np.full(n, prefix.rstrip(".")))]
    parts += [_num(rng.integers(lo, hi, n)) for _ in range(missing)]
    return _join(*parts, sep=".")


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


def make_nsx_dfw(folder: str, rows: int, seed: int = 3) -> str:
    """NSX-T DFW packet logs as an ESXi host forwards them: RFC 5424 envelope (`<182>1 <ts> <host>
    dfwpktlogs <pid> - - <body>`), body as in the NSX-T admin guide (`<vif> INET match <action>
    <rule> IN|OUT <len> <proto> <src>/<sport>-><dst>/<dport> <flags>`): 8% ICMP, 12% `TERM`
    session ends (`<vif> INET TERM <rule> IN|OUT TCP FIN|RST|TIMEOUT <src>/<sport>-><dst>/<dport>
    <pkts in>/<pkts out> <bytes in>/<bytes out>`) that close an earlier TCP PASS of the same
    session, the rest TCP/UDP session starts (PASS 85%, DROP, REJECT); 4 hosts."""
    rng = np.random.default_rng(seed)
    n = rows
    idx = np.arange(n)
    const = lambda v: pa.array(np.full(n, v))  # noqa: E731
    kind = rng.random(n)
    term = (kind < 0.12) & (idx > 0)
    icmp = (kind >= 0.12) & (kind < 0.20)
    starts = np.flatnonzero(~term)
    # a TERM repeats the session of one of the 2000 session starts before it
    before = np.searchsorted(starts, idx) - 1
    pick = np.clip(before - rng.integers(0, 2000, n), 0, None)
    same = np.where(term, starts[np.clip(pick, 0, len(starts) - 1)], idx)
    proto = np.where(icmp, "ICMP", np.where(rng.random(n) < 0.8, "TCP", "UDP"))
    action = rng.choice(np.array(["PASS"] * 17 + ["DROP", "DROP", "REJECT"]), n)
    opened = same[term]
    proto[opened], action[opened], icmp[opened] = "TCP", "PASS", False
    proto[term] = "TCP"

    def session(values: np.ndarray) -> np.ndarray:
        return values[same]

    secs = 1_712_950_000 + np.sort(rng.random(n)) * 3600
    millis = pa.array(np.round(secs * 1000).astype(np.int64), pa.timestamp("ms", "UTC"))
    ts = _join(pc.strftime(millis, "%Y-%m-%dT%H:%M:%S"), const("Z"), sep="")   # %S has the .mmm
    host = pa.array(np.char.add("esx-0", session(rng.integers(1, 5, n)).astype(str)))
    vif = pc.utf8_lpad(pa.array(np.char.mod("%x", session(rng.integers(0, 2**32, n, dtype=np.uint64)))), 8, "0")
    rule = _num(session(rng.integers(1000, 1400, n)))
    direction = pa.array(session(np.where(rng.random(n) < 0.5, "IN", "OUT")))
    src = _join(const("10.20"), _num(session(rng.integers(0, 255, n))), _num(session(rng.integers(1, 254, n))),
                sep=".")
    dst = _join(const("172.16"), _num(session(rng.integers(0, 255, n))), _num(session(rng.integers(1, 254, n))),
                sep=".")
    sport = _num(session(rng.integers(1024, 65535, n)))
    dport = _num(session(rng.choice([443, 80, 53, 902, 8443, 22, 3389, 1117], n)))
    length = _num(rng.integers(40, 1500, n))
    flags = np.where(proto == "TCP", rng.choice(["S", "SEW", "PA", "A"], n), "")
    space = const(" ")
    endpoints = _join(src, const("/"), sport, const("->"), dst, const("/"), dport, sep="")
    packet = _join(vif, const("INET match"), pa.array(action), rule, direction, length, pa.array(proto),
                   pc.if_else(pa.array(icmp), _join(src, const("->"), dst, sep=""), endpoints), sep=" ")
    packet = pc.if_else(pa.array(flags != ""), _join(packet, pa.array(flags), sep=" "), packet)
    counts = _join(_num(rng.integers(1, 50, n)), const("/"), _num(rng.integers(1, 50, n)), space,
                   _num(rng.integers(40, 90_000, n)), const("/"), _num(rng.integers(40, 900_000, n)), sep="")
    ended = _join(vif, const("INET TERM"), rule, direction, const("TCP"),
                  pa.array(rng.choice(["FIN", "RST", "TIMEOUT"], n)), endpoints, counts, sep=" ")
    body = pc.if_else(pa.array(term), ended, packet)
    pid = _num(rng.integers(2_000_000, 2_100_000, n))
    lines = _join(const("<182>1"), ts, host, const("dfwpktlogs"), pid, const("- -"), body, sep=" ")
    path = os.path.join(folder, "dfwpktlogs.log")
    with open(path, "wb") as fh:
        fh.write(pc.binary_join(pa.array([lines], pa.list_(pa.string())), "\n")[0].as_buffer())
        fh.write(b"\n")
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
    floor: str = ""                      # "conn" / "dns": also time the floors and the conversion


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def _best(fn, repeat: int):
    """(result of the last run, wall, cpu) of the run with the best wall time."""
    best = None
    for _ in range(repeat):
        out, wall, cpu = _timed(fn)
        if best is None or wall < best[1]:
            best = (out, wall, cpu)
        del out
    return best


def _zeek_fields(path: str) -> list[str]:
    with open(path, "rb") as fh:
        head = [fh.readline() for _ in range(8)]
    return [f.decode() for f in head[6].rstrip(b"\n").split(b"\t")[1:]]


def pyarrow_floor(path: str, repeat: int = 1) -> tuple[int, float, float]:
    """Bare pyarrow.csv.read_csv of a Zeek TSV (all columns as text, threads on): the parse floor."""
    fields = _zeek_fields(path)
    table, wall, cpu = _best(lambda: pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=fields, skip_rows=8),
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False, invalid_row_handler=lambda r: "skip"),
        convert_options=pacsv.ConvertOptions(column_types={f: pa.string() for f in fields}),
    ), repeat)
    return table.num_rows, wall, cpu


def typed_floor(path: str, kind: str, repeat: int = 1) -> tuple[pa.Table, float, float]:
    """pyarrow.csv.read_csv of the whole plain file with the reader's own columns, types and
    options (what its fast path asks of pyarrow): the floor of the reader, before conversion."""
    spec = zeek.CONN_SPEC if kind == "conn" else zeek.DNS_SPEC
    text = pa.large_string() if kind == "conn" else pa.string()
    fields = _zeek_fields(path)
    columns = [c for c in spec if c in fields]
    types = {c: text if zeek._ARROW_TYPE[spec[c]] == pa.string() else zeek._ARROW_TYPE[spec[c]] for c in columns}
    return _best(lambda: pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=fields, skip_rows=8, block_size=zeek.PARSE_BLOCK_BYTES),
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False, escape_char=False,
                                         ignore_empty_lines=False, invalid_row_handler=lambda r: "skip"),
        convert_options=pacsv.ConvertOptions(column_types=types, include_columns=columns, null_values=["-"],
                                             strings_can_be_null=True, quoted_strings_can_be_null=False),
    ), repeat)


def conversion(table: pa.Table, kind: str, repeat: int = 1) -> tuple[int, float, float]:
    """The reader's canonical conversion alone (fast-path table -> canonical frame)."""
    header = zeek._Header(fields=list(table.column_names))
    chunk = DEFAULT_CHUNK_ROWS

    def run():
        rows = 0
        for start in range(0, table.num_rows, chunk):   # in reader-sized chunks, as the reader does
            part = table.slice(start, chunk)
            parsed = zeek._Parsed(zeek._blank_empty_strings(part, zeek.CONN_SPEC if kind == "conn" else zeek.DNS_SPEC,
                                                            header), np.arange(start, start + part.num_rows) + 9, [])
            if kind == "conn":
                rows += len(zeek._conn_frame(parsed, "zeek_conn_tsv", "bench"))
            else:
                parsed, answers, ttls = zeek._split_vectors(parsed, header, "bench")
                rows += len(zeek._dns_frame(parsed, answers, ttls, "zeek_dns_tsv", "bench"))
        return rows

    return _best(run, repeat)


# --- Cases (add new readers here) -------------------------------------------------------------

CASES: list[Case] = [
    Case("zeek_conn_tsv", make_zeek_conn, read_connections, "conn_rows", floor="conn"),
    Case("zeek_conn_tsv.gz", make_zeek_conn, read_connections, "conn_rows", compress=True),
    Case("zeek_dns_tsv", make_zeek_dns, read_dns, "dns_rows", floor="dns"),
    Case("zeek_dns_tsv.gz", make_zeek_dns, read_dns, "dns_rows", compress=True),
    Case("nsx_dfw", make_nsx_dfw, read_connections, "nsx_rows"),
    Case("nsx_dfw.gz", make_nsx_dfw, read_connections, "nsx_rows", compress=True),
]


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conn-rows", type=int, default=2_000_000)
    parser.add_argument("--dns-rows", type=int, default=1_000_000)
    parser.add_argument("--nsx-rows", type=int, default=500_000)
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the best wall time is shown")
    parser.add_argument("--only", nargs="*", help="case names to run (default: all)")
    args = parser.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="ingest-bench-")
    made: dict[tuple, str] = {}
    formats()   # import every reader module now, not inside the first timed case
    print(f"{os.cpu_count()} CPUs, load average {_load()} (1/5/15 min), best of {args.repeat}")
    try:
        print(f"{'case':<22} {'input rows':>10} {'out rows':>10} {'MB':>7} {'wall s':>7} {'cpu s':>7} "
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

            def run():
                quarantine.__init__()
                return len(case.read(path, quarantine))

            out_rows, wall, cpu = _best(run, args.repeat)
            size = os.path.getsize(path) / 1e6
            print(f"{case.name:<22} {rows:>10,} {out_rows:>10,} {size:>7.0f} {wall:>7.2f} {cpu:>7.2f} "
                  f"{rows / wall:>14,.0f}  {len(quarantine)}")
            if case.floor:
                n, wall, cpu = pyarrow_floor(path, args.repeat)
                print(f"{'  pyarrow floor (text)':<22} {n:>10,} {'':>10} {size:>7.0f} {wall:>7.2f} {cpu:>7.2f} "
                      f"{n / wall:>14,.0f}")
                table, wall, cpu = typed_floor(path, case.floor, args.repeat)
                n = table.num_rows
                print(f"{'  pyarrow floor (typed)':<22} {n:>10,} {'':>10} {size:>7.0f} {wall:>7.2f} {cpu:>7.2f} "
                      f"{n / wall:>14,.0f}")
                out, wall, cpu = conversion(table, case.floor, args.repeat)
                print(f"{'  conversion alone':<22} {n:>10,} {out:>10,} {'':>7} {wall:>7.2f} {cpu:>7.2f} "
                      f"{n / wall:>14,.0f}")
                del table
        print(f"load average after: {_load()}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
