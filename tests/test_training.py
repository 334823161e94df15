"""Certified training: differentiable IBP / CROWN-IBP bounds, the IBP and CROWN-IBP losses, their schedules,
the training driver and ``jaxrobust train --method``."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrobust import zoo
from jaxrobust.cli import main
from jaxrobust.differentiable_bounds import interval_bounds, spec_lower_bounds
from jaxrobust.errors import InputError, UnsupportedOpError
from jaxrobust.kernels.bounds import crown, ibp, robustness_spec, spec_interval
from jaxrobust.network import with_preprocessing
from jaxrobust.training import (
    Schedule,
    TrainState,
    certified_schedule,
    check_method_options,
    crown_ibp_loss,
    eps_schedule,
    ibp_loss,
    loss,
    make_step,
    worst_case_logits,
)


def _net(family, seed=0, **kw):
    return zoo.init(zoo.arch(family, input_shape=(12, 12, 1), **kw), jax.random.PRNGKey(seed))


NETS = {
    "mlp": lambda: _net("mlp", hidden=(32, 16)),
    "conv_small": lambda: _net("conv_small"),
    "cnn-maxpool": lambda: _net("cnn", sizes=(4, 8, 16)),
    "normalised-tanh": lambda: with_preprocessing(_net("mlp", hidden=(16,), activation="tanh"), mean=0.3, std=0.4),
}


def _batch(n=6, seed=1):
    x = jax.random.uniform(jax.random.PRNGKey(seed), (n, 12, 12, 1))
    return x, jnp.arange(n) % 10


@pytest.mark.parametrize("name", sorted(NETS))
def test_worst_case_logits_bound_random_points_in_the_ball(name):
    net, (x, y), eps = NETS[name](), _batch(), 0.05
    points = jnp.clip(x + jax.random.uniform(jax.random.PRNGKey(2), (300, *x.shape), minval=-eps, maxval=eps), 0, 1)
    z = jax.vmap(net)(points)                                           # (300, B, C)
    gap = z - jnp.take_along_axis(z, y[None, :, None], axis=2)          # logit_j - logit_y
    b = interval_bounds(net.apply, net.params, jnp.clip(x - eps, 0, 1), jnp.clip(x + eps, 0, 1))
    assert bool(jnp.all((z >= b.lower - 1e-5) & (z <= b.upper + 1e-5)))
    for beta in (0.0, 1.0, 0.5):
        worst = worst_case_logits(net.apply, net.params, x, y, eps, beta=beta)
        assert worst.shape == (6, 10) and bool(jnp.all(worst[jnp.arange(6), y] == 0))
        assert bool(jnp.all(gap <= worst[None] + 1e-5)), beta


def test_bounds_match_the_bound_engine_on_a_relu_cnn():
    net, (x, y), eps = NETS["conv_small"](), _batch(), 0.02
    lo, hi = jnp.clip(x - eps, 0, 1), jnp.clip(x + eps, 0, 1)
    ours, engine = interval_bounds(net.apply, net.params, lo, hi), ibp(net, lo, hi, sound_margin=False)
    np.testing.assert_allclose(ours.lower, engine.lower, atol=1e-4)
    np.testing.assert_allclose(ours.upper, engine.upper, atol=1e-4)
    spec = robustness_spec(y, 10)
    np.testing.assert_allclose(spec_lower_bounds(net.apply, net.params, lo, hi, spec, beta=1.0),
                               crown(net, lo, hi, spec, intermediate="ibp", sound_margin=False).lower, atol=1e-4)
    # IBP margins fold the spec into the last layer: never looser than the differences of logit bounds
    naive = spec_interval(spec, ours.lower, ours.upper).lower
    assert bool(jnp.all(spec_lower_bounds(net.apply, net.params, lo, hi, spec) >= naive - 1e-5))


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_losses_reduce_to_cross_entropy_at_eps_zero_and_are_differentiable(beta):
    net, (x, y) = NETS["mlp"](), _batch()
    ce = loss(net.apply, net.params, x, y)
    fn = lambda p, e: crown_ibp_loss(net.apply, p, x, y, e, kappa=0.3, beta=beta)  # noqa: E731
    np.testing.assert_allclose(fn(net.params, 0.0), ce, rtol=1e-5)
    np.testing.assert_allclose(ibp_loss(net.apply, net.params, x, y, 0.0, kappa=0.7), ce, rtol=1e-5)
    assert float(fn(net.params, 0.05)) > float(ce)
    value, grads = jax.jit(jax.value_and_grad(fn))(net.params, 0.05)
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves) and sum(float(jnp.abs(g).sum()) for g in leaves) > 0
    # the gradient predicts the change along a small random direction
    d = jax.tree_util.tree_map(lambda a: 1e-3 * jax.random.normal(jax.random.PRNGKey(5), a.shape), net.params)
    moved = fn(jax.tree_util.tree_map(jnp.add, net.params, d), 0.05) - value
    predicted = sum(jnp.vdot(g, v) for g, v in zip(leaves, jax.tree_util.tree_leaves(d)))
    np.testing.assert_allclose(moved, predicted, rtol=0.1, atol=1e-4)


def test_unsupported_primitive_is_named():
    with pytest.raises(UnsupportedOpError, match="sin"):
        interval_bounds(lambda p, x: jnp.sin(x.reshape(len(x), -1) @ p), jnp.ones((144, 10)),
                        jnp.zeros((2, 12, 12, 1)), jnp.ones((2, 12, 12, 1)))


def test_schedule_shape():
    steps = np.arange(0, 40)
    eps = np.array([float(eps_schedule(t, 0.2, warmup=10, ramp=20)) for t in steps])
    assert np.all(eps[:11] == 0) and np.all(eps[30:] == pytest.approx(0.2))
    assert np.all(np.diff(eps) >= -1e-9) and eps[20] == pytest.approx(0.1)
    s = [certified_schedule(t, 0.2, warmup=10, ramp=20, kappa=(1.0, 0.5), beta=(1.0, 0.0)) for t in (0, 20, 35)]
    assert [float(v.kappa) for v in s] == pytest.approx([1.0, 0.75, 0.5])
    assert [float(v.beta) for v in s] == pytest.approx([1.0, 0.5, 0.0])
    # traced steps work inside jit
    assert float(jax.jit(lambda t: eps_schedule(t, 0.2, warmup=10, ramp=20))(25)) == pytest.approx(0.15)


def _clusters(n=256, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.uniform(0.2, 0.8, (10, 12, 12, 1))
    y = rng.integers(0, 10, n)
    x = np.clip(centers[y] + rng.normal(0, 0.05, (n, 12, 12, 1)), 0, 1).astype(np.float32)
    return x, y


@pytest.mark.parametrize("method", ["ibp", "crown-ibp"])
def test_a_few_steps_lower_the_certified_loss(method):
    net, (x, y) = _net("mlp", hidden=(32,)), _clusters()
    opt = optax.adam(3e-3)
    step = make_step(net.apply, opt, method=method)
    sched = Schedule(jnp.float32(0.03), jnp.float32(0.0), jnp.float32(1.0))
    robust = lambda p: float(crown_ibp_loss(net.apply, p, x, y, 0.03, kappa=0.0, beta=0.0))  # noqa: E731
    state, before = TrainState(net.params, opt.init(net.params)), robust(net.params)
    for i in range(30):
        state, _ = step(state, x, y, jax.random.PRNGKey(i), sched)
    assert robust(state.params) < 0.8 * before


@pytest.mark.parametrize("kw, match", [
    ({"method": "ibp", "eps": 0.0}, "needs eps > 0"),
    ({"method": "standard", "eps": 0.1}, "takes no eps"),
    ({"method": "pgd", "eps": 0.1, "eps_ramp": 1}, "ramp applies"),
    ({"method": "ibp", "eps": 0.1, "eps_warmup": 2, "eps_ramp": 2}, "exceed"),
    ({"method": "ibp", "eps": 0.1, "kappa": (1.0, 1.5)}, "kappa"),
    ({"method": "sgd", "eps": 0.1}, "unknown training method"),
])
def test_method_option_errors(kw, match):
    with pytest.raises(InputError, match=match):
        check_method_options(epochs=3, **{"method": None, **kw})


def test_method_defaults_keep_pgd_for_positive_eps():
    assert check_method_options(None, epochs=1, eps=0.1) == "pgd"
    assert check_method_options(None, epochs=1, eps=0.0) == "standard"


@pytest.fixture
def tiny_mnist(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=rng.integers(0, 255, (128, 28, 28), dtype=np.uint8), y_train=rng.integers(0, 10, 128),
             x_test=rng.integers(0, 255, (32, 28, 28), dtype=np.uint8), y_test=rng.integers(0, 10, 32))
    return f"mnist:{path}"


@pytest.mark.parametrize("args, match", [
    (["--method", "ibp"], "needs eps > 0"),
    (["--method", "crown-ibp", "--eps", "0.1", "--warmup", "1", "--ramp", "1"], "exceed"),
    (["--eps", "0.1", "--kappa", "1,0.5"], "--kappa applies to --method ibp or crown-ibp, not pgd"),
    (["--method", "ibp", "--eps", "0.1", "--beta", "1,0"], "--beta applies to --method crown-ibp"),
    (["--method", "ibp", "--eps", "0.1", "--kappa", "1,2"], "START,END in \\[0, 1\\]"),
    (["--method", "mixup"], "invalid choice"),
])
def test_cli_option_errors_are_one_line(tmp_path, capsys, tiny_mnist, args, match):
    out = tmp_path / "net.msgpack"
    assert main(["train", "--dataset", tiny_mnist, "--epochs", "1", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(match, err), err
    assert not out.exists()


def test_cli_trains_with_crown_ibp(tmp_path, capsys, tiny_mnist):
    """Standard warm-up epoch, CROWN-IBP while β > 0, then IBP steps."""
    out = tmp_path / "net.msgpack"
    assert main(["train", "--arch", "mlp:16", "--dataset", tiny_mnist, "--epochs", "3", "--batch-size", "64",
                 "--method", "crown-ibp", "--eps", "0.05", "--warmup", "1", "--ramp", "1", "--kappa", "1,0",
                 "--out", str(out)]) == 0
    assert "crown-ibp at eps 0.05" in capsys.readouterr().out and out.exists()


def test_bundled_certified_network_is_certified_by_crown_on_the_bundled_sample():
    from jaxrobust.data import load_dataset, to_network_input
    from jaxrobust.kernels.bounds import margin_bounds
    from jaxrobust.weights import BUNDLED_DIR, load_weights
    net = load_weights(BUNDLED_DIR / "mnist-certified.msgpack")
    ds = load_dataset("mnist", "test")          # the bundled sample: first 1000 MNIST test images
    x, y = to_network_input(ds.x[:100], net.input_shape), ds.y[:100]
    certified = np.asarray(margin_bounds(net, x, 0.1, "crown", labels=y)).min(axis=1) > 0
    assert certified.mean() >= 0.9
