"""Write a dataset as Zeek logs (TSV with full headers, or JSON lines) plus inventory and labels CSV.

Fields Zeek has but the canonical frames do not (trans_id, rtt, DNS client port, history,
service, ip_bytes) are derived deterministically from the row (a hash of the uid), so any
canonical frame can be written, including real traffic with injected attacks. Rows are written
in the order Zeek writes them: a conn.log record when the connection *ends*, so files are not
sorted by `ts`. The canonical DNS `ts` is the response time; Zeek's `ts` is the query time, so
`ts - rtt` is written and readers recover the response time as `ts + rtt`.
"""
from __future__ import annotations

import gzip as gzip_mod
import io
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

CONN_FIELDS = ("ts", "uid", "id.orig_h", "id.orig_p", "id.resp_h", "id.resp_p", "proto", "service", "duration",
               "orig_bytes", "resp_bytes", "conn_state", "local_orig", "local_resp", "missed_bytes", "history",
               "orig_pkts", "orig_ip_bytes", "resp_pkts", "resp_ip_bytes", "tunnel_parents")
CONN_TYPES = ("time", "string", "addr", "port", "addr", "port", "enum", "string", "interval", "count", "count",
              "string", "bool", "bool", "count", "string", "count", "count", "count", "count", "set[string]")
DNS_FIELDS = ("ts", "uid", "id.orig_h", "id.orig_p", "id.resp_h", "id.resp_p", "proto", "trans_id", "rtt", "query",
              "qclass", "qclass_name", "qtype", "qtype_name", "rcode", "rcode_name", "AA", "TC", "RD", "RA", "Z",
              "answers", "TTLs", "rejected")
DNS_TYPES = ("time", "string", "addr", "port", "addr", "port", "enum", "count", "interval", "string", "count",
             "string", "count", "string", "count", "string", "bool", "bool", "bool", "bool", "count",
             "vector[string]", "vector[interval]", "bool")
QTYPES = {"A": 1, "NS": 2, "CNAME": 5, "PTR": 12, "MX": 15, "TXT": 16, "AAAA": 28, "SRV": 33, "HTTPS": 65}
RCODES = {"NOERROR": 0, "SERVFAIL": 2, "NXDOMAIN": 3, "REFUSED": 5}
SERVICES = {(80, "tcp"): "http", (443, "tcp"): "ssl", (8443, "tcp"): "ssl", (22, "tcp"): "ssh", (123, "udp"): "ntp",
            (88, "tcp"): "krb_tcp", (445, "tcp"): "smb", (389, "tcp"): "ldap", (514, "udp"): "syslog",
            (161, "udp"): "snmp", (5671, "tcp"): "ssl", (135, "tcp"): "dce_rpc", (9200, "tcp"): "http"}
_HISTORY = {("tcp", "SF"): "ShADadFf", ("tcp", "S0"): "S", ("tcp", "REJ"): "Sr", ("tcp", "RSTO"): "ShADadR",
            ("tcp", "RSTR"): "ShADadr", ("udp", "SF"): "Dd", ("udp", "S0"): "D"}


def _hash(values: pd.Series) -> np.ndarray:
    return pd.util.hash_pandas_object(values.reset_index(drop=True), index=False).to_numpy()


def dns_rtt(event_id: pd.Series) -> np.ndarray:
    """The query->response time written for each DNS record (0.3 to 30 ms, from the uid)."""
    return 0.0003 + (_hash(event_id) % np.uint64(29_700)).astype(float) * 1e-6


def _stamp(ts: float) -> str:
    return time.strftime("%Y-%m-%d-%H-%M-%S", time.gmtime(ts))


def conn_records(conns: pd.DataFrame) -> pd.DataFrame:
    """Zeek conn.log columns (Zeek names), one row per connection, in Zeek's write order."""
    c = conns.reset_index(drop=True)
    tcp = c["proto"] == "tcp"
    hdr = np.where(tcp, 40, 28)
    # Look-ups on small integer codes instead of per-row tuples.
    port_proto = c["dst_port"].to_numpy().astype(np.int64) * 2 + tcp.to_numpy()
    service_of = pd.Series({p * 2 + (pr == "tcp"): name for (p, pr), name in SERVICES.items()})
    service = pd.Series(service_of.reindex(port_proto).fillna("-").to_numpy(dtype=object))
    service[(c["conn_state"].isin(["S0", "REJ"]) & tcp).to_numpy()] = "-"
    state_codes, states = pd.factorize(c["proto"].astype(object) + "/" + c["conn_state"].astype(object))
    history_of = np.array([_HISTORY.get(tuple(s.split("/", 1)), "-") for s in states], dtype=object)
    history = pd.Series(history_of[state_codes] if len(c) else np.array([], dtype=object))
    rec = pd.DataFrame({
        "ts": c["ts"], "uid": c["event_id"], "id.orig_h": c["src_ip"], "id.orig_p": c["src_port"],
        "id.resp_h": c["dst_ip"], "id.resp_p": c["dst_port"], "proto": c["proto"], "service": service,
        "duration": c["duration"], "orig_bytes": c["bytes_out"].astype("Int64"),
        "resp_bytes": c["bytes_in"].astype("Int64"), "conn_state": c["conn_state"], "local_orig": "-",
        "local_resp": "-", "missed_bytes": 0, "history": history.fillna("-"),
        "orig_pkts": c["packets_out"].astype("Int64"),
        "orig_ip_bytes": (c["bytes_out"].fillna(0) + hdr * c["packets_out"]).astype("Int64"),
        "resp_pkts": c["packets_in"].astype("Int64"),
        "resp_ip_bytes": (c["bytes_in"].fillna(0) + hdr * c["packets_in"]).astype("Int64"), "tunnel_parents": "-",
    })
    end = c["ts"].to_numpy() + np.nan_to_num(c["duration"].to_numpy())
    rec["_end"] = end
    return rec.iloc[np.argsort(end, kind="stable")].reset_index(drop=True)


def dns_records(dns: pd.DataFrame) -> pd.DataFrame:
    """Zeek dns.log columns, one row per response (its answer rows joined into vectors)."""
    # Group each response's rows together (factorize + integer sort; string sorts are slow).
    codes, _ = pd.factorize(dns["event_id"])
    d = dns.take(np.lexsort((dns["answer_index"].to_numpy(), codes))).reset_index(drop=True)
    uid = d["event_id"].to_numpy(dtype=object)
    starts = np.flatnonzero(np.r_[True, uid[1:] != uid[:-1]]) if len(d) else np.array([], dtype=np.int64)
    last = np.r_[starts[1:] - 1, len(d) - 1] if len(d) else starts
    has = (d["answer"] != "").to_numpy()
    answer = d["answer"].astype(object)
    txt = (d["rtype"] == "TXT").to_numpy()
    if txt.any():   # Zeek logs each TXT string as "TXT <length> <text>"
        answer[txt] = ["TXT %d %s" % (len(a), a) for a in answer[txt]]
    srv = (d["rtype"] == "SRV").to_numpy()
    if srv.any():   # Zeek logs an SRV record's target only: priority, weight and port are lost
        answer[srv] = [(a.split() or [a])[-1] for a in answer[srv]]
    elem = answer.str.replace(",", "\\x2c", regex=False).to_numpy(dtype=object)
    ttl_txt = np.asarray(pc.fill_null(fixed6(d["ttl"].to_numpy()), "-").to_pylist(), dtype=object)
    sep = np.full(len(d), ",", dtype=object)
    sep[last] = ""
    # Vectors are joined per record with one reduceat (string +) instead of a groupby of lambdas.
    answers = np.add.reduceat(np.where(has, elem + sep, ""), starts) if len(d) else np.array([], object)
    ttls = np.add.reduceat(np.where(has, ttl_txt + sep, ""), starts) if len(d) else np.array([], object)
    answers = np.where(answers == "", "-", answers)
    ttls = np.where(ttls == "", "-", ttls)
    first = d.iloc[starts].set_index("event_id")
    rtypes = d["rtype"].to_numpy(dtype=object)
    # The query type is the first non-CNAME record type of the response (A when there is none).
    not_cname = np.where(rtypes == "CNAME", len(d), np.arange(len(d)))
    first_real = np.minimum.reduceat(not_cname, starts) if len(d) else starts
    qname = pd.Series(np.where(first_real <= last, rtypes[np.minimum(first_real, max(len(d) - 1, 0))], "A"),
                      index=first.index, dtype=object).replace("", "A")
    h = _hash(pd.Series(first.index))
    rtt = dns_rtt(pd.Series(first.index))
    rcode = first["rcode"].replace("", "NOERROR")
    rec = pd.DataFrame({
        "ts": first["ts"].to_numpy() - rtt, "uid": first.index.to_numpy(), "id.orig_h": first["client_ip"].to_numpy(),
        "id.orig_p": (32768 + h % np.uint64(28000)).astype(np.int64), "id.resp_h": first["resolver_ip"].to_numpy(),
        "id.resp_p": 53, "proto": "udp", "trans_id": ((h >> np.uint64(20)) % np.uint64(65536)).astype(np.int64),
        "rtt": rtt, "query": first["query"].to_numpy(), "qclass": 1, "qclass_name": "C_INTERNET",
        "qtype": qname.map(lambda t: QTYPES.get(t, 1)).to_numpy(), "qtype_name": qname.to_numpy(),
        "rcode": rcode.map(lambda r: RCODES.get(r, 0)).to_numpy(), "rcode_name": rcode.to_numpy(),
        "AA": "F", "TC": "F", "RD": "T", "RA": "T", "Z": 0,
        "answers": answers, "TTLs": ttls,
        "rejected": "F",
    })
    rec["_end"] = rec["ts"] + rec["rtt"]
    return rec.sort_values("_end", kind="stable").reset_index(drop=True)


_BOOL_FIELDS = {"AA", "TC", "RD", "RA", "rejected", "local_orig", "local_resp"}
_FLOAT_TYPES = {"time", "interval"}


def fixed6(values) -> pa.Array:
    """Floats as Zeek prints them ("%.6f"), nulls for NaN; vectorised (no per-value Python)."""
    x = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(x)
    x = np.where(bad, 0.0, x)
    neg = x < 0
    ax = np.abs(x)
    sec = np.floor(ax)
    frac = np.round((ax - sec) * 1e6).astype(np.int64)
    carry = frac >= 1_000_000
    sec, frac = sec + carry, np.where(carry, frac - 1_000_000, frac)
    whole = pc.cast(pa.array(sec.astype(np.int64)), pa.string())
    whole = pc.if_else(pa.array(neg), pc.binary_join_element_wise("-", whole, ""), whole)
    text = pc.binary_join_element_wise(whole, pc.utf8_lpad(pc.cast(pa.array(frac), pa.string()), 6, "0"), ".")
    return pc.if_else(pa.array(bad), pa.scalar(None, pa.string()), text)


def _arrow_text(col: pd.Series, zeek_type: str) -> pa.Array:
    """One column as Zeek text, null where the field is unset."""
    if zeek_type in _FLOAT_TYPES:
        return fixed6(col.to_numpy(dtype=np.float64, na_value=np.nan))
    if zeek_type in ("count", "port"):
        v = col.to_numpy(dtype=np.float64, na_value=np.nan)
        ok = np.isfinite(v)
        return pc.cast(pa.array(np.where(ok, v, 0).astype(np.int64), mask=~ok), pa.string())
    text = pa.chunked_array([pa.array(col, type=pa.string())]).combine_chunks() if len(col) else pa.array([], pa.string())
    return pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)


def _tsv_body(rec: pd.DataFrame, fields, types) -> bytes:
    cols = [pc.fill_null(_arrow_text(rec[f], t), "-") for f, t in zip(fields, types)]
    buf = io.BytesIO()
    pacsv.write_csv(pa.table(cols, names=list(fields)), buf,
                    pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none"))
    return buf.getvalue()


def _json_body(rec: pd.DataFrame, fields, types) -> bytes:
    """JSON lines with Zeek's conventions: dotted keys, unset fields omitted, vectors as arrays."""
    pieces = []
    for f, t in zip(fields, types):
        col = _arrow_text(rec[f], t)
        key = f'"{f}":'
        if t.startswith("vector") or t.startswith("set"):
            if t == "vector[interval]":
                body = pc.binary_join_element_wise("[", col, "]", "")
            else:
                esc = pc.replace_substring(pc.replace_substring(col, "\\", "\\\\"), '"', '\\"')
                body = pc.binary_join_element_wise('["', pc.replace_substring(esc, ",", '","'), '"]', "")
            body = pc.if_else(pc.equal(col, "-"), pa.scalar(None, pa.string()), body)
        elif t in _FLOAT_TYPES or t in ("count", "port"):
            body = col
        elif t == "bool":
            body = pc.if_else(pc.equal(col, "T"), "true", pc.if_else(pc.equal(col, "F"), "false",
                                                                    pa.scalar(None, pa.string())))
        else:
            col = pc.if_else(pc.equal(col, "-"), pa.scalar(None, pa.string()), col)
            esc = pc.replace_substring(pc.replace_substring(col, "\\", "\\\\"), '"', '\\"')
            body = pc.binary_join_element_wise('"', esc, '"', "")
        pieces.append(pc.binary_join_element_wise(key, body, ""))
    line = pc.binary_join_element_wise(*pieces, ",", null_handling="skip")
    line = pc.binary_join_element_wise("{", line, "}", "")
    lines = line.to_pylist()
    return ("\n".join(lines) + ("\n" if lines else "")).encode("utf-8")


def _write(path: Path, data: bytes, gzip: bool) -> Path:
    if gzip:
        path = path.with_name(path.name + ".gz")
        with gzip_mod.open(path, "wb", compresslevel=5) as fh:
            fh.write(data)
    else:
        path.write_bytes(data)
    return path


def _log_bytes(rec: pd.DataFrame, path_name: str, fields, types, fmt: str) -> bytes:
    if fmt == "json":
        return _json_body(rec, fields, types)
    ts = rec["ts"]
    t_open = float(ts.min()) if len(rec) else 0.0
    t_close = float(rec["_end"].max()) if len(rec) else 0.0
    header = ("#separator \\x09\n#set_separator\t,\n#empty_field\t(empty)\n#unset_field\t-\n"
              f"#path\t{path_name}\n#open\t{_stamp(t_open)}\n#fields\t" + "\t".join(fields) + "\n#types\t"
              + "\t".join(types) + "\n")
    return header.encode() + _tsv_body(rec, fields, types) + f"#close\t{_stamp(t_close)}\n".encode()


def write_zeek(ds, out_dir, fmt: str = "tsv", gzip: bool = False, hourly: bool = False) -> list[Path]:
    """Write `ds` (a SynthDataset, or anything with connections/dns_answers/inventory/labels) to `out_dir`.

    Files: conn.log, dns.log (or hourly `conn.YYYY-MM-DD-HH.log`, by the hour each record is written),
    inventory.csv (ip,name,kind,esxi_host,role) and labels.csv. Returns the paths written.
    """
    if fmt not in ("tsv", "json"):
        raise ValueError(f"fmt must be 'tsv' or 'json', not {fmt!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for path_name, rec, fields, types in (("conn", conn_records(ds.connections), CONN_FIELDS, CONN_TYPES),
                                          ("dns", dns_records(ds.dns_answers), DNS_FIELDS, DNS_TYPES)):
        if not hourly:
            written.append(_write(out / f"{path_name}.log", _log_bytes(rec, path_name, fields, types, fmt), gzip))
            continue
        hour = np.floor(rec["_end"].to_numpy() / 3600.0).astype(np.int64)
        for h in np.unique(hour):
            part = rec[hour == h]
            name = f"{path_name}.{time.strftime('%Y-%m-%d-%H', time.gmtime(h * 3600))}.log"
            written.append(_write(out / name, _log_bytes(part, path_name, fields, types, fmt), gzip))
    ds.inventory.to_csv(out / "inventory.csv", index=False, columns=["ip", "name", "kind", "esxi_host", "role"])
    ds.labels.to_csv(out / "labels.csv", index=False)
    written += [out / "inventory.csv", out / "labels.csv"]
    return written


__all__ = ["write_zeek", "conn_records", "dns_records", "dns_rtt"]
