import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxrobust.errors import FileFormatError, InputError
from jaxrobust.store import ResultStore, config_hash

COLS = {"eps": ("f8", ()), "status": ("str", ()), "cex": ("f4", (3,))}


def rows(idx, net="n1"):
    idx = np.asarray(idx)
    return {"network": [net] * len(idx), "dataset": ["mnist"] * len(idx), "split": ["test"] * len(idx),
            "index": idx, "config": ["c"] * len(idx), "eps": idx * 0.5, "status": ["exact"] * len(idx),
            "cex": np.ones((len(idx), 3), np.float32) * idx[:, None]}


def test_append_read_resume(tmp_path):
    p = tmp_path / "r.h5"
    s = ResultStore(p, "t", COLS)
    s.append(rows([0, 1, 2]))
    s.append(rows([3]))
    s.append(rows([0], net="n2"))
    assert len(s) == 5
    assert ResultStore(p, "t", COLS).done("n1", "mnist", "test", "c") == {0, 1, 2, 3}
    d = s.read()
    np.testing.assert_array_equal(d["eps"][:4], [0, 0.5, 1, 1.5])
    assert list(d["status"][:2]) == ["exact", "exact"]
    np.testing.assert_array_equal(d["cex"][3], [3, 3, 3])
    n = s.to_csv(tmp_path / "r.csv", ["network", "index", "eps", "status"])
    assert n == 5 and (tmp_path / "r.csv").read_text().splitlines()[1] == "n1,0,0.0,exact"


def test_config_stored_once(tmp_path):
    s = ResultStore(tmp_path / "r.h5", "t", COLS)
    h = s.save_config({"tol": 0.001, "oracle": "crown"})
    assert h == config_hash({"oracle": "crown", "tol": 0.001})
    assert s.configs()[h] == {"oracle": "crown", "tol": 0.001}


def test_bad_rows_and_files(tmp_path):
    s = ResultStore(tmp_path / "r.h5", "t", COLS)
    r = rows([0])
    del r["eps"]
    with pytest.raises(InputError, match="eps"):
        s.append(r)
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5 at all")
    with pytest.raises(FileFormatError, match="bad.h5"):
        ResultStore(bad, "t", COLS)
    assert bad.read_bytes() == b"not hdf5 at all"  # nothing stored is touched
    with pytest.raises(FileFormatError, match="row shape"):
        ResultStore(tmp_path / "r.h5", "t", {**COLS, "cex": ("f4", (4,))})


def test_interrupted_transaction_leaves_file_intact(tmp_path):
    p = tmp_path / "r.h5"
    s = ResultStore(p, "t", COLS)
    s.append(rows([0, 1]))
    before = p.read_bytes()
    with pytest.raises(RuntimeError):
        with s._transaction() as f:
            f["t/eps"].resize(5, axis=0)
            raise RuntimeError("killed mid-write")
    assert p.read_bytes() == before
    s.append(rows([2]))
    assert s.done("n1", "mnist", "test", "c") == {0, 1, 2}


WRITER = """
import sys, time, numpy as np
sys.path.insert(0, {root!r})
from tests.test_store import COLS, rows
from jaxrobust.store import ResultStore
s = ResultStore({path!r}, "t", COLS)
done = s.done("n1", "mnist", "test", "c")
for i in range(200):
    if i not in done:
        s.append(rows([i]))
print("finished", flush=True)
"""


@pytest.mark.slow
def test_sigkill_then_resume_loses_and_duplicates_nothing(tmp_path):
    p = str(tmp_path / "r.h5")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = WRITER.format(root=root, path=p)
    for delay in (0.4, 0.7, 1.0):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "finished" in out.stdout
    d = ResultStore(p, "t", COLS).read()
    assert sorted(d["index"].tolist()) == list(range(200))
    np.testing.assert_array_equal(d["eps"][np.argsort(d["index"])], np.arange(200) * 0.5)


def test_commit_appends_to_several_tables_at_once(tmp_path):
    from jaxrobust.store import commit
    p = tmp_path / "r.h5"
    a, b = ResultStore(p, "a", COLS), ResultStore(p, "b", {"x": ("i8", ())})
    rb = {k: rows([7])[k] for k in ("network", "dataset", "split", "index", "config")}
    commit([(a, rows([0, 1])), (b, {**rb, "x": [5]})])
    assert len(a) == 2 and b.read()["x"].tolist() == [5]
    with pytest.raises(InputError, match="lack columns"):  # one bad batch: neither table changes
        commit([(a, rows([2])), (b, rb)])
    assert len(a) == 2 and len(b) == 1
    with pytest.raises(InputError, match="one file"):
        commit([(a, rows([3])), (ResultStore(tmp_path / "other.h5", "a", COLS), rows([3]))])
    a.log_run({"workers": 2})
    a.log_run({"workers": 1})
    assert [r["workers"] for r in b.runs()] == [2, 1]
