"""float64 end to end under ``jax_enable_x64`` (and the float32 floor for low-precision inputs).

The ``dtype`` fixture defined here is imported by the other generative test modules: it runs a test
once in float32 (the default) and once in float64 inside ``jax.enable_x64(True)``, a context manager
that restores the previous setting on exit, so x64 never leaks into other tests
(``test_x64_does_not_leak`` checks it).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.generative import likelihood as LK
from research.generative import losses as L
from research.generative import parameterization as P
from research.generative._util import normal_logp
from research.generative.edm import edm_precond, edm_weight, make_edm_denoiser
from research.generative.sampling import karras
from research.generative.ot import linear_assignment, ot_pairing, squared_distances
from research.generative.paths import PATHS, get_path
from research.generative.sde import PathSDE, SubVPSDE, VESDE, VPSDE
from research.generative.timesteps import base_uniform, sample_edm_sigma, sample_timesteps

F64 = jnp.dtype(jnp.float64)


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    """The compute dtype of a test: float32, or float64 with x64 on for the test's duration only."""
    if request.param == "float32":
        yield jnp.dtype(jnp.float32)
    else:
        with jax.enable_x64(True):
            yield jnp.dtype(jnp.float64)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def test_x64_does_not_leak(dtype):
    """Inside the fixture x64 matches the dtype; module level (and so every other test) stays float32."""
    assert jnp.asarray(1.0).dtype == dtype


def test_x64_is_off_outside_the_fixture():
    assert not jax.config.jax_enable_x64
    assert jnp.asarray(1.0).dtype == jnp.float32


def _all_f64(tree):
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    return leaves and all(jnp.result_type(x) == F64 for x in leaves)


SDE_CASES = {
    "vp": lambda: VPSDE(), "subvp": lambda: SubVPSDE(), "ve": lambda: VESDE(),
    "path_rf": lambda: PathSDE(get_path("rectified_flow"), T=0.99), "path_cosine": lambda: PathSDE(get_path("vp_cosine")),
    "path_edm": lambda: PathSDE(get_path("edm"), T=80.0),
}


@pytest.mark.parametrize("name", sorted(PATHS))
def test_paths_float64(x64, name):
    path = get_path(name)
    t = jnp.array([0.2, 0.6], F64) * (40.0 if name == "edm" else 1.0)
    x = jnp.ones((2, 3), F64)
    outs = [path.alpha(t), path.sigma(t), path.d_alpha(t), path.d_sigma(t), path.edm_sigma(t),
            path.t_from_edm_sigma(path.edm_sigma(t)), path.marginal(x, x, t), path.velocity_target(x, x, t)]
    assert _all_f64(outs), [o.dtype for o in outs]
    # a float32 t with float64 data: marginal and velocity_target evaluate the schedule in float64
    assert path.marginal(x, x, t.astype(jnp.float32)).dtype == F64


@pytest.mark.parametrize("name", list(SDE_CASES))
def test_sdes_float64(x64, name):
    sde = SDE_CASES[name]()
    x = jnp.full((2, 3), 0.5, F64)
    t = jnp.array([0.3, 0.6], F64) * (60.0 if name == "path_edm" else 1.0)
    score = lambda y, s: -y
    outs = [sde.sde(x, t), sde.marginal_prob(x, t), sde.prior_sample(jax.random.PRNGKey(0), (2, 3), F64),
            sde.prior_logp(x), sde.discretize(x, t, t * 0.9), sde.reverse(score).sde(x, t),
            sde.reverse(score, probability_flow=True).discretize(x, t, t * 0.9)]
    assert _all_f64(outs)
    assert sde.prior_sample(jax.random.PRNGKey(0), (2, 3)).dtype == jnp.float32  # the default stays float32


@pytest.mark.parametrize("name", ["rectified_flow", "vp_linear", "vp_cosine", "ve", "sub_vp", "edm"])
def test_conversions_float64(x64, name):
    path = get_path(name)
    x = jnp.full((2, 3), 0.5, F64)
    t = jnp.array([0.3, 0.6], F64)
    for src in P.PREDICTIONS:
        assert _all_f64(P.to_x0_eps(path, x, x, t, src))
        for dst in P.PREDICTIONS:
            assert P.convert(path, x, x, t, src=src, dst=dst).dtype == F64
    assert P.as_edm_denoiser(lambda y, s: y, path, src="eps")(x, jnp.array([0.5, 2.0], F64)).dtype == F64
    assert _all_f64(P.eps_precond(path, t, 0.5))
    fn = P.preconditioned_eps_model(lambda p, y, s, c, k: y.astype(jnp.float32), path, 0.5)
    assert fn(None, x, t, None, None).dtype == F64


def _losses(x0):
    zero = lambda p, x, t, c, k: jnp.zeros_like(x)
    key = jax.random.PRNGKey(0)
    yield L.rectified_flow_loss(zero, None, x0, key)
    yield L.cfm_loss(zero, None, x0, key, sigma=0.1)
    yield L.cfm_loss(zero, None, x0, key, coupling="ot")
    yield L.pair_flow_loss(zero, None, x0, x0 + 1.0, key)
    for sde in (VPSDE(), SubVPSDE(), VESDE()):
        yield L.dsm_loss(zero, None, x0, key, sde=sde)
        yield L.dsm_loss(zero, None, x0, key, sde=sde, likelihood_weighting=True, prediction="score")
    yield L.edm_loss(zero, None, x0, key)
    for pred in P.PREDICTIONS:
        yield L.path_loss(zero, None, x0, key, path=get_path("vp_cosine"), prediction=pred, t_min=0.01, t_max=0.9)


def test_losses_float64_and_float32_floor(x64):
    x0 = jax.random.normal(jax.random.PRNGKey(1), (8, 3), F64)
    for loss, aux in _losses(x0):
        assert loss.dtype == F64 and aux["loss"].dtype == F64
    # bfloat16 data and bfloat16 model outputs still give float32 losses
    bf = x0.astype(jnp.bfloat16)
    for loss, _ in _losses(bf):
        assert loss.dtype == jnp.float32
    half = lambda p, x, t, c, k: jnp.zeros_like(x, jnp.float16)
    assert L.rectified_flow_loss(half, None, x0.astype(jnp.float32), jax.random.PRNGKey(0))[0].dtype == jnp.float32


def test_timesteps_and_edm_float64(x64):
    k = jax.random.PRNGKey(0)
    for kw in ({}, {"antithetic": True}, {"stratified": True}):
        assert base_uniform(k, (6,), dtype=F64, **kw).dtype == F64
    for dist in ("uniform", "logit_normal", "cosmap"):
        assert sample_timesteps(k, (6,), dist=dist, dtype=F64).dtype == F64
        assert sample_timesteps(k, (6,), dist=dist).dtype == jnp.float32  # default float32
    assert sample_edm_sigma(k, (6,), dtype=F64).dtype == F64
    s = jnp.array([0.1, 1.0], F64)
    assert _all_f64(edm_precond(s)) and edm_weight(s).dtype == F64
    x = jnp.ones((2, 3), F64)
    assert make_edm_denoiser(lambda p, y, c, cond, key: y.astype(jnp.float32), None)(x, s).dtype == F64
    assert karras(4, 0.002, 80.0, dtype=F64).dtype == F64


def test_likelihood_float64(x64):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 2)), F64)
    v = lambda y, t: -y * (1.0 + t[:, None])
    for div in ("exact", "rademacher"):
        logp, aux = LK.ode_log_likelihood(v, x, prior_logp=normal_logp, divergence=div, key=jax.random.PRNGKey(0))
        assert _all_f64((logp, aux["z"], aux["delta_logp"]))
    z = LK.dequantize(jax.random.PRNGKey(0), jnp.arange(6).reshape(2, 3), bin_width=0.5, offset=-1.0, dtype=F64)
    assert z.dtype == F64 and LK.bits_per_dim(jnp.zeros(2, F64), 3, bin_width=0.5).dtype == F64


def test_ot_float64(x64):
    rng = np.random.default_rng(0)
    a, b = jnp.asarray(rng.standard_normal((6, 2))), jnp.asarray(rng.standard_normal((6, 2)))
    assert a.dtype == F64
    assert squared_distances(a, b).dtype == F64
    assert ot_pairing(a, b).dtype == jnp.int32 and linear_assignment(squared_distances(a, b)).dtype == jnp.int32


def test_vp_probability_flow_drift_of_standard_normal_data_is_zero(x64):
    """N(0, I) data under the VP SDE stays N(0, I), the exact score is -x and the PF drift
    f x - g^2/2 score = -beta/2 x + beta/2 x vanishes. In float64 the two terms are the same beta to
    round-off (sqrt(beta)^2 = beta (1 + O(eps))), so |drift| <= ~ beta |x| eps_64 ~ 20 * 3 * 2e-16.
    Before the dtype fix the schedule ran in float32 and the drift was 1.2e-6."""
    sde = VPSDE()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 3)))
    t = jnp.linspace(1e-3, 1.0, 16)
    drift = sde.reverse(lambda y, s: -y, probability_flow=True).sde(x, t)[0]
    assert drift.dtype == F64
    assert float(jnp.max(jnp.abs(drift))) < 1e-14
    # the generic PathSDE of the VP path gives the same drift (f = alpha'/alpha, g^2 from sigma)
    drift_generic = PathSDE(get_path("vp_linear")).reverse(lambda y, s: -y, probability_flow=True).sde(x, t)[0]
    # g^2 = 2 s s' - 2 f s^2 sums terms of size beta: a few eps_64 * beta |x| as well
    assert float(jnp.max(jnp.abs(drift_generic))) < 1e-13
