"""CSV writers: spreadsheet formulas in log text are neutralised, numbers stay numbers."""
from __future__ import annotations

import csv

import pandas as pd
import pytest

from esxi_anomaly.report import csv as csv_mod
from esxi_anomaly.report.csv import write_csv, write_entity_rollup_csv


@pytest.fixture(params=["compiled", "arrow"])
def row_joiner(request, monkeypatch):
    """The encoder's rows joined by the compiled routine (`_csv_rows.c`), or by Arrow's kernels (as
    installed without a C compiler): the same bytes either way."""
    if request.param == "arrow":
        monkeypatch.setattr(csv_mod, "_rows_routines", lambda: None)
    elif csv_mod._rows_routines() is None:
        pytest.skip("the package was installed without its compiled CSV rows (no C compiler at install)")
    return request.param


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_formula_cells_neutralised(ranked, tmp_path):
    path = write_csv(ranked, tmp_path / "ranked.csv")
    rows = _rows(path)
    assert [r["query"] for r in rows] == [
        "'=HYPERLINK(\"http://x\")",
        "<script>window.__pwned=1</script>.evil.example",
        "'+cmd",
        "'-2+3",
        "'@SUM(1)",
    ]


def test_tab_and_carriage_return_neutralised(ranked, tmp_path):
    ranked["process"] = ["\tcmd", "\rcmd", "hostd", "x\ny\rz", "a=b"]
    rows = _rows(write_csv(ranked, tmp_path / "ranked.csv"))
    assert [r["process"] for r in rows] == ["'\tcmd", "'\rcmd", "hostd", "x\ny\rz", "a=b"]


def test_numeric_columns_unchanged_including_negatives(ranked, tmp_path):
    path = write_csv(ranked, tmp_path / "ranked.csv")
    rows = _rows(path)
    assert [r["port_delta"] for r in rows] == ["-2.5", "0.0", "-7.0", "3.25", "-1e-09"]
    assert [r["offset"] for r in rows] == ["-7", "0", "3", "-1", "2"]
    assert [r["src_port"] for r in rows] == ["50001", "50002", "-1", "40000", "40001"]
    assert [r["dns_delay"] for r in rows] == ["2.1", "1.5", "", "0.2", ""]
    back = pd.read_csv(path)
    assert list(back.columns) == list(ranked.columns)
    pd.testing.assert_series_equal(back["port_delta"], ranked["port_delta"])
    pd.testing.assert_series_equal(back["score"], ranked["score"])
    assert back["ts"].tolist() == ranked["ts"].tolist()


def test_input_frame_not_modified_and_no_temp_file_left(ranked, tmp_path):
    before = ranked.copy()
    write_csv(ranked, tmp_path / "out" / "ranked.csv")
    pd.testing.assert_frame_equal(ranked, before)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["ranked.csv"]


def test_rollup_csv_neutralised(tmp_path):
    rollup = pd.DataFrame({"src_name": ["=cmd|' /C calc'!A0", "vm-db-01"], "max_score": [0.9, -0.1]})
    rows = _rows(write_entity_rollup_csv(rollup, tmp_path / "rollup.csv"))
    assert rows == [{"src_name": "'=cmd|' /C calc'!A0", "max_score": "0.9"},
                    {"src_name": "vm-db-01", "max_score": "-0.1"}]


def _pandas_bytes(frame: pd.DataFrame) -> bytes:
    from esxi_anomaly.report.csv import neutralise_formulas

    return neutralise_formulas(frame).to_csv(index=False, lineterminator="\r\n").encode("utf-8")


def _arrow_bytes(frame: pd.DataFrame) -> bytes:
    import io

    import pyarrow as pa

    from esxi_anomaly.report.csv import write_arrow_csv

    buffer = io.BytesIO()
    assert write_arrow_csv(pa.Table.from_pandas(frame, preserve_index=False), buffer)  # the Arrow encoder ran
    return buffer.getvalue()


def test_arrow_encoder_writes_the_bytes_pandas_writes(ranked, row_joiner):
    import numpy as np

    rng = np.random.default_rng(7)
    n = 4000
    magnitude = 10.0 ** rng.uniform(-12, 23, n)
    scale = 10.0 ** rng.integers(0, 17, n)   # short and long digit strings
    floats = np.round(rng.choice([-1.0, 1.0], n) * magnitude * scale) / scale
    floats[:12] = [0.0, -0.0, np.nan, np.inf, -np.inf, 1e-4, 9.999999999999999e-05, 1e16, 9999999999999998.0,
                   1e15, 0.1 + 0.2, 2.0]
    texts = np.array(["plain", "", "a,b", 'say "hi"', "cr\rin", "lf\nin", "\tlead", "\rlead", "=1+2", "+x", "-y",
                      "@z", " =space first", "é ü ∞", "tail\r\n", "\x00nul", "'quoted'"], dtype=object)
    frame = pd.DataFrame({
        "f": floats, "f32": floats.astype("float32"), "i": rng.integers(-2**40, 2**40, n),
        "i32": rng.integers(-5, 70000, n).astype("int32"), "u8": rng.integers(0, 255, n).astype("uint8"),
        "b": rng.random(n) < 0.5, "nb": pd.array(np.where(rng.random(n) < 0.2, None, rng.random(n) < 0.5),
                                                dtype="boolean"),
        "ni": pd.array(np.where(rng.random(n) < 0.2, None, rng.integers(-9, 9, n)), dtype="Int64"),
        "s": pd.Series(rng.choice(texts, n), dtype="str"),
        "o": pd.Series(np.where(rng.random(n) < 0.1, None, rng.choice(texts, n)), dtype=object),
        "c": pd.Categorical(rng.choice(texts[:6], n)),
        'odd "name", here': "x",
    })
    assert _arrow_bytes(frame) == _pandas_bytes(frame)
    assert _arrow_bytes(ranked) == _pandas_bytes(ranked)
    for single in (pd.DataFrame({"a": ["", "x", None, "=1"]}, dtype="str"), pd.DataFrame({"": [1.5, np.nan]}),
                   frame.iloc[:0]):
        assert _arrow_bytes(single) == _pandas_bytes(single)


def test_arrow_encoder_matches_pandas_on_columns_of_few_values_and_where_exponents_start(row_joiner):
    """The encoder's shortcuts: float columns of few distinct values are formatted once per value
    (0.0 and -0.0 kept apart), values near where numpy (1e-4, 1e16) and Arrow (1e-6, 1e10) switch to
    exponents are formatted by the right one, and text columns where every value needs quotes, some
    values, or none, are quoted as the csv module quotes them."""
    import numpy as np

    rng = np.random.default_rng(11)
    n = 30_000
    digits = 10.0 ** rng.integers(0, 17, n)
    floats = np.round(rng.choice([-1.0, 1.0], n) * 10.0 ** rng.uniform(-7, 17, n) * digits) / digits
    edges = np.array([1e-6, 9.999999999999999e-07, 1e-4, 9.999999999999999e-05, 1e10, 9999999999.999998,
                      9999999999.0, 1e10 + 0.5, 1e15, 1e16, 9999999999999998.0, 1709709151.845888])
    floats[:len(edges)] = edges
    few = rng.choice(np.r_[edges, 0.0, -0.0, 0.25, np.nan, np.inf, -np.inf], n)
    words = np.array(["no DNS answer explains 10.0.0.1:443, ranked by the forest", 'a "quoted" name, here',
                      "line\nbreak, too", "cr\r, and comma"], dtype=object)
    frame = pd.DataFrame({
        "f": floats, "few": few, "flag": rng.choice([0.0, 1.0], n),
        "all_quoted": pd.Series(rng.choice(words, n), dtype="str"),
        "some_quoted": pd.Series(np.where(rng.random(n) < 0.01, "x,y", "plain"), dtype="str"),
        "last_only": pd.Series(["plain"] * (n - 1) + ['end "quote"'], dtype="str"),
    })
    assert _arrow_bytes(frame) == _pandas_bytes(frame)


def test_rows_in_a_given_order_are_the_rows_of_the_reordered_table(row_joiner, monkeypatch):
    """`order` (an output block's rank order) writes the rows taken in that order, header first."""
    import numpy as np
    import pyarrow as pa

    from esxi_anomaly.report.csv import arrow_csv_parts

    rng = np.random.default_rng(3)
    n = 500
    table = pa.table({"rank": np.arange(n), "text": rng.choice(["a", "b,c", 'd "e"', "", "f\r\ng"], n),
                      "score": rng.random(n), "alert": rng.random(n) < 0.5})
    order = rng.permutation(n)
    real, joined = csv_mod._compiled_rows, []
    monkeypatch.setattr(csv_mod, "_compiled_rows", lambda *args: joined.append(real(*args)) or joined[-1])

    def encoded(t, order=None) -> bytes:
        return b"".join(bytes(part) for part in arrow_csv_parts(t, order=order))

    taken = encoded(table.take(pa.array(order)))
    assert encoded(table, order) == taken and taken.count(b"\r\n") > n
    assert encoded(table, order[:0]) == taken.split(b"\r\n")[0] + b"\r\n"      # the header alone
    assert joined and all((rows is not None) == (row_joiner == "compiled") for rows in joined)
    twice = np.r_[order[:10], order[:10]]                     # rows repeated: Arrow's take repeats them
    assert encoded(table, twice) == encoded(table.take(pa.array(twice)))
    with pytest.raises((IndexError, pa.ArrowIndexError)):
        encoded(table, np.r_[order[:10], -1])


def test_write_csv_falls_back_to_pandas_for_other_types(tmp_path):
    import numpy as np

    frame = pd.DataFrame({"when": pd.to_datetime([0, 10**9], unit="s"), "mixed": [1, "=2"],
                          "x": [np.nan, 0.5]})
    path = write_csv(frame, tmp_path / "mixed.csv")
    assert path.read_bytes() == _pandas_bytes(frame)
    assert _rows(path)[1]["mixed"] == "'=2"
