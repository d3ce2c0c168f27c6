"""The registry: every sampler in SAMPLERS jits, returns finite (x, nfe), and nfe equals the number of
model calls counted by a host callback (one per call of the denoiser / score / velocity)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.generative import sampling as S
from research.generative.paths import get_path
from research.generative.sde import VPSDE
from tests.gaussian_oracle import GaussianOracle, gaussian_edm_denoiser

MU, S0 = np.array([1.0, -0.5], np.float32), 0.5
ORACLE = GaussianOracle(get_path("vp_linear"), MU, S0)
TIME_ARGS = {  # name -> (model fn, options)
    "euler_maruyama": (ORACLE.score, {"sde": VPSDE(), "num_steps": 5}),
    "pc": (ORACLE.score, {"sde": VPSDE(), "num_steps": 25, "n_corrector": 2}),  # score_sde alpha_i = 1 - beta dt > 0
    "ddim": (ORACLE.x0_eps, {"path": get_path("vp_linear"), "num_steps": 5, "eta": 0.5}),
    "ode": (lambda x, t: ORACLE.velocity(x, t), {"num_steps": 3, "solver": "rk4", "t_end": 1e-3}),
    "ode_adaptive": (lambda x, t: ORACLE.velocity(x, t), {"t_end": 1e-3, "rtol": 1e-4, "atol": 1e-4}),
}


def _counted(fn, calls):
    def g(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return fn(x, t)

    return g


def test_every_sampler_is_tested_here():
    fam = {n: s.family for n, s in S.SAMPLERS.items()}
    assert {n for n, f in fam.items() if f == "time"} == set(TIME_ARGS)
    assert {n for n, f in fam.items() if f == "sigma"} >= {"euler", "heun", "euler_ancestral", "lms", "dpm_2",
                                                           "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "unipc"}
    for spec in S.SAMPLERS.values():
        assert spec.doc and spec.order


@pytest.mark.parametrize("name", sorted(S.SAMPLERS))
@pytest.mark.parametrize("steps", [1, 5])
def test_jits_finite_and_nfe_is_counted(name, steps):
    spec = S.SAMPLERS[name]
    calls = []
    x_init = jax.random.normal(jax.random.key(0), (3, 2))
    key = jax.random.key(1) if spec.stochastic else None
    if spec.family == "sigma":
        sig = S.karras(steps, 0.01, 10.0)
        den = _counted(gaussian_edm_denoiser(MU, S0), calls)
        x, nfe = jax.jit(lambda x, k: S.sample(name, den, 10.0 * x, sigmas=sig, key=k))(x_init, key)
    else:
        fn, opts = TIME_ARGS[name]
        if "num_steps" in opts:
            opts = {**opts, "num_steps": opts["num_steps"] + steps - 1}
        x, nfe = jax.jit(lambda x, k: S.sample_time(name, _counted(fn, calls), x, key=k, **opts))(x_init, key)
    jax.effects_barrier()
    assert np.all(np.isfinite(np.asarray(x))) and x.shape == x_init.shape
    assert int(nfe) == len(calls) > 0, (name, int(nfe), len(calls))
    if spec.nfe is not None:  # a static Python int outside jit
        nfe_eager = spec.nfe(steps if spec.family == "sigma" else (opts.get("num_steps")), **spec.resolve(
            {} if spec.family == "sigma" else opts))
        assert isinstance(nfe_eager, int) and nfe_eager == int(nfe)


def test_register_adds_a_sampler_in_one_line():
    @S.register("_test_half_euler", family="sigma", nfe=lambda n, **o: n, order="1")
    def half(denoiser, x, sigmas, *, scale=1.0):
        """Test-only sampler."""
        return S.SAMPLERS["euler"].fn(denoiser, x, sigmas) * scale

    try:
        x, nfe = S.sample("_test_half_euler", gaussian_edm_denoiser(MU, S0), jnp.ones((2, 2)),
                          sigmas=S.karras(3, 0.1, 1.0), scale=0.5)
        assert nfe == 3 and x.shape == (2, 2)
        with pytest.raises(ValueError, match="unknown option"):
            S.sample("_test_half_euler", gaussian_edm_denoiser(MU, S0), jnp.ones((2, 2)),
                     sigmas=S.karras(3, 0.1, 1.0), scael=0.5)
        with pytest.raises(ValueError, match="already registered"):
            S.register("_test_half_euler", family="sigma", nfe=lambda n, **o: n)(half)
    finally:
        del S.SAMPLERS["_test_half_euler"]


def test_family_mismatch_and_missing_required_option():
    with pytest.raises(ValueError, match="unknown time-space sampler 'heun'"):
        S.sample_time("heun", ORACLE.score, jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="unknown sigma-space sampler 'ode'"):
        S.sample("ode", ORACLE.score, jnp.ones((2, 2)), sigmas=S.karras(2, 0.1, 1.0))
    with pytest.raises(ValueError, match="missing required option.*sde"):
        S.sample_time("euler_maruyama", ORACLE.score, jnp.ones((2, 2)), key=jax.random.key(0), num_steps=2)
    with pytest.raises(ValueError, match="key"):
        S.sample_time("pc", ORACLE.score, jnp.ones((2, 2)), sde=VPSDE(), num_steps=2)
    with pytest.raises(ValueError, match="method"):
        S.sample_time("ode", ORACLE.velocity, jnp.ones((2, 2)), num_steps=2, method="rk4")
