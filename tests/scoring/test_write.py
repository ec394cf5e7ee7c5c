"""scoring.write: the ranking of every scored row, band by band."""
from __future__ import annotations

import mmap

import numpy as np
import pyarrow as pa
import pytest

from esxi_anomaly.scoring import write
from esxi_anomaly.scoring.rank import rank_order
from esxi_anomaly.scoring.write import ScoredFiles, rank_all


SCHEMA = pa.schema([("score", pa.float64()), ("alert", pa.bool_()), ("event_id", pa.string())])


def scored_files(folder, rng, sizes, scores) -> ScoredFiles:
    """Arrow files of rows with scores drawn from `scores` (many ties) and unique-ish event ids."""
    paths = []
    for bucket, n in enumerate(sizes):
        ids = [f"C{rng.integers(0, 60):02d}x{k}" for k in range(n)]   # equal prefixes: ties reach the id
        table = pa.table({"score": rng.choice(scores, n), "alert": rng.random(n) < 0.2, "event_id": ids},
                         schema=SCHEMA)
        path = folder / f"{bucket}.scored.arrow"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        paths.append(path)
    return ScoredFiles(paths)


@pytest.mark.parametrize("band_rows", [1, 37, 400, 10**6])
def test_rank_all_band_by_band_is_the_one_sort(tmp_path, monkeypatch, band_rows):
    monkeypatch.setattr(write, "RANK_BAND_ROWS", band_rows)
    rng = np.random.default_rng(band_rows)
    tables = scored_files(tmp_path, rng, [300, 0, 517, 180], np.array([0.0, -0.0, 0.25, 0.5, 0.5 + 1e-16, 0.99, 1.0]))
    keys = pa.concat_tables([t.select(["alert", "score", "event_id"]) for t in tables.values()])
    alert = keys["alert"].to_numpy(zero_copy_only=False).copy()
    alert[::11] = ~alert[::11]   # the final alerts are not the files' own
    score = keys["score"].to_numpy()
    want = rank_order(keys.set_column(0, "alert", pa.array(alert)))
    got = rank_all(tables, alert, score)
    assert got.dtype == np.int32
    assert np.array_equal(got, want)


def test_rank_all_with_nan_scores_takes_the_one_sort(tmp_path, monkeypatch):
    monkeypatch.setattr(write, "RANK_BAND_ROWS", 50)
    tables = scored_files(tmp_path, np.random.default_rng(3), [200, 100], np.array([0.1, np.nan, 0.7]))
    keys = pa.concat_tables([t.select(["alert", "score", "event_id"]) for t in tables.values()])
    alert, score = keys["alert"].to_numpy(zero_copy_only=False), keys["score"].to_numpy()
    assert np.array_equal(rank_all(tables, alert, score), rank_order(keys))


def test_take_runs_gives_the_runs_rows_one_after_another_in_single_chunks(tmp_path):
    tables = scored_files(tmp_path, np.random.default_rng(5), [50, 80, 30], np.array([0.1, 0.5]))
    runs = [(1, np.arange(10, 40)), (0, np.array([3, 7, 8, 20])), (2, np.arange(30)), (1, np.array([5]))]
    got = tables.take_runs(runs)
    assert got.equals(pa.concat_tables([tables[b].take(pa.array(r)) for b, r in runs]))
    assert [column.num_chunks for column in got.columns] == [1, 1, 1]
    assert got.schema == tables[0].schema
    assert tables.take(0, np.array([4, 2])).equals(tables[0].take(pa.array([4, 2])))   # one run, taken
    sliced = tables.take(1, np.arange(3, 9), ["event_id"])
    assert sliced.equals(tables[1].select(["event_id"]).slice(3, 6))
    assert sliced["event_id"].chunk(0).offset == 0          # copied out of the mapping, not a view of it


def test_take_runs_unifies_files_of_other_column_types(tmp_path):
    tables = scored_files(tmp_path, np.random.default_rng(6), [20, 20], np.array([0.1, 0.5]))
    other = pa.table({"score": [0.3, 0.4], "alert": [True, False], "event_id": pa.nulls(2)})
    with pa.OSFile(str(tmp_path / "7.scored.arrow"), "wb") as sink, pa.ipc.new_file(sink, other.schema) as writer:
        writer.write_table(other)   # a file whose text column is all null: typed null by pandas
    tables = ScoredFiles(sorted(tmp_path.glob("*.scored.arrow")))
    runs = [(0, np.arange(5, 9)), (7, np.array([1, 0])), (1, np.arange(2))]
    got = tables.take_runs(runs)
    want = pa.concat_tables([tables[b].take(pa.array(r)) for b, r in runs], promote_options="default")
    assert got.equals(want) and [column.num_chunks for column in got.columns] == [1, 1, 1]


def test_take_runs_lets_the_pages_of_the_files_go_as_soon_as_they_are_copied(tmp_path, monkeypatch):
    """Rows spread over a file touch all its pages: a run that is not a slice lets them go at once; the
    sliced files' pages go column by column (held to the end, a 10M run's peak memory was 0.6 GB more)."""
    tables = scored_files(tmp_path, np.random.default_rng(7), [50, 80, 30], np.array([0.1, 0.5]))
    events = []
    monkeypatch.setattr(ScoredFiles, "__getitem__", lambda self, b: events.append(("read", b)) or dict.__getitem__(self, b))
    monkeypatch.setattr(ScoredFiles, "release", lambda self, b=None: events.append(("release", b)))
    monkeypatch.setattr(ScoredFiles, "release_column", lambda self, b, name: events.append(("release", b, name)))
    tables.take_runs([(0, np.array([1, 9, 4])), (1, np.arange(5, 9)), (2, np.arange(3))])
    # sliced files: each column's pages go once it is copied out of them, the rest of theirs at the end
    assert events == [("read", 0), ("release", 0), ("read", 1), ("read", 2)] + \
        [("release", b, name) for name in SCHEMA.names for b in (1, 2)] + [("release", 1), ("release", 2)]


def test_column_pages_are_the_whole_pages_of_the_columns_buffers(tmp_path):
    rng = np.random.default_rng(8)
    tables = scored_files(tmp_path, rng, [40_000, 3], np.array([0.1, 0.5]))
    size = len(tables._maps[0])
    spans = {name: tables.column_pages(0, name) for name in SCHEMA.names}
    for name, (offset, length) in spans.items():
        assert offset % mmap.PAGESIZE == 0 and length > 0 and offset + length <= size
        for chunk in tables[0][name].chunks:
            for buffer in (b for b in chunk.buffers() if b is not None):
                start = buffer.address - tables._base[0]
                assert offset <= start and start + buffer.size <= offset + length
    # a column's pages, not the file's: the score column (320 kB) is not the event ids' pages
    (s_off, s_len), (e_off, e_len) = spans["score"], spans["event_id"]
    assert s_len < size // 2 and (s_off + s_len <= e_off + mmap.PAGESIZE or e_off + e_len <= s_off + mmap.PAGESIZE)
    assert 0 < tables.column_pages(1, "score")[1] <= mmap.PAGESIZE   # a tiny file: one page at most


@pytest.mark.parametrize("kind", ["file order", "shuffled", "duplicates", "wide buckets"])
def test_file_order_is_lexsort_of_file_then_row(kind):
    rng = np.random.default_rng(9)
    bucket = rng.choice(np.array([-2, 7, 51_001, 51_006]), 5_000).astype(np.int64)   # within 16 bits
    row = np.zeros(len(bucket), dtype=np.int32)
    for b in np.unique(bucket):   # each file's rows in its own order (an output block's)
        row[bucket == b] = np.sort(rng.choice(10**6, int((bucket == b).sum()), replace=False))
    if kind == "shuffled":
        row = rng.permutation(row)
    elif kind == "duplicates":
        row[10:20] = row[9]
    elif kind == "wide buckets":
        bucket[::7] += 1 << 20
    got = write._file_order(bucket, row)
    assert np.array_equal(got, np.lexsort((row, bucket)))
    assert len(write._file_order(bucket[:0], row[:0])) == 0
