"""The input files a command names, listed and sized before anything heavy is imported."""
from __future__ import annotations

import bz2
import gzip
import lzma
import subprocess
import sys
import zipfile

import pytest

from esxi_anomaly import ingest
from esxi_anomaly.input_paths import IngestError, expand_paths, input_files, is_compressed


def test_score_decides_on_workers_before_importing_pandas(tmp_path):
    """`score` sizes its inputs (`workers_for`) and starts the worker pool before it imports pandas,
    pyarrow or numpy: the pool's forkserver imports the scoring stack meanwhile."""
    conn, dns = tmp_path / "conn.log", tmp_path / "dns.log"
    conn.write_bytes(b"x" * 1000)
    dns.write_bytes(gzip.compress(b"y" * 1000))
    probe = ("import sys; from esxi_anomaly import cli; from esxi_anomaly.scoring.workers import workers_for; "
             "n = workers_for(cli._given_files(sys.argv[1:2], sys.argv[2:3])); "
             "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'pandas', 'pyarrow', 'numpy', 'sklearn'}); "
             "print(n, ' '.join(heavy) or 'none')")
    done = subprocess.run([sys.executable, "-c", probe, str(conn), str(dns)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "none"]


@pytest.mark.parametrize("pack", [gzip.compress, bz2.compress, lzma.compress, "zip"])
def test_compressed_files_are_told_by_their_first_bytes(tmp_path, pack):
    path = tmp_path / "conn.log.any"
    if pack == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("conn.log", "#separator \\x09\n")
    else:
        path.write_bytes(pack(b"#separator \\x09\n"))
    assert is_compressed(path)
    plain = tmp_path / "plain.log"
    plain.write_bytes(b"#separator \\x09\n")
    assert not is_compressed(plain) and not is_compressed(tmp_path / "missing.log")


def test_input_files_of_several_lists_and_the_errors_ingest_knows(tmp_path):
    (tmp_path / "a.log").write_text("a")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.log").write_text("b")
    assert input_files([tmp_path / "a.log"], None, str(tmp_path / "sub")) == [tmp_path / "a.log", tmp_path / "sub" / "b.log"]
    assert expand_paths(str(tmp_path / "*.log")) == [str(tmp_path / "a.log")]
    with pytest.raises(ingest.IngestError, match="no such file"):   # one class, whichever module names it
        input_files([tmp_path / "missing.log"])
    assert ingest.IngestError is IngestError and ingest.expand_paths is expand_paths
