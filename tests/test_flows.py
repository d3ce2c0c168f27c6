"""Normalizing-flow bijectors and image flows (research.flows): log-determinants against slogdet of
jacfwd in float64, inversion in float32 and float64, NICE's exact zero log-det, a 2-D density that
integrates to one, values and gradients at the edges of the domain, ActNorm's data-dependent init,
the LU 1x1 convolution, and the flows' likelihood against an independent NumPy computation."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.flows.bijectors import (
    ActNorm, Chain, DiagonalScale, FactorOut, Flatten, InvConv1x1, LogitTransform, Squeeze, lu_init,
)
from research.flows.coupling import Coupling, make_mask
from research.flows.models import (
    FLOW_KINDS, ConditionalFlow, build_bijector, build_flow, flow_bits_per_dim, init_flow, make_flow_loss,
    marginal_log_prob,
)
from research.generative.likelihood import digits_dequantization

BW, OFF = digits_dequantization()
LOW, HIGH = OFF, OFF + 17 * BW
REACH = 0.05 * (HIGH - LOW) / 0.9  # the logit preprocessing's inverse lands in (LOW - REACH, HIGH + REACH)
E = 3  # conditioning width


def small_coupling(**kw):
    return Coupling(hidden=8, depth=2, scale_bound=2.0, **kw)


# name -> (bijector factory, event shape, uses cond, input kind)
CASES = {
    "affine_checkerboard_image": (lambda: small_coupling(mask="checkerboard", parity=0), (4, 4, 2), True, "normal"),
    "affine_channel_image": (lambda: small_coupling(mask="channel", parity=1), (2, 2, 4), True, "normal"),
    "affine_checkerboard_vector": (lambda: small_coupling(mask="checkerboard", parity=1), (5,), True, "normal"),
    "additive_channel_vector": (lambda: small_coupling(mask="channel", parity=0, kind="additive"), (4,), False,
                                "normal"),
    "actnorm_image": (ActNorm, (2, 2, 3), False, "normal"),
    "invconv1x1_image": (lambda: InvConv1x1(seed=3), (2, 2, 4), False, "normal"),
    "invconv1x1_vector": (lambda: InvConv1x1(seed=1), (3,), False, "normal"),
    "diagonal_scale": (DiagonalScale, (6,), False, "normal"),
    "logit": (lambda: LogitTransform(LOW, HIGH, 0.05), (2, 2, 1), False, "interval"),
    "squeeze": (lambda: Chain([Squeeze(), Flatten((1, 1, 8))]), (2, 2, 2), False, "normal"),
    "factor_out": (lambda: Chain([Squeeze(), FactorOut((2, 2, 4), Chain([
        small_coupling(mask="channel", parity=0), Flatten((2, 2, 2))]))]), (4, 4, 1), True, "normal"),
    "realnvp": (lambda: build_bijector("realnvp", event_shape=(4, 4, 1), low=LOW, high=HIGH, levels=2, steps=1,
                                       hidden=4, depth=1), (4, 4, 1), True, "interval"),
    "glow": (lambda: build_bijector("glow", event_shape=(4, 4, 1), low=LOW, high=HIGH, levels=1, steps=2,
                                    hidden=4, depth=1), (4, 4, 1), True, "interval"),
    "nice": (lambda: build_bijector("nice", event_shape=(2, 2, 1), low=LOW, high=HIGH, steps=2, hidden=4,
                                    depth=1), (2, 2, 1), True, "interval"),
}


def _inputs(seed, shape, batch, kind, dtype=np.float32):
    """NumPy inputs (no per-shape compilation of JAX random kernels in the tests)."""
    rng = np.random.default_rng(seed)
    if kind == "interval":
        return rng.uniform(LOW + 1e-3, HIGH - 1e-3, (batch,) + shape).astype(dtype)
    return (1.5 * rng.standard_normal((batch,) + shape) + 0.3).astype(dtype)


def _perturbed(params, seed=0, scale=0.3):
    """Every parameter moved by Gaussian noise (NumPy), so zero-initialised coupling outputs are non-trivial."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: np.asarray(a) + scale * rng.standard_normal(a.shape).astype(np.asarray(a).dtype),
                        params)


def _init(module, *args, method="forward"):
    """Jitted ``module.init`` (one compiled program instead of many eagerly compiled ops)."""
    return jax.jit(lambda *a: module.init(jax.random.key(0), *a, method=method))(*args).get("params", {})


def _apply(module, params, *args, method="forward"):
    return jax.jit(lambda p, *a: module.apply({"params": p}, *a, method=method))(params, *args)


def _random_params(module, *args, seed=0, scale=0.3, dtype=np.float32, method="forward"):
    """N(0, scale^2) parameters of the shapes ``module.init`` would create (``jax.eval_shape``: nothing is
    compiled). Random rather than initialised values make every layer non-trivial (zero-initialised
    coupling outputs would be the identity); ActNorm's data-dependent init has its own test."""
    shapes = jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a, method=method), *args).get("params", {})
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (scale * rng.standard_normal(s.shape)).astype(dtype), shapes)


def _setup(name, batch=3, dtype=np.float32, seed=0):
    make, shape, uses_cond, kind = CASES[name]
    bij = make()
    x = _inputs(seed, shape, batch, kind, dtype)
    cond = np.random.default_rng(seed + 1).standard_normal((batch, E)).astype(dtype) if uses_cond else None
    scale = 0.1 if name in FLOW_KINDS else 0.3  # whole flows compose many layers: keep them well-conditioned
    return bij, _random_params(bij, x, cond, seed=seed + 2, scale=scale, dtype=dtype), x, cond


def _per_example_jacobians(bij, params, x, cond, inverse):
    """[B, D, D]: the Jacobian of each example's own map (flat vector -> flat vector), by jacfwd."""
    shape = x.shape[1:]

    def f(v, c):
        out, _ = bij.apply({"params": params}, v.reshape((1,) + shape), None if c is None else c[None],
                           method="inverse" if inverse else "forward")
        return out.reshape(-1)

    jac = jax.vmap(jax.jacfwd(f), in_axes=(0, None if cond is None else 0))
    return np.asarray(jax.jit(jac)(x.reshape(x.shape[0], -1), cond))


@pytest.mark.parametrize("name", sorted(CASES))
def test_log_det_matches_slogdet_of_jacobian_float64(name):
    with jax.enable_x64(True):
        bij, params, x, cond = _setup(name, dtype=np.float64)
        y, ld = _apply(bij, params, x, cond)
        x_back, ld_inv = _apply(bij, params, y, cond, method="inverse")
        assert ld.shape == (x.shape[0],) and ld.dtype == jnp.float64
        sign, logabs = np.linalg.slogdet(_per_example_jacobians(bij, params, x, cond, inverse=False))
        assert np.all(sign != 0)
        np.testing.assert_allclose(np.asarray(ld), logabs, rtol=1e-9, atol=1e-9)
        _, logabs_inv = np.linalg.slogdet(_per_example_jacobians(bij, params, y, cond, inverse=True))
        np.testing.assert_allclose(np.asarray(ld_inv), logabs_inv, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(np.asarray(ld_inv), -np.asarray(ld), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(np.asarray(x_back), x, rtol=1e-10, atol=1e-10)


# every case in float32; the whole flows also in float64 (every single layer's float64 inversion is
# checked in test_log_det_matches_slogdet_of_jacobian_float64)
@pytest.mark.parametrize("name,dtype", [(n, "float32") for n in sorted(CASES)] + [(k, "float64") for k in FLOW_KINDS])
def test_inverse_of_forward_is_identity(name, dtype):
    tol = 1e-12 if dtype == "float64" else 2e-5
    with jax.enable_x64(dtype == "float64"):
        bij, params, x, cond = _setup(name, batch=4, dtype=np.dtype(dtype), seed=1)

        @jax.jit
        def roundtrip(p, x_, c):
            y_, ld_ = bij.apply({"params": p}, x_, c, method="forward")
            xb, ldi = bij.apply({"params": p}, y_, c, method="inverse")
            return y_, ld_, xb, ldi, bij.apply({"params": p}, xb, c, method="forward")[0]

        y, ld, x_back, ld_inv, y_back = roundtrip(params, x, cond)
        assert y.dtype == np.dtype(dtype) and x_back.dtype == np.dtype(dtype) and x_back.shape == x.shape
        big = lambda a: max(1.0, float(np.abs(np.asarray(a)).max()))  # noqa: E731
        np.testing.assert_allclose(np.asarray(x_back), x, atol=10 * tol * big(x), rtol=tol)
        np.testing.assert_allclose(np.asarray(ld + ld_inv), 0.0, atol=10 * tol * big(ld))
        np.testing.assert_allclose(np.asarray(y_back), np.asarray(y), atol=100 * tol * big(y))


def test_nice_additive_coupling_log_det_is_exactly_zero():
    for mask, shape in (("checkerboard", (6,)), ("channel", (2, 2, 4))):
        bij = Coupling(mask=mask, kind="additive", hidden=8, depth=2)
        x = _inputs(0, shape, 5, "normal")
        cond = _inputs(1, (E,), 5, "normal")
        params = _random_params(bij, x, cond)
        y, ld = _apply(bij, params, x, cond)
        _, ld_inv = _apply(bij, params, y, cond, method="inverse")
        assert np.all(np.asarray(ld) == 0.0) and np.all(np.asarray(ld_inv) == 0.0)
        moved = np.abs(np.asarray(y) - x) > 1e-3
        b = make_mask(shape, mask, 0).astype(bool)
        assert moved[:, ~b].any() and not moved[:, b].any()  # only the masked-out half moves


@pytest.mark.parametrize("conditional", [False, True])
def test_2d_flow_density_integrates_to_one(conditional):
    layers = [ActNorm(), Coupling(mask="checkerboard", parity=0, hidden=16, depth=2, scale_bound=1.0),
              InvConv1x1(seed=5), Coupling(mask="checkerboard", parity=1, hidden=16, depth=2, scale_bound=1.0),
              Coupling(mask="channel", parity=0, kind="additive", hidden=16, depth=2), DiagonalScale()]
    flow = ConditionalFlow(Chain(layers), (2,), num_classes=3 if conditional else 0, embed_dim=4)
    with jax.enable_x64(True):
        x0 = _inputs(0, (2,), 64, "normal", np.float64) * np.array([1.0, 0.5])
        lab0 = np.zeros((64,), np.int32) if conditional else None
        params = _random_params(flow, x0, lab0, seed=2, scale=0.2, dtype=np.float64, method="log_prob")
        g = np.linspace(-15.0, 15.0, 751)
        pts = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
        labels = np.full((pts.shape[0],), 2, np.int32) if conditional else None
        logp = np.asarray(_apply(flow, params, pts, labels, method="log_prob"))
        total = np.trapezoid(np.trapezoid(np.exp(logp).reshape(g.size, g.size), g, axis=1), g)
        np.testing.assert_allclose(total, 1.0, atol=1e-2)
        # the density is not the base N(0, I): the perturbed flow does something
        assert np.abs(logp - (-0.5 * np.sum(pts ** 2, 1) - math.log(2 * math.pi))).max() > 0.1


def _grads_finite(fn, *args):
    val, grads = jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(args)))))(*args)
    return np.isfinite(float(val)) and all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("name", ["affine_checkerboard_image", "additive_channel_vector", "actnorm_image",
                                  "invconv1x1_image", "diagonal_scale"])
def test_large_inputs_give_finite_values_and_gradients(name):
    bij, params, x, cond = _setup(name)

    def loss(p, x_):
        y, ld = bij.apply({"params": p}, x_, cond, method="forward")
        xb, ldi = bij.apply({"params": p}, y, cond, method="inverse")
        return jnp.sum(y) * 1e-3 + jnp.sum(ld) + jnp.sum(ldi) + jnp.sum(xb) * 1e-3

    assert _grads_finite(loss, params, 1e3 * x)


def test_saturated_log_scale_stays_bounded_with_finite_gradients():
    bound = 2.0
    bij = Coupling(mask="checkerboard", parity=0, hidden=8, depth=2, scale_bound=bound)
    x = _inputs(0, (4, 4, 2), 4, "normal")
    cond = _inputs(1, (E,), 4, "normal")
    params = _random_params(bij, x, cond, seed=3, scale=1.0)
    out = params["net"]["Conv_2"]  # the output layer: channels [:2] shift t, [2:] raw log-scale
    out["kernel"][..., :2] = 0.0
    out["bias"][:2] = 0.0
    out["kernel"][..., 2:] *= 1e4  # raw log-scales ~1e4: deep in tanh's saturation
    out["bias"][2:] *= 1e4
    y, ld = _apply(bij, params, x, cond)
    n_transformed = 16  # half of the 4x4x2 elements
    s = np.log(np.abs(np.asarray(y) / x))[:, make_mask((4, 4, 2), "checkerboard", 0) == 0]
    np.testing.assert_allclose(np.abs(s), bound, rtol=1e-4)  # every scale at the limit, +-bound
    np.testing.assert_allclose(np.asarray(ld), s.sum(1), rtol=1e-4)
    assert np.all(np.abs(np.asarray(ld)) <= bound * n_transformed * (1 + 1e-6))
    x_back, _ = _apply(bij, params, y, cond, method="inverse")
    np.testing.assert_allclose(np.asarray(x_back), x, rtol=1e-5, atol=1e-5)
    assert _grads_finite(lambda p, x_: jnp.sum(bij.apply({"params": p}, x_, cond, method="forward")[1]) +
                         jnp.sum(bij.apply({"params": p}, x_, cond, method="forward")[0]), params, x)


@pytest.mark.parametrize("kind", FLOW_KINDS)
def test_flow_finite_at_the_ends_of_the_dequantisation_grid(kind):
    flow = _tiny_flow(kind)
    labels = np.arange(4, dtype=np.int32)
    ints = np.array([0.0, 16.0, 0.0, 16.0], np.float32)[:, None, None, None] * np.ones((4, 4, 4, 1), np.float32)
    u = np.array([0.0, np.nextafter(np.float32(1), np.float32(0)), 0.5, 0.0], np.float32)[:, None, None, None]
    z = (OFF + BW * (ints + u)).astype(np.float32)  # the lowest and the highest dequantised values
    z[3] = HIGH  # and the exact upper end of the interval
    params = _random_params(flow, z, labels, seed=1, scale=0.1, method="log_prob")
    logp = _apply(flow, params, z, labels, method="log_prob")
    assert np.all(np.isfinite(np.asarray(logp)))
    assert _grads_finite(lambda p, z_: jnp.sum(flow.apply({"params": p}, z_, labels, method="log_prob")), params, z)
    # samples from far out in the tails still land inside the data interval
    x = np.asarray(_apply(flow, params, np.full((4, 16), 30.0, np.float32), labels, method="inverse")[0])
    assert np.all(np.isfinite(x)) and np.all((x >= LOW - REACH) & (x <= HIGH + REACH))


@pytest.mark.parametrize("shape", [(64, 3), (16, 4, 4, 3)])
def test_actnorm_data_dependent_init_standardises_the_first_batch(shape):
    x = (_inputs(0, shape[1:], shape[0], "normal") * np.array([0.1, 2.0, 5.0]) + np.array([3.0, -1.0, 0.5]))
    x = x.astype(np.float32)
    an = ActNorm()
    params = _init(an, x)
    y, ld = _apply(an, params, x)
    axes = tuple(range(len(shape) - 1))
    np.testing.assert_allclose(np.asarray(y).mean(axes), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y).var(axes), 1.0, atol=1e-4)
    positions = int(np.prod(shape[1:-1]))
    np.testing.assert_allclose(float(ld[0]), -positions * float(np.sum(np.log(np.std(x, axes)))), rtol=1e-4)
    # in a chain, each ActNorm is initialised on the activations that reach it
    chain = Chain([DiagonalScale(), ActNorm(), InvConv1x1(seed=0), ActNorm()])
    yc, _ = _apply(chain, _init(chain, x), x)
    np.testing.assert_allclose(np.asarray(yc).mean(axes), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(yc).var(axes), 1.0, atol=1e-4)
    # a second batch is NOT re-standardised: the parameters are fixed after init
    y2, _ = _apply(an, params, 2.0 * x)
    assert float(np.abs(np.asarray(y2).var(axes) - 1.0).max()) > 1.0


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_lu_1x1_conv_matches_assembled_weight(seed):
    c, hw = 4, (3, 2)
    conv = InvConv1x1(seed=seed)
    x = _inputs(0, hw + (c,), 2, "normal")
    perm, l0, u0, sign, logs = lu_init(c, seed)
    w0 = perm @ (l0 + np.eye(c)) @ (u0 + np.diag(sign * np.exp(logs)))
    np.testing.assert_allclose(w0 @ w0.T, np.eye(c), atol=1e-10)  # a rotation at init
    np.testing.assert_array_equal(np.sort(np.argmax(perm, axis=1)), np.arange(c))  # P is a permutation
    np.testing.assert_array_equal(perm.sum(0), np.ones(c))
    p0 = _init(conv, x)
    for name, want in (("l_strict", l0), ("u_strict", u0), ("log_s", logs)):
        np.testing.assert_allclose(np.asarray(p0[name]), want, rtol=1e-6, atol=1e-6)
    params = _perturbed(p0, 2, 0.5)
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
        low = np.tril(p64["l_strict"], -1) + np.eye(c)
        up = np.triu(p64["u_strict"], 1) + np.diag(sign * np.exp(p64["log_s"]))
        w = perm @ low @ up  # assembled independently in NumPy
        y, ld = _apply(conv, p64, x.astype(np.float64))
        np.testing.assert_allclose(np.asarray(y), np.einsum("bhwj,ij->bhwi", x.astype(np.float64), w), atol=1e-12)
        np.testing.assert_allclose(np.asarray(ld), hw[0] * hw[1] * np.linalg.slogdet(w)[1], rtol=1e-12)
        np.testing.assert_allclose(np.asarray(ld), hw[0] * hw[1] * np.sum(p64["log_s"]), rtol=1e-12)


def test_make_mask_patterns_and_errors():
    m = make_mask((2, 2, 2), "checkerboard", 0)
    np.testing.assert_array_equal(m[..., 0], [[1, 0], [0, 1]])
    np.testing.assert_array_equal(m[..., 1], m[..., 0])
    np.testing.assert_array_equal(make_mask((2, 1, 4), "channel", 1)[0, 0], [0, 0, 1, 1])
    np.testing.assert_array_equal(make_mask((5,), "checkerboard", 1), [0, 1, 0, 1, 0])
    np.testing.assert_array_equal(1 - make_mask((3, 3, 1), "checkerboard", 1), make_mask((3, 3, 1), "checkerboard", 0))
    with pytest.raises(ValueError, match="at least 2 channels"):
        make_mask((4, 4, 1), "channel", 0)
    with pytest.raises(ValueError, match="unknown mask"):
        make_mask((4,), "stripes", 0)
    with pytest.raises(ValueError, match="keeps all or nothing"):
        make_mask((1,), "checkerboard", 0)


# ---------------------------------------------------------------- whole flows
def _tiny_flow(kind, num_classes=10):
    """Two scales for RealNVP (its factor-out), one for Glow (multi-scale Glow: the "factor_out" case)."""
    return build_flow(kind, event_shape=(4, 4, 1), num_classes=num_classes, embed_dim=4, low=LOW, high=HIGH,
                      levels=1 if kind == "glow" else 2, steps=1, hidden=4, depth=1)


def _np_logit_logp(z, alpha=0.05):
    """log-density of z under: logit preprocessing of (LOW, HIGH), then N(0, I) (float64 NumPy)."""
    z = np.asarray(z, np.float64).reshape(len(z), -1)
    p = alpha + (1 - 2 * alpha) * (z - LOW) / (HIGH - LOW)
    y = np.log(p) - np.log1p(-p)
    log_jac = np.log1p(-2 * alpha) - np.log(HIGH - LOW) - np.log(p) - np.log1p(-p)
    return np.sum(-0.5 * y ** 2 - 0.5 * np.log(2 * np.pi) + log_jac, axis=1)


def test_flow_at_init_is_the_logit_gaussian_and_bits_per_dim_match_numpy():
    """NICE's couplings and scaling are the identity at init (zero-initialised outputs): the flow's density
    is the logit-Gaussian, computed here independently; the loss is its bits/dim bound."""
    flow = _tiny_flow("nice")
    ints = np.random.default_rng(0).integers(0, 17, (6, 4, 4, 1)).astype(np.float32)
    labels = np.arange(6, dtype=np.int32)
    z0 = (OFF + BW * (ints + 0.5)).astype(np.float32)
    params = init_flow(flow, jax.random.key(1), z0, labels)
    np.testing.assert_allclose(np.asarray(_apply(flow, params, z0, labels, method="log_prob")), _np_logit_logp(z0),
                               rtol=1e-5)
    key = jax.random.key(2)
    loss, _ = jax.jit(make_flow_loss(flow, bin_width=BW, offset=OFF))(params, {"image": ints, "label": labels}, key)
    z = OFF + BW * (ints.astype(np.float64) + np.asarray(jax.random.uniform(key, ints.shape)))
    want = np.mean(-(_np_logit_logp(z) + 16 * np.log(BW)) / (16 * np.log(2)))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    bpd = flow_bits_per_dim(flow, params, ints, labels, key, bin_width=BW, offset=OFF)
    np.testing.assert_allclose([bpd["conditional"], bpd["marginal"]], want, rtol=1e-5)  # labels unused at init


@pytest.mark.parametrize("kind", FLOW_KINDS)
def test_conditional_flow_sampling_likelihood_and_marginal(kind):
    flow = _tiny_flow(kind)
    z0 = _inputs(0, (4, 4, 1), 8, "interval")
    labels = np.arange(8, dtype=np.int32)
    params = _random_params(flow, z0, labels, seed=2, scale=0.2, method="log_prob")
    sample = jax.jit(lambda p, k, t: flow.apply({"params": p}, k, labels, t, method="sample"))
    x = np.asarray(sample(params, jax.random.key(3), 0.7))
    assert x.shape == (8, 4, 4, 1) and np.all(np.isfinite(x)) and np.all((x > LOW - REACH) & (x < HIGH + REACH))

    @jax.jit
    def per_class(p):
        return jnp.stack([flow.apply({"params": p}, z0, jnp.full((8,), c, jnp.int32), method="log_prob")
                          for c in range(10)])

    lp = np.asarray(per_class(params), np.float64)
    assert np.ptp(lp, axis=0).min() > 1e-4  # the labels matter
    want = np.logaddexp.reduce(lp, axis=0) - np.log(10)
    got = jax.jit(lambda p: marginal_log_prob(flow, p, z0))(params)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)
    # temperature 0 gives the image of z = 0
    x0b = _apply(flow, params, np.zeros((8, 16), np.float32), labels, method="inverse")[0]
    np.testing.assert_allclose(np.asarray(sample(params, jax.random.key(4), 0.0)), np.asarray(x0b), atol=1e-6)


def test_bad_inputs_are_rejected_with_clear_errors():
    flow = _tiny_flow("realnvp")
    z0 = np.zeros((2, 4, 4, 1), np.float32)
    params = _random_params(flow, z0, np.array([0, 1]), method="log_prob")
    apply = lambda *a, **k: flow.apply({"params": params}, *a, **k)  # noqa: E731
    with pytest.raises(ValueError, match=r"labels must be in \[0, 9\]"):
        apply(z0, np.array([0, 10]), method="log_prob")
    with pytest.raises(ValueError, match=r"labels must be in \[0, 9\]"):
        apply(z0, np.array([-1, 3]), method="log_prob")
    with pytest.raises(TypeError, match="integer class ids"):
        apply(z0, np.array([0.0, 1.0]), method="log_prob")
    with pytest.raises(ValueError, match="labels must have shape"):
        apply(z0, np.array([0, 1, 2]), method="log_prob")
    with pytest.raises(ValueError, match="needs labels"):
        apply(z0, None, method="log_prob")
    with pytest.raises(ValueError, match=r"x must be \[B"):
        apply(np.zeros((2, 8, 8, 1), np.float32), np.array([0, 1]), method="log_prob")
    with pytest.raises(TypeError, match="floating"):
        apply(np.zeros((2, 4, 4, 1), np.int32), np.array([0, 1]), method="log_prob")
    with pytest.raises(ValueError, match=r"z must be \[B, 16\]"):
        apply(np.zeros((2, 15), np.float32), np.array([0, 1]), method="inverse")
    with pytest.raises(ValueError, match="unknown flow kind"):
        build_bijector("maf", event_shape=(4, 4, 1), low=LOW, high=HIGH)
    with pytest.raises(ValueError, match="even sizes"):
        build_bijector("glow", event_shape=(4, 4, 1), low=LOW, high=HIGH, levels=3)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        build_bijector("realnvp", event_shape=(4, 4, 1), low=LOW, high=HIGH, steps=0)
    with pytest.raises(ValueError, match="scale_bound"):
        Coupling(scale_bound=0.0).init(jax.random.key(0), np.zeros((2, 4), np.float32), method="forward")
    with pytest.raises(ValueError, match="alpha"):
        LogitTransform(LOW, HIGH, 0.5).init(jax.random.key(0), np.zeros((2, 4), np.float32), method="forward")
    with pytest.raises(ValueError, match="unconditional"):
        _tiny_flow("nice", num_classes=0).init(jax.random.key(0), z0, np.array([0, 1]), method="log_prob")
