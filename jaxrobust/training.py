"""Training with optax: standard and PGD adversarial training (Madry et al.) as pure functions.

A user's own Flax/optax loop can call `loss`, `adversarial_loss` or a step from `make_step`;
`train` is the thin driver with a progress bar.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from .errors import InputError
from .network import Network


def loss(apply: Callable, params, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of ``apply(params, x): (B, C)`` against integer labels ``y: (B,)``."""
    return optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y).mean()


def adversarial_examples(apply: Callable, params, x, y, key, *, eps: float, steps: int = 10,
                         domain=(0.0, 1.0)) -> jax.Array:
    """L∞ PGD (cross-entropy, random start, step 2.5·ε/steps) against the current ``params``; no gradient flows back."""
    from .kernels.attacks import pgd
    adv = pgd(lambda z: apply(params, z), x, y, eps, key=key, steps=steps, loss="ce", domain=domain)
    return jax.lax.stop_gradient(adv.x_adv)


def adversarial_loss(apply: Callable, params, x, y, key, *, eps: float, steps: int = 10,
                     domain=(0.0, 1.0)) -> jax.Array:
    """Madry et al.'s robust loss: cross-entropy at the PGD point of the ε-ball around each ``x``."""
    return loss(apply, params, adversarial_examples(apply, params, x, y, key, eps=eps, steps=steps,
                                                    domain=domain), y)


class TrainState(NamedTuple):
    params: object
    opt_state: object


def make_step(apply: Callable, optimizer: optax.GradientTransformation, *, eps: float = 0.0,
              steps: int = 10, domain=(0.0, 1.0)) -> Callable:
    """A jitted ``step(state, x, y, key) -> (state, loss)``; adversarial when ``eps > 0``."""

    def objective(params, x, y, key):
        if eps > 0:
            return adversarial_loss(apply, params, x, y, key, eps=eps, steps=steps, domain=domain)
        return loss(apply, params, x, y)

    @jax.jit
    def step(state: TrainState, x, y, key):
        value, grads = jax.value_and_grad(objective)(state.params, x, y, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return TrainState(optax.apply_updates(state.params, updates), opt_state), value

    return step


@partial(jax.jit, static_argnums=0)
def _predict(apply, params, x):
    return jnp.argmax(apply(params, x), axis=-1)


def accuracy(net: Network, x, y, batch_size: int = 1000) -> float:
    """Fraction of ``x: (N, *input_shape)`` classified as ``y: (N,)``."""
    x, y = np.asarray(x), np.asarray(y)
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((np.asarray(_predict(net.apply, net.params, x[i:i + batch_size])) == y[i:i + batch_size]).sum())
    return correct / max(len(x), 1)


def train(net: Network, x, y, *, epochs: int = 3, batch_size: int = 128, learning_rate: float = 1e-3,
          eps: float = 0.0, eps_warmup: int = 0, pgd_steps: int = 10, seed: int = 0,
          progress: bool = True) -> tuple[Network, list[float]]:
    """Train ``net`` on ``x: (N, *input_shape)``, ``y: (N,)`` with Adam and a cosine learning-rate decay;
    PGD adversarial training when ``eps > 0``.

    ``eps_warmup`` epochs of standard training come first (stabilises adversarial training of small nets).
    Returns the trained network and the mean loss of each epoch.
    """
    x = net.check_inputs(x, "training inputs")
    y = net.check_labels(y, len(x), "training labels")
    if eps < 0:
        raise InputError(f"eps must be >= 0, got {eps}")
    steps_per_epoch = len(x) // batch_size
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, max(epochs * steps_per_epoch, 1)))
    state = TrainState(net.params, optimizer.init(net.params))
    plain = make_step(net.apply, optimizer, domain=net.domain)
    robust = make_step(net.apply, optimizer, eps=eps, steps=pgd_steps, domain=net.domain) if eps > 0 else plain
    key = jax.random.PRNGKey(seed)
    rng = np.random.default_rng(seed)
    history = []
    for epoch in range(epochs):
        step = plain if epoch < eps_warmup else robust
        order = rng.permutation(len(x))
        total = 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for i in bar:
            idx = order[i * batch_size:(i + 1) * batch_size]
            key, sub = jax.random.split(key)
            state, value = step(state, x[idx], y[idx], sub)
            total += float(value)
            if i % 50 == 0:
                bar.set_postfix(loss=f"{float(value):.4f}")
        history.append(total / max(steps_per_epoch, 1))
    return net.replace(params=state.params), history
