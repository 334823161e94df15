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


def test_version_matches_the_package_metadata(capsys):
    """``jaxrobust --version`` prints the version of ``pyproject.toml`` (the two are bumped together)."""
    import re
    from pathlib import Path
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    version = re.search(r'^version = "([^"]+)"', pyproject.read_text(), re.M).group(1)
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"jaxrobust {version}"


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


def test_critical_eps_in_l2_is_stored_apart_and_named(tmp_path, capsys):
    out = tmp_path / "r.h5"
    base = ["critical-eps", "--indices", "0:2", "--oracle", "crown", "--tol", "0.1", "--targets", "0",
            "--out", str(out)]
    assert main(base + ["--norm", "2", "--eps-max", "4"]) == 0
    assert main(base + ["--norm", "inf", "--resume"]) == 0      # another configuration: rows kept apart
    capsys.readouterr()
    assert main(["distribution", str(out), "--json", "--bootstrap", "20"]) == 0
    names = sorted(g["config_name"] for g in json.loads(capsys.readouterr().out)["groups"])
    assert len(names) == 2 and names[0].startswith("crown L2 ") and not names[1].startswith("crown L")
    assert main(base + ["--norm", "3"]) == 2 and "--norm" in capsys.readouterr().err


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


# --- one-line errors, nothing written -------------------------------------------------------------------
def _one_line(capsys, *words):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    for w in words:
        assert w in err[0], err[0]
    return err[0]


@pytest.mark.parametrize("argv, words", [
    (["critical-eps", "--tol", "-1"], ["--tol", "> 0", "-1"]),
    (["critical-eps", "--batch-size", "0"], ["--batch-size", ">= 1"]),
    (["critical-eps", "--mean", "a,b"], ["--mean", "numbers"]),
    (["critical-eps", "--domain", "1,0"], ["--domain", "LO < HI"]),
    (["critical-eps", "--indices", "-5000:"], ["-5000:", "outside"]),
    (["critical-eps", "--grid-step", "0.6"], ["--grid-step", "--eps-max"]),
    (["critical-eps", "--mean", "0.1,0.2"], ["2 channel values", "(28, 28, 1)"]),
    (["roma", "--delta", "0"], ["--delta", "(0, 1]"]),
    (["roma", "--eps", "-0.1"], ["--eps", ">= 0"]),
    (["roma", "--significance", "0.2"], ["--significance", "invalid choice"]),
    (["critical-eps", "--workers", "0"], ["--workers", ">= 1"]),
    (["roma", "--devices", "0"], ["--devices", ">= 1"]),
    (["instances", "missing.csv", "--timeout", "0"], ["--timeout", "> 0"]),
])
def test_bad_options_are_one_line_and_write_nothing(tmp_path, capsys, argv, words):
    out = tmp_path / "r.h5"
    assert main(argv + ["--out", str(out)]) == 2
    _one_line(capsys, *words)
    assert list(tmp_path.iterdir()) == []


def test_outputs_and_results_files_are_checked_first(tmp_path, capsys):
    (tmp_path / "plain.txt").write_text("x")
    assert main(["critical-eps", "--out", str(tmp_path), "--indices", "0:2"]) == 2
    _one_line(capsys, "is a directory")
    assert main(["critical-eps", "--out", str(tmp_path / "plain.txt"), "--indices", "0:2"]) == 2
    _one_line(capsys, "not an HDF5 results file")
    assert main(["distribution", str(tmp_path)]) == 2
    _one_line(capsys, "is a directory")
    assert main(["distribution", str(tmp_path / "plain.txt")]) == 2
    _one_line(capsys, "not an HDF5 file")
    assert main(["roma", "--out", str(tmp_path / "r.h5"), "--plot", str(tmp_path / "plain.txt")]) == 2
    _one_line(capsys, "--plot", "not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.txt"]


def test_debug_anywhere_version_and_negative_ranges(tmp_path, capsys):
    with pytest.raises(Exception, match="no-such"):
        main(["info", "no-such", "--debug"])
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and "jaxrobust 0." in capsys.readouterr().out
    assert main(["info", "mnist-mlp", "--dataset", "mnist", "--indices", "-50:", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dataset"].endswith("(50 images)") and out["preprocessing"] is None


def test_wrong_preprocessing_warns_and_sidecar_is_read(tmp_path, capsys):
    assert main(["info", "mnist-mlp", "--dataset", "mnist", "--indices", ":300", "--mean", "0.5", "--std", "0.05",
                 "--json"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["preprocessing"] == {"mean": [0.5], "std": [0.05]}
    assert "warning:" in cap.err and "preprocessing" in cap.err and "--mean" in cap.err


def test_vnnlib_box_outside_the_domain_names_bound_and_input(tmp_path, capsys):
    prop = tmp_path / "p.vnnlib"
    lines = [f"(declare-const X_{i} Real)" for i in range(784)] + [f"(declare-const Y_{j} Real)" for j in range(10)]
    lines += [f"(assert (>= X_{i} 0.0))\n(assert (<= X_{i} 0.1))" for i in range(784)]
    lines[784 + 10 + 17] = "(assert (>= X_17 -2.5))\n(assert (<= X_17 -2.4))"
    lines.append("(assert (>= Y_1 Y_0))")
    prop.write_text("\n".join(lines) + "\n")
    assert main(["verify", "mnist-mlp", str(prop), "--timeout", "5"]) == 2
    _one_line(capsys, "X_17", "upper bound", "-2.4", "--domain")
    assert main(["verify", "mnist-mlp", str(prop), "--timeout", "5", "--domain", "-3,1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["result"] in ("sat", "unsat", "unknown", "timeout")


def test_distribution_groups_by_any_stored_key(tmp_path, capsys):
    out = tmp_path / "r.h5"
    base = ["critical-eps", "--indices", "0:4", "--oracle", "attack", "--targets", "0", "--attack-steps", "5",
            "--out", str(out)]
    assert main(base) == 0 and main(base[:-2] + ["--eps-max", "0.3", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["distribution", str(out), "--by", "config", "--bootstrap", "20", "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)["groups"]
    assert len(groups) == 2 and {g["bound"] for g in groups} == {"counterexample"}
    assert main(["distribution", str(out), "--bootstrap", "20"]) == 0
    text = capsys.readouterr().out
    assert "[attack tol=0.001 eps_max=0.3]  (values: counterexample bounds)" in text
    assert "[attack tol=0.001 eps_max=0.5]  (values: counterexample bounds)" in text and "set aside" in text
    assert main(["distribution", str(out), "--by", "colour"]) == 2
    _one_line(capsys, "colour", "network_name")


def test_instances_file_is_verified_and_resumed(tmp_path, capsys):
    """``jaxrobust instances``: every row of a VNN-COMP instances CSV verified into one results file, then resumed."""
    from .conftest import shared_path
    folder = shared_path("networks", "mnist", "vnncomp2021_mnistfc")
    csv = tmp_path / "inst.csv"
    csv.write_text("".join(f"{folder}/mnist-net_256x2.onnx,{folder}/prop_{i}_0.03.vnnlib,60\n" for i in (0, 2)))
    out = tmp_path / "r.h5"
    assert main(["instances", str(csv), "--out", str(out), "--csv", str(tmp_path / "r.csv"), "--devices", "1"]) == 0
    assert "2 rows in" in capsys.readouterr().out
    rows = (tmp_path / "r.csv").read_text().splitlines()
    assert len(rows) == 3 and all(r.split(",")[4] in ("sat", "unsat") for r in rows[1:])
    assert main(["instances", str(csv), "--out", str(out), "--resume"]) == 0
    assert "2 rows in" in capsys.readouterr().out
