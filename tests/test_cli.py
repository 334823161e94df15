import json

import numpy as np
import pytest

from jaxrobust.cli import build_parser, main


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    names = [a for a in parser._subparsers._group_actions[0].choices]
    assert {"demo", "info", "train", "critical-eps", "distribution", "roma", "global"} <= set(names)
    for name in names:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "usage" in capsys.readouterr().out


def test_info_on_bundled_network(capsys):
    assert main(["info", "mnist-mlp", "--dataset", "mnist", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["parameters"] == 269_322 and out["input_shape"] == [28, 28, 1]
    assert out["ops"]["dot_general"] == 3 and out["accuracy"] > 0.97


def test_errors_are_one_line(capsys):
    assert main(["info", "no-such-network"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-network" in err[0] and "Traceback" not in err[0]
    assert main(["critical-eps", "--out", "/nonexistent/dir/x.h5", "--indices", "0:2", "--oracle", "attack"]) == 2
    assert "x.h5" in capsys.readouterr().err
    assert main(["critical-eps", "--out", "x.h5", "--indices", "5000:6000"]) == 2
    assert "'5000:6000'" in capsys.readouterr().err


def test_critical_eps_distribution_and_train(tmp_path, capsys):
    out, csv = tmp_path / "r.h5", tmp_path / "r.csv"
    args = ["critical-eps", "--indices", "0:6", "--oracle", "ibp", "--tol", "0.01", "--targets", "0",
            "--out", str(out), "--csv", str(csv)]
    assert main(args) == 0
    rows = csv.read_text().splitlines()
    assert rows[0].startswith("network,dataset,split,index,label,eps_lower,eps_upper,status,oracle,time_s")
    assert len(rows) == 7
    assert main(args) == 2 and "--resume" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0
    capsys.readouterr()
    assert main(["distribution", str(out), "--json", "--bootstrap", "50", "--plot", str(tmp_path / "fig")]) == 0
    summary = json.loads(capsys.readouterr().out)
    g = summary["groups"][0]
    assert g["n"] == 6 and g["network_name"] == "mnist-mlp"
    assert (tmp_path / "fig" / "ecdf.png").stat().st_size > 1000
    # train on a tiny npz data set
    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    np.savez(data, x_train=rng.integers(0, 255, (256, 28, 28), dtype=np.uint8), y_train=rng.integers(0, 10, 256),
             x_test=rng.integers(0, 255, (64, 28, 28), dtype=np.uint8), y_test=rng.integers(0, 10, 64))
    w = tmp_path / "net.msgpack"
    assert main(["train", "--arch", "mlp:16", "--dataset", f"mnist:{data}", "--epochs", "1", "--out", str(w)]) == 0
    assert "saved" in capsys.readouterr().out and w.stat().st_size > 0
    assert main(["info", str(w)]) == 0


def test_verify_budgets_are_checked_before_any_work(tmp_path, capsys):
    prop = tmp_path / "p.vnnlib"
    prop.write_text("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"
                    "(assert (>= X_0 0.0))\n(assert (<= X_0 1.0))\n(assert (>= Y_1 Y_0))\n")
    for bad, word in ((["--max-memory", "1X"], "--max-memory"), (["--max-memory", "10K"], "at least 1M"),
                      (["--max-domains", "0"], "--max-domains")):
        assert main(["verify", "no-such-network.onnx", str(prop), *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and word in err[0]


def test_verdict_vocabulary():
    from jaxrobust.verdict import ROBUST, UNKNOWN, VIOLATED, Status, status_names
    assert (ROBUST, UNKNOWN, VIOLATED) == (1, 0, -1)
    assert list(status_names(np.array([1, 0, -1], np.int8))) == ["ROBUST", "UNKNOWN", "VIOLATED"]
    assert Status(-1).name == "VIOLATED"
