"""Fidelity of the ONNX importer on every shared network.

Prints, per network: max |logit difference| between the imported JAX network and onnxruntime on
100 test images, and the JAX network's test accuracy (full 10k MNIST test set for MNIST networks,
the 100 lossless CIFAR-10 test images for CIFAR-10 networks).

Usage: python benchmarks/onnx_accuracy.py [--shared PATH_TO_SHARED]
"""
import argparse
import time
from pathlib import Path

import jax
import numpy as np
import onnxruntime as ort

from jaxrobust.onnx_import import KNOWN_NORMALIZATION, load_onnx


def ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    """onnxruntime logits of ``x: (B, *input_shape)`` (one image per call when batch is fixed)."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    if isinstance(inp.shape[0], int):
        return np.concatenate([sess.run(None, {inp.name: x[i:i + 1]})[0].reshape(1, -1)
                               for i in range(len(x))])
    return sess.run(None, {inp.name: x})[0].reshape(len(x), -1)


def normalized(stem: str, x: np.ndarray) -> np.ndarray:
    """Input as onnxruntime needs it: known outside-the-graph normalisation applied."""
    if stem not in KNOWN_NORMALIZATION:
        return x
    mean = np.asarray(KNOWN_NORMALIZATION[stem]["mean"], np.float32).reshape(-1, 1, 1)
    std = np.asarray(KNOWN_NORMALIZATION[stem]["std"], np.float32).reshape(-1, 1, 1)
    return ((x - mean) / std).astype(np.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    ap.add_argument("--batch", type=int, default=1000)
    args = ap.parse_args()

    mnist = np.load(args.shared / "data" / "mnist.npz")
    cifar = np.load(args.shared / "data" / "cifar10" / "cifar10_test_first100_lossless.npz")
    data = {"mnist": (mnist["x_test"].astype(np.float32) / 255, mnist["y_test"]),
            "cifar": (cifar["x_test"].transpose(0, 3, 1, 2).astype(np.float32) / 255, cifar["y_test"])}

    print(f"{'network':44s} {'input':>13s} {'max|Δ| vs ORT':>14s} {'accuracy':>9s} {'n':>6s} "
          f"{'load s':>7s} {'eval s':>7s}")
    for path in sorted((args.shared / "networks").rglob("*.onnx")):
        t0 = time.perf_counter()
        net = load_onnx(path)
        t_load = time.perf_counter() - t0
        x, y = data["cifar" if net.input_shape[0] == 3 else "mnist"]
        x = x.reshape((len(x),) + net.input_shape)
        fn = jax.jit(net.apply)
        t0 = time.perf_counter()
        logits = np.concatenate([np.asarray(fn(net.params, x[i:i + args.batch]))
                                 for i in range(0, len(x), args.batch)])
        t_eval = time.perf_counter() - t0
        diff = np.abs(logits[:100] - ort_logits(path, normalized(path.stem, x[:100]))).max()
        acc = (logits.argmax(1) == y).mean()
        print(f"{str(path.relative_to(args.shared / 'networks').with_suffix('')):44s} "
              f"{str(net.input_shape):>13s} {diff:14.2e} {acc:9.4f} {len(x):6d} "
              f"{t_load:7.2f} {t_eval:7.2f}")


if __name__ == "__main__":
    main()
