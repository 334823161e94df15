"""Generator ∘ classifier composition, global correctness / robustness, latent attacks, the CLI functions.

Most tests use a *brightness* pair with known answers: the generator of class 1 draws uniform images of
brightness tanh(3 (z0 + s)) in [-1, 1] (class 0: tanh(-3 (z0 + s))), the classifier compares the mean pixel
with 0.5. So C(G_1(z)) = 1 exactly when z0 > -s; with s = 6 (beyond the latent box) always.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxrobust import gan, zoo
from jaxrobust import generative as G
from jaxrobust.errors import InputError
from jaxrobust.generator import Generator
from jaxrobust.kernels import crown, ibp, robustness_spec
from jaxrobust.kernels.perturb import sample
from jaxrobust.network import from_function
from jaxrobust.verdict import ROBUST, VIOLATED


def _bright(params, z):
    v = jnp.tanh(params["k"] * (z[:, :1] + params["s"]))  # (B, 1)
    return jnp.broadcast_to(v[:, :, None, None], (z.shape[0], 28, 28, 1))


def brightness_generator(sign, shift=0.0):
    return Generator(_bright, {"k": jnp.float32(3.0 * sign), "s": jnp.float32(shift)}, 3, (28, 28, 1),
                     (-1.0, 1.0), f"bright{sign}", {"test": "bright", "sign": sign, "shift": shift})


def _mean_classifier(params, x):
    m = x.reshape(x.shape[0], -1).mean(axis=1)
    return jnp.concatenate([params["w"] * (0.5 - m)[:, None], params["w"] * (m - 0.5)[:, None]], axis=1)


CLF = from_function(_mean_classifier, {"w": jnp.float32(4.0)}, (28, 28, 1), 2, name="mean")
CONSISTENT = {0: brightness_generator(-1.0, 6.0), 1: brightness_generator(1.0, 6.0)}
EDGE = brightness_generator(1.0)


@pytest.fixture(scope="module")
def mlp_pair():
    arch = gan.gan_arch(latent_dim=4, hidden=(16,), disc_hidden=(8,))
    import optax
    g = gan.make_generator(arch, gan._init(arch, jax.random.PRNGKey(0), optax.identity()).g_params)
    clf = zoo.init(zoo.arch("mlp", input_shape=(784,), hidden=(16,)), jax.random.PRNGKey(1))
    return clf, g


def test_compose_maps_range_and_layout(mlp_pair):
    clf, g = mlp_pair
    net = G.compose(clf, g)
    assert net.input_shape == (4,) and net.domain == (-G.LATENT_BOX, G.LATENT_BOX) and net.num_classes == 10
    assert G.compose(clf, g) is net
    z = jax.random.normal(jax.random.PRNGKey(2), (6, 4))
    manual = clf(((g(z) + 1) / 2).reshape(6, 784))  # [-1, 1] -> [0, 1], NHWC -> (784,)
    np.testing.assert_allclose(net(z), manual, rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError):
        G.compose(zoo.init(zoo.arch("mlp", input_shape=(10,), hidden=(4,)), jax.random.PRNGKey(0)), g)


def test_attacks_compile_once_for_generators_of_one_architecture(mlp_pair):
    import optax

    from jaxrobust.kernels import attacks
    clf, g = mlp_pair
    other = gan.make_generator(g.arch["gan"], gan._init(g.arch["gan"], jax.random.PRNGKey(7), optax.identity()).g_params)
    nets = [G.compose(clf, h) for h in (g, other)]
    assert nets[0] is not nets[1] and nets[0].apply == nets[1].apply
    z = jax.random.normal(jax.random.PRNGKey(8), (5, 4))
    y = jnp.zeros((5,), jnp.int32)
    for attack, program, kw in ((attacks.pgd, attacks._pgd, {"steps": 7}),
                                (attacks.random_search, attacks._random_search, {"queries": 7})):
        before = program._cache_size()
        res = [attack(net, z, y, 0.3, key=jax.random.PRNGKey(9), **kw) for net in nets]
        assert program._cache_size() == before + 1
        for net, r in zip(nets, res):  # each run used its own generator's parameters
            np.testing.assert_allclose(r.margin, attacks.margin(net(r.x_adv), y), atol=1e-5)
    before = G._sample_predictions._cache_size()
    for h in (g, other):
        G.global_correctness(clf, h, 0, samples=64, chunk=64)
    assert G._sample_predictions._cache_size() == before + 1


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_composed_bounds_contain_samples(mlp_pair, method):
    clf, g = mlp_pair
    net = G.compose(clf, g)
    z = jax.random.normal(jax.random.PRNGKey(3), (3, 4))
    eps = 0.2
    lo, hi = z - eps, z + eps
    if method == "ibp":
        lower, upper = ibp(net, lo, hi)
    else:
        lower, upper = crown(net, lo, hi, jnp.broadcast_to(jnp.eye(10), (3, 10, 10)), intermediate="ibp")
    pts = sample(jax.random.PRNGKey(4), z, eps, 200)  # (3, 200, 4)
    out = net(pts.reshape(-1, 4)).reshape(3, 200, 10)
    corners = net(jnp.concatenate([lo, hi]))
    assert bool(jnp.all(out >= lower[:, None] - 1e-6)) and bool(jnp.all(out <= upper[:, None] + 1e-6))
    assert bool(jnp.all(corners >= jnp.concatenate([lower, lower]) - 1e-6))
    y = jnp.argmax(net(z), -1)
    margins = G._bound_margins(net, z, y, eps, method)
    assert margins.shape == (3, 9)
    spec = robustness_spec(y, 10)
    sampled_margins = jnp.einsum("bkc,bnc->bnk", spec, out).min(axis=1)
    assert bool(jnp.all(sampled_margins >= margins - 1e-5))
    if method == "crown":  # forward-mode intermediates + backward pass: never looser than IBP
        assert np.all(margins >= G._bound_margins(net, z, y, eps, "ibp") - 1e-5)


def test_global_correctness_trivially_consistent():
    for c in (0, 1):
        r = G.global_correctness(CLF, CONSISTENT[c], c, samples=3000, chunk=1000, key=jax.random.PRNGKey(c))
        assert r.correct == 3000 and r.estimate == 1.0 and r.ci_high == 1.0 and len(r.wrong_index) == 0
    s = 0.4  # class 1 correct iff z0 > -0.4: probability Phi(0.4) = 0.655
    r = G.global_correctness(CLF, brightness_generator(1.0, s), 1, samples=4000, chunk=1000)
    assert r.ci_low <= r.estimate <= r.ci_high and r.ci_low < stats.norm.cdf(s) < r.ci_high
    lo = stats.beta.ppf(0.025, r.correct, r.samples - r.correct + 1)
    hi = stats.beta.ppf(0.975, r.correct + 1, r.samples - r.correct)
    np.testing.assert_allclose([r.ci_low, r.ci_high], [lo, hi], rtol=1e-4)
    assert len(r.wrong_index) == 100 and np.all(r.wrong_predicted == 0) and np.all(r.wrong_expected == 1)
    assert np.all(r.wrong_latent[:, 0] < -s)  # the saved misclassified latents are the wrong ones
    np.testing.assert_allclose(r.wrong_image, EDGE.to_unit(brightness_generator(1.0, s)(r.wrong_latent)), atol=1e-6)


def test_perfect_classifier_interval_and_reference():
    r = G.global_correctness(CLF, CONSISTENT[1], 1, samples=1000, chunk=1000)
    assert r.estimate == 1.0 and r.ci_high == 1.0
    np.testing.assert_allclose(r.ci_low, 0.025 ** (1 / 1000), rtol=1e-5)
    agree = G.global_correctness(CLF, EDGE, None, reference=CLF, samples=1000, chunk=500)
    assert agree.label == -1 and agree.correct == 1000
    with pytest.raises(InputError):
        G.global_correctness(CLF, EDGE, 1, reference=CLF, samples=10)


@pytest.mark.parametrize("method", ["pgd", "random"])
def test_latent_adversarial_pairs(method):
    g = EDGE
    z = jnp.array([[0.05, 1.0, -1.0], [0.08, 0.0, 0.0], [3.0, 0.0, 0.0]], jnp.float32)
    z_before = np.asarray(z).copy()
    kw = {"steps": 20} if method == "pgd" else {"queries": 50}
    r = G.latent_attack(CLF, g, z, 0.1, key=jax.random.PRNGKey(0), method=method, **kw)
    np.testing.assert_array_equal(np.asarray(z), z_before)  # the start point is not modified
    assert r.found.tolist() == [True, True, False]  # z0 = 3 is 30 eps away from the boundary
    assert np.all(np.abs(r.z_adv - r.z).max(axis=1) <= 0.1 + 1e-6)
    # re-check with an independent forward pass: images in [0, 1], classes differ
    img, img_adv = g.to_unit(g(r.z)), g.to_unit(g(r.z_adv))
    np.testing.assert_allclose(r.image, img, atol=1e-6)
    np.testing.assert_allclose(r.image_adv, img_adv, atol=1e-6)
    pred, pred_adv = np.argmax(CLF(img), -1), np.argmax(CLF(img_adv), -1)
    assert np.all(pred[r.found] == 1) and np.all(pred_adv[r.found] == 0)
    assert float(img.min()) >= 0 and float(img.max()) <= 1


def test_adversarial_pairs_and_time_to_first():
    g = brightness_generator(1.0, 0.05)
    pairs = G.adversarial_pairs(CLF, g, 1, 0.2, samples=64, key=jax.random.PRNGKey(1), steps=10)
    assert len(pairs.z) > 0 and pairs.found.all()
    assert np.all(pairs.label == 1) and np.all(pairs.label_adv == 0)
    assert np.all(np.abs(pairs.z_adv - pairs.z).max(axis=1) <= 0.2 + 1e-6)
    t, rounds, first = G.time_to_first(CLF, g, 1, 0.2, batch=64, steps=10)
    assert t > 0 and rounds >= 1 and len(first.z) > 0


def test_global_robustness_fractions():
    eps, n = 0.1, 400
    r = G.global_robustness(CLF, EDGE, 1, eps, samples=n, chunk=200, attack_steps=10, key=jax.random.PRNGKey(5))
    assert r.counts.sum() == n and r.status.shape == (n,)
    z = np.asarray(G.latents(jax.random.PRNGKey(5), jnp.arange(n), 3, G.LATENT_BOX))
    near = np.abs(z[:, 0]) < eps  # exactly these boxes cross the decision boundary
    assert np.all(r.status[~near] == ROBUST) and set(r.reason[~near]) == {"ibp"}
    assert np.all(r.status[near] == VIOLATED) and set(r.reason[near]) == {"attack"}
    np.testing.assert_array_equal(r.counts, [(~near).sum(), near.sum(), 0])
    assert np.all(r.ci_low <= r.fractions) and np.all(r.fractions <= r.ci_high)
    assert len(r.pairs.z) == near.sum() and np.all(np.abs(r.pairs.z_adv - r.pairs.z).max(1) <= eps + 1e-6)
    none = G.global_robustness(CLF, EDGE, 1, eps, samples=n, chunk=200, attack_steps=10,
                               key=jax.random.PRNGKey(5), bounds="none")
    np.testing.assert_array_equal(none.counts, [0, near.sum(), (~near).sum()])


def test_complete_global_robustness_decides_what_bounds_and_attacks_leave(monkeypatch):
    """With bounds that prove nothing, ``bounds="complete"`` decides every latent box the attack leaves by
    input splitting: ROBUST exactly where the box does not cross the decision boundary, VIOLATED with a
    counterexample latent inside the box where it does."""
    monkeypatch.setattr(G, "_bound_margins", lambda net, z, labels, eps, method: np.full((len(z), 1), -1.0))
    eps, n = 0.1, 60
    r = G.global_robustness(CLF, EDGE, 1, eps, samples=n, chunk=60, attack_steps=1, key=jax.random.PRNGKey(5),
                            bounds="complete", complete_timeout=20.0)
    z = np.asarray(G.latents(jax.random.PRNGKey(5), jnp.arange(n), 3, G.LATENT_BOX))
    near = np.abs(z[:, 0]) < eps
    assert np.all(r.status[~near] == ROBUST) and np.all(r.status[near] == VIOLATED)
    assert r.counts[2] == 0 and set(r.reason[~near]) == {"complete"} and set(r.reason[near]) <= {"attack", "complete"}
    assert len(r.pairs.z) == near.sum() and np.all(r.pairs.label_adv != r.pairs.label)
    assert np.all(np.abs(r.pairs.z_adv - r.pairs.z).max(1) <= eps + 1e-6)


def test_run_global_store_resume_and_images(tmp_path):
    out, img = tmp_path / "g.h5", tmp_path / "png"
    gens = {0: CONSISTENT[0], 1: brightness_generator(1.0, 0.3)}
    s = G.run_global(CLF, gens, out, samples=500, eps=0.1, robust_samples=100, attack_steps=5, image_dir=img,
                     progress=False)
    assert [r["class"] for r in s["correctness"]] == [0, 1]
    c0, c1 = s["correctness"]
    assert c0["correct"] == 500 and c1["ci_low"] < stats.norm.cdf(0.3) < c1["ci_high"]
    assert [r["robust"] + r["violated"] + r["unknown"] for r in s["robustness"]] == [100, 100]
    assert (img / "adversarial_class1.png").exists()
    json.dumps(s)
    with pytest.raises(InputError, match="resume"):
        G.run_global(CLF, gens, out, samples=500, eps=0.1, robust_samples=100, attack_steps=5, progress=False)
    again = G.run_global(CLF, gens, out, samples=500, eps=0.1, robust_samples=100, attack_steps=5, resume=True,
                         progress=False)
    assert again["correctness"] == s["correctness"] and again["robustness"] == s["robustness"]
    from jaxrobust.store import ResultStore
    adv = ResultStore(out, "global_adversarial", G._tables(3, (28, 28, 1))["global_adversarial"]).read()
    assert len(adv["index"]) == sum(r["violated"] for r in s["robustness"])
    assert np.all(np.abs(adv["latent_adv"] - adv["latent"]).max(1) <= 0.1 + 1e-6)


def test_cli_functions(tmp_path, capsys, mlp_pair):
    from jaxrobust.cli import main
    from jaxrobust.weights import save_network
    clf, g = mlp_pair
    clf = zoo.init(zoo.arch("mlp", hidden=(8,)), jax.random.PRNGKey(3))
    save_network(clf, tmp_path / "c.msgpack")
    gan.save_generators({3: g, 5: g}, tmp_path / "g.msgpack")
    argv = ["global", "--classifier", str(tmp_path / "c.msgpack"), "--generator", str(tmp_path / "g.msgpack"),
            "--samples", "300", "--out", str(tmp_path / "o.h5"), "--json"]
    assert main(argv + ["--class", "5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["class"] for r in out["correctness"]] == [5] and out["correctness"][0]["samples"] == 300
    assert out["robustness"] == [] and 0 <= out["correctness"][0]["ci_low"] <= out["correctness"][0]["estimate"]
    assert main(argv + ["--class", "7"]) == 2
    assert "no class 7" in capsys.readouterr().err


def test_keras_dcgan_composition(shared):
    from jaxrobust.keras_import import load_keras_dcgan_generator
    g = load_keras_dcgan_generator(shared("networks", "generative", "keras_dcgan_mnist", "mnist_generator.h5"))
    clf = zoo.init(zoo.arch("mlp", hidden=(8,)), jax.random.PRNGKey(0))
    net = G.compose(clf, g)
    z = G.latents(jax.random.PRNGKey(0), jnp.arange(4), 100, G.LATENT_BOX)
    np.testing.assert_allclose(net(z), clf(g.to_unit(g(z))), rtol=1e-5, atol=1e-5)
    r = G.global_correctness(clf, g, None, reference=clf, samples=64, chunk=64)
    assert r.estimate == 1.0 and r.label == -1
