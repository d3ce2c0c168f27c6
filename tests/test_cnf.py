"""Continuous normalizing flow (research.flows.cnf): the log-likelihood of a fixed linear velocity field
against the closed-form Gaussian change of variables, Hutchinson's estimator against the exact
divergence, the generative direction against expm, gradients of the fixed-step training loss, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from research.flows.cnf import cnf_log_prob, cnf_sample, cnf_transform, make_cnf_loss, velocity_from_model
from research.nn.mlp import ToyMLP, make_mlp_fn

A = np.array([[-0.4, 0.7, 0.0], [-0.2, 0.3, 0.5], [0.1, 0.0, -0.6]])  # non-symmetric, non-diagonal


def _linear(dtype):
    a = jnp.asarray(A, dtype)
    return lambda x, t: x @ a.T


def _closed_form_logp(x):
    """dx/dt = A x over [0, 1]: z = expm(A) x, log p(x) = log N(z; 0, I) + tr(A) (float64)."""
    z = np.asarray(x, np.float64) @ scipy.linalg.expm(A).T
    return -0.5 * np.sum(z ** 2, 1) - 0.5 * z.shape[1] * np.log(2 * np.pi) + np.trace(A), z


def _init_mlp(model, d, scale=0.0):
    """Jitted ToyMLP init (one compiled program), optionally every parameter moved by scale * N(0, 1)."""
    params = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, d)), jnp.zeros((1,)))["params"])()
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda a: np.asarray(a) + scale * rng.standard_normal(a.shape).astype(np.float32), params)


def _x(n=6, seed=0, dtype=np.float32):
    return (1.3 * np.random.default_rng(seed).standard_normal((n, 3))).astype(dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("solver,num_steps", [("heun", 64), ("tsit5", None)])
def test_linear_velocity_log_likelihood_matches_gaussian_change_of_variables(solver, num_steps, dtype):
    with jax.enable_x64(dtype == "float64"):
        x = _x(dtype=np.dtype(dtype))
        f = jax.jit(lambda x_: cnf_log_prob(_linear(x_.dtype), x_, divergence="exact", solver=solver,
                                            num_steps=num_steps, rtol=1e-9, atol=1e-9))
        logp, aux = f(x)
        want, z = _closed_form_logp(x)
        assert logp.dtype == np.dtype(dtype)
        # heun is second order: 64 steps of size 1/64 leave ~1e-4 relative; tsit5 at 1e-9 is exact to float
        tol = {"heun": 2e-4, "tsit5": 1e-8 if dtype == "float64" else 2e-5}[solver]
        np.testing.assert_allclose(np.asarray(logp), want, rtol=tol, atol=tol)
        np.testing.assert_allclose(np.asarray(aux["z"]), z, rtol=tol, atol=tol)
        np.testing.assert_allclose(np.asarray(aux["delta_logp"]), np.trace(A), rtol=tol, atol=tol)


def test_hutchinson_divergence_is_unbiased_for_the_linear_field():
    x = np.repeat(_x(2), 2000, axis=0)  # 2000 probes for each of 2 points
    f = jax.jit(lambda x_, k: cnf_log_prob(_linear(jnp.float32), x_, key=k, divergence="rademacher",
                                           solver="heun", num_steps=16)[0])
    logp = np.asarray(f(x, jax.random.key(0))).reshape(2, 2000)
    exact = np.asarray(jax.jit(lambda x_: cnf_log_prob(_linear(jnp.float32), x_, solver="heun",
                                                       num_steps=16)[0])(_x(2)))
    # per probe eps^T A eps = tr(A) + sum_{i != j} eps_i A_ij eps_j: variance sum_{i<j} (A_ij + A_ji)^2
    sd = np.sqrt(sum((A[i, j] + A[j, i]) ** 2 for i in range(3) for j in range(i + 1, 3)))
    assert np.all(np.abs(logp.mean(1) - exact) < 4 * sd / np.sqrt(2000))
    assert logp.std(1).min() > 0.5 * sd  # the estimator really is stochastic


def test_generative_direction_matches_expm_and_inverts_the_likelihood_path():
    with jax.enable_x64(True):
        z = _x(dtype=np.float64)
        x = np.asarray(jax.jit(lambda z_: cnf_transform(_linear(jnp.float64), z_, num_steps=200, solver="rk4"))(z))
        np.testing.assert_allclose(x, z @ scipy.linalg.expm(-A).T, rtol=1e-9, atol=1e-9)
    # a nonlinear time-dependent field: x -> z (likelihood path) -> x (sampling path) closes
    model = ToyMLP(hidden_size=16, depth=2, time_embed_dim=8, time_scale=1.0)
    params = _init_mlp(model, 3, scale=0.3)
    v = velocity_from_model(make_mlp_fn(model), params)
    x0 = _x(5, seed=1)
    z = jax.jit(lambda x_: cnf_log_prob(v, x_, solver="heun", num_steps=64)[1]["z"])(x0)
    assert float(jnp.abs(z - x0).max()) > 0.1
    back = jax.jit(lambda z_: cnf_transform(v, z_, num_steps=64, solver="heun"))(z)
    np.testing.assert_allclose(np.asarray(back), x0, atol=1e-3)  # two O(h^2) solves of the same ODE


def test_training_loss_is_the_mean_nll_with_finite_nonzero_gradients():
    model = ToyMLP(hidden_size=16, depth=2, time_embed_dim=8)
    mf = make_mlp_fn(model)
    x = _x(8, seed=2)[:, :2]
    params = _init_mlp(model, 2)
    loss_fn = make_cnf_loss(mf, num_steps=4, solver="heun", divergence="exact")
    (loss, aux), grads = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, {"x": x}, jax.random.key(1)),
                                                    has_aux=True))(params)
    # the zero-initialised output layer makes v = 0 at init: the NLL is the base N(0, I)'s
    base = 0.5 * np.sum(x.astype(np.float64) ** 2, 1) + np.log(2 * np.pi)
    np.testing.assert_allclose(float(loss), base.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(aux["nll"]), float(loss))
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
    assert max(float(jnp.abs(g).max()) for g in leaves) > 1e-3


def test_cnf_sample_shapes_and_temperature():
    v = _linear(jnp.float32)
    f = jax.jit(lambda k, t: cnf_sample(v, k, 4000, 3, num_steps=8, temperature=t), static_argnums=())
    x1 = np.asarray(f(jax.random.key(0), 1.0))
    assert x1.shape == (4000, 3) and np.all(np.isfinite(x1))
    # samples of the linear flow are N(0, expm(-A) expm(-A)^T)
    m = scipy.linalg.expm(-A)
    np.testing.assert_allclose(np.cov(x1.T), m @ m.T, atol=0.15 * np.abs(m @ m.T).max())
    np.testing.assert_allclose(np.asarray(f(jax.random.key(0), 0.5)), 0.5 * x1, rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_rejected():
    v = _linear(jnp.float32)
    x = _x()
    with pytest.raises(ValueError, match="unknown solver"):
        cnf_log_prob(v, x, solver="midpoint")
    with pytest.raises(ValueError, match="needs num_steps"):
        cnf_log_prob(v, x, solver="euler", num_steps=None)
    with pytest.raises(ValueError, match="unknown divergence"):
        cnf_log_prob(v, x, divergence="hutch")
    with pytest.raises(ValueError, match="PRNG key"):
        cnf_log_prob(v, x, divergence="gaussian")
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        cnf_log_prob(v, x[None])
    with pytest.raises(TypeError, match="floating"):
        cnf_log_prob(v, np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match="fixed-step"):
        make_cnf_loss(lambda *a: a[1], num_steps=4, solver="tsit5")
    with pytest.raises(ValueError, match="positive ints"):
        cnf_sample(v, jax.random.key(0), 0, 3)
