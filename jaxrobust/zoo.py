"""Built-in Flax models in the papers' families, described by small JSON-able ``arch`` dicts.

Families (inputs NHWC images in [0, 1], e.g. ``(28, 28, 1)``):

* ``mlp``      — Flatten → [Dense(h) → act]* → Dense(classes), act ReLU (default), sigmoid or tanh. Bosman et
  al. use ReLU 256x2/4/6, 3x100 … 9x200.
* ``conv_small`` — ERAN's convSmall: Conv16 4x4/2 → ReLU → Conv32 4x4/2 → ReLU → Dense100 → ReLU → Dense.
* ``cnn``     — Fijalkow & Gupta's classifiers: Conv(c1) 3x3 → ReLU → MaxPool2 → Conv(c2) 3x3 → ReLU → MaxPool2
  → Dense(d) → ReLU → Dense(classes); sizes small (32, 64, 200), medium (64, 128, 256), large (64, 128, 512).
"""
from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from .errors import InputError
from .network import Network

GENERATIVE_SIZES = {"small": (32, 64, 200), "medium": (64, 128, 256), "large": (64, 128, 512)}


ACTIVATIONS = {"relu": nn.relu, "sigmoid": nn.sigmoid, "tanh": nn.tanh}


class MLP(nn.Module):
    """Fully connected network: ``(B, *in) -> (B, classes)``, activation by name (`ACTIVATIONS`)."""
    hidden: Sequence[int]
    num_classes: int = 10
    activation: str = "relu"

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        for h in self.hidden:
            x = ACTIVATIONS[self.activation](nn.Dense(h)(x))
        return nn.Dense(self.num_classes)(x)


class ConvSmall(nn.Module):
    """ERAN convSmall: ``(B, H, W, C) -> (B, classes)``."""
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (4, 4), strides=(2, 2), padding="VALID")(x))
        x = nn.relu(nn.Conv(32, (4, 4), strides=(2, 2), padding="VALID")(x))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(100)(x))
        return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
    """Conv-pool-conv-pool-dense classifier of the generative-model paper: ``(B, H, W, C) -> (B, classes)``."""
    channels: Sequence[int] = (32, 64)
    dense: int = 200
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        for c in self.channels:
            x = nn.relu(nn.Conv(c, (3, 3), padding="SAME")(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.dense)(x))
        return nn.Dense(self.num_classes)(x)


def arch(family: str, input_shape=(28, 28, 1), num_classes: int = 10, **kw) -> dict:
    """A canonical architecture dict, e.g. ``arch("mlp", hidden=(256, 256))`` or ``arch("cnn", size="small")``."""
    a = {"family": family, "input_shape": [int(d) for d in input_shape], "num_classes": int(num_classes)}
    if family == "mlp":
        a["hidden"] = [int(h) for h in kw.pop("hidden", (256, 256))]
        act = kw.pop("activation", "relu")
        if act not in ACTIVATIONS:
            raise InputError(f"unknown activation {act!r}; choose from {', '.join(ACTIVATIONS)}")
        if act != "relu":       # ReLU networks keep the architecture (and content hash) they always had
            a["activation"] = act
    elif family == "cnn":
        size = kw.pop("size", None)
        c1, c2, d = GENERATIVE_SIZES[size] if size else kw.pop("sizes", GENERATIVE_SIZES["small"])
        a["sizes"] = [int(c1), int(c2), int(d)]
    elif family != "conv_small":
        raise InputError(f"unknown model family {family!r}; choose from mlp, conv_small, cnn")
    if kw:
        raise InputError(f"unexpected options for family {family!r}: {sorted(kw)}")
    return a


def module(a: dict) -> nn.Module:
    """The Flax module of an architecture dict."""
    fam = a.get("family")
    if fam == "mlp":
        return MLP(tuple(a["hidden"]), a["num_classes"], a.get("activation", "relu"))
    if fam == "conv_small":
        return ConvSmall(a["num_classes"])
    if fam == "cnn":
        c1, c2, d = a["sizes"]
        return CNN((c1, c2), d, a["num_classes"])
    raise InputError(f"unknown model family {fam!r} in architecture {a}")


def network(a: dict, params, *, name: str | None = None, domain=(0.0, 1.0)) -> Network:
    """A `Network` for architecture ``a`` with the given ``{'params': ...}`` variables."""
    m = module(a)

    def apply(p, x):
        return m.apply(p, x)

    return Network(apply, params, tuple(a["input_shape"]), a["num_classes"],
                   (float(domain[0]), float(domain[1])), name or describe(a), {"zoo": a})


def init(a: dict, key: jax.Array, **kw) -> Network:
    """A freshly initialised `Network` of architecture ``a``."""
    params = module(a).init(key, jnp.zeros((1, *a["input_shape"]), jnp.float32))
    return network(a, params, **kw)


def describe(a: dict) -> str:
    """Short name, e.g. ``mlp-256x2``, ``conv_small``, ``cnn-32-64-200``."""
    if a["family"] == "mlp":
        hs = a["hidden"]
        act = "" if a.get("activation", "relu") == "relu" else f"-{a['activation']}"
        return (f"mlp-{hs[0]}x{len(hs)}" if len(set(hs)) == 1 else "mlp-" + "-".join(map(str, hs))) + act
    if a["family"] == "cnn":
        return "cnn-" + "-".join(map(str, a["sizes"]))
    return a["family"]
