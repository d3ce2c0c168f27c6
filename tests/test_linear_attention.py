"""Causal linear attention: Pallas kernel (interpret mode on CPU), plain-JAX forms and the decode
step, against a float64 oracle written independently of ``pallas_kernels``.

Oracle: ``np_loop`` is a NumPy float64 transcription of the formula with an explicit loop over
the query position ``i`` (``o_i = sum_{j<=i} (q_i.k_j) v_j / (sum_{j<=i} q_i.k_j + eps)``), with
the gradient written per row (no chunks, no state, no numerator/denominator split). That
gradient is itself checked against ``jax.vjp`` in float64 (``jax.enable_x64``) of a third
formulation (prefix sums of ``k_j^T v_j``). Inputs are feature-mapped, ``q, k = elu(x) + 1``;
the gradient is that of the random linear functional ``sum(w * o)``.

Tolerances (relative L2 error ``||x - x64|| / ||x64||`` of o, dq, dk, dv):
  float32  1e-5: exact float32 products, float32 state; observed <= 8.3e-7.
  bfloat16 2^-5 = 4 * eps_bf16 (eps_bf16 = 2^-7): the oracle sees the same bf16-rounded inputs,
           so the error comes from rounding the scores and the state to bf16 before the
           matmuls (~u = 2^-8 each, relative), the bf16 cotangent g and the bf16 outputs; a few
           u in all (observed <= 7.2e-3 ~ 0.9 eps_bf16, in dq). A wrong algorithm is off by O(1).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels import (linear_attention, linear_attention_init_state,
                            linear_attention_step, reference_linear_attention)
from pallas_kernels.linear import chunked_linear_attention, recurrent_linear_attention
from pallas_kernels.linear.kernel import LinearStatic, linear_bwd, linear_fwd

BF16_EPS = 2.0 ** -7
TOL = {"float32": 1e-5, "bfloat16": 4 * BF16_EPS}


# ------------------------------------------------------------------------------ oracle
def np_loop(q, k, v, *, causal, eps, w=None):
    """float64 NumPy, explicit loop over query positions ``i``: ``o`` or, given the cotangent
    ``w``, ``(o, dq, dk, dv)`` with the gradient written per row: for ``s_j = q_i . k_j`` and
    ``n = sum_j s_j + eps``, ``dL/ds_j = w_i . (v_j - o_i) / n`` and ``dL/dv_j = s_j w_i / n``."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, H, _ = q.shape
    o = np.zeros(v.shape)
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    for i in range(T):
        J = i + 1 if causal else T
        s = np.einsum("bhd,bjhd->bhj", q[:, i], k[:, :J])                 # q_i . k_j
        n = s.sum(-1) + eps                                                # [B, H]
        o[:, i] = np.einsum("bhj,bjhe->bhe", s, v[:, :J]) / n[..., None]
        if w is not None:
            wi = np.asarray(w, np.float64)[:, i]                           # [B, H, Dv]
            ds = (np.einsum("bhe,bjhe->bhj", wi, v[:, :J])
                  - np.einsum("bhe,bhe->bh", wi, o[:, i])[..., None]) / n[..., None]
            dq[:, i] = np.einsum("bhj,bjhd->bhd", ds, k[:, :J])
            dk[:, :J] += np.einsum("bhj,bhd->bjhd", ds, q[:, i])
            dv[:, :J] += np.einsum("bhj,bhe->bjhe", s / n[..., None], wi)
    return o if w is None else (o, dq, dk, dv)


def _prefix_form(q, k, v, causal, eps):
    """A third formulation for the autodiff check: prefix sums of ``k_j^T v_j`` and ``k_j``."""
    kv = jnp.einsum("bjhd,bjhe->bjhde", k, v)
    if causal:
        S, z = jnp.cumsum(kv, axis=1), jnp.cumsum(k, axis=1)
    else:
        S = jnp.broadcast_to(kv.sum(1, keepdims=True), kv.shape)
        z = jnp.broadcast_to(k.sum(1, keepdims=True), k.shape)
    num = jnp.einsum("bihd,bihde->bihe", q, S)
    return num / (jnp.einsum("bihd,bihd->bih", q, z) + eps)[..., None]


def oracle(q, k, v, w, *, causal, eps=1e-6):
    """float64 ``(o, dq, dk, dv)`` as NumPy arrays (``np_loop``)."""
    f64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    return np_loop(f64(q), f64(k), f64(v), causal=causal, eps=eps, w=f64(w))


def rel_err(x, ref):
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30)


def make_inputs(seed, B, T, H, Dk, Dv, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.nn.elu(jax.random.normal(ks[0], (B, T, H, Dk))) + 1.0
    k = jax.nn.elu(jax.random.normal(ks[1], (B, T, H, Dk))) + 1.0
    v = jax.random.normal(ks[2], (B, T, H, Dv))
    w = jax.random.normal(ks[3], (B, T, H, Dv))
    return tuple(x.astype(dtype) for x in (q, k, v, w))


def fwd_bwd(fn, q, k, v, w, **kw):
    """Jitted ``(o, dq, dk, dv)``; the gradient is that of ``sum(w * o)`` (a VJP with ``w``)."""
    @jax.jit
    def run(q, k, v, w):
        o, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **kw), q, k, v)
        return (o, *vjp(w.astype(o.dtype)))
    return run(q, k, v, w)


def check_all(out, ref, dtype, names=("o", "dq", "dk", "dv")):
    for name, x, r in zip(names, out, ref):
        assert x.dtype == jnp.dtype(dtype), name
        assert np.all(np.isfinite(np.asarray(x, np.float32))), name
        err = rel_err(x, r)
        assert err < TOL[dtype], f"{name}: relative error {err:.2e} >= {TOL[dtype]:.1e}"


def test_oracle_closed_forms():
    """Sanity of the oracle itself: with one shared key, o_i is the (eps-shrunk) running mean."""
    B, T, H, D = 1, 6, 1, 3
    rng = np.random.default_rng(0)
    q = rng.uniform(0.5, 1.5, (B, T, H, D))
    k = np.broadcast_to(rng.uniform(0.5, 1.5, (1, 1, H, D)), (B, T, H, D))
    v = rng.normal(size=(B, T, H, 2))
    eps = 0.3
    s = np.einsum("bihd,bihd->bih", q, k)[..., None]                      # q_i . k
    n = np.arange(1, T + 1)[None, :, None, None]
    causal = np.cumsum(v, axis=1) / n * (n * s / (n * s + eps))
    np.testing.assert_allclose(np_loop(q, k, v, causal=True, eps=eps), causal, rtol=1e-12)
    full = v.mean(1, keepdims=True) * (T * s / (T * s + eps))
    np.testing.assert_allclose(np_loop(q, k, v, causal=False, eps=eps), full, rtol=1e-12)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_oracle_gradient_matches_float64_autodiff(causal):
    """The hand-written NumPy gradient == jax.vjp (x64) of the prefix-sum formulation."""
    rng = np.random.default_rng(1)
    q, k = (np.exp(rng.normal(size=(2, 9, 2, 3))) for _ in range(2))
    v, w = (rng.normal(size=(2, 9, 2, 4)) for _ in range(2))
    mine = np_loop(q, k, v, causal=causal, eps=0.7, w=w)
    with jax.enable_x64(True):
        o, vjp = jax.vjp(functools.partial(_prefix_form, causal=causal, eps=0.7),
                         jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
        auto = [np.asarray(x) for x in (o, *vjp(jnp.asarray(w)))]
    for a, b in zip(mine, auto):
        assert a.dtype == b.dtype == np.float64
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------ kernel vs oracle
# (causal, T, chunk, B, H, Dk, Dv, dtype, eps)
KERNEL_CASES = [
    pytest.param(True, 37, 16, 2, 2, 16, 16, "float32", 1e-6, id="causal-T37-C16-ragged"),
    pytest.param(True, 64, 16, 1, 2, 16, 32, "float32", 1e-6, id="causal-T64-C16-4chunks"),
    pytest.param(True, 50, 32, 1, 2, 32, 16, "float32", 1e-6, id="causal-T50-C32"),
    pytest.param(True, 5, 64, 2, 1, 16, 16, "float32", 1e-6, id="causal-T5-ltchunk"),
    pytest.param(True, 40, 16, 1, 2, 8, 24, "float32", 5.0, id="causal-odd-dims-big-eps"),
    pytest.param(False, 37, 16, 2, 2, 16, 16, "float32", 1e-6, id="noncausal-T37-C16-ragged"),
    pytest.param(False, 32, 16, 1, 2, 16, 16, "float32", 1e-6, id="noncausal-T32-C16"),
    pytest.param(False, 5, 64, 1, 2, 16, 16, "float32", 5.0, id="noncausal-T5-big-eps"),
    pytest.param(True, 37, 16, 2, 2, 16, 16, "bfloat16", 1e-6, id="bf16-causal-T37"),
    pytest.param(False, 37, 16, 1, 2, 16, 32, "bfloat16", 1e-6, id="bf16-noncausal-T37"),
]


@pytest.mark.parametrize("causal,T,chunk,B,H,Dk,Dv,dtype,eps", KERNEL_CASES)
def test_kernel_matches_float64(causal, T, chunk, B, H, Dk, Dv, dtype, eps):
    q, k, v, w = make_inputs(T * 7 + Dk, B, T, H, Dk, Dv, jnp.dtype(dtype))
    ref = oracle(q, k, v, w, causal=causal, eps=eps)
    out = fwd_bwd(linear_attention, q, k, v, w, causal=causal, chunk_size=chunk, eps=eps)
    check_all(out, ref, dtype)


# ------------------------------------------------------------------------------ plain-JAX forms
FORMS = {
    "quadratic": lambda q, k, v, causal, eps: reference_linear_attention(
        q, k, v, causal=causal, eps=eps),
    "chunked": lambda q, k, v, causal, eps: chunked_linear_attention(
        q, k, v, causal=causal, chunk_size=16, eps=eps),
    "recurrent": lambda q, k, v, causal, eps: recurrent_linear_attention(q, k, v, eps=eps),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_plain_forms_match_float64(form, causal, dtype):
    if form == "recurrent" and not causal:
        pytest.skip("the recurrent form is causal by construction")
    q, k, v, w = make_inputs(3, 1, 37, 2, 16, 16, jnp.dtype(dtype))
    ref = oracle(q, k, v, w, causal=causal, eps=0.5)
    out = fwd_bwd(FORMS[form], q, k, v, w, causal=causal, eps=0.5)
    check_all(out, ref, dtype)


def test_single_full_chunk():
    """T=64 as one chunk of 64 (4 chunks of 16 and chunk 32 are cases above): no state step."""
    q, k, v, w = make_inputs(11, 1, 64, 1, 16, 16)
    ref = oracle(q, k, v, w, causal=True)
    check_all(fwd_bwd(linear_attention, q, k, v, w, causal=True, chunk_size=64), ref,
              "float32")


# ------------------------------------------------------------------------------ padding / prefix
def test_causal_prefix_and_padding():
    """Causal: the first 37 outputs of a T=48 run equal the T=37 run (whose last chunk is padded),
    and so do the gradients w.r.t. the first 37 positions of a loss on the first 37 outputs."""
    q, k, v, w = make_inputs(5, 1, 48, 2, 16, 16)
    f = functools.partial(linear_attention, causal=True, chunk_size=16)

    @jax.jit
    def run(q, k, v):   # o and the gradient of a loss on the first 37 outputs
        o, vjp = jax.vjp(f, q, k, v)
        return (o, *vjp(jnp.zeros_like(o).at[:, :37].set(w[:, :37])))

    long, short = run(q, k, v), run(q[:, :37], k[:, :37], v[:, :37])
    for a, b in zip(long, short):
        np.testing.assert_allclose(a[:, :37], b, rtol=1e-5, atol=1e-6)
    for a in long[1:]:
        np.testing.assert_array_equal(a[:, 37:], 0.0)   # later tokens do not touch early outputs


def test_noncausal_padding_contributes_nothing():
    """Non-causal, T=37 with chunk 16 (11 padded rows): o is independent of the chunk size and
    of appending tokens whose key is zero (what the padding is); a leak would change the sums."""
    q, k, v, _ = make_inputs(6, 1, 37, 2, 16, 16)
    f = jax.jit(lambda q, k, v: [linear_attention(q, k, v, causal=False, chunk_size=C)
                                 for C in (16, 64)])
    o16, o64 = f(q, k, v)
    np.testing.assert_allclose(o64, o16, rtol=1e-5, atol=1e-6)
    z = jnp.zeros((1, 11, 2, 16))
    o_ext, _ = f(jnp.concatenate([q, z + 1], 1), jnp.concatenate([k, z], 1),
                 jnp.concatenate([v, z + 3], 1))
    np.testing.assert_allclose(o_ext[:, :37], o16, rtol=1e-5, atol=1e-6)
    assert rel_err(o16, np_loop(q, k, v, causal=False, eps=1e-6)) < TOL["float32"]


# ------------------------------------------------------------------------------ decode step
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_steps_reproduce_causal_output(dtype):
    B, T, H, Dk, Dv = 2, 37, 2, 16, 8
    q, k, v, _ = make_inputs(7, B, T, H, Dk, Dv, jnp.dtype(dtype))
    full = linear_attention(q, k, v, causal=True, chunk_size=16)
    ref = np_loop(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                  causal=True, eps=1e-6)
    step = jax.jit(linear_attention_step)
    state = linear_attention_init_state(B, H, Dk, Dv)
    shapes0 = [(x.shape, x.dtype) for x in state]
    assert shapes0 == [((B, H, Dk, Dv), jnp.float32), ((B, H, Dk), jnp.float32)]
    outs = []
    for t in range(T):
        o_t, state = step(state, q[:, t], k[:, t], v[:, t])
        assert [(x.shape, x.dtype) for x in state] == shapes0   # O(1) state, independent of t
        assert o_t.shape == (B, H, Dv) and o_t.dtype == q.dtype
        outs.append(o_t)
    steps = jnp.stack(outs, axis=1)
    tol = 1e-5 if dtype == "float32" else 2 * BF16_EPS  # bf16: both outputs rounded to bf16
    f32 = lambda x: np.asarray(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(f32(steps), f32(full), rtol=tol, atol=tol)
    assert rel_err(steps, ref) < TOL[dtype]
    S, z = state   # the state is exactly the sums of the whole prefix
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
    np.testing.assert_allclose(S, jnp.einsum("bthd,bthe->bhde", kf, vf), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(z, kf.sum(1).reshape(B, H, Dk), rtol=1e-5)


# ------------------------------------------------------------------------------ memory / transforms
def _max_shapes(fn, *args):
    """Shapes of every top-level value in the jaxpr of ``fn`` (pallas_call bodies are opaque)."""
    jaxpr = jax.make_jaxpr(fn)(*args)
    return [v.aval.shape for eqn in jaxpr.eqns for v in eqn.outvars]


def test_backward_keeps_no_txt_array():
    T = 64
    q, k, v, w = make_inputs(8, 1, T, 1, 16, 16)

    def grads(fn):
        return lambda q, k, v: jax.grad(lambda q, k, v: jnp.sum(w * fn(q, k, v)),
                                        argnums=(0, 1, 2))(q, k, v)

    quadratic = lambda shape: sum(d == T for d in shape) >= 2
    kern = functools.partial(linear_attention, causal=True, chunk_size=16)
    assert not any(map(quadratic, _max_shapes(grads(kern), q, k, v)))
    # the check can see a T x T array: the quadratic reference has one
    assert any(map(quadratic, _max_shapes(grads(reference_linear_attention), q, k, v)))


def test_jit_and_vmap():
    """Eager, jit and vmap (over an extra leading axis) give the same, correct result."""
    q, k, v, _ = make_inputs(9, 1, 21, 2, 16, 16)
    f = functools.partial(linear_attention, causal=True, chunk_size=16)
    eager = f(q, k, v)
    assert rel_err(eager, np_loop(q, k, v, causal=True, eps=1e-6)) < TOL["float32"]
    vm = jax.jit(jax.vmap(f))(*(jnp.stack([x, 2 * x]) for x in (q, k, v)))
    np.testing.assert_allclose(vm[0], eager, rtol=1e-5, atol=1e-6)
    assert rel_err(vm[1], np_loop(2 * q, 2 * k, 2 * v, causal=True, eps=1e-6)) < TOL["float32"]


# ------------------------------------------------------------------------------ Triton lowering
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_triton_lowering_for_gpu(causal, dtype):
    """The compiled path (interpret=False) lowers through Pallas' Triton lowering to Triton IR
    for an abstract H200, without a GPU (catches unsupported ops; not a numerical test)."""
    export = pytest.importorskip("jax.export")
    st = LinearStatic(T=100, T_pad=128, chunk=64, Dk=64, Dv=32, causal=causal, eps=1e-6,
                      dtype=dtype, interpret=False)
    x = lambda D: jax.ShapeDtypeStruct((2, 128, 4, D), jnp.dtype(dtype))
    gd = jax.ShapeDtypeStruct((2, 4, 128), jnp.float32)
    dev = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=dev)
    ok = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    with jax.sharding.use_abstract_mesh(mesh):
        for fn, args in ((lambda q, k, v: linear_fwd(q, k, v, st), (x(64), x(64), x(32))),
                         (lambda q, k, v, g, gd: linear_bwd(q, k, v, g, gd, st),
                          (x(64), x(64), x(32), x(32), gd))):
            text = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=ok)(
                *args).mlir_module()
            assert "__gpu$xla.gpu.triton" in text


# ------------------------------------------------------------------------------ bad inputs
def _x(shape, dtype=jnp.float32):
    return jnp.ones(shape, dtype)


_Q = _x((1, 8, 2, 16))
_V = _x((1, 8, 2, 32))
BAD = [
    (lambda: linear_attention(_x((1, 8, 16)), _Q, _V), ValueError, "q must be 4-D"),
    (lambda: linear_attention(_Q, _x((1, 8, 2, 8)), _V), ValueError, "q and k must have the same"),
    (lambda: linear_attention(_Q, _Q, _x((1, 9, 2, 32))), ValueError, r"v must be \[B, T, H, Dv\]"),
    (lambda: linear_attention(_Q, _Q, _x((1, 8, 2, 0))), ValueError, "empty dimension"),
    (lambda: linear_attention(_Q.astype(jnp.int32), _Q.astype(jnp.int32), _V.astype(jnp.int32)),
     TypeError, "float32, bfloat16 or float16"),
    (lambda: linear_attention(_Q, _Q, _V.astype(jnp.bfloat16)), TypeError, "share one dtype"),
    (lambda: linear_attention(_Q, _Q, _V, chunk_size=24), ValueError, "chunk_size must be a power"),
    (lambda: linear_attention(_Q, _Q, _V, chunk_size=8), ValueError, "chunk_size must be a power"),
    (lambda: linear_attention(_Q, _Q, _V, chunk_size=True), ValueError, "chunk_size"),
    (lambda: linear_attention(_Q, _Q, _V, eps=0.0), ValueError, "eps must be a finite number > 0"),
    (lambda: linear_attention(_Q, _Q, _V, eps=float("nan")), ValueError, "eps must be a finite"),
    (lambda: linear_attention(_Q, _Q, _V, eps="1"), TypeError, "eps must be a number"),
    (lambda: linear_attention(_Q, _Q, _V, causal=1), TypeError, "causal must be a bool"),
    (lambda: linear_attention(_Q, _Q, _V, interpret="yes"), TypeError, "interpret must be"),
    (lambda: linear_attention(_x((1, 8, 2, 512)), _x((1, 8, 2, 512)), _V), ValueError,
     "head dims must be <= 256"),
    (lambda: reference_linear_attention(_Q, _Q, _V, eps=-1.0), ValueError, "eps must be"),
    (lambda: reference_linear_attention(_Q, _x((2, 8, 2, 16)), _V), ValueError, "same shape"),
    (lambda: linear_attention_init_state(1, 2, 16, 0), ValueError, "dv must be a positive int"),
    (lambda: linear_attention_init_state(1, 2, 16, 8, jnp.bfloat16), TypeError, "state is float32"),
    (lambda: linear_attention_step(linear_attention_init_state(1, 2, 16, 8), _x((1, 2, 16)),
                                   _x((1, 2, 16)), _x((1, 2, 16))), ValueError, "v_t must have"),
    (lambda: linear_attention_step(linear_attention_init_state(1, 2, 16, 8), _x((1, 3, 16)),
                                   _x((1, 2, 16)), _x((1, 2, 8))), ValueError, "q_t must have"),
    (lambda: linear_attention_step(linear_attention_init_state(1, 2, 16, 8), _x((1, 2, 16)),
                                   _x((1, 2, 16)), _x((1, 2, 8)), eps=0), ValueError, "eps"),
    (lambda: linear_attention_step(jnp.zeros((1, 2, 16, 8)), _x((1, 2, 16)), _x((1, 2, 16)),
                                   _x((1, 2, 8))), TypeError, "state must be the pair"),
]


@pytest.mark.parametrize("call,exc,match", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_interpret_false_without_gpu_raises():
    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match=r"interpret=False\) needs a GPU backend"):
        linear_attention(_Q, _Q, _V, interpret=False)


# ------------------------------------------------------------------------------ GPU (compiled)
GPU_CASES = [  # causal, B, T, H, Dk, Dv, chunk, dtype
    (True, 2, 1000, 4, 64, 64, 64, "bfloat16"),
    (True, 1, 257, 2, 128, 64, 32, "bfloat16"),
    (False, 2, 300, 4, 64, 128, 64, "bfloat16"),
    (True, 1, 333, 2, 64, 64, 64, "float32"),
    (False, 1, 129, 2, 32, 32, 16, "float32"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("causal,B,T,H,Dk,Dv,chunk,dtype", GPU_CASES)
def test_compiled_kernel_matches_float64(causal, B, T, H, Dk, Dv, chunk, dtype):
    q, k, v, w = make_inputs(T + Dk, B, T, H, Dk, Dv, jnp.dtype(dtype))
    ref = oracle(q, k, v, w, causal=causal)
    out = fwd_bwd(linear_attention, q, k, v, w, causal=causal, chunk_size=chunk,
                  interpret=False)
    check_all(out, ref, dtype)
