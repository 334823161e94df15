"""``jaxrobust global``: global correctness and robustness of a classifier on generated images."""
from __future__ import annotations

import json

from .common import (
    check_output,
    check_results_file,
    command,
    load_net,
    nonneg_float,
    nonneg_int,
    open_unit,
    positive_float,
    positive_int,
    preprocessing_options,
    scale,
    scale_options,
    warn,
)


def _options(p):
    from ..generative import BOUND_METHODS, LATENT_BOX
    p.add_argument("--classifier", "-n", required=True, help="classifier: bundled name, .onnx or .msgpack weights")
    p.add_argument("--generator", "-g", required=True,
                   help="generator file: a generator set (.msgpack, jaxrobust.gan), the Keras DCGAN (.h5) or .onnx")
    p.add_argument("--class", dest="cls", type=int, help="only this class (default: every class of the set)")
    p.add_argument("--reference", help="reference classifier for an unconditional generator (agreement; its own NET.json)")
    preprocessing_options(p)
    p.add_argument("--samples", type=positive_int, default=10_000, help="Monte Carlo samples per class for correctness")
    p.add_argument("--eps", type=nonneg_float, help="latent L∞ radius for global robustness (omit to skip robustness)")
    p.add_argument("--robust-samples", type=positive_int, default=1000, help="latents per class for robustness")
    p.add_argument("--bounds", choices=BOUND_METHODS, default="ibp", help="verification of latent boxes")
    p.add_argument("--attack-steps", type=nonneg_int, default=40, help="latent PGD steps")
    p.add_argument("--latent-box", type=positive_float, default=LATENT_BOX, help="latent domain [-b, b]^d")
    p.add_argument("--confidence", type=open_unit, default=0.95, help="Clopper–Pearson confidence level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", "-o", required=True, help="HDF5 results file (appended to)")
    p.add_argument("--images", metavar="DIR", help="write PNGs of misclassified samples and adversarial pairs here")
    p.add_argument("--resume", action="store_true", help="skip classes already stored with the same configuration")
    scale_options(p)
    p.add_argument("--json", action="store_true", help="print JSON")


@command("global", "global correctness / robustness of a classifier on generated images (Fijalkow & Gupta)",
         _options)
def global_cmd(args):
    """``jaxrobust global``: print the per-class table (or JSON) of `generative.run_global`."""
    from ..errors import InputError
    from ..gan import load_generators
    from ..generative import run_global
    from ..loading import load_network

    check_results_file(args.out, "--out")
    check_output(args.images, "--images", folder=True)
    classifier = load_net(args.classifier, args)
    generators = load_generators(args.generator)
    reference = load_network(args.reference) if args.reference else None
    if args.cls is not None:
        if None in generators:
            raise InputError(f"{args.generator} is an unconditional generator; --class does not apply")
        classes = [args.cls]
    else:
        classes = None
    if None in generators and reference is None and args.eps is None:
        raise InputError("an unconditional generator needs --reference (correctness) or --eps (robustness)")
    out = run_global(classifier, generators, args.out, classes=classes, samples=args.samples, eps=args.eps,
                     robust_samples=args.robust_samples, reference=reference, confidence=args.confidence,
                     bounds=args.bounds, attack_steps=args.attack_steps, seed=args.seed, latent_box=args.latent_box,
                     image_dir=args.images, resume=args.resume, **scale(args))
    total = sum(r["samples"] for r in out["correctness"])
    if total and sum(r["correct"] for r in out["correctness"]) < total / 2:
        warn(f"{classifier.name} classifies fewer than half of the generated images as their class; it probably "
             "expects other preprocessing (--mean, --std, --domain or a NET.json next to the network)")
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(format_global_summary(out))


def format_global_summary(out: dict) -> str:
    """Plain-text table of a `generative.run_global` summary."""
    conf = out["config"]["confidence"]
    lines = []
    if out["correctness"]:
        lines.append(f"global correctness of {out['classifier']} ({conf:.0%} Clopper–Pearson)")
        lines.append(f"{'class':>6} {'samples':>8} {'correct':>8} {'estimate':>9}  interval")
        for r in out["correctness"]:
            name = "all" if r["class"] < 0 else r["class"]
            lines.append(f"{name:>6} {r['samples']:>8} {r['correct']:>8} {r['estimate']:>9.4f}  "
                         f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}]")
    if out["robustness"]:
        names = [k for k in out["robustness"][0] if k + "_low" in out["robustness"][0]]
        lines.append(f"global robustness, latent eps={out['config']['eps']} ({' / '.join(names)})")
        for r in out["robustness"]:
            name = "all" if r["class"] < 0 else r["class"]
            cells = [f"{r[s] / r['samples']:.3f} [{r[s + '_low']:.3f}, {r[s + '_high']:.3f}]" for s in names]
            lines.append(f"{name:>6} n={r['samples']:<6} " + "  ".join(cells))
    return "\n".join(lines)
