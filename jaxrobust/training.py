"""Training with optax as pure functions: standard, PGD adversarial (Madry et al. 2018) and certified training,
IBP (Gowal et al. 2018) and CROWN-IBP (Zhang et al. 2020).

A user's own Flax/optax loop can call `loss`, `adversarial_loss`, `ibp_loss`, `crown_ibp_loss` (with the
ε ramp and κ / β mixing of `certified_schedule`) or a step from `make_step`; `train` is the thin driver with
a progress bar.
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

from .differentiable_bounds import spec_lower_bounds
from .errors import InputError
from .kernels.bounds import robustness_spec
from .network import Network

METHODS = ("standard", "pgd", "ibp", "crown-ibp")


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


def worst_case_logits(apply: Callable, params, x, y, eps, *, beta=0.0, domain=(0.0, 1.0)) -> jax.Array:
    """Logits ``(B, C)`` that are 0 at the label ``y`` and ``-m_j`` elsewhere, ``m: (B, C-1)`` the lower bounds of
    the margins ``logit_y - logit_j`` (`robustness_spec`) over the ε-box around ``x: (B, *in)`` clipped to
    ``domain``: IBP at ``beta = 0``, CROWN-IBP at 1 (`differentiable_bounds.spec_lower_bounds`). Their
    cross-entropy bounds that of every point of the box from above."""
    x = jnp.asarray(x, jnp.float32)
    lo, hi = jnp.clip(x - eps, *domain), jnp.clip(x + eps, *domain)
    spec = robustness_spec(y, jax.eval_shape(apply, params, x).shape[-1])
    margins = spec_lower_bounds(apply, params, lo, hi, spec, beta=beta)
    return jnp.einsum("bk,bkc->bc", margins, jnp.minimum(spec, 0))


def crown_ibp_loss(apply: Callable, params, x, y, eps, *, kappa, beta=1.0, domain=(0.0, 1.0)) -> jax.Array:
    """Zhang et al.'s loss: ``kappa * CE(clean) + (1 - kappa) * CE(worst_case_logits(beta))``.

    At ``eps = 0`` it is the plain cross-entropy; a Python ``beta = 0`` gives `ibp_loss` at its cost."""
    robust = optax.softmax_cross_entropy_with_integer_labels(
        worst_case_logits(apply, params, x, y, eps, beta=beta, domain=domain), y).mean()
    return kappa * loss(apply, params, x, y) + (1 - kappa) * robust


def ibp_loss(apply: Callable, params, x, y, eps, *, kappa, domain=(0.0, 1.0)) -> jax.Array:
    """Gowal et al.'s loss: ``kappa * CE(clean) + (1 - kappa) * CE(IBP worst-case logits)``."""
    return crown_ibp_loss(apply, params, x, y, eps, kappa=kappa, beta=0.0, domain=domain)


class Schedule(NamedTuple):
    """Certified training at one step: radius ``eps``, weight ``kappa`` of the clean loss, weight ``beta`` of
    CROWN-IBP in the bounds (scalars)."""
    eps: float
    kappa: float
    beta: float


def linear_ramp(step, start, end, *, warmup: int, length: int):
    """``start`` up to step ``warmup``, then linear to ``end`` at ``warmup + length``, then ``end``."""
    return start + (end - start) * jnp.clip((step - warmup) / max(length, 1), 0.0, 1.0)


def eps_schedule(step, eps, *, warmup: int, ramp: int):
    """The ε ramp of Gowal et al. and Zhang et al.: 0 for ``warmup`` steps, linear to ``eps`` over ``ramp`` steps."""
    return linear_ramp(step, 0.0, eps, warmup=warmup, length=ramp)


def certified_schedule(step, eps, *, warmup: int, ramp: int, kappa=(1.0, 0.5), beta=(1.0, 0.0)) -> Schedule:
    """`eps_schedule` with κ and β moving with it from their first to their second value, as in Zhang et al.'s
    code. Defaults: κ 1 → 0.5 (Gowal et al.), β 1 → 0 (CROWN-IBP); Zhang et al. also end κ at 0."""
    mix = partial(linear_ramp, step, warmup=warmup, length=ramp)
    return Schedule(eps_schedule(step, eps, warmup=warmup, ramp=ramp), mix(*kappa), mix(*beta))


class TrainState(NamedTuple):
    params: object
    opt_state: object


def make_step(apply: Callable, optimizer: optax.GradientTransformation, *, method: str | None = None,
              eps: float = 0.0, steps: int = 10, domain=(0.0, 1.0)) -> Callable:
    """A jitted ``step(state, x, y, key, schedule=None) -> (state, loss)``.

    ``method``: "standard", "pgd" (PGD adversarial training at radius ``eps`` with ``steps`` steps), "ibp" or
    "crown-ibp", whose radius, κ and β come from each call's ``schedule`` (a `Schedule`, e.g. from
    `certified_schedule`; "ibp" ignores β). Default: "pgd" when ``eps > 0``, else "standard".
    """
    method = _method(method, eps)

    def objective(params, x, y, key, schedule):
        if method == "pgd":
            return adversarial_loss(apply, params, x, y, key, eps=eps, steps=steps, domain=domain)
        if method == "ibp":
            return ibp_loss(apply, params, x, y, schedule.eps, kappa=schedule.kappa, domain=domain)
        if method == "crown-ibp":
            return crown_ibp_loss(apply, params, x, y, schedule.eps, kappa=schedule.kappa, beta=schedule.beta,
                                  domain=domain)
        return loss(apply, params, x, y)

    @jax.jit
    def step(state: TrainState, x, y, key, schedule: Schedule | None = None):
        value, grads = jax.value_and_grad(objective)(state.params, x, y, key, schedule)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return TrainState(optax.apply_updates(state.params, updates), opt_state), value

    return step


def _method(method, eps) -> str:
    method = method or ("pgd" if eps > 0 else "standard")
    if method not in METHODS:
        raise InputError(f"unknown training method {method!r}; choose from {', '.join(METHODS)}")
    return method


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


def check_method_options(method, *, epochs: int, eps: float, eps_warmup: int = 0, eps_ramp: int = 0,
                         kappa=(1.0, 0.5), beta=(1.0, 0.0)) -> str:
    """The training method (default "pgd" when ``eps > 0``, else "standard"); `InputError` for options that do not
    fit it: ε > 0 for every method but "standard" (which needs ε = 0), a ramp only for "ibp" and "crown-ibp",
    warm-up plus ramp within ``epochs``, κ and β pairs in [0, 1]."""
    method = _method(method, eps)
    if eps < 0:
        raise InputError(f"eps must be >= 0, got {eps}")
    if method == "standard" and eps > 0:
        raise InputError(f"standard training takes no eps (got {eps}); choose pgd, ibp or crown-ibp")
    if method != "standard" and eps == 0:
        raise InputError(f"{method} training needs eps > 0")
    if eps_ramp and method not in ("ibp", "crown-ibp"):
        raise InputError(f"an eps ramp applies to ibp and crown-ibp training, not {method}")
    if eps_warmup + eps_ramp > epochs:
        raise InputError(f"warm-up ({eps_warmup}) plus ramp ({eps_ramp}) epochs exceed the {epochs} epochs: "
                         "training would end before eps reaches its target")
    for name, pair in (("kappa", kappa), ("beta", beta)):
        if len(pair) != 2 or not all(0 <= v <= 1 for v in pair):
            raise InputError(f"{name} must be two numbers START,END in [0, 1], got {tuple(pair)}")
    return method


def train(net: Network, x, y, *, epochs: int = 3, batch_size: int = 128, learning_rate: float = 1e-3,
          method: str | None = None, eps: float = 0.0, eps_warmup: int = 0, eps_ramp: int = 0,
          kappa=(1.0, 0.5), beta=(1.0, 0.0), pgd_steps: int = 10, seed: int = 0,
          progress: bool = True) -> tuple[Network, list[float]]:
    """Train ``net`` on ``x: (N, *input_shape)``, ``y: (N,)`` with Adam and a cosine learning-rate decay.

    ``method`` (see `make_step`; default "pgd" when ``eps > 0``, else "standard"): ``eps_warmup`` epochs of
    standard training come first (they stabilise adversarial training of small nets); certified training then
    ramps ε, κ and β over ``eps_ramp`` epochs (`certified_schedule`, per step) and keeps their final values.
    CROWN-IBP steps run only while β > 0; later steps are IBP steps. Options are checked by
    `check_method_options`. Returns the trained network and the mean loss of each epoch.
    """
    x = net.check_inputs(x, "training inputs")
    y = net.check_labels(y, len(x), "training labels")
    method = check_method_options(method, epochs=epochs, eps=eps, eps_warmup=eps_warmup, eps_ramp=eps_ramp,
                                  kappa=kappa, beta=beta)
    steps_per_epoch = len(x) // batch_size
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, max(epochs * steps_per_epoch, 1)))
    state = TrainState(net.params, optimizer.init(net.params))
    steps = {m: make_step(net.apply, optimizer, method=m, eps=eps, steps=pgd_steps, domain=net.domain)
             for m in {"standard", method, "ibp" if method == "crown-ibp" else method}}
    key = jax.random.PRNGKey(seed)
    rng = np.random.default_rng(seed)
    history = []
    for epoch in range(epochs):
        order = rng.permutation(len(x))
        total = 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for i in bar:
            idx = order[i * batch_size:(i + 1) * batch_size]
            key, sub = jax.random.split(key)
            t = epoch * steps_per_epoch + i
            sched = certified_schedule(t, eps, warmup=eps_warmup * steps_per_epoch, ramp=eps_ramp * steps_per_epoch,
                                       kappa=kappa, beta=beta)
            m = "standard" if epoch < eps_warmup else "ibp" if method == "crown-ibp" and sched.beta == 0 else method
            state, value = steps[m](state, x[idx], y[idx], sub, sched)
            total += float(value)
            if i % 50 == 0:
                bar.set_postfix(loss=f"{float(value):.4f}", eps=f"{float(sched.eps):.3f}")
        history.append(total / max(steps_per_epoch, 1))
    return net.replace(params=state.params), history
