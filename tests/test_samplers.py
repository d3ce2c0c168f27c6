"""samplers.edm_sample (EDM Algorithm 2, unit latents) and classifier-free guidance with every sampler;
exact Gaussian predictions in any parameterisation drive the registry's samplers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.generative import parameterization as P
from research.generative.guidance import guided, guided_denoiser, guided_model_fn
from research.generative.paths import get_path
from research.generative.samplers import edm_nfe, edm_sample
from research.generative.sampling import SAMPLERS, karras, sample, sample_time
from tests.gaussian_oracle import moments_ok, GaussianOracle, gaussian_edm_denoiser

MU = np.array([1.0, -0.5], np.float32)
S0 = 0.5
N = 2000
IDEAL = gaussian_edm_denoiser(MU, S0)


@pytest.fixture(scope="module")
def z():
    return jax.random.normal(jax.random.PRNGKey(0), (N, 2), jnp.float32)


_moments_ok = moments_ok


# ----------------------------------------------------------------------------- edm_sample
@pytest.mark.parametrize("num_steps", [1, 2, 18])
def test_edm_nfe_is_2n_minus_1(num_steps):
    calls = []

    def den(x, sigma):
        calls.append(1)
        return 0.5 * x

    with jax.disable_jit():
        edm_sample(den, jnp.ones((2, 2)), num_steps=num_steps)
    assert len(calls) == edm_nfe(num_steps) == 2 * num_steps - 1


def test_edm_sample_is_heun_over_karras(z):
    k = jax.random.key(3)
    a = edm_sample(IDEAL, z[:8], num_steps=7, sigma_max=40.0, S_churn=5.0, S_min=0.1, S_max=10.0, key=k)
    sig = karras(7, 0.002, 40.0)
    b, _ = sample("heun", IDEAL, sig[0] * z[:8], sigmas=sig, s_churn=5.0, s_tmin=0.1, s_tmax=10.0, key=k)
    np.testing.assert_array_equal(a, b)


def test_edm_deterministic_matches_transport(z):
    out = jax.jit(lambda x: edm_sample(IDEAL, x, num_steps=64))(z[:256])
    x80 = 80.0 * np.asarray(z[:256])
    exact = MU + S0 * (x80 - MU) / np.sqrt(S0 ** 2 + 80.0 ** 2)
    np.testing.assert_allclose(np.asarray(out), exact, atol=1e-2)


def test_edm_stochastic_churn_moments(z):
    f = jax.jit(lambda x, k: edm_sample(IDEAL, x, num_steps=64, S_churn=20.0, S_min=0.01, S_max=50.0, key=k))
    _moments_ok(f(z, jax.random.PRNGKey(7)), MU, S0 ** 2)


def test_edm_sample_validates_eagerly(z):
    for kw, what in [({"S_churn": 1.0}, "key"), ({"S_churn": -1.0}, "S_churn"), ({"rho": 0.0}, "rho"),
                     ({"sigma_min": 0.0}, "sigma_min"), ({"sigma_min": 100.0}, "sigma_min"),
                     ({"num_steps": 0}, "num_steps"), ({"S_noise": -0.5}, "S_noise")]:
        with pytest.raises(ValueError, match=what):
            edm_sample(IDEAL, z[:4], **kw)


# ----------------------------------------------------------------------------- any path model, any sampler
def _steps(name):
    """24 steps; first-order / SDE-type samplers more (their variance bias is first order in the step)."""
    if name == "euler_ancestral":
        return 256
    return 48 if name == "euler" or (SAMPLERS[name].stochastic and name != "heun") else 24


PATH_SRC = [("vp_linear", "eps"), ("rectified_flow", "velocity"), ("ve", "score"), ("vp_cosine", "x0"),
            ("sub_vp", "eps"), ("edm", "x0")]


@pytest.mark.parametrize("path_name,src", PATH_SRC)
@pytest.mark.parametrize("name", sorted(n for n, s in SAMPLERS.items() if s.family == "sigma"))
def test_any_path_model_any_sigma_sampler(z, path_name, src, name):
    """A path model in any parameterisation -> as_edm_denoiser -> every sigma sampler hits N(MU, S0^2)."""
    path = get_path(path_name)
    o = GaussianOracle(path, MU, S0)
    den = P.as_edm_denoiser({"eps": o.eps, "velocity": o.velocity, "score": o.score, "x0": o.x0}[src], path,
                            src=src)
    s = jnp.array([0.1, 1.0, 5.0])
    np.testing.assert_allclose(den(jnp.ones((3, 2)), s), IDEAL(jnp.ones((3, 2)), s), rtol=2e-3, atol=2e-3)
    smax = min(float(path.edm_sigma(jnp.float32(path.t_start * 0.999))), 80.0)
    # SDE-type samplers carry a first-order variance bias (+17% for dpmpp_2m_sde at 24 steps from 80)
    sig = karras(_steps(name), 0.002, smax)
    x, _ = jax.jit(lambda x, k: sample(name, den, x, sigmas=sig, key=k))(sig[0] * z, jax.random.key(1))
    _moments_ok(x, MU, S0 ** 2, tol_var=0.12)


# ----------------------------------------------------------------------------- CFG
def _cond_model(params, x, t, cond, key):
    _cond_model.calls.append(x.shape[0])
    return params * x + cond[:, None].astype(jnp.float32)


def test_guided_formula_and_single_batched_call():
    x, t, cond = jnp.ones((3, 2)), jnp.zeros((3,)), jnp.array([1, 2, 3])
    for w in (0.0, 1.0, 2.5, 4.0):
        _cond_model.calls = []
        out = guided(_cond_model, 2.0, cond, 10, w)(x, t)
        uncond, condo = 2.0 * x + 10.0, 2.0 * x + cond[:, None]
        np.testing.assert_allclose(out, uncond + w * (condo - uncond), rtol=1e-6)
        assert _cond_model.calls == ([3] if w == 1.0 else [6])
    with pytest.raises(ValueError, match="null_cond shape"):
        guided(_cond_model, 2.0, cond, jnp.array([1, 2]), 3.0)(x, t)
    out = jax.jit(lambda w: guided(_cond_model, 1.0, cond, jnp.array([0, 0, 0]), w)(x, t))(3.0)
    np.testing.assert_allclose(out, x + 3.0 * cond[:, None], rtol=1e-6)
    # denoiser level
    _cond_model.calls = []
    d = guided_denoiser(lambda x, s, c: _cond_model(2.0, x, s, c, None), cond, 10, 2.5)(x, jnp.ones((3,)))
    np.testing.assert_allclose(d, 2.0 * x + 10.0 + 2.5 * (cond[:, None] - 10.0), rtol=1e-6)
    assert _cond_model.calls == [6]


def test_cfg_composes_with_every_sampler(z):
    """CFG of exact conditional eps-predictions: the guided eps is that of the Gaussian with mean
    mu_u + w (mu_c - mu_u) (same variance), so every sampler must produce that mean."""
    path = get_path("vp_linear")
    mu_c, mu_u = np.array([1.0, 1.0], np.float32), np.array([0.0, 0.0], np.float32)
    oc, ou = GaussianOracle(path, mu_c, S0), GaussianOracle(path, mu_u, S0)

    def model(params, x, t, cond, key):
        return jnp.where(cond[:, None] == 1, oc.eps(x, t), ou.eps(x, t))

    w = 2.0
    target = mu_u + w * (mu_c - mu_u)
    og = GaussianOracle(path, target, S0)
    cond = jnp.ones((N,), jnp.int32)
    xs, ts = np.asarray(z[:8]), jnp.full((8,), 0.3)
    np.testing.assert_allclose(guided(model, None, cond[:8], 0, w)(xs, ts), og.eps(xs, ts), rtol=1e-4, atol=1e-5)
    eps_fn = guided(model, None, cond, 0, w)
    out, _ = jax.jit(lambda x: sample_time("ddim", P.as_x0_eps_fn(eps_fn, path, src="eps"), x, path=path,
                                           num_steps=100))(z)
    _moments_ok(out, og.mean(path.t_end), og.var(path.t_end))
    g_model = guided_model_fn(model, 0, w)
    den = P.as_edm_denoiser(lambda x, t: g_model(None, x, t, cond, None), path, src="eps")
    for name in sorted(n for n, s in SAMPLERS.items() if s.family == "sigma"):
        sig = karras(_steps(name), 0.002, 100.0)
        x, _ = jax.jit(lambda x, k: sample(name, den, x, sigmas=sig, key=k))(sig[0] * z, jax.random.key(2))
        _moments_ok(x, target, S0 ** 2, tol_var=0.12)
