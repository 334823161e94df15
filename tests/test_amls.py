import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxrobust import from_function
from jaxrobust.errors import InputError
from jaxrobust.kernels import perturb
from jaxrobust.kernels.amls import AmlsConfig, amls, constrained_moves, latent_size, to_samples
from jaxrobust.rare_events import (
    COLUMNS,
    EstimatorConfig,
    amls_estimate,
    config_entries,
    estimate_columns,
    monte_carlo,
    parse_estimators,
)

D = 8
W = jnp.ones(D) / math.sqrt(D)


def linear(samples, _):
    """``w·x`` with ``|w| = 1``: under ``x ~ N(0, I)`` a standard normal."""
    return samples.reshape(samples.shape[0], -1) @ W


def irwin_hall_sf(t: float, d: int) -> float:
    """``P(U_1 + … + U_d > t)`` for ``d - 1 <= t <= d``: ``(d - t)^d / d!``."""
    return (d - t) ** d / math.factorial(d)


def test_gaussian_perturbation_of_a_linear_score_matches_the_normal_tail():
    reps, cfg = 32, AmlsConfig(particles=300, steps=20)
    p = np.repeat([1e-4, 1e-6], reps)
    r = jax.device_get(amls(linear, jax.random.PRNGKey(0), jnp.zeros((2 * reps, D)), 1.0, stats.norm.isf(p),
                            cfg=cfg, sampler="gaussian"))
    truth = np.log10(p)
    err = r.log10_p - truth
    assert not r.capped.any()
    assert np.all(np.abs(err) < 1)                                   # every run within a factor 10
    for half in (slice(0, reps), slice(reps, None)):
        assert abs(np.median(err[half])) < 0.15                      # and typically within 40 %
        covered = (r.log10_low[half] <= truth[half]) & (truth[half] <= r.log10_high[half])
        assert covered.mean() >= 0.8                                 # nominal 95 %
    np.testing.assert_array_equal(r.forward_passes, cfg.particles * (1 + cfg.steps * (r.levels - 1)))
    assert np.all(r.levels >= 4) and np.all(r.levels <= 9)           # log10 p / log10 ρ levels, about
    acc = r.acceptance[:, :3]
    assert np.all((acc > 0.1) & (acc < 0.6))


@pytest.fixture(scope="module")
def cube_net():
    """Two classes, logits ``(0, Σx - t0)``: for label 0 the wrong-label confidence exceeds δ = 1/2 iff
    ``Σx > t0``, an Irwin–Hall tail under uniform noise on the cube ``[0, 1]^d``."""
    return from_function(lambda t0, x: jnp.stack([jnp.zeros(x.shape[0]), x.reshape(x.shape[0], -1).sum(-1) - t0],
                                                 -1), jnp.float32(0.0), (2, 3), 2, name="cube")


def test_rare_events_of_a_network_match_the_irwin_hall_tail(cube_net):
    d, reps = 6, 16
    ts = np.array([d - (math.factorial(d) * p) ** (1 / d) for p in (1e-3, 1e-5)], np.float32)
    x = np.full((reps, 2, 3), 0.5, np.float32)
    y = np.zeros(reps, int)
    for t, tail_bound in zip(ts, (1e-3, 1e-5)):
        net = cube_net.replace(params=jnp.float32(t))
        truth = math.log10(irwin_hall_sf(float(t), d))
        assert abs(truth - math.log10(tail_bound)) < 1e-3
        r = jax.device_get(amls_estimate(net, x, y, 0.5, 0.5, AmlsConfig(particles=300, steps=20), seed=3))
        covered = (r.log10_low <= truth) & (truth <= r.log10_high)
        assert np.all(np.abs(r.log10_p - truth) < 1) and covered.mean() >= 0.75
        assert abs(np.median(r.log10_p) - truth) < 0.15
    misclassified = jax.device_get(amls_estimate(net, x, y, 0.5, None, AmlsConfig(particles=300, steps=20)))
    assert abs(np.median(misclassified.log10_p) - truth) < 0.3  # logits (0, Σx - t0): misclassified iff c > 1/2
    net = cube_net.replace(params=jnp.float32(ts[0]))
    mc = monte_carlo(net, x[:4], y[:4], 0.5, 0.5, 20_000, 5_000, indices=[0, 1, 2, 3])
    p = irwin_hall_sf(float(ts[0]), d)
    assert np.all((mc.low <= p) & (p <= mc.high)) and np.all(mc.count == np.round(mc.p * 20_000))
    stats_ = stats.binomtest(int(mc.count[0]), 20_000).proportion_ci(0.95, "exact")
    np.testing.assert_allclose([mc.low[0], mc.high[0]], [stats_.low, stats_.high], rtol=1e-6)
    other = monte_carlo(net, x[:4], y[:4], 0.5, 0.5, 20_000, 5_000, indices=[0, 1, 2, 3], rng="threefry")
    assert np.all((other.low <= p) & (p <= other.high)) and np.any(other.count != mc.count)  # other samples


@pytest.mark.parametrize("sampler,domain", [("linf", (0.0, 1.0)), ("gaussian", (0.0, 1.0)), ("l2", None),
                                            ("l1", None)])
def test_latents_and_unconstrained_moves_give_the_perturbation_law(sampler, domain):
    x = jnp.asarray(np.linspace(0.05, 0.95, D), jnp.float32)  # the ε-box is clipped at both ends
    n, eps = 4000, 0.2 if sampler not in ("l2", "l1") else 1.0
    exact = np.asarray(perturb.sample(jax.random.PRNGKey(1), x[None], eps, n, sampler=sampler, domain=domain))[0]
    z = jax.random.normal(jax.random.PRNGKey(2), (n, latent_size(sampler, D)))
    dom = None if domain is None else tuple(jnp.float32(v) for v in domain)
    f = lambda z: to_samples(sampler, z, x, eps, dom) @ W
    z, _, beta, rate = constrained_moves(f, jax.random.PRNGKey(3), z, f(z), -jnp.inf, jnp.float32(0.5), 10)
    assert rate == 1 and beta == 1  # nothing is rejected, the step grows to independent proposals
    moved = np.asarray(to_samples(sampler, z, x, eps, dom))
    for j in (0, 3, D - 1):
        assert stats.ks_2samp(moved[:, j], exact[:, j]).pvalue > 1e-3
    if sampler in ("l2", "l1"):
        order = 2 if sampler == "l2" else 1
        assert stats.ks_2samp(np.linalg.norm(moved - np.asarray(x), order, axis=1),
                              np.linalg.norm(exact - np.asarray(x), order, axis=1)).pvalue > 1e-3


def test_constrained_moves_keep_the_conditional_law():
    """Started from the uniform box law restricted to {w·x > level} (by rejection), 20 moves keep that law."""
    x = jnp.full((D,), 0.5, jnp.float32)
    z = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (40_000, D)))
    f = lambda z: to_samples("linf", z, x, 0.5, None) @ W
    s = np.asarray(f(jnp.asarray(z)))
    level = float(np.quantile(s, 0.9))
    start, fresh = z[s > level][:2000], z[s > level][2000:4000]
    z1, s1, _, rate = constrained_moves(f, jax.random.PRNGKey(5), jnp.asarray(start), f(jnp.asarray(start)),
                                        jnp.float32(level), jnp.float32(0.3), 20)
    assert 0.1 < rate < 0.9 and bool(jnp.all(s1 > level))
    assert np.mean(np.all(np.asarray(z1) == start, axis=1)) < 0.01        # the particles moved
    assert stats.ks_2samp(np.asarray(s1), np.asarray(f(jnp.asarray(fresh)))).pvalue > 1e-3
    u1, u0 = np.asarray(to_samples("linf", z1, x, 0.5)), np.asarray(to_samples("linf", jnp.asarray(fresh), x, 0.5))
    np.testing.assert_allclose(u1.mean(0), u0.mean(0), atol=0.02)
    np.testing.assert_allclose(u1.std(0), u0.std(0), atol=0.02)


def test_batched_over_inputs_equals_one_at_a_time():
    x = jnp.asarray(np.random.default_rng(0).uniform(0.2, 0.8, (3, D)), jnp.float32)
    t = jnp.asarray([2.3, 2.4, 2.2])
    cfg = AmlsConfig(particles=200, steps=5, max_levels=20)
    key = jax.random.PRNGKey(7)
    kw = dict(cfg=cfg, sampler="linf", domain=(0.0, 1.0))
    batch = jax.device_get(amls(linear, key, x, 0.3, t, offset=10, **kw))
    for i in range(3):
        one = jax.device_get(amls(linear, key, x[i:i + 1], 0.3, t[i], offset=10 + i, **kw))
        for a, b in zip(batch, one):
            np.testing.assert_allclose(np.asarray(a)[i], np.asarray(b)[0], rtol=1e-5, atol=1e-6)
    assert np.all(batch.levels >= 2)


def test_capped_runs_report_an_upper_bound():
    p = 1e-6
    r = jax.device_get(amls(linear, jax.random.PRNGKey(0), jnp.zeros((4, D)), 1.0, stats.norm.isf(p),
                            cfg=AmlsConfig(particles=200, steps=10, max_levels=3), sampler="gaussian"))
    assert r.capped.all() and np.all(r.levels == 3) and np.all(r.log10_low == -np.inf)
    assert np.all(r.log10_p > math.log10(p) + 1)  # P(score > L_3) ≈ 10^-3 bounds p = 10^-6 from above
    assert np.all(np.isnan(r.acceptance[:, 2])) and np.all(np.isfinite(r.thresholds[:, :3]))


def test_rows_and_configuration_key(cube_net):
    assert config_entries(EstimatorConfig()) == {}  # RoMA alone keeps the key of its stored rows
    cfg = EstimatorConfig(("roma", "mc", "amls"), 1000, AmlsConfig(particles=100, steps=2, max_levels=4))
    e = config_entries(cfg)
    assert e["estimators"] == ["roma", "mc", "amls"] and e["mc_samples"] == 1000 and e["amls"]["particles"] == 100
    assert config_entries(cfg._replace(estimators=("roma", "mc")))["estimators"] == ["roma", "mc"]
    x = np.full((2, 2, 3), 0.5, np.float32)
    rows = estimate_columns(cube_net.replace(params=jnp.float32(4.6)), x, [0, 0], 0.5, 0.5, cfg, 500)
    assert set(rows) == set(COLUMNS) and all(len(v) == 2 for v in rows.values())
    assert np.all(rows["mc_samples"] == 1000) and np.all(rows["amls_forward"] > 0)
    assert np.all((rows["amls_acceptance"] > 0) & (rows["amls_min_acceptance"] <= rows["amls_acceptance"]))
    only = estimate_columns(cube_net, x, [0, 0], 0.5, 0.5, cfg._replace(estimators=("amls",)), 500)
    assert np.all(only["mc_samples"] == -1) and np.all(np.isnan(only["mc_p"]))


@pytest.mark.parametrize("call", [
    lambda: amls(linear, jax.random.PRNGKey(0), jnp.zeros((1, D)), 1.0, 1.0, cfg=AmlsConfig(particles=1)),
    lambda: amls(linear, jax.random.PRNGKey(0), jnp.zeros((1, D)), 1.0, 1.0, cfg=AmlsConfig(rho=1.0)),
    lambda: amls(linear, jax.random.PRNGKey(0), jnp.zeros((1, D)), 1.0, 1.0, cfg=AmlsConfig(particles=10, rho=0.01)),
    lambda: amls(linear, jax.random.PRNGKey(0), jnp.zeros((1, D)), 1.0, 1.0, cfg=AmlsConfig(steps=0)),
    lambda: amls(linear, jax.random.PRNGKey(0), jnp.zeros((1, D)), 1.0, 1.0, cfg=AmlsConfig(max_levels=0)),
    lambda: amls(linear, jax.random.PRNGKey(0), jnp.zeros((1, D)), 1.0, 1.0, cfg=AmlsConfig(confidence=1.0)),
    lambda: amls(linear, jax.random.PRNGKey(0), jnp.zeros((1, D)), 1.0, 1.0, sampler=perturb.uniform_linf),
    lambda: amls(linear, jax.random.PRNGKey(0), jnp.zeros((1, D)), 1.0, 1.0, sampler="box"),
    lambda: amls(linear, jax.random.PRNGKey(0), jnp.zeros((2, D)), 1.0, jnp.ones(3)),
    lambda: amls(linear, jax.random.PRNGKey(0), jnp.zeros((1, D)), 1.0, jnp.nan),
    lambda: amls(linear, jax.random.PRNGKey(0), jnp.zeros((1, D)), -1.0, 1.0),
    lambda: parse_estimators("roma,bogus"),
    lambda: parse_estimators(" , "),
])
def test_bad_options_raise_one_line_input_errors(call):
    with pytest.raises(InputError) as e:
        call()
    assert "\n" not in str(e.value)


def test_bad_network_level_options(cube_net):
    x, y = np.full((1, 2, 3), 0.5, np.float32), [0]
    for call in (lambda: monte_carlo(cube_net, x, y, 0.1, 0.5, 0, 10),
                 lambda: monte_carlo(cube_net, x, y, 0.1, 0.0, 10, 10),
                 lambda: monte_carlo(cube_net, x, y, 0.1, 0.5, 10, 10, rng="mt19937"),
                 lambda: amls_estimate(cube_net, x, y, 0.1, 1.5)):
        with pytest.raises(InputError):
            call()
    assert parse_estimators("amls, roma,mc") == ("roma", "mc", "amls")


def test_scores_are_roma_confidence_and_the_margin():
    from jaxrobust.rare_events import score
    from jaxrobust.roma import wrong_label_confidence
    net = from_function(lambda w, x: x.reshape(x.shape[0], -1) @ w, jnp.asarray(np.random.default_rng(0).normal(
        size=(6, 4)), jnp.float32), (2, 3), 4)
    s = jnp.asarray(np.random.default_rng(1).uniform(size=(3, 5, 2, 3)), jnp.float32)
    y = jnp.asarray([0, 2, 3])
    np.testing.assert_allclose(np.exp(score(net, s, y[:, None])), wrong_label_confidence(net)(s, y), rtol=1e-5)
    logits = np.asarray(net(s.reshape(-1, 2, 3))).reshape(3, 5, 4)
    right = np.take_along_axis(logits, np.asarray(y)[:, None, None], -1)[..., 0]
    wrong = np.where(np.arange(4) == np.asarray(y)[:, None, None], -np.inf, logits).max(-1)
    np.testing.assert_allclose(score(net, s, y[:, None], softmax=False), wrong - right, rtol=1e-5, atol=1e-6)


def test_roma_run_stores_the_estimates_under_their_own_key(tmp_path):
    from jaxrobust.data import from_arrays
    from jaxrobust.roma import RomaConfig, config_key, run
    from jaxrobust.store import config_hash
    net = from_function(lambda w, x: x.reshape(x.shape[0], -1) @ w, jnp.asarray(np.random.default_rng(0).normal(
        size=(6, 3)), jnp.float32), (2, 3), 3)
    x = np.random.default_rng(1).uniform(size=(3, 2, 3)).astype(np.float32)
    ds = from_arrays(x, np.asarray(net(x)).argmax(-1), "toy", num_classes=3)
    cfg = RomaConfig(eps=0.3, delta=0.5, samples=200)
    assert config_key(cfg) == {"method": "roma", **cfg._asdict()}  # RoMA alone: the key rows had before
    est = EstimatorConfig(("roma", "mc", "amls"), 3000, AmlsConfig(particles=100, steps=5, max_levels=10))
    out = tmp_path / "r.h5"
    rows = run(net, ds, range(3), cfg, out, progress=False, estimators=est).read()
    assert set(rows["config"]) == {config_hash(config_key(cfg, est))} != {config_hash(config_key(cfg))}
    assert np.all(rows["mc_samples"] == 3000) and np.all(rows["amls_forward"] >= 100)
    assert np.all((rows["mc_low"] <= rows["mc_p"]) & (rows["mc_p"] <= rows["mc_high"]))
    plain = run(net, ds, range(3), cfg, out, progress=False).read()  # same file, RoMA alone: new rows, NaN estimates
    mine = plain["config"] == config_hash(config_key(cfg))
    assert mine.sum() == 3 and np.all(plain["mc_samples"][mine] == -1) and np.all(np.isnan(plain["amls_log10_p"][mine]))


def test_cli_estimators(tmp_path, capsys):
    import json

    from jaxrobust.cli import main
    out = tmp_path / "r.h5"
    assert main(["roma", "--estimator", "roma,bogus", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "bogus" in err and "\n" not in err and not out.exists()
    assert main(["roma", "--indices", "0:2", "--eps", "0.1", "--samples", "100", "--estimator", "amls,mc",
                 "--mc-samples", "500", "--amls-particles", "50", "--amls-steps", "2", "--amls-max-levels", "4",
                 "--out", str(out), "--json", "--csv", str(tmp_path / "r.csv")]) == 0
    e = json.loads(capsys.readouterr().out)["networks"][0]
    assert e["mc"]["samples"] == 500 and e["amls"]["median_forward"] > 0
    assert "amls_log10_p" in (tmp_path / "r.csv").read_text().splitlines()[0]


def test_amls_estimate_in_memory_bounded_groups_equals_one_batch(cube_net, monkeypatch):
    import jaxrobust.rare_events as rare_events
    x = np.random.default_rng(2).uniform(0.3, 0.7, (3, 2, 3)).astype(np.float32)
    net, cfg = cube_net.replace(params=jnp.float32(4.4)), AmlsConfig(particles=100, steps=3, max_levels=10)
    one = jax.device_get(amls_estimate(net, x, [0, 0, 0], 0.3, 0.5, cfg, indices=[4, 5, 6]))
    monkeypatch.setattr(rare_events, "GROUP_FLOATS", 2 * 100 * 6)  # groups of two inputs, the last one padded
    grouped = jax.device_get(amls_estimate(net, x, [0, 0, 0], 0.3, 0.5, cfg, indices=[4, 5, 6]))
    for a, b in zip(one, grouped):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
