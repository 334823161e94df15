import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrobust.errors import InputError
from jaxrobust.kernels import sharding

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jaxrobust.kernels import attacks, perturb, sharding
    from jaxrobust.network import from_function

    assert jax.local_device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    W1 = jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)
    W2 = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
    net = from_function(lambda p, x: jax.nn.relu(x @ p[0]) @ p[1], (W1, W2), (8,), 3)
    B = 10  # not a multiple of 4: padded to 12
    x = jnp.asarray(rng.uniform(0, 1, (B, 8)), jnp.float32)
    y = jnp.argmax(net(x), axis=1)
    eps = jnp.linspace(0.01, 0.3, B)
    key = jax.random.key(7)

    def ibp(x, eps):  # interval through the first dense layer and ReLU, midpoint-radius form
        lo, hi = jnp.clip(x - eps[:, None], 0, 1), jnp.clip(x + eps[:, None], 0, 1)
        mid, rad = (hi + lo) / 2 @ W1, (hi - lo) / 2 @ jnp.abs(W1)
        return jax.nn.relu(mid - rad), jax.nn.relu(mid + rad)

    def kernels(x, y, eps):
        return dict(pgd=attacks.pgd(net, x, y, eps, key=key, steps=10, restarts=2),
                    rs=attacks.random_search(net, x, y, eps, key=key, queries=30),
                    samples=perturb.map_samples(lambda s: s.sum(-1), key, x, eps, 50, 16),
                    ibp=jax.jit(ibp)(x, eps))

    single = kernels(x, y, eps)
    with jax.default_device(jax.local_devices()[3]):  # the whole batch on another device: the same bits
        elsewhere = kernels(x, y, eps)
    assert elsewhere["pgd"].x_adv.device == jax.local_devices()[3]
    for a, b in zip(jax.tree_util.tree_leaves(single), jax.tree_util.tree_leaves(elsewhere)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    mesh = sharding.batch_mesh()
    (xs, ys, es), n = sharding.shard_batch((x, y, eps), mesh)
    assert n == B and xs.shape == (12, 8) and len(xs.sharding.device_set) == 4
    assert xs.sharding.shard_shape(xs.shape) == (3, 8)
    out = kernels(xs, ys, es)
    assert len(out["pgd"].x_adv.sharding.device_set) == 4  # computed sharded, not gathered
    multi = sharding.unpad(out, n)
    via_map = sharding.map_sharded(kernels, x, y, eps, mesh=mesh)
    # split over the devices, each runs the programs on 3 rows instead of 12: XLA's products round by shape, so
    # floats agree to rounding (the runner never splits a chunk); the samples, keyed by global index, are exact
    for got in (multi, via_map):
        for a, b in zip(jax.tree_util.tree_leaves(single), jax.tree_util.tree_leaves(got)):
            assert a.shape == b.shape, (a.shape, b.shape)
            if a.dtype == jnp.bool_:
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            else:
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(single["samples"]), np.asarray(multi["samples"]))
    print("SHARDING-OK", int(single["pgd"].success.sum()))
""")


@pytest.mark.slow
def test_sharded_kernels_match_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SHARDING-OK" in proc.stdout


def test_shard_batch_pads_and_unpads_single_device():
    mesh = sharding.batch_mesh(jax.devices()[:1])
    tree = {"x": jnp.arange(6.0).reshape(3, 2), "y": jnp.arange(3)}
    sharded, n = sharding.shard_batch(tree, mesh)
    assert n == 3 and sharded["x"].shape == (3, 2)
    np.testing.assert_array_equal(np.asarray(sharding.unpad(sharded, n)["y"]), [0, 1, 2])
    assert sharding.map_sharded(lambda a: a * 2, jnp.ones(5), mesh=mesh).shape == (5,)
    with pytest.raises(InputError, match="batch"):
        sharding.shard_batch((jnp.ones(3), jnp.ones(4)), mesh)
    with pytest.raises(InputError, match="batch"):
        sharding.shard_batch(jnp.ones(()), mesh)
