"""Global correctness and robustness of classifiers with generative models (Fijalkow & Gupta).

A generator ``G_c`` of class ``c`` turns latents into images of ``c``; the classifier ``C`` is judged
on what the generator draws:

* **composition** — `compose` builds ``C ∘ G`` as a `Network` over latents: the generator's
  ``output_range`` (e.g. tanh's [-1, 1]) is mapped affinely onto the classifier's ``domain``
  (e.g. [0, 1]) and the images are laid out as the classifier's input (`data.to_network_input`).
  It is an ordinary pure function, so sampling, bounds (IBP/CROWN over the composed jaxpr, through
  LeakyReLU and tanh) and attacks all apply to it.
* **latent distribution** — ``z ~ N(0, I)`` truncated to the *latent box* ``[-b, b]^d``
  (``b = LATENT_BOX = 5`` by default), which is also the composed network's domain: attacks
  stay in it and bounds clip to it. The truncation removes ``d · 5.7e-7`` of the probability mass
  (6e-6 for d = 10, 6e-5 for the DCGAN's d = 100); with ``b`` large the box behaves as unbounded.
  Latent ``i`` of a stream is drawn from ``fold_in(key, i)``, so results do not depend on chunking.
* **global correctness** — P(C(G_c(z)) = c) per class by Monte Carlo, with a Clopper–Pearson
  interval; misclassified samples (latent, image, predicted class) are kept. For an unconditional
  generator, the agreement P(C(G(z)) = R(G(z))) with a reference classifier ``R``.
* **global robustness** — for sampled latents, local robustness of ``C ∘ G_c`` on the latent
  ε-box around ``z`` (w.r.t. the class predicted at ``z``) in the verdicts of `verdict.Status`: ROBUST
  (sound margin bounds on the composed network are positive), VIOLATED (a latent PGD attack found ``z'``
  classified differently, confirmed by a forward pass) or UNKNOWN; each fraction with a Clopper–Pearson
  interval.
* **realistic adversarial examples** — `adversarial_pairs`: white-box latent PGD (projected onto
  the ε-ball ∩ latent box at every step, random start, never modifying the start point) or black-box
  random search; returns pairs ``(G(z), G(z'))`` with ``‖z − z'‖∞ ≤ ε`` whose classes differ by a
  fresh forward pass of the classifier on images mapped to its domain (softmax is never applied:
  decisions are argmax of logits).

`run_global` is the driver behind ``jaxrobust global``: one work unit per (stage, class) through
`runner.ResumableRun` (HDF5 results, resumable, local devices or Ray workers).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .data import to_network_input
from .errors import InputError, JaxRobustError
from .generator import Generator
from .network import Network
from .verdict import ROBUST, UNKNOWN, VIOLATED, Status

LATENT_BOX = 5.0
BOUND_METHODS = ("ibp", "crown", "complete", "none")
# seconds of branch and bound (input splitting) per latent box that the bounds and the attack leave undecided
COMPLETE_TIMEOUT = 10.0
ATTACKS = ("pgd", "random")


# --- composition ------------------------------------------------------------------------------------
def to_classifier_input(images: jax.Array, output_range, domain, input_shape) -> jax.Array:
    """Generated ``images: (B, H, W, C)`` in ``output_range`` -> classifier inputs ``(B, *input_shape)``
    in ``domain`` (affine map of the ranges, then `data.to_network_input`)."""
    (glo, ghi), (dlo, dhi) = output_range, domain
    scale = (dhi - dlo) / (ghi - glo)
    return to_network_input(images * scale + (dlo - glo * scale), input_shape)


@dataclasses.dataclass(frozen=True)
class _Composed:
    """``apply(params, z) = C(map(G(z)))`` with ``params = {"generator": ..., "classifier": ...}``
    (hashable and equal for equal parts, so jitted callers share compilations across classes)."""
    gen_apply: object
    clf_apply: object
    output_range: tuple
    domain: tuple
    input_shape: tuple

    def __call__(self, params, z):
        images = self.gen_apply(params["generator"], z)
        x = to_classifier_input(images, self.output_range, self.domain, self.input_shape)
        return self.clf_apply(params["classifier"], x)


def compose(classifier: Network, generator: Generator, *, latent_box: float = LATENT_BOX,
            name: str | None = None) -> Network:
    """``C ∘ G`` as a `Network`: ``z: (B, latent_dim) -> logits (B, num_classes)`` on the domain
    ``[-latent_box, latent_box]``.

    Its ``apply`` is equal for generators of equal architecture (e.g. the per-class GANs of a set), so
    the attacks, which take ``apply`` as a static argument and the parameters as traced ones, compile
    once for all of them. The same arguments give the same `Network` object (a small cache), which
    kernels that cache per network object (bounds) reuse.
    """
    return _compose(classifier, generator, float(latent_box), name)


@functools.lru_cache(maxsize=32)
def _compose(classifier: Network, generator: Generator, latent_box: float, name: str | None) -> Network:
    if not latent_box > 0:
        raise InputError(f"latent_box must be > 0, got {latent_box}")
    glo, ghi = generator.output_range
    if not ghi > glo:
        raise InputError(f"generator {generator.name!r} has an empty output range {generator.output_range}")
    if math.prod(generator.output_shape) != math.prod(classifier.input_shape):
        raise InputError(f"generator images {generator.output_shape} do not fit classifier inputs "
                         f"{classifier.input_shape}")
    apply = _Composed(generator.apply, classifier.apply, tuple(map(float, generator.output_range)),
                      tuple(map(float, classifier.domain)), tuple(classifier.input_shape))
    arch = {"compose": {"classifier": classifier.arch, "generator": generator.arch, "latent_box": float(latent_box)}}
    return Network(apply, {"generator": generator.params, "classifier": classifier.params},
                   (generator.latent_dim,), classifier.num_classes, (-float(latent_box), float(latent_box)),
                   name or f"{classifier.name}∘{generator.name}", arch)


def _structural(model):
    """``model`` (a `Network` or `Generator`) without its name and description, so that jitted functions
    taking it as an argument compile once per ``apply`` and parameter shapes (e.g. once for all the
    generators of a set)."""
    return dataclasses.replace(model, name="", arch=None)


# --- latent sampling --------------------------------------------------------------------------------
@partial(jax.jit, static_argnames=("dim", "box"))
def latents(key, indices: jax.Array, dim: int, box: float = LATENT_BOX) -> jax.Array:
    """Latents ``(n, dim)``: ``z_i ~ N(0, I)`` truncated to ``[-box, box]^dim`` from ``fold_in(key, i)``
    for the global sample indices ``indices: (n,)``."""
    return jax.vmap(lambda i: jax.random.truncated_normal(jax.random.fold_in(key, i), -box, box, (dim,)))(indices)


@partial(jax.jit, static_argnames=("box",))
def _sample_predictions(generator, classifiers, key, indices, box):
    """Predicted classes ``(len(classifiers), n)`` of the samples ``indices: (n,)``."""
    z = latents(key, indices, generator.latent_dim, box)
    images = generator(z)
    return jnp.stack([jnp.argmax(c(to_classifier_input(images, generator.output_range, c.domain, c.input_shape)),
                                 axis=-1) for c in classifiers])


@jax.jit
def _unit_images(generator, z):
    return generator.to_unit(generator(z))


def generate(generator: Generator, key, indices, box: float = LATENT_BOX) -> tuple[np.ndarray, np.ndarray]:
    """Latents ``(n, d)`` of the given sample ``indices: (n,)`` and their images ``(n, H, W, C)`` in [0, 1].

    The batch is padded to a power of two of at least 64 rows, so varying ``n`` compiles few programs.
    """
    idx = np.asarray(indices, np.int32).reshape(-1)
    n = len(idx)
    padded = jnp.asarray(np.pad(idx, (0, max(64, 1 << max(n - 1, 0).bit_length()) - n)))
    z = latents(key, padded, generator.latent_dim, float(box))
    return np.asarray(z)[:n], np.asarray(_unit_images(_structural(generator), z))[:n]


# --- global correctness -----------------------------------------------------------------------------
class Correctness(NamedTuple):
    """Global correctness of one generator.

    Attributes:
      label: the generator's class, or -1 for an unconditional generator (agreement with the reference).
      samples, correct: sample count and how many were classified as ``label`` (or as the reference does).
      estimate, ci_low, ci_high: ``correct / samples`` and its Clopper–Pearson interval.
      wrong_index: ``(m,)`` sample indices of the first ``m`` (≤ ``max_saved``) misclassified samples.
      wrong_latent: ``(m, d)``.  wrong_image: ``(m, H, W, C)`` in [0, 1].
      wrong_predicted: ``(m,)`` the classifier's class.  wrong_expected: ``(m,)`` the true/reference class.
    """

    label: int
    samples: int
    correct: int
    estimate: float
    ci_low: float
    ci_high: float
    wrong_index: np.ndarray
    wrong_latent: np.ndarray
    wrong_image: np.ndarray
    wrong_predicted: np.ndarray
    wrong_expected: np.ndarray


def interval(k, n, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided Clopper–Pearson interval of ``k`` successes in ``n`` trials."""
    from .kernels.stats import clopper_pearson
    lo, hi = clopper_pearson(k, n, confidence)
    return float(lo), float(hi)


def global_correctness(classifier: Network, generator: Generator, label: int | None, *, samples: int = 10_000,
                       key=None, reference: Network | None = None, confidence: float = 0.95,
                       latent_box: float = LATENT_BOX, chunk: int = 2000, max_saved: int = 100,
                       on_chunk=None) -> Correctness:
    """Monte Carlo estimate of P(C(G(z)) = label), or, with ``reference``, of P(C(G(z)) = R(G(z))).

    ``on_chunk(m)`` is called after each chunk of ``m`` samples (progress bars). Sample ``i`` is latent
    ``i`` of ``key`` (see `latents`), on JAX's default device.
    """
    if (label is None) == (reference is None):
        raise InputError("give exactly one of a class label (class generator) or a reference classifier "
                         "(unconditional generator)")
    if label is not None and not 0 <= label < classifier.num_classes:
        raise InputError(f"label {label} outside [0, {classifier.num_classes})")
    samples, chunk = int(samples), int(chunk)
    if samples < 1 or chunk < 1:
        raise InputError(f"samples and chunk must be >= 1, got {samples}, {chunk}")
    for net in (classifier, reference):
        if net is not None:
            compose(net, generator, latent_box=latent_box)  # validates the shapes
    key = jax.random.PRNGKey(0) if key is None else key
    gen = _structural(generator)
    nets = tuple(map(_structural, (classifier,) if reference is None else (classifier, reference)))
    chunk = min(chunk, samples)
    starts = range(0, samples, chunk)
    # every chunk is dispatched before the first result is read, so the device never waits on Python
    pending = [_sample_predictions(gen, nets, key, jnp.arange(start, start + chunk), float(latent_box))
               for start in starts]
    preds, expected = [], []
    for start, p in zip(starts, pending):
        p = np.asarray(p)
        m = min(chunk, samples - start)
        preds.append(p[0, :m])
        expected.append(p[1, :m] if reference is not None else np.full(m, label))
        if on_chunk:
            on_chunk(m)
    preds, expected = np.concatenate(preds), np.concatenate(expected)
    wrong = np.flatnonzero(preds != expected)
    k = samples - len(wrong)
    lo, hi = interval(k, samples, confidence)
    idx = wrong[:max_saved]
    z, images = generate(generator, key, idx, latent_box)
    return Correctness(-1 if label is None else int(label), samples, int(k), k / samples, lo, hi,
                       idx, z, images, preds[idx], expected[idx])


# --- latent attacks ---------------------------------------------------------------------------------
class AdversarialPairs(NamedTuple):
    """Attack outcome per latent; rows with ``found`` False hold the attack's best (unsuccessful) point.

    Attributes:
      z, z_adv: ``(B, d)`` latents, ``‖z − z_adv‖∞ ≤ eps`` (up to float32 rounding of ``z ± eps``).
      image, image_adv: ``(B, H, W, C)`` generated images in [0, 1].
      label, label_adv: ``(B,)`` classes the classifier gives to ``image`` and ``image_adv``.
      found: ``(B,)`` bool, ``label_adv != label`` (fresh forward pass) and ``label`` is the target label.
    """

    z: np.ndarray
    z_adv: np.ndarray
    image: np.ndarray
    image_adv: np.ndarray
    label: np.ndarray
    label_adv: np.ndarray
    found: np.ndarray


def _classify(classifier, generator, z):
    images = generator(z)
    x = to_classifier_input(images, generator.output_range, classifier.domain, classifier.input_shape)
    return generator.to_unit(images), jnp.argmax(classifier(x), axis=-1)


_classify_jit = jax.jit(_classify)


def latent_attack(classifier: Network, generator: Generator, z, eps, *, key, labels=None, method: str = "pgd",
                  steps: int = 40, restarts: int = 1, queries: int = 1000,
                  latent_box: float = LATENT_BOX) -> AdversarialPairs:
    """Search ``z' ∈ [z − eps, z + eps] ∩ latent box`` with ``C(G(z')) ≠ label`` for each of ``z: (B, d)``.

    ``method``: ``"pgd"`` (white-box projected gradient descent on the margin loss, `kernels.attacks.pgd`)
    or ``"random"`` (black-box random local search, `kernels.attacks.random_search`). ``labels`` default
    to the classes predicted at ``z``; a row whose prediction differs from its given label is never
    ``found`` (it is misclassified already, not an adversarial pair).
    Every pair is re-checked by generating both images and classifying them afresh.
    """
    from .kernels.attacks import pgd, random_search
    if method not in ATTACKS:
        raise InputError(f"unknown latent attack {method!r}; choose one of {ATTACKS}")
    net = compose(classifier, generator, latent_box=latent_box)
    z = jnp.asarray(z, jnp.float32)
    if z.ndim != 2 or z.shape[1] != generator.latent_dim:
        raise InputError(f"latents must have shape (B, {generator.latent_dim}), got {tuple(z.shape)}")
    parts = _structural(classifier), _structural(generator)
    image, pred = _classify_jit(*parts, z)
    labels = pred if labels is None else jnp.asarray(labels, jnp.int32)
    if method == "pgd":
        r = pgd(net, z, labels, eps, key=key, steps=steps, restarts=restarts, loss="margin")
    else:
        r = random_search(net, z, labels, eps, key=key, queries=queries)
    image_adv, pred_adv = _classify_jit(*parts, r.x_adv)
    e = np.broadcast_to(np.asarray(eps, np.float32), (z.shape[0],))
    dist = np.max(np.abs(np.asarray(r.x_adv) - np.asarray(z)), axis=1)
    within = dist <= e + 4 * np.spacing(np.float32(latent_box + e))
    found = np.asarray(pred_adv != labels) & np.asarray(pred == labels) & within
    return AdversarialPairs(np.asarray(z), np.asarray(r.x_adv), np.asarray(image), np.asarray(image_adv),
                            np.asarray(pred), np.asarray(pred_adv), found)


def adversarial_pairs(classifier: Network, generator: Generator, label: int | None, eps: float, *, samples: int = 100,
                      key=None, method: str = "pgd", latent_box: float = LATENT_BOX, **attack) -> AdversarialPairs:
    """Realistic adversarial examples: attack ``samples`` latents ``z`` (stream ``key``) of a class
    generator whose image is classified as ``label`` (any class when ``label`` is None); return the
    confirmed pairs only (``found`` all True)."""
    key = jax.random.PRNGKey(0) if key is None else key
    z = latents(jax.random.fold_in(key, 0), jnp.arange(samples), generator.latent_dim, float(latent_box))
    labels = None if label is None else jnp.full((samples,), label, jnp.int32)
    r = latent_attack(classifier, generator, z, eps, key=jax.random.fold_in(key, 1), labels=labels, method=method,
                      latent_box=latent_box, **attack)
    return AdversarialPairs(*(a[r.found] for a in r))


def time_to_first(classifier: Network, generator: Generator, label: int | None, eps: float, *, batch: int = 32,
                  max_rounds: int = 20, key=None, method: str = "pgd", latent_box: float = LATENT_BOX,
                  **attack) -> tuple[float, int, AdversarialPairs]:
    """Wall time until the first confirmed adversarial pair: rounds of ``batch`` fresh latents are attacked
    until one succeeds. Returns ``(seconds, rounds, pairs found in the last round)``; raises `JaxRobustError`
    after ``max_rounds`` fruitless rounds."""
    key = jax.random.PRNGKey(0) if key is None else key
    t0 = time.perf_counter()
    for r in range(max_rounds):
        pairs = adversarial_pairs(classifier, generator, label, eps, samples=batch, key=jax.random.fold_in(key, r),
                                  method=method, latent_box=latent_box, **attack)
        if len(pairs.found):
            return time.perf_counter() - t0, r + 1, pairs
    raise JaxRobustError(f"no adversarial example within eps={eps} after {max_rounds} rounds of {batch} latents")


# --- global robustness ------------------------------------------------------------------------------
VERDICTS = (ROBUST, VIOLATED, UNKNOWN)  # the order of `Robustness.counts` and of the stored columns


class Robustness(NamedTuple):
    """Global robustness of one generator in the latent ε-box.

    Attributes:
      label: the generator's class (-1: unconditional).  samples: latents drawn.  eps: latent L∞ radius.
      counts: ``(3,)`` ROBUST, VIOLATED, UNKNOWN (`VERDICTS`).  fractions: ``(3,)`` counts / samples.
      ci_low, ci_high: ``(3,)`` Clopper–Pearson intervals of the fractions.
      status: ``(samples,)`` int8 `verdict.Status` per latent.
      reason: ``(samples,)`` str: the bound method that proved it, ``"attack"``, or ``""`` (undecided).
      pairs: the confirmed adversarial pairs (`AdversarialPairs`, ``found`` all True).
    """

    label: int
    samples: int
    eps: float
    counts: np.ndarray
    fractions: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    status: np.ndarray
    reason: np.ndarray
    pairs: AdversarialPairs


def _bound_margins(net: Network, z, labels, eps, method: str) -> np.ndarray:
    """Lower bounds ``(B, C-1)`` of the margins over the latent ε-box ∩ domain. ``"crown"``: a backward
    pass from the margins over intermediate bounds from forward-mode linear propagation in the latent
    (`kernels.forward_bounds`), which costs a forward pass per latent dimension instead of a backward
    pass per neuron of the image-sized layers."""
    from .kernels.bounds import margin_bounds, robustness_spec
    from .kernels.forward_bounds import forward_linear
    if method == "ibp":
        return np.asarray(margin_bounds(net, z, eps, "ibp", labels=labels))
    lo, hi = jnp.clip(z - eps, *net.domain), jnp.clip(z + eps, *net.domain)
    return np.asarray(forward_linear(net, lo, hi, robustness_spec(labels, net.num_classes)).lower)


def global_robustness(classifier: Network, generator: Generator, label: int | None, eps: float, *,
                      samples: int = 1000, key=None, bounds: str = "ibp", attack_steps: int = 40,
                      restarts: int = 1, confidence: float = 0.95, latent_box: float = LATENT_BOX,
                      chunk: int = 250, on_chunk=None,
                      complete_timeout: float = COMPLETE_TIMEOUT) -> Robustness:
    """Classify the latent ε-box around each of ``samples`` latents as ROBUST / VIOLATED / UNKNOWN.

    The reference class of a latent is the classifier's prediction at it. Latents come from stream
    ``key`` (see `latents`); the attack uses ``fold_in(key, 1)``. ``bounds``: ``"ibp"``, ``"crown"``
    (see `_bound_margins`), ``"complete"`` (``"crown"``, then `verify.verify` by input splitting of the latent
    box, ``complete_timeout`` seconds per latent the bounds and the attack leave undecided) or ``"none"``
    (falsification only). A latent is never both proved and falsified; if it were, the bounds would be
    unsound and a `JaxRobustError` is raised. Runs on JAX's default device.
    """
    if bounds not in BOUND_METHODS:
        raise InputError(f"unknown bound method {bounds!r}; choose one of {BOUND_METHODS}")
    if not eps >= 0:
        raise InputError(f"eps must be >= 0, got {eps}")
    samples, chunk = int(samples), int(chunk)
    if samples < 1 or chunk < 1:
        raise InputError(f"samples and chunk must be >= 1, got {samples}, {chunk}")
    key = jax.random.PRNGKey(0) if key is None else key
    net = compose(classifier, generator, latent_box=latent_box)
    chunk = min(chunk, samples)
    status, reasons, pairs = [], [], []
    for start in range(0, samples, chunk):
        idx = jnp.arange(start, start + chunk)  # fixed shape; rows past `samples` dropped
        z = latents(key, idx, generator.latent_dim, float(latent_box))
        r = latent_attack(classifier, generator, z, eps, key=jax.random.fold_in(jax.random.fold_in(key, 1), start),
                          steps=attack_steps, restarts=restarts, latent_box=latent_box)
        st = np.where(r.found, VIOLATED, UNKNOWN).astype(np.int8)
        why = np.where(r.found, "attack", "").astype(object)
        if bounds != "none":
            method = "crown" if bounds == "complete" else bounds
            ok = np.all(_bound_margins(net, z, jnp.asarray(r.label), eps, method) > 0, axis=1)
            if np.any(ok & r.found):
                raise JaxRobustError("unsound bounds: a latent box was proved robust and falsified")
            st, why = np.where(ok, ROBUST, st).astype(np.int8), np.where(ok, method, why)
        m = min(chunk, samples - start)
        if bounds == "complete":
            r = _decide_completely(classifier, generator, net, r, st, why, m, eps, complete_timeout,
                                   jax.random.fold_in(key, 2))
        status.append(st[:m])
        reasons.append(why[:m])
        pairs.append(AdversarialPairs(*(a[:m][r.found[:m]] for a in r)))
        if on_chunk:
            on_chunk(m)
    status, reason = np.concatenate(status), np.concatenate(reasons)
    counts = np.array([(status == s).sum() for s in VERDICTS])
    cis = np.array([interval(int(c), samples, confidence) for c in counts])
    pairs = AdversarialPairs(*(np.concatenate(p) for p in zip(*pairs)))
    return Robustness(-1 if label is None else int(label), samples, float(eps), counts, counts / samples,
                      cis[:, 0], cis[:, 1], status, reason, pairs)


def _decide_completely(classifier, generator, net, r: AdversarialPairs, st, why, m: int, eps, timeout: float, key):
    """Branch and bound (`verify.verify`, input splitting of the latent ε-box ∩ domain) on the first ``m``
    latents of a chunk that ``st`` leaves UNKNOWN; updates ``st`` and ``why`` in place and returns the pairs
    with its counterexamples (re-classified through G and C) added."""
    from .verify import VerifyConfig, verify
    todo = np.flatnonzero(st[:m] == UNKNOWN)
    if not len(todo):
        return r
    v = verify(net, r.z[todo], r.label[todo], eps, VerifyConfig(timeout=timeout, split="inputs"), key=key)
    st[todo], why[todo] = v.status, np.where(v.status == UNKNOWN, v.stage, "complete")
    hit = todo[v.status == VIOLATED]
    if not len(hit):
        return r
    z_adv = r.z_adv.copy()
    z_adv[hit] = v.counterexample[v.status == VIOLATED]
    image_adv, pred_adv = (np.asarray(a) for a in _classify_jit(_structural(classifier), _structural(generator),
                                                               jnp.asarray(z_adv[hit])))
    out = r._replace(z_adv=z_adv, image_adv=r.image_adv.copy(), label_adv=r.label_adv.copy(), found=r.found.copy())
    out.image_adv[hit], out.label_adv[hit], out.found[hit] = image_adv, pred_adv, pred_adv != r.label[hit]
    return out


# --- driver -----------------------------------------------------------------------------------------
STAGES = {"correctness": "global_correctness", "robustness": "global_robustness"}  # stage -> its main table
COUNTS = tuple(f"{Status(v).name.lower()}{suffix}" for v in VERDICTS for suffix in ("", "_low", "_high"))


def _tables(latent_dim: int, image_shape) -> dict:
    image = ("f4", tuple(image_shape))
    return {
        "global_correctness": {"samples": ("i8", ()), "correct": ("i8", ()), "estimate": ("f8", ()),
                               "ci_low": ("f8", ()), "ci_high": ("f8", ()), "classifier_name": ("str", ()),
                               "generator_name": ("str", ()), "reference": ("str", ())},
        "global_misclassified": {"label": ("i8", ()), "predicted": ("i8", ()), "expected": ("i8", ()),
                                 "latent": ("f4", (latent_dim,)), "image": image},
        "global_robustness": {"samples": ("i8", ()), "eps": ("f8", ()),
                              **{c: ("i8" if c.isalpha() else "f8", ()) for c in COUNTS}},
        "global_adversarial": {"label": ("i8", ()), "label_adv": ("i8", ()), "latent": ("f4", (latent_dim,)),
                               "latent_adv": ("f4", (latent_dim,)), "image": image, "image_adv": image},
    }


class _Unit(NamedTuple):
    """One work unit of `run_global`: a stage (`STAGES`) of one class (None: unconditional generator)."""
    stage: str
    cls: int | None

    @property
    def index(self) -> int:
        return -1 if self.cls is None else int(self.cls)


class _Task:
    """``compute(unit) -> {table: rows}`` of `run_global` (rows without the ``config`` column), on JAX's default
    device."""

    def __init__(self, classifier: Network, generators: Mapping, reference: Network | None, options: dict):
        self.classifier, self.generators, self.reference = classifier, dict(generators), reference
        self.options = options

    def __call__(self, unit: _Unit) -> dict:
        o, clf, g = self.options, self.classifier, self.generators[unit.cls]
        i = unit.index
        key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(o["seed"]), i + 1), int(unit.stage == "robustness"))
        keys = lambda n, split: {"network": [clf.hash] * n, "dataset": [g.hash] * n, "split": [split] * n}  # noqa: E731
        if unit.stage == "correctness":
            r = global_correctness(clf, g, unit.cls, samples=o["samples"], key=key,
                                   reference=self.reference if unit.cls is None else None,
                                   confidence=o["confidence"], latent_box=o["latent_box"], max_saved=o["max_saved"])
            m = len(r.wrong_index)
            return {"global_misclassified": {**keys(m, f"class{i}"), "index": r.wrong_index, "label": [i] * m,
                                             "predicted": r.wrong_predicted, "expected": r.wrong_expected,
                                             "latent": r.wrong_latent, "image": r.wrong_image},
                    "global_correctness": {**keys(1, "global"), "index": [i], "samples": [r.samples],
                                           "correct": [r.correct], "estimate": [r.estimate], "ci_low": [r.ci_low],
                                           "ci_high": [r.ci_high], "classifier_name": [clf.name],
                                           "generator_name": [g.name],
                                           "reference": ["" if self.reference is None else self.reference.name]}}
        r = global_robustness(clf, g, unit.cls, o["eps"], samples=o["robust_samples"], key=key, bounds=o["bounds"],
                              attack_steps=o["attack_steps"], confidence=o["confidence"], latent_box=o["latent_box"])
        p = AdversarialPairs(*(a[:o["max_saved"]] for a in r.pairs))
        m = len(p.z)
        counts = {f"{name}{suffix}": [v[k]] for k, name in enumerate(COUNTS[::3])
                  for suffix, v in (("", r.counts), ("_low", r.ci_low), ("_high", r.ci_high))}
        return {"global_adversarial": {**keys(m, f"class{i}"), "index": np.flatnonzero(r.status == VIOLATED)[:m],
                                       "label": p.label, "label_adv": p.label_adv, "latent": p.z, "latent_adv": p.z_adv,
                                       "image": p.image, "image_adv": p.image_adv},
                "global_robustness": {**keys(1, "global"), "index": [i], "samples": [r.samples], "eps": [r.eps],
                                      **counts}}


def run_global(classifier: Network, generators: Mapping, out, *, classes=None, samples: int = 10_000,
               eps: float | None = 0.1, robust_samples: int = 1000, reference: Network | None = None,
               confidence: float = 0.95, bounds: str = "ibp", attack_steps: int = 40, seed: int = 0,
               latent_box: float = LATENT_BOX, max_saved: int = 100, image_dir=None, resume: bool = False,
               progress: bool = True, devices: int | None = None, workers: int | None = None,
               ray_address: str | None = None) -> dict:
    """Global correctness (and, with ``eps``, robustness) of ``classifier`` on each generator of the set.

    ``generators``: ``{class: Generator}`` (class generators) or ``{None: Generator}`` (unconditional:
    correctness needs ``reference`` and is skipped without it). Results go to the HDF5 file ``out``
    (tables ``global_correctness``, ``global_misclassified``, ``global_robustness``,
    ``global_adversarial``), keyed by (classifier hash, generator hash, class, configuration); each stage of
    each class is one unit of `runner.ResumableRun`, committed when done, so ``resume=True`` continues a
    stopped run. ``devices``: local devices that run units side by side (default all); ``workers`` /
    ``ray_address``: Ray workers. With ``image_dir``, PNG grids of misclassified samples and of adversarial
    pairs (top row original, bottom row adversarial) are written.
    Returns a JSON-able summary ``{"correctness": [...], "robustness": [...]}``; a robustness entry counts
    the latents per verdict (``robust``, ``violated``, ``unknown``, each with ``_low`` / ``_high``).
    """
    from .runner import ResumableRun, check_scale

    check_scale(devices, workers, ray_address)
    if not generators:
        raise InputError("no generators given")
    classes = list(generators) if classes is None else list(classes)
    missing = [c for c in classes if c not in generators]
    if missing:
        raise InputError(f"the generator set has no class {missing[0]} (classes: {list(generators)})")
    if bounds not in BOUND_METHODS:
        raise InputError(f"unknown bound method {bounds!r}; choose one of {BOUND_METHODS}")
    if eps is not None and not eps >= 0:
        raise InputError(f"eps must be >= 0, got {eps}")
    if min(samples, robust_samples) < 1 or max_saved < 0 or not 0 < confidence < 1:
        raise InputError(f"need samples, robust_samples >= 1, max_saved >= 0 and 0 < confidence < 1 (got {samples}, "
                         f"{robust_samples}, {max_saved}, {confidence})")
    for c in classes:
        compose(classifier, generators[c], latent_box=latent_box)  # shapes and the latent box, before any file
    stages = [s for s, on in (("correctness", reference is not None or None not in classes),
                              ("robustness", eps is not None)) if on]
    options = {"samples": samples, "eps": eps, "robust_samples": robust_samples, "confidence": confidence,
               "bounds": bounds, "attack_steps": attack_steps, "seed": seed, "latent_box": latent_box,
               "reference": None if reference is None else reference.hash}
    some = generators[classes[0]]
    run = ResumableRun(out, _tables(some.latent_dim, some.output_shape), options, resume=resume, progress=progress,
                       desc="global", unit="sample", devices=devices, workers=workers, ray_address=ray_address)
    units = [_Unit(s, c) for s in stages for c in classes]
    todo = np.ones(len(units), bool)
    for s in stages:
        mine = np.flatnonzero([u.stage == s for u in units])
        todo[mine] = run.pending([(classifier.hash, generators[units[k].cls].hash, "global", units[k].index)
                                  for k in mine], STAGES[s])
    size = lambda u: samples if u.stage == "correctness" else robust_samples  # noqa: E731

    def save_images(rows):
        from .gan import save_png
        for table, name in (("global_misclassified", "misclassified"), ("global_adversarial", "adversarial")):
            r = rows.get(table)
            if r is not None and len(r["index"]):
                split, k = r["split"][0], min(len(r["index"]), 10)
                images = r["image"][:50] if name == "misclassified" else np.concatenate([r["image"][:k],
                                                                                        r["image_adv"][:k]])
                save_png(images, Path(image_dir) / f"{name}_{split}.png", ncols=10 if name == "misclassified" else k)

    run.map([u for u, t in zip(units, todo) if t], _Task(classifier, generators, reference,
                                                          {**options, "max_saved": max_saved}),
            size=size, done=sum(size(u) for u, t in zip(units, todo) if not t),
            after=None if image_dir is None else save_images)
    summary = {"classifier": classifier.name, "classifier_hash": classifier.hash, "config": options,
               "correctness": [], "robustness": []}
    columns = {"correctness": ("samples", "correct", "estimate", "ci_low", "ci_high"),
               "robustness": ("samples", "eps") + COUNTS}
    for s in stages:
        d = run.read(STAGES[s])
        for c in classes:
            u = _Unit(s, c)
            i = np.flatnonzero((d["network"] == classifier.hash) & (d["dataset"] == generators[c].hash)
                               & (d["index"] == u.index))[0]
            summary[s].append({"class": u.index, **{k: d[k][i].item() for k in columns[s]}})
    return summary
