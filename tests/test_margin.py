"""Margin softmax losses (research/losses/margin.py) against independent transcriptions of the papers'
formulas, which compute θ = arccos(cos θ) explicitly (so they are used away from cos θ = ±1 only):
values, gradients, reductions to NormFace, monotonicity of the target logit, finiteness at the
singular points (features parallel / antiparallel to a class weight, zero features) and the
cross-entropy against torch.nn.functional.cross_entropy."""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from research.losses import margin as M

C, D, N = 10, 8, 40
DTYPES = ["float32", "float64"]

# (id, kind, keyword arguments): every kind and variant
CASES = [
    ("softmax", "softmax", {}),
    ("softmax_bias", "softmax", {"bias": "random"}),
    ("normface", "normface", {"scale": 8.0}),
    ("cosface", "cosface", {"scale": 8.0, "margin": 0.35}),
    ("arcface", "arcface", {"scale": 8.0, "margin": 0.5}),
    ("arcface_big_m", "arcface", {"scale": 4.0, "margin": 1.2}),
    ("arcface_easy", "arcface", {"scale": 8.0, "margin": 0.5, "easy_margin": True}),
    ("sphereface_norm", "sphereface", {"margin": 4}),
    ("sphereface_lam", "sphereface", {"margin": 4, "lam": 5.0}),
    ("sphereface_m2_scale", "sphereface", {"margin": 2, "scale": 8.0}),
    ("sphereface_m3", "sphereface", {"margin": 3, "lam": 0.5}),
]
CASE_IDS = [c[0] for c in CASES]
MARGIN_CASES = [c for c in CASES if c[1] != "softmax"]


def _x64(dtype):
    return jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()


def _tol(dtype):
    return {"rtol": 2e-5, "atol": 2e-5} if dtype == "float32" else {"rtol": 1e-10, "atol": 1e-10}


def _data(seed=0):
    """Class weights [C, D], labels [N] and features [N, D] whose angle to their own class weight runs
    over (0.05, π − 0.05): every SphereFace interval k and ArcFace's threshold region are visited."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(C, D)) * rng.uniform(0.5, 2.0, size=(C, 1))
    y = rng.integers(0, C, size=N)
    theta = np.linspace(0.05, np.pi - 0.05, N)
    rng.shuffle(theta)
    w_hat = w[y] / np.linalg.norm(w[y], axis=1, keepdims=True)
    u = rng.normal(size=(N, D))
    u -= np.sum(u * w_hat, axis=1, keepdims=True) * w_hat
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    r = rng.uniform(0.5, 3.0, size=(N, 1))
    x = r * (np.cos(theta)[:, None] * w_hat + np.sin(theta)[:, None] * u)
    bias = rng.normal(size=C)
    return x, w, y, bias


def _ref_logits(xp, x, w, y, kind, scale=None, margin=None, easy_margin=False, lam=0.0, bias=None):
    """The papers' formulas in θ-space (arccos), for numpy (values) or jax.numpy in float64 (gradients)."""
    if kind == "softmax":
        out = x @ w.T
        return out if bias is None else out + bias
    xn = x / xp.sqrt(xp.sum(x ** 2, axis=1, keepdims=True))
    wn = w / xp.sqrt(xp.sum(w ** 2, axis=1, keepdims=True))
    cos = xn @ wn.T
    theta = xp.arccos(cos)
    onehot = np.arange(C)[None, :] == np.asarray(y)[:, None]
    if kind == "normface":
        t = cos
    elif kind == "cosface":                   # CosFace eq. (4): s (cos θ_y − m)
        t = cos - margin
    elif kind == "arcface":                   # ArcFace: s cos(θ_y + m)
        if easy_margin:                       # margin only for θ < π/2
            t = xp.where(theta < np.pi / 2, xp.cos(theta + margin), cos)
        else:                                 # θ + m beyond π: cos θ − m sin m (insightface)
            t = xp.where(theta + margin < np.pi, xp.cos(theta + margin), cos - margin * np.sin(margin))
    elif kind == "sphereface":                # SphereFace eq. (7) and the λ blend of its code
        k = xp.minimum(xp.floor(margin * theta / np.pi), margin - 1)
        psi = (-1.0) ** k * xp.cos(margin * theta) - 2 * k
        t = (lam * cos + psi) / (1 + lam)
    else:
        raise AssertionError(kind)
    s = xp.sqrt(xp.sum(x ** 2, axis=1, keepdims=True)) if scale is None else scale
    return s * xp.where(onehot, t, cos)


def _kw(kw, bias):
    kw = dict(kw)
    if kw.get("bias") == "random":
        kw["bias"] = bias
    return kw


# ---------------------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_logits_match_paper_formula(case, dtype):
    _, kind, kw = case
    x, w, y, bias = _data()
    kw = _kw(kw, bias)
    want = _ref_logits(np, x, w, y, kind, **kw)
    with _x64(dtype):
        got = M.margin_logits(jnp.asarray(x, dtype), jnp.asarray(w, dtype), jnp.asarray(y), kind=kind,
                              **{k: (jnp.asarray(v, dtype) if k == "bias" else v) for k, v in kw.items()})
        assert got.dtype == jnp.dtype(dtype) and got.shape == (N, C)
        scale = np.max(np.abs(want))
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=_tol(dtype)["atol"] * scale * 5)


def test_reference_data_cover_every_region():
    """The data reach the ArcFace threshold region (θ + m > π for m = 1.2) and all four SphereFace
    intervals of m = 4, so the comparison above exercises every branch."""
    x, w, y, _ = _data()
    cos = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
    theta = np.arccos(cos[np.arange(N), y])
    assert np.sum(theta + 1.2 > np.pi) >= 3 and np.sum(theta + 0.5 > np.pi) >= 2
    assert set(np.floor(4 * theta / np.pi).astype(int)) == {0, 1, 2, 3}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", MARGIN_CASES, ids=[c[0] for c in MARGIN_CASES])
def test_gradients_match_paper_formula(case, dtype):
    """jax.grad of the loss (arccos-free) equals the gradient of the θ-space transcription (float64)."""
    _, kind, kw = case
    x, w, y, _ = _data(seed=1)
    with jax.enable_x64(True):
        ref = jax.grad(lambda a, b: M.softmax_cross_entropy(_ref_logits(jnp, a, b, y, kind, **kw), y),
                       argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))
    with _x64(dtype):
        got = jax.grad(lambda a, b: M.margin_softmax_loss(a, b, jnp.asarray(y), kind=kind, **kw),
                       argnums=(0, 1))(jnp.asarray(x, dtype), jnp.asarray(w, dtype))
        for g, r in zip(got, ref):
            assert g.dtype == jnp.dtype(dtype)
            np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(r),
                                       rtol=1e-3 if dtype == "float32" else 1e-8,
                                       atol=1e-4 * float(np.max(np.abs(r))) if dtype == "float32" else 1e-10)


# ---------------------------------------------------------------------------- reductions


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_margin_reduces_to_normface(dtype):
    x, w, y, _ = _data(seed=2)
    with _x64(dtype):
        x, w, y = jnp.asarray(x, dtype), jnp.asarray(w, dtype), jnp.asarray(y)
        norm = M.margin_logits(x, w, y, kind="normface", scale=8.0)
        np.testing.assert_allclose(norm, 8.0 * M.cosine_matrix(x, w), rtol=0, atol=0)
        for kind, kw in [("cosface", {"margin": 0.0}), ("arcface", {"margin": 0.0}),
                         ("arcface", {"margin": 0.0, "easy_margin": True}), ("sphereface", {"margin": 1})]:
            np.testing.assert_array_equal(M.margin_logits(x, w, y, kind=kind, scale=8.0, **kw), norm, err_msg=kind)
        # SphereFace m = 1 with the feature norm: A-Softmax without margin, ‖x‖ cos θ_j = <x, ŵ_j>, any λ
        a_softmax = x @ M.l2_normalize(w).T
        for lam in (0.0, 3.0):
            np.testing.assert_allclose(M.margin_logits(x, w, y, kind="sphereface", margin=1, lam=lam), a_softmax,
                                       **_tol(dtype))
        # labels=None: inference logits, no margin
        np.testing.assert_array_equal(M.margin_logits(x, w, None, kind="arcface", scale=8.0, margin=0.5), norm)


def _theta_grid(n=4001):
    return np.linspace(0.0, np.pi, n)


MONOTONE = [
    ("cosface", lambda c: M.cosface_target(c, 0.35)),
    ("arcface_m0.5", lambda c: M.arcface_target(c, 0.5)),
    ("arcface_m1.2", lambda c: M.arcface_target(c, 1.2)),
    ("sphereface_m2", lambda c: M.sphereface_psi(c, 2)),
    ("sphereface_m3", lambda c: M.sphereface_psi(c, 3)),
    ("sphereface_m4", lambda c: M.sphereface_psi(c, 4)),
    ("sphereface_m4_lam5", lambda c: M.sphereface_target(c, 4, lam=5.0)),
]


@pytest.mark.parametrize("name, fn", MONOTONE, ids=[m[0] for m in MONOTONE])
def test_target_logit_monotone_decreasing_and_harder(name, fn):
    with jax.enable_x64(True):
        theta = _theta_grid()
        cos = np.cos(theta)
        t = np.asarray(fn(jnp.asarray(cos)))
    assert np.all(np.isfinite(t))
    assert np.all(np.diff(t) <= 1e-12), f"{name}: target logit increases somewhere in θ"
    assert np.all(t <= cos + 1e-12), f"{name}: the margin makes the target easier somewhere"
    assert np.mean(t < cos - 1e-6) > 0.9


def test_sphereface_psi_closed_form_values():
    with jax.enable_x64(True):
        for m in (1, 2, 3, 4, 5):
            psi = np.asarray(M.sphereface_psi(jnp.asarray([1.0, -1.0]), m))
            np.testing.assert_allclose(psi, [1.0, 1.0 - 2 * m], atol=1e-12)
        # continuity at the interval boundaries θ = kπ/4
        eps = 1e-7
        for k in range(1, 4):
            th = np.array([k * np.pi / 4 - eps, k * np.pi / 4 + eps])
            v = np.asarray(M.sphereface_psi(jnp.asarray(np.cos(th)), 4))
            assert abs(v[0] - v[1]) < 1e-5


def test_plain_arcface_without_threshold_is_not_monotone():
    """Why the threshold exists: cos(θ + m) turns back up past θ = π − m (guards the test above)."""
    theta = _theta_grid()
    assert np.any(np.diff(np.cos(theta + 0.5)) > 1e-6)


def test_easy_margin():
    with jax.enable_x64(True):
        theta = _theta_grid()
        c = jnp.asarray(np.cos(theta))
        easy = np.asarray(M.arcface_target(c, 0.5, easy_margin=True))
        hard = np.asarray(M.arcface_target(c, 0.5))
    pos = np.cos(theta) > 0
    np.testing.assert_array_equal(easy[~pos], np.cos(theta)[~pos])             # no margin at cos θ <= 0
    np.testing.assert_allclose(easy[pos], np.cos(theta[pos] + 0.5), atol=1e-12)  # full margin at cos θ > 0
    np.testing.assert_allclose(hard[pos], easy[pos], atol=1e-12)
    assert np.all(hard[~pos] < easy[~pos])


# ---------------------------------------------------------------------------- singular points


def _axis_data(dtype):
    """Unit-axis class weights (norm 4) and features ±2 e_y, so cos θ is exactly +1 / −1 in any dtype;
    row 2 is parallel to a NON-target weight; the last row is a zero feature."""
    w = 4.0 * np.eye(C, D + 2)
    x = np.stack([2.0 * np.eye(C, D + 2)[0], -2.0 * np.eye(C, D + 2)[1], 2.0 * np.eye(C, D + 2)[5],
                  np.zeros(D + 2)])
    y = np.array([0, 1, 2, 3])
    return jnp.asarray(x, dtype), jnp.asarray(w, dtype), jnp.asarray(y)


SINGULAR_CASES = [c for c in CASES if c[0] != "softmax_bias"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SINGULAR_CASES, ids=[c[0] for c in SINGULAR_CASES])
def test_finite_values_and_gradients_at_cos_plus_minus_one_and_zero_features(case, dtype):
    _, kind, kw = case
    with _x64(dtype):
        x, w, y = _axis_data(dtype)
        cos = np.asarray(M.cosine_matrix(x, w))
        assert cos[0, 0] == 1.0 and cos[1, 1] == -1.0 and cos[2, 5] == 1.0 and np.all(cos[3] == 0)

        def total(a, b):  # the loss and the raw sum of logits (no softmax damping of a bad derivative)
            return (M.margin_softmax_loss(a, b, y, kind=kind, **kw)
                    + 1e-3 * jnp.sum(M.margin_logits(a, b, y, kind=kind, **kw)))

        value, grads = jax.value_and_grad(total, argnums=(0, 1))(x, w)
        logits = M.margin_logits(x, w, y, kind=kind, **kw)
        assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(logits)))
        for g in grads:
            assert g.dtype == jnp.dtype(dtype) and np.all(np.isfinite(np.asarray(g))), kind
        # per-example gradients too (each row alone: no other example can mask a NaN)
        for i in range(4):
            gi = jax.grad(lambda a: M.margin_softmax_loss(a, w, y[i:i + 1], kind=kind, **kw))(x[i:i + 1])
            assert np.all(np.isfinite(np.asarray(gi))), (kind, i)


@pytest.mark.parametrize("dtype", DTYPES)
def test_values_at_cos_plus_minus_one_closed_form(dtype):
    with _x64(dtype):
        x, w, y = _axis_data(dtype)
        s, m = 8.0, 0.5
        arc = np.asarray(M.margin_logits(x, w, y, kind="arcface", scale=s, margin=m))
        np.testing.assert_allclose(arc[[0, 1], [0, 1]], [s * np.cos(m), s * (-1 - m * np.sin(m))], **_tol(dtype))
        easy = np.asarray(M.margin_logits(x, w, y, kind="arcface", scale=s, margin=m, easy_margin=True))
        np.testing.assert_allclose(easy[[0, 1], [0, 1]], [s * np.cos(m), -s], **_tol(dtype))
        cosf = np.asarray(M.margin_logits(x, w, y, kind="cosface", scale=s, margin=0.35))
        np.testing.assert_allclose(cosf[[0, 1], [0, 1]], [s * 0.65, -s * 1.35], **_tol(dtype))
        sph = np.asarray(M.margin_logits(x, w, y, kind="sphereface", margin=4))  # ‖x‖ = 2
        np.testing.assert_allclose(sph[[0, 1], [0, 1]], [2.0, 2.0 * -7.0], **_tol(dtype))
        # row 2 is parallel to class 5, which is not its label: plain s cos θ = s there, no margin
        assert arc[2, 5] == s and cosf[2, 5] == s and sph[2, 5] == 2.0


def test_arccos_formulation_is_singular_at_these_points():
    """Guards the finiteness test: the naive θ = arccos(cos) form really has a non-finite gradient here."""
    x, w, y = _axis_data("float32")
    naive = lambda a: jnp.cos(jnp.arccos(M.cosine_matrix(a, w)[0, 0]) + 0.5)  # noqa: E731
    assert not np.all(np.isfinite(np.asarray(jax.grad(naive)(x))))
    safe = lambda a: M.arcface_target(M.cosine_matrix(a, w)[0, 0], 0.5)  # noqa: E731
    assert np.all(np.isfinite(np.asarray(jax.grad(safe)(x))))


def test_zero_features_loss():
    """Zero features: cos θ = 0 for every class -> NormFace logits all 0 -> loss log C."""
    x = jnp.zeros((3, D))
    w = jnp.asarray(np.random.default_rng(0).normal(size=(C, D)), jnp.float32)
    y = jnp.array([0, 4, 9])
    np.testing.assert_allclose(M.margin_softmax_loss(x, w, y, kind="normface", scale=8.0), np.log(C), rtol=1e-6)


# ---------------------------------------------------------------------------- cross-entropy vs torch


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_matches_torch(dtype, reduction):
    x, w, y, _ = _data(seed=3)
    with _x64(dtype):
        logits = M.margin_logits(jnp.asarray(x, dtype), jnp.asarray(w, dtype), jnp.asarray(y), kind="arcface",
                                 scale=16.0, margin=0.5)
        lg = np.asarray(logits)
        cot = np.random.default_rng(4).normal(size=(N,)) if reduction == "none" else 1.0

        def f(z):
            return M.softmax_cross_entropy(z, jnp.asarray(y), reduction=reduction)

        val, vjp = jax.vjp(f, logits)
        (g,) = vjp(jnp.asarray(cot, val.dtype))
        assert val.dtype == jnp.dtype(dtype)
        # the loss of margin_softmax_loss is exactly this cross-entropy of its logits
        np.testing.assert_array_equal(
            M.margin_softmax_loss(jnp.asarray(x, dtype), jnp.asarray(w, dtype), jnp.asarray(y), kind="arcface",
                                  scale=16.0, margin=0.5, reduction=reduction), val)
    tdtype = torch.float32 if dtype == "float32" else torch.float64
    t = torch.tensor(lg, dtype=tdtype, requires_grad=True)
    tv = torch.nn.functional.cross_entropy(t, torch.tensor(y, dtype=torch.long), reduction=reduction)
    tv.backward(torch.tensor(cot, dtype=tdtype) if reduction == "none" else None)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == "float32" else {"rtol": 1e-12, "atol": 1e-13}
    np.testing.assert_allclose(np.asarray(val), tv.detach().numpy(), **tol)
    np.testing.assert_allclose(np.asarray(g), t.grad.numpy(), **tol)


def test_cross_entropy_runs_in_float32_for_low_precision_logits():
    z = jnp.asarray(np.random.default_rng(5).normal(size=(6, C)) * 20, jnp.bfloat16)
    y = jnp.arange(6)
    loss = M.softmax_cross_entropy(z, y)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, M.softmax_cross_entropy(z.astype(jnp.float32), y), rtol=0, atol=0)


# ---------------------------------------------------------------------------- api


def test_jit_with_traced_scale_and_lambda():
    x, w, y, _ = _data(seed=6)
    x, w, y = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(y)
    f = jax.jit(lambda s, lam: M.margin_softmax_loss(x, w, y, kind="sphereface", margin=4, scale=s, lam=lam))
    g = jax.jit(jax.grad(lambda s: M.margin_softmax_loss(x, w, y, kind="cosface", scale=s, margin=0.35)))
    np.testing.assert_allclose(f(8.0, 5.0), M.margin_softmax_loss(x, w, y, kind="sphereface", margin=4, scale=8.0,
                                                                     lam=5.0), rtol=1e-6)
    assert np.isfinite(float(g(8.0)))


def test_sphereface_lambda_schedule():
    lam = np.asarray(M.sphereface_lambda(jnp.array([0, 100, 10_000])))
    np.testing.assert_allclose(lam, [1000.0, 1000.0 / 13.0, 5.0], rtol=1e-6)


def test_registry():
    assert M.KINDS == ("softmax", "normface", "sphereface", "cosface", "arcface")
    assert set(M.TARGET_FNS) == set(M.KINDS) - {"softmax"}


@pytest.mark.parametrize("kwargs, needle", [
    ({"kind": "cosine"}, "unknown margin-softmax kind"),
    ({"kind": "sphereface", "margin": 2.5}, "integer margin"),
    ({"kind": "sphereface", "margin": 0}, "integer margin"),
    ({"kind": "cosface", "scale": 8.0, "margin": -0.1}, "margin must be >= 0"),
    ({"kind": "cosface", "scale": 8.0}, "needs a margin"),
    ({"kind": "arcface", "margin": 0.5}, "needs a scale"),
    ({"kind": "arcface", "scale": 0.0, "margin": 0.5}, "scale must be > 0"),
    ({"kind": "normface", "scale": 8.0, "margin": 0.2}, "normface has no margin"),
    ({"kind": "softmax", "margin": 0.5}, "takes no scale or margin"),
    ({"kind": "cosface", "scale": 8.0, "margin": 0.3, "easy_margin": True}, "easy_margin"),
])
def test_bad_arguments(kwargs, needle):
    x, w, y, _ = _data()
    with pytest.raises(ValueError, match=needle):
        M.margin_logits(jnp.asarray(x), jnp.asarray(w), jnp.asarray(y), **kwargs)
