"""Writes ``jaxrobust/_data/jair_cifar_sample.json``: which CIFAR-10 image each ``image_id`` of the JAIR CIFAR
results (``reference/jair/results_CIFAR_JAIR.csv``) is. Needs scikit-learn.

The authors' experiment code (``get_balanced_sample`` in ADA-research/NNV_JAIR_robustness_distributions,
``experiments/CIFAR-10/main.py``) draws a class-balanced sample of 100 images per split with
``StratifiedShuffleSplit(n_splits=1, test_size=100 | train_size=100, random_state=42)`` over the torchvision
labels, and VERONA numbers the images by their position in that sample. Every class has 1,000 test (5,000
train) images, so the draws depend only on the class counts: class-sorted labels give the same picks as
``(class, rank of the image within its class in the official order)``, which is what the file stores.

    python benchmarks/jair_cifar_sample.py        # scikit-learn: pip install ".[bench]"
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedShuffleSplit

OUT = Path(__file__).resolve().parents[1] / "jaxrobust" / "_data" / "jair_cifar_sample.json"


def sample(split: str, seed: int = 42) -> list[list[int]]:
    per = 1000 if split == "test" else 5000
    y = np.repeat(np.arange(10), per)
    size = {"test_size": 100} if split == "test" else {"train_size": 100}
    train, test = next(StratifiedShuffleSplit(n_splits=1, random_state=seed, **size).split(np.zeros(len(y)), y))
    return [[int(i // per), int(i % per)] for i in (test if split == "test" else train)]


if __name__ == "__main__":
    OUT.write_text(json.dumps({s: sample(s) for s in ("test", "train")}, separators=(",", ":")) + "\n")
    print(f"wrote {OUT}")
