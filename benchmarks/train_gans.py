"""Train the generators of the global-robustness experiments once and store them outside the package.

For each dataset × training set (standard / augmented) this writes
``<out>/<dataset>-<kind>[-aug].msgpack`` (a generator set, see `jaxrobust.gan`) and a PNG sample grid
beside it; existing files are kept unless ``--force``. ``kind`` is ``perclass`` (one GAN per class,
the paper's setup; 4000 steps by default) or ``cond`` (one class-conditional GAN; 5000 steps). The files used
by ``notebooks/generative.ipynb`` come from these two commands (about 20 and 4 minutes on 2 CPU cores):

    python benchmarks/train_gans.py --dataset mnist:/work/shared/data/mnist.npz --kind perclass
    python benchmarks/train_gans.py --dataset fashion_mnist:/work/shared/data/fashion_mnist.npz --kind cond

Default output folder: ``<cache>/gans`` (``$JAXROBUST_CACHE`` or ``~/.cache/jaxrobust``).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from jaxrobust import gan
from jaxrobust.data import default_cache_dir, load_dataset


def output_path(out: Path, dataset: str, kind: str, augment: bool) -> Path:
    return out / f"{dataset}-{kind}{'-aug' if augment else ''}.msgpack"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist:/work/shared/data/mnist.npz")
    p.add_argument("--kind", choices=["perclass", "cond"], default="perclass")
    p.add_argument("--augment", choices=["no", "yes", "both"], default="both")
    p.add_argument("--steps", type=int, default=None, help="default: 4000 per-class, 5000 conditional")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=default_cache_dir() / "gans")
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    steps = args.steps or {"perclass": 4000, "cond": 5000}[args.kind]
    ds = load_dataset(args.dataset, "train")
    for augment in {"no": [False], "yes": [True], "both": [False, True]}[args.augment]:
        path = output_path(args.out, ds.name, args.kind, augment)
        if path.exists() and not args.force:
            print(f"{path} exists, kept")
            continue
        t0 = time.perf_counter()
        gens, losses = gan.train_gans(ds.x, ds.y, conditional=args.kind == "cond", augment=augment,
                                      steps=steps, batch_size=args.batch_size, seed=args.seed)
        meta = {"dataset": ds.id, "kind": args.kind, "augment": augment, "steps": int(losses.shape[0]),
                "batch_size": args.batch_size, "seed": args.seed, "train_s": time.perf_counter() - t0,
                "final_losses": losses[-50:].mean(axis=0).tolist()}
        h = gan.save_generators(gens, path, meta=meta)
        gan.sample_grid(gens, path.with_suffix(".png"))
        print(f"{path}: hash {h}, {meta['train_s']:.0f} s, final (d, g) losses "
              f"{losses[-50:].mean(axis=0).round(3).tolist()}")


if __name__ == "__main__":
    main()
