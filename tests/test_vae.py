"""Gaussian VAE maths (research.latent.vae) and the conv nets (research.latent.nets): the KL term
against a float64 NumPy closed form and Monte Carlo, reparameterisation gradients, the
discretised logistic (normalised over the 17 levels, equal to float64 CDF differences, its
sampler's frequencies), the ELBO / IWAE bounds against the exact likelihood of a linear-Gaussian
model, the class-marginal bound, the training objective, and the nets' layers (im2col conv =
lax conv = flax Conv, space/depth round trip, shapes, label handling)."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.latent import nets
from research.latent.vae import (
    VAE, VAEObjective, bound_bits_per_dim, bounds, class_marginal_bound, diag_gaussian_log_prob,
    discretized_logistic_log_prob, discretized_logistic_sample, gaussian_kl, reparameterize,
)

DTYPES = ["float32", "float64"]
LEVELS = np.arange(17) / 8.0 - 1.0  # the 17 grid values of the digits in [-1, 1]
TOL = {"float32": 2e-5, "float64": 1e-12}


def _x64(dtype):
    return jax.enable_x64(dtype == "float64")


def _np_sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gaussian_kl_closed_form_and_monte_carlo(dtype):
    rng = np.random.default_rng(0)
    mean, log_var = rng.normal(size=(3, 2, 2, 4)), rng.normal(scale=0.7, size=(3, 2, 2, 4))
    expected = 0.5 * np.sum(np.exp(log_var) + mean**2 - 1.0 - log_var, axis=(1, 2, 3))
    with _x64(dtype):
        m, lv = jnp.asarray(mean, dtype), jnp.asarray(log_var, dtype)
        kl = gaussian_kl(m, lv)
        assert kl.dtype == jnp.dtype(dtype) and kl.shape == (3,)
        np.testing.assert_allclose(np.asarray(kl), expected, rtol=10 * TOL[dtype])
        if dtype == "float64":  # KL = E_q[log q(z) - log p(z)], with diag_gaussian_log_prob
            keys = jax.random.split(jax.random.key(1), 4000)
            zeros = jnp.zeros_like(m)
            draws = jax.vmap(lambda k: diag_gaussian_log_prob(z := reparameterize(k, m, lv), m, lv)
                             - diag_gaussian_log_prob(z, zeros, zeros))(keys)
            se = np.asarray(jnp.std(draws, 0)) / math.sqrt(len(keys))
            np.testing.assert_allclose(np.asarray(jnp.mean(draws, 0)), expected, atol=float(4 * se.max()))


def test_diag_gaussian_log_prob_matches_numpy():
    rng = np.random.default_rng(1)
    z, m, lv = rng.normal(size=(3, 5)), rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    expected = np.sum(-0.5 * np.log(2 * np.pi * np.exp(lv)) - (z - m) ** 2 / (2 * np.exp(lv)), axis=1)
    with jax.enable_x64(True):
        np.testing.assert_allclose(np.asarray(diag_gaussian_log_prob(jnp.asarray(z), jnp.asarray(m), jnp.asarray(lv))),
                                   expected, rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reparameterisation_gradients(dtype):
    with _x64(dtype):
        m, lv = jnp.asarray([0.3, -1.2], dtype), jnp.asarray([0.4, -0.5], dtype)
        key = jax.random.key(2)
        eps = (reparameterize(key, m, lv) - m) / jnp.exp(0.5 * lv)  # the draw's standard normal
        # per draw: dz/dmean = 1, dz/dlog_var = exp(log_var / 2) eps / 2
        g_m, g_lv = jax.grad(lambda a, b: jnp.sum(reparameterize(key, a, b)), argnums=(0, 1))(m, lv)
        np.testing.assert_allclose(np.asarray(g_m), 1.0, rtol=TOL[dtype])
        np.testing.assert_allclose(np.asarray(g_lv), np.asarray(0.5 * jnp.exp(0.5 * lv) * eps), rtol=10 * TOL[dtype])
        # the estimator of d/d(params) E[z^2] = d/d(params) (m^2 + exp(lv)) is unbiased
        keys = jax.random.split(jax.random.key(3), 4000)
        f = lambda a, b, k: jnp.sum(reparameterize(k, a, b) ** 2)  # noqa: E731
        gm, glv = jax.vmap(jax.grad(f, argnums=(0, 1)), in_axes=(None, None, 0))(m, lv, keys)
        for g, exact in [(gm, 2 * np.asarray(m)), (glv, np.exp(np.asarray(lv)))]:
            se = np.asarray(jnp.std(g, 0)) / math.sqrt(len(keys))
            np.testing.assert_allclose(np.asarray(jnp.mean(g, 0)), exact, atol=float(4 * se.max()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loc,log_scale", [(0.0, -2.0), (0.93, -4.0), (-3.0, 0.5), (0.4, -7.0), (1.7, 2.0)])
def test_discretized_logistic_is_normalised_over_the_17_levels(dtype, loc, log_scale):
    with _x64(dtype):
        x = jnp.asarray(LEVELS, dtype)
        lp = discretized_logistic_log_prob(x, jnp.asarray(loc, dtype), jnp.asarray(log_scale, dtype))
        assert lp.dtype == jnp.dtype(dtype) and np.all(np.asarray(lp) <= 0)
        np.testing.assert_allclose(float(jnp.sum(jnp.exp(lp))), 1.0, atol=10 * TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_discretized_logistic_matches_float64_cdf_differences(dtype):
    rng = np.random.default_rng(4)
    loc, log_scale = rng.uniform(-1.2, 1.2, size=(40, 1)), rng.uniform(-3.5, 0.5, size=(40, 1))
    s = np.exp(log_scale)
    a, b = (LEVELS + 1 / 16 - loc) / s, (LEVELS - 1 / 16 - loc) / s
    a, b = np.where(LEVELS < 1 - 1e-9, a, np.inf), np.where(LEVELS > -1 + 1e-9, b, -np.inf)  # open edge bins
    # CDF(a) - CDF(b), or (1 - CDF(b)) - (1 - CDF(a)) in the right tail: no cancellation in float64
    mass = np.where(b > 0, _np_sigmoid(-b) - _np_sigmoid(-a), _np_sigmoid(a) - _np_sigmoid(b))
    expected = np.log(mass)
    with _x64(dtype):
        lp = discretized_logistic_log_prob(jnp.asarray(np.broadcast_to(LEVELS, (40, 17)), dtype),
                                           jnp.asarray(loc, dtype), jnp.asarray(log_scale, dtype))
    # float32: inner bins lose up to ~1e-4 relative to cancellation-free float64 only for masses ~1e-7
    np.testing.assert_allclose(np.asarray(lp), expected, rtol=2e-4 if dtype == "float32" else 1e-10,
                               atol=1e-4 if dtype == "float32" else 1e-10)


def test_discretized_logistic_sample_frequencies():
    loc, log_scale = jnp.full((200000,), 0.3), jnp.full((200000,), -2.0)
    x = np.asarray(discretized_logistic_sample(jax.random.key(5), loc, log_scale))
    idx = np.rint((x + 1) * 8).astype(int)
    np.testing.assert_allclose((idx + 0.0) / 8 - 1, x, atol=1e-6)  # on the grid
    freq = np.bincount(idx, minlength=17) / len(x)
    p = np.exp(np.asarray(discretized_logistic_log_prob(jnp.asarray(LEVELS), 0.3, -2.0)))
    np.testing.assert_allclose(freq, p, atol=4 * np.sqrt(p * (1 - p) / len(x)).max() + 1e-4)


def _linear_gaussian(dtype, a, v):
    """p(z) = N(0, 1), p(x | z) = N(w z, s^2); posterior q(z | x) = N(a x, v). Returns the model pieces
    and log p(x) = log N(x; 0, w^2 + s^2)."""
    w, s2 = 1.5, 0.3

    def posterior(x):
        return a * x, jnp.full_like(x, math.log(v))

    def log_likelihood(x, z):
        return jnp.sum(-0.5 * jnp.log(2 * jnp.pi * s2) - (x - w * z) ** 2 / (2 * s2), axis=1)

    def log_px(x):
        return -0.5 * np.log(2 * np.pi * (w**2 + s2)) - x**2 / (2 * (w**2 + s2))

    def elbo_closed_form(x):
        m = a * x
        return (-0.5 * np.log(2 * np.pi * s2) - ((x - w * m) ** 2 + w**2 * v) / (2 * s2)
                - 0.5 * (v + m**2 - 1 - np.log(v)))

    exact = {"a": w / (w**2 + s2), "v": s2 / (w**2 + s2)}
    return posterior, log_likelihood, log_px, elbo_closed_form, exact


@pytest.mark.parametrize("dtype", DTYPES)
def test_bounds_equal_log_likelihood_with_the_exact_posterior(dtype):
    x = np.array([[-1.3], [0.2], [2.1]])
    with _x64(dtype):
        *_, exact = _linear_gaussian(dtype, 0.0, 1.0)
        post, lik, log_px, elbo_cf, _ = _linear_gaussian(dtype, exact["a"], exact["v"])
        elbo, iwae = bounds(post, lik, jnp.asarray(x, dtype), jax.random.key(6), num_samples=3)
        assert elbo.dtype == iwae.dtype == jnp.dtype(dtype)
        # every importance weight p(x, z) / q(z | x) equals p(x): the IWAE bound is exact for any draw
        np.testing.assert_allclose(np.asarray(iwae), log_px(x[:, 0]), rtol=50 * TOL[dtype])
        np.testing.assert_allclose(elbo_cf(x[:, 0]), log_px(x[:, 0]), rtol=1e-12)  # the ELBO is tight


def test_bounds_with_a_wrong_posterior_are_ordered_and_match_the_closed_form_elbo():
    x = np.array([[-1.3], [0.2], [2.1]])
    with jax.enable_x64(True):
        post, lik, log_px, elbo_cf, _ = _linear_gaussian("float64", 0.2, 0.8)
        keys = jax.random.split(jax.random.key(7), 2000)
        reps = {k: jax.jit(jax.vmap(lambda kk, k=k: bounds(post, lik, jnp.asarray(x), kk, num_samples=k)))(keys)
                for k in (1, 64)}
        truth, elbo = log_px(x[:, 0]), elbo_cf(x[:, 0])

        def mean_se(a):
            a = np.asarray(a)
            return a.mean(0), a.std(0) / math.sqrt(len(a))

        for est in (reps[1][0], reps[1][1], reps[64][0]):  # unbiased ELBO estimates (IWAE with K = 1 is one)
            m, se = mean_se(est)
            np.testing.assert_allclose(m, elbo, atol=float(4 * se.max()) + 1e-9)
        iwae64, se64 = mean_se(reps[64][1])
        assert np.all(elbo + 0.5 * (truth - elbo) < iwae64 - 4 * se64)  # K = 64 closes over half the gap
        assert np.all(iwae64 < truth + 4 * se64)  # and stays a bound


def test_class_marginal_bound_and_bits_per_dim():
    b = np.array([[-10.0, -3.0], [-2.0, -300.0], [-5.0, -4.0]])
    expected = np.log(np.exp(b).sum(0) / 3)
    np.testing.assert_allclose(np.asarray(class_marginal_bound(jnp.asarray(b))), expected, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(bound_bits_per_dim(jnp.asarray([-64 * math.log(17.0)]), 64)),
                               math.log2(17.0), rtol=1e-6)
    with pytest.raises(ValueError, match="C, B"):
        class_marginal_bound(jnp.zeros(3))


@pytest.fixture(scope="module")
def tiny_vae():
    vae = VAE(features=(8, 8), latent_channels=2, num_classes=10)
    return vae, vae.init(jax.random.key(0))


def test_vae_objective_is_the_negative_elbo_per_dim(tiny_vae):
    vae, params = tiny_vae
    rng = np.random.default_rng(9)
    x = jnp.asarray(LEVELS[rng.integers(0, 17, size=(4, 8, 8, 1))], jnp.float32)
    y = jnp.asarray([0, 3, 9, 5], jnp.int32)
    key = jax.random.key(10)

    @jax.jit
    def parts(p):
        mean, log_var = vae.posterior(p, x, y)
        z = reparameterize(key, mean, log_var)
        return (VAEObjective(1.0).loss(vae, p, x, key, cond=y), VAEObjective(0.5).loss(vae, p, x, key, cond=y),
                vae.log_likelihood(p, x, z, y), gaussian_kl(mean, log_var), vae.bounds(p, x, key, y, num_samples=2))

    (loss1, aux1), (loss_half, aux_half), log_px, kl, (elbo, iwae) = parts(params)
    np.testing.assert_allclose(float(loss1), float(jnp.mean(kl - log_px)) / 64, rtol=1e-5)
    np.testing.assert_allclose(float(loss_half), float(jnp.mean(0.5 * kl - log_px)) / 64, rtol=1e-5)
    np.testing.assert_allclose(float(aux1["elbo_bpd"]), float(loss1) / math.log(2), rtol=1e-5)
    np.testing.assert_allclose(float(aux_half["elbo_bpd"]), float(aux1["elbo_bpd"]), rtol=1e-6)
    np.testing.assert_allclose(float(aux1["recon_bpd"] + aux1["kl_bpd"]), float(aux1["elbo_bpd"]), rtol=1e-5)
    assert elbo.shape == iwae.shape == (4,) and np.all(np.isfinite(np.asarray(elbo)))
    with pytest.raises(ValueError, match="class-conditional"):
        vae.posterior(params, x)


@pytest.mark.parametrize("features,size", [((8,), 8), ((8, 8), 4), ((8, 8, 16), 2), ((4, 8, 8, 16), 1)])
def test_nets_shapes(features, size):
    enc, dec = nets.Encoder(features, 6), nets.Decoder(features, 2, num_classes=3)
    x = jnp.zeros((2, 8, 8, 1))
    pe = nets.init_module(enc, jax.random.key(0), x.shape, conditional=False)
    z = jax.eval_shape(lambda: enc.apply({"params": pe}, x))
    assert z.shape == (2, size, size, 6) and nets.latent_size(features) == size
    pd = nets.init_module(dec, jax.random.key(1), (2, size, size, 3), conditional=True)
    zc = jnp.zeros((2, size, size, 3))
    assert jax.eval_shape(lambda: dec.apply({"params": pd}, zc, jnp.asarray([0, 2]))).shape == (2, 8, 8, 2)
    with pytest.raises(ValueError, match="pass labels"):
        dec.apply({"params": pd}, zc)
    with pytest.raises(ValueError, match="expected input"):
        enc.apply({"params": pe}, jnp.zeros((2, 7, 8, 1)))


@pytest.mark.parametrize("size", [1, 2, 4])
def test_conv3x3_paths_agree_with_flax_conv(size):
    x = jax.random.normal(jax.random.key(11), (3, size, size, 5))
    conv = nets.Conv3x3(7)
    p = conv.init(jax.random.key(12), x)
    flax_params = {"params": {"kernel": p["params"]["kernel"], "bias": p["params"]["bias"]}}
    ref = jax.jit(nn.Conv(7, (3, 3)).apply)(flax_params, x)
    out = jax.jit(conv.apply)(p, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
    lax_out = jax.lax.conv_general_dilated(x, p["params"]["kernel"], (1, 1), "SAME",
                                           dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["params"]["bias"]
    np.testing.assert_allclose(np.asarray(out), np.asarray(lax_out), rtol=1e-5, atol=1e-5)


def test_init_module_matches_flax_structure_and_scales():
    dec = nets.Decoder((16, 32), 2, num_classes=10)
    params = nets.init_module(dec, jax.random.key(13), (1, 4, 4, 3), conditional=True)
    ref = jax.eval_shape(lambda: dec.init({"params": jax.random.key(0)}, jnp.zeros((1, 4, 4, 3)),
                                          jnp.zeros((1,), jnp.int32))["params"])
    assert jax.tree.structure(params) == jax.tree.structure(ref)
    flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    for path, v in flat.items():
        assert v.dtype == np.float32
        if path.endswith("['bias']"):
            np.testing.assert_array_equal(v, 0.0)
        elif path.endswith("['scale']"):
            np.testing.assert_array_equal(v, 1.0)
        elif path.endswith("['kernel']") and v.size >= 4000:  # LeCun normal: std 1 / sqrt(fan_in)
            np.testing.assert_allclose(v.std() * math.sqrt(math.prod(v.shape[:-1])), 1.0, rtol=0.06)
    kernels = [v.ravel()[:50] for p, v in flat.items() if p.endswith("['kernel']")]
    assert len({k.tobytes() for k in kernels}) == len(kernels)  # independent slices of the one draw
    again = nets.init_module(dec, jax.random.key(13), (1, 4, 4, 3), conditional=True)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)))

    class Odd(nn.Module):
        @nn.compact
        def __call__(self, x, labels=None):
            return x * self.param("gain", nn.initializers.ones, (1,))

    with pytest.raises(ValueError, match="gain"):
        nets.init_module(Odd(), jax.random.key(0), (1, 8, 8, 1), conditional=False)


def test_space_depth_round_trip():
    x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
    y = nets.space_to_depth(x)
    assert y.shape == (2, 2, 2, 12)
    np.testing.assert_array_equal(np.asarray(y[0, 0, 1]), np.asarray(x[0, 0:2, 2:4].reshape(-1)))
    np.testing.assert_array_equal(np.asarray(nets.depth_to_space(y)), np.asarray(x))


def test_bad_inputs_rejected():
    with pytest.raises(ValueError, match="features"):
        VAE(features=(), latent_channels=2)
    with pytest.raises(ValueError, match="latent_channels"):
        VAE(latent_channels=0)
    with pytest.raises(ValueError, match="num_levels"):
        discretized_logistic_log_prob(jnp.zeros(3), 0.0, 0.0, num_levels=1)
    with pytest.raises(ValueError, match="num_samples"):
        bounds(lambda x: (x, x), lambda x, z: x[:, 0], jnp.zeros((2, 1)), jax.random.key(0), num_samples=0)
