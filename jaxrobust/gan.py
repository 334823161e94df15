"""MLP GANs in Flax + optax: per-class and class-conditional generators, training, files, sample grids.

Architecture (Fijalkow & Gupta): generator ``z: (B, latent_dim=10)`` → Dense 256 → Dense 512 →
Dense 1024 (LeakyReLU(0.2) after each) → Dense 784 → tanh, reshaped to ``(B, 28, 28, 1)`` in
[-1, 1]; discriminator an MLP ``784 → 512 → 256 → 1`` with LeakyReLU(0.2). The conditional variant
concatenates the one-hot label to ``z`` and to the flattened image. Training uses the
non-saturating GAN loss with Adam (lr 2e-4, β1 = 0.5); real images are rescaled to [-1, 1] and,
with ``augment``, randomly transformed each step by `augment.random_affine`.

Generators of several classes travel together as a *generator set*, ``{class: Generator}``
(``{None: Generator}`` for an unconditional one). `save_generators` writes one msgpack file
(architecture, parameters and content hash per model; a conditional model is stored once),
`load_generators` reads it back, and also accepts a Keras DCGAN ``.h5`` or an ONNX generator.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from .augment import AffineRange, random_affine
from .errors import FileFormatError, InputError
from .generator import Generator
from .network import content_hash

FORMAT = "jaxrobust-generators/1"
GeneratorSet = Mapping  # {class (int) or None: Generator}


class MLPGenerator(nn.Module):
    """``z: (B, latent), labels: (B,) or None -> (B, *output_shape)`` in [-1, 1]."""
    hidden: Sequence[int] = (256, 512, 1024)
    output_shape: Sequence[int] = (28, 28, 1)
    num_classes: int = 0

    @nn.compact
    def __call__(self, z, labels=None):
        if self.num_classes:
            z = jnp.concatenate([z, jax.nn.one_hot(labels, self.num_classes, dtype=z.dtype)], axis=-1)
        for h in self.hidden:
            z = nn.leaky_relu(nn.Dense(h)(z), 0.2)
        x = jnp.tanh(nn.Dense(math.prod(self.output_shape))(z))
        return x.reshape((z.shape[0], *self.output_shape))


class MLPDiscriminator(nn.Module):
    """``x: (B, *shape) in [-1, 1], labels: (B,) or None -> (B,)`` logits of "real"."""
    hidden: Sequence[int] = (512, 256)
    num_classes: int = 0

    @nn.compact
    def __call__(self, x, labels=None):
        x = x.reshape((x.shape[0], -1))
        if self.num_classes:
            x = jnp.concatenate([x, jax.nn.one_hot(labels, self.num_classes, dtype=x.dtype)], axis=-1)
        for h in self.hidden:
            x = nn.leaky_relu(nn.Dense(h)(x), 0.2)
        return nn.Dense(1)(x)[:, 0]


def gan_arch(latent_dim: int = 10, hidden=(256, 512, 1024), output_shape=(28, 28, 1), num_classes: int = 0,
             disc_hidden=(512, 256)) -> dict:
    """Canonical architecture dict of an MLP GAN (``num_classes > 0``: class-conditional)."""
    if latent_dim < 1 or not hidden or len(output_shape) != 3 or num_classes < 0:
        raise InputError(f"bad GAN architecture: latent_dim={latent_dim}, hidden={hidden}, "
                         f"output_shape={output_shape}, num_classes={num_classes}")
    return {"family": "mlp_gan", "latent_dim": int(latent_dim), "hidden": [int(h) for h in hidden],
            "output_shape": [int(d) for d in output_shape], "num_classes": int(num_classes),
            "disc_hidden": [int(h) for h in disc_hidden]}


def _modules(arch: dict) -> tuple[MLPGenerator, MLPDiscriminator]:
    if arch.get("family") != "mlp_gan":
        raise InputError(f"unknown generator family {arch.get('family')!r}")
    return (MLPGenerator(tuple(arch["hidden"]), tuple(arch["output_shape"]), arch["num_classes"]),
            MLPDiscriminator(tuple(arch["disc_hidden"]), arch["num_classes"]))


@dataclasses.dataclass(frozen=True)
class _GanApply:
    """Hashable ``apply(params, z)`` of an MLP generator (equal for equal architectures, so jitted callers
    share their compilations). A conditional generator's params are ``{"model": ..., "label": int32 ()}``:
    the class is a parameter, so the generators of all classes share this function."""
    arch_json: str

    def __call__(self, params, z):
        gen, _ = _modules(json.loads(self.arch_json))
        if not gen.num_classes:
            return gen.apply(params, z)
        return gen.apply(params["model"], z, jnp.broadcast_to(params["label"], (z.shape[0],)))


def make_generator(arch: dict, params, label: int | None = None, *, name: str | None = None) -> Generator:
    """The `Generator` ``z: (B, latent_dim) -> (B, 28, 28, 1)`` in [-1, 1] of an MLP GAN's generator
    ``params``; ``label`` selects the class of a conditional one (required iff conditional)."""
    if bool(arch["num_classes"]) != (label is not None):
        raise InputError("a label is required for a conditional generator and meaningless otherwise")
    if label is not None and not 0 <= label < arch["num_classes"]:
        raise InputError(f"label {label} outside [0, {arch['num_classes']})")
    if label is not None:
        params = {"model": params, "label": np.int32(label)}
    default = f"mlp_gan{'' if label is None else f'[{label}]'}"
    return Generator(_GanApply(json.dumps(arch, sort_keys=True)), params, arch["latent_dim"],
                     tuple(arch["output_shape"]), (-1.0, 1.0), name or default, {"gan": arch, "label": label})


def _model_params(generator: Generator):
    """The network parameters of an MLP GAN generator (without the class of a conditional one)."""
    return generator.params if generator.arch["label"] is None else generator.params["model"]


# --- training ---------------------------------------------------------------------------------------
class GANState(NamedTuple):
    g_params: object
    d_params: object
    g_opt: object
    d_opt: object


def _losses(gen, disc, g_params, d_params, z, real, labels):
    """Non-saturating GAN losses ``(d_loss, g_loss)`` of one batch."""
    fake = gen.apply(g_params, z, labels)
    d_real = disc.apply(d_params, real, labels)
    d_fake = disc.apply(d_params, jax.lax.stop_gradient(fake), labels)
    d_loss = jnp.mean(jax.nn.softplus(-d_real) + jax.nn.softplus(d_fake))
    g_loss = jnp.mean(jax.nn.softplus(-disc.apply(d_params, fake, labels)))
    return d_loss, g_loss


def _make_train(arch, optimizer, batch_size, augment, ranges, steps_per_call):
    """``run(state, data, counts, bucket_labels, key) -> (state, losses (steps_per_call, 2))`` for one GAN.

    ``data: (K, N_max, H, W, C)`` in [-1, 1] holds K buckets of images (one per class), ``counts: (K,)``
    their sizes and ``bucket_labels: (K,)`` their labels (used by a conditional GAN). Each step draws a
    bucket, then an image, per batch row.
    """
    gen, disc = _modules(arch)
    cond = arch["num_classes"] > 0

    def run(state, data, counts, bucket_labels, key):
        def step(state, key):
            kb, ki, kz, ka = jax.random.split(key, 4)
            bucket = jax.random.randint(kb, (batch_size,), 0, data.shape[0])
            real = data[bucket, jax.random.randint(ki, (batch_size,), 0, counts[bucket])]
            if augment:
                real = random_affine(ka, (real + 1) / 2, ranges) * 2 - 1
            labels = bucket_labels[bucket] if cond else None
            z = jax.random.normal(kz, (batch_size, arch["latent_dim"]))
            d_loss, d_grad = jax.value_and_grad(
                lambda p: _losses(gen, disc, state.g_params, p, z, real, labels)[0])(state.d_params)
            upd, d_opt = optimizer.update(d_grad, state.d_opt, state.d_params)
            d_params = optax.apply_updates(state.d_params, upd)
            g_loss, g_grad = jax.value_and_grad(
                lambda p: _losses(gen, disc, p, d_params, z, real, labels)[1])(state.g_params)
            upd, g_opt = optimizer.update(g_grad, state.g_opt, state.g_params)
            new = GANState(optax.apply_updates(state.g_params, upd), d_params, g_opt, d_opt)
            return new, jnp.stack([d_loss, g_loss])

        return jax.lax.scan(step, state, jax.random.split(key, steps_per_call))

    return run


def _init(arch, key, optimizer) -> GANState:
    gen, disc = _modules(arch)
    kg, kd = jax.random.split(key)
    cond = arch["num_classes"] > 0
    z = jnp.zeros((1, arch["latent_dim"]))
    lab = jnp.zeros((1,), jnp.int32) if cond else None
    g = gen.init(kg, z, lab)
    d = disc.init(kd, jnp.zeros((1, *arch["output_shape"])), lab)
    return GANState(g, d, optimizer.init(g), optimizer.init(d))


def _buckets(x, y, classes):
    """Images of each class padded into ``(K, N_max, H, W, C)`` in [-1, 1], with counts ``(K,)``."""
    groups = [x[y == c] for c in classes]
    if any(len(g) == 0 for g in groups):
        empty = [c for c, g in zip(classes, groups) if len(g) == 0]
        raise InputError(f"no training images of class(es) {empty}")
    n_max = max(len(g) for g in groups)
    data = np.zeros((len(groups), n_max, *x.shape[1:]), np.float32)
    for i, g in enumerate(groups):
        data[i, :len(g)] = g * 2 - 1
    return jnp.asarray(data), jnp.asarray([len(g) for g in groups], jnp.int32)


def _check_images(x, y):
    x = np.asarray(x, np.float32)
    if x.ndim != 4 or not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise InputError(f"training images must be finite (N, H, W, C) in [0, 1], got shape {x.shape}")
    y = np.asarray(y)
    if y.shape != (len(x),) or y.dtype.kind not in "iu":
        raise InputError(f"labels must be integers of shape ({len(x)},), got {y.dtype} {y.shape}")
    return x, y


def train_gans(x, y, *, classes=None, conditional: bool = False, steps: int = 2000, batch_size: int = 64,
               learning_rate: float = 2e-4, latent_dim: int = 10, hidden=(256, 512, 1024),
               disc_hidden=(512, 256), augment: bool = False, ranges: AffineRange = AffineRange(),
               seed: int = 0, steps_per_call: int = 50, progress: bool = True) -> tuple[dict, np.ndarray]:
    """Train GANs on ``x: (N, H, W, C)`` in [0, 1] with labels ``y: (N,)``.

    ``conditional=False``: one unconditional GAN per class of ``classes`` (default: every label present),
    trained side by side (`vmap` over classes). ``conditional=True``: one class-conditional GAN, whose
    batches are drawn class-balanced. ``steps`` generator/discriminator update pairs, rounded up to a
    multiple of ``steps_per_call`` (steps run inside one jitted `lax.scan`).

    Returns ``({class: Generator}, losses)`` with ``losses: (steps, [K,] 2)`` = (discriminator, generator).
    """
    from tqdm.auto import tqdm

    x, y = _check_images(x, y)
    classes = sorted(int(c) for c in (np.unique(y) if classes is None else classes))
    if steps < 1 or batch_size < 1 or steps_per_call < 1:
        raise InputError(f"steps, batch_size and steps_per_call must be >= 1, got {steps}, {batch_size}, "
                         f"{steps_per_call}")
    num_labels = max(classes) + 1
    arch = gan_arch(latent_dim, hidden, x.shape[1:], num_labels if conditional else 0, disc_hidden)
    optimizer = optax.adam(learning_rate, b1=0.5)
    run = _make_train(arch, optimizer, batch_size, augment, ranges, steps_per_call)
    data, counts = _buckets(x, y, classes)
    key = jax.random.PRNGKey(seed)
    calls = -(-steps // steps_per_call)
    if conditional:
        state = _init(arch, jax.random.fold_in(key, num_labels), optimizer)
        call = jax.jit(run)
    else:
        state = jax.vmap(lambda c: _init(arch, jax.random.fold_in(key, c), optimizer))(jnp.asarray(classes))
        labels = jnp.zeros((1,), jnp.int32)
        call = jax.jit(jax.vmap(lambda s, d, n, k: run(s, d[None], n[None], labels, k)))
    history = []
    for i in tqdm(range(calls), desc="GAN training", unit=f"×{steps_per_call} steps", disable=not progress):
        k = jax.random.fold_in(key, i)
        if conditional:
            state, losses = call(state, data, counts, jnp.asarray(classes, jnp.int32), k)
        else:
            state, losses = call(state, data, counts, jax.random.split(k, len(classes)))
            losses = jnp.moveaxis(losses, 0, 1)
        history.append(np.asarray(losses))
    history = np.concatenate(history)
    if conditional:
        return {c: make_generator(arch, state.g_params, c) for c in classes}, history
    return {c: make_generator(arch, jax.tree_util.tree_map(lambda a: a[i], state.g_params))
            for i, c in enumerate(classes)}, history


# --- files ----------------------------------------------------------------------------------------------
def save_generators(generators: GeneratorSet, path, *, meta: dict | None = None) -> str:
    """Write a generator set ``{class or None: Generator}`` of MLP GANs to ``path`` (msgpack) atomically.

    Models shared by several classes (a conditional GAN) are stored once. ``meta`` (JSON-able, e.g. the
    training data and steps) is stored alongside. Returns the content hash of the set.
    """
    if not generators:
        raise InputError("no generators to save")
    models, classes = {}, {}
    for c, g in generators.items():
        if not (isinstance(g.arch, dict) and "gan" in g.arch):
            raise InputError(f"only MLP GAN generators can be saved (generator {g.name!r} has arch {g.arch!r})")
        params = _model_params(g)
        h = content_hash(g.arch["gan"], params)
        models.setdefault(h, {"arch": json.dumps(g.arch["gan"]), "hash": h,
                              "params": flax.serialization.to_state_dict(jax.tree_util.tree_map(np.asarray, params))})
        classes["none" if c is None else str(int(c))] = [h, -1 if g.arch["label"] is None else int(g.arch["label"])]
    record = {"format": FORMAT, "models": models, "classes": json.dumps(classes), "meta": json.dumps(meta or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(flax.serialization.msgpack_serialize(record))
    os.replace(tmp, path)
    return set_hash(generators)


def set_hash(generators: GeneratorSet) -> str:
    """Content hash (16 hex digits) of a generator set: its classes and every generator's hash."""
    return content_hash({str(c): g.hash for c, g in generators.items()}, [])


def load_generators(path, *, image_shape=(28, 28, 1), output_range=(-1.0, 1.0)) -> dict:
    """Read a generator set: a msgpack file of `save_generators` (content hashes verified), a Keras
    MNIST DCGAN ``.h5`` or an ONNX generator (both unconditional: ``{None: Generator}``).

    ``image_shape`` and ``output_range`` describe an ONNX generator's output (reshaped from any layout of
    the same size; a ``(C, H, W)`` output is transposed to ``(H, W, C)``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"generator file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".h5":
        from .keras_import import load_keras_dcgan_generator
        return {None: load_keras_dcgan_generator(path)}
    if suffix == ".onnx":
        return {None: _onnx_generator(path, tuple(image_shape), output_range)}
    if suffix != ".msgpack":
        raise FileFormatError(f"{path}: unknown generator file type {path.suffix!r} (expected .msgpack, .h5 or .onnx)")
    try:
        record = flax.serialization.msgpack_restore(path.read_bytes())
        if record.get("format") != FORMAT:
            raise ValueError(f"format {record.get('format')!r}")
        params = {}
        for h, m in record["models"].items():
            arch = json.loads(m["arch"])
            template = _init(arch, jax.random.PRNGKey(0), optax.identity()).g_params
            restored = flax.serialization.from_state_dict(template, m["params"])
            params[h] = (arch, jax.tree_util.tree_map(np.asarray, restored))
            if content_hash(arch, params[h][1]) != m["hash"] or h != m["hash"]:
                raise FileFormatError(f"{path}: content hash mismatch for model {h}; the file is corrupt")
        out = {}
        for c, (h, label) in json.loads(record["classes"]).items():
            arch, p = params[h]
            out[None if c == "none" else int(c)] = make_generator(arch, p, None if label < 0 else label)
    except FileFormatError:
        raise
    except Exception as e:  # msgpack, key and shape errors all mean an invalid file
        raise FileFormatError(f"{path} is not a valid jaxrobust generator file ({type(e).__name__}: {e})") from None
    return dict(sorted(out.items(), key=lambda kv: -1 if kv[0] is None else kv[0]))


def generator_meta(path) -> dict:
    """The ``meta`` dict stored by `save_generators` (empty for other file types)."""
    path = Path(path)
    if path.suffix.lower() != ".msgpack":
        return {}
    try:
        return json.loads(flax.serialization.msgpack_restore(path.read_bytes())["meta"])
    except Exception as e:
        raise FileFormatError(f"{path} is not a valid jaxrobust generator file ({type(e).__name__}: {e})") from None


def _reshape_images(apply, image_shape):
    """``apply`` with its output ``(B, ...)`` laid out as ``(B, *image_shape)`` (NCHW transposed)."""
    h, w, c = image_shape

    def out(params, z):
        x = apply(params, z)
        if x.ndim == 4 and tuple(x.shape[1:]) == (c, h, w) and c > 1:
            return x.transpose(0, 2, 3, 1)
        return x.reshape((x.shape[0], h, w, c))

    return out


def _onnx_generator(path, image_shape, output_range) -> Generator:
    from .onnx_import import load_onnx
    net = load_onnx(path, mean=0.0, std=1.0, domain=(-np.inf, np.inf))
    if len(net.input_shape) != 1:
        raise FileFormatError(f"{path}: a generator must take latent vectors (B, d), got inputs {net.input_shape}")
    out = jax.eval_shape(net.apply, net.params, jax.ShapeDtypeStruct((1, *net.input_shape), jnp.float32))
    if math.prod(out.shape[1:]) != math.prod(image_shape):
        raise FileFormatError(f"{path}: output shape {tuple(out.shape[1:])} does not hold images {image_shape}")
    return Generator(_reshape_images(net.apply, image_shape), net.params, net.input_shape[0], image_shape,
                     (float(output_range[0]), float(output_range[1])), path.stem, {"onnx_generator": net.arch})


# --- pictures ---------------------------------------------------------------------------------------------
def tile(images, ncols: int) -> np.ndarray:
    """Images ``(N, H, W, C)`` in [0, 1] -> one ``(rows*(H+1)-1, ncols*(W+1)-1, C)`` grid (1-pixel gaps)."""
    images = np.asarray(images, np.float32)
    n, h, w, c = images.shape
    rows = -(-n // ncols)
    grid = np.ones((rows * (h + 1) - 1, ncols * (w + 1) - 1, c), np.float32)
    for i, im in enumerate(images):
        r, q = divmod(i, ncols)
        grid[r * (h + 1):r * (h + 1) + h, q * (w + 1):q * (w + 1) + w] = im
    return grid


def save_png(images, path, ncols: int = 10) -> Path:
    """Write ``images: (N, H, W, C)`` in [0, 1] as one PNG grid; returns the path. Uses no plotting
    backend, so an interactive or inline one (notebooks) is left as it is."""
    from matplotlib import image

    grid = np.clip(tile(images, min(ncols, len(images))), 0, 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if grid.shape[-1] == 1:
        image.imsave(path, grid[..., 0], cmap="gray", vmin=0, vmax=1)
    else:
        image.imsave(path, grid)
    return path


def sample_grid(generators: GeneratorSet, path, *, per_class: int = 10, seed: int = 0) -> Path:
    """PNG with one row of ``per_class`` samples (z ~ N(0, I)) per generator of the set."""
    rows = []
    for i, g in enumerate(generators.values()):
        z = jax.random.normal(jax.random.PRNGKey(seed + i), (per_class, g.latent_dim))
        rows.append(np.asarray(g.to_unit(g(z))))
    return save_png(np.concatenate(rows), path, ncols=per_class)
