"""The README's examples run as written: the shell commands of its set-up and quick start (in order, each file
they name bundled, made by an earlier command or fetched with --download) and their Python blocks, scaled down
to small inputs.

Data come from a cache holding a small MNIST made of the bundled test images, so --download finds them
without a network; every scaling substitution must match the README, so an edited example is noticed."""
import re
import shlex
import time
from pathlib import Path

import numpy as np
import pytest

from jaxrobust.cli import main

ROOT = Path(__file__).resolve().parents[1]
# the examples a new user runs: set-up and quick start (later sections describe clusters and benchmarks)
README = (ROOT / "README.md").read_text().split("\n## Architecture")[0]

# (pattern, replacement): sizes of the README's examples -> sizes a test can afford
SHELL_SCALE = [
    (r"jaxrobust demo$", "jaxrobust demo --images 4"),
    (r"--indices 0:1000 ", "--indices 0:6 "), (r"--indices 0:100 ", "--indices 0:6 "), (r"--indices 0:20 ", "--indices 0:2 "),
    (r"--samples 10000 --eps 0\.1", "--samples 200 --robust-samples 30 --eps 0.1"), (r"--samples 10000", "--samples 200"),
    (r"--epochs \d+", "--epochs 1"), (r"--steps 2000", "--steps 50"), (r"--timeout 60", "--timeout 5"),
    (r"--indices :500", "--indices :200"),
]
PYTHON_SCALE = [(r"samples=10_000", "samples=500"), (r"timeout=60", "timeout=5")]


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def commands() -> list[str]:
    """The README's shell commands, continuation lines joined, comments dropped."""
    out = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words:
                    out.append(" ".join(shlex.quote(w) for w in words))
    return out


def scale(text: str, rules) -> str:
    for pattern, repl in rules:
        text = re.sub(pattern, repl, text, flags=re.M)
    return text


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working directory with the repository's examples/, and a cache with a small MNIST."""
    sample = np.load(ROOT / "jaxrobust" / "_data" / "mnist_test_1000.npz")
    (tmp_path / "cache" / "mnist").mkdir(parents=True)
    np.savez(tmp_path / "cache" / "mnist" / "mnist.npz", x_train=sample["x_test"][:600], y_train=sample["y_test"][:600],
             x_test=sample["x_test"], y_test=sample["y_test"])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "examples").symlink_to(ROOT / "examples")
    monkeypatch.setenv("JAXROBUST_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path / "run")
    return tmp_path / "run"


def test_every_scaling_rule_matches_the_readme():
    text = "\n".join(commands())
    for pattern, _ in SHELL_SCALE:
        assert re.search(pattern, text, re.M), f"no README command matches {pattern!r}"
    python = "\n".join(blocks("python"))
    for pattern, _ in PYTHON_SCALE:
        assert re.search(pattern, python), f"no README Python line matches {pattern!r}"


def test_files_named_by_commands_exist_or_are_made_earlier():
    made = set()
    for cmd in commands():
        words = shlex.split(cmd)
        for w in words[1:]:
            if re.search(r"\.(onnx|msgpack|vnnlib|h5|npz)$", w) and not w.startswith("-"):
                produced = any(words[i] in ("--out", "-o", "--csv") and words[i + 1] == w for i in range(len(words) - 1))
                assert produced or w in made or (ROOT / w).is_file() or w.startswith("torch_net"), \
                    f"{w} is named by `{cmd}` before any command makes it"
                made.add(w)


@pytest.mark.slow
def test_shell_commands_run_as_written(workdir, capsys):
    ran = 0
    for cmd in commands():
        words = shlex.split(scale(cmd, SHELL_SCALE))
        if words[0] != "jaxrobust":
            continue  # installation and test commands
        t0 = time.perf_counter()
        rc = main(words[1:])
        out = capsys.readouterr()
        with capsys.disabled():
            print(f"{time.perf_counter() - t0:6.1f} s  {' '.join(words)}")
        assert rc == 0, f"`{' '.join(words)}` failed: {out.err.strip()[-500:]}"
        ran += 1
    assert ran >= 12
    assert (workdir / "figures" / "ecdf.pdf").is_file() and (workdir / "figures" / "plr_vs_eps.png").is_file()
    assert (workdir / "normalised.json").is_file() and (workdir / "gans.msgpack").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("block", blocks("python"), ids=lambda b: b.split("\n")[-2][:40])
def test_python_blocks_run_as_written(workdir, block):
    if "import torch" in block:
        pytest.importorskip("torch")
    namespace = {}
    exec(compile(scale(block, PYTHON_SCALE), "README.md", "exec"), namespace)
    if "fit" in namespace:
        assert namespace["fit"].sigma > 0 and namespace["p"].plr.shape == (16,)
    if "torch" in namespace:  # the exported network computes the model's logits
        torch, net = namespace["torch"], namespace["net"]
        x = np.random.default_rng(0).random((3, 1, 28, 28), np.float32)
        np.testing.assert_allclose(net(x), namespace["model"](torch.from_numpy(x)).detach().numpy(), atol=1e-5)
