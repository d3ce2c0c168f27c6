"""FlashAttention Pallas kernel (interpret mode on CPU) and reference vs a float64 oracle.

The oracle below is written independently of ``pallas_kernels``: K/V heads are repeated
(``np.repeat``) instead of reshaping q into groups, the mask is built element by element, and
gradients come from ``jax.vjp`` in float64 (``jax.enable_x64``).

Tolerances (relative L2 error ``||x - x64|| / ||x64||`` of the output and of dq, dk, dv):
  float32  2e-5   (exact float32 products; observed ~1e-7)
  float16  1e-2   (P and dS are rounded to float16 before the matmuls; observed ~1e-3)
  bfloat16 3e-2   (same with 8 bits of mantissa; observed ~5e-3)
"""
from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels import flash_attention, reference_attention

TOL = {"float32": 2e-5, "float16": 1e-2, "bfloat16": 3e-2}


# ------------------------------------------------------------------------------ oracle
def _mask_np(Tq, Tk, causal, q_seg, kv_seg, B):
    m = np.ones((B, Tq, Tk), bool)
    for i in range(Tq):
        for j in range(Tk):
            if causal and j > i + (Tk - Tq):
                m[:, i, j] = False
    if q_seg is not None:
        m &= np.asarray(q_seg)[:, :, None] == np.asarray(kv_seg)[:, None, :]
    return m


def oracle(q, k, v, do, *, causal, q_seg=None, kv_seg=None, sm_scale=None):
    """float64 (o, dq, dk, dv) as numpy arrays."""
    q, k, v, do = (np.asarray(x, np.float64) for x in (q, k, v, do))
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = 1.0 / np.sqrt(D) if sm_scale is None else sm_scale
    mask = _mask_np(Tq, Tk, causal, q_seg, kv_seg, B)[:, None]  # [B,1,Tq,Tk]
    with jax.enable_x64(True):
        def f(q, k, v):
            kr = jnp.repeat(k, G, axis=2)
            vr = jnp.repeat(v, G, axis=2)
            s = jnp.einsum("bqhd,bkhd->bhqk", q, kr) * scale
            s = jnp.where(mask, s, -1e300)
            s = s - jax.lax.stop_gradient(s.max(-1, keepdims=True))
            e = jnp.where(mask, jnp.exp(s), 0.0)
            den = e.sum(-1, keepdims=True)
            p = e / jnp.where(den == 0, 1.0, den)
            return jnp.einsum("bhqk,bkhd->bqhd", p, vr)
        o, vjp = jax.vjp(f, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
        dq, dk, dv = vjp(jnp.asarray(do))
        return tuple(np.asarray(x) for x in (o, dq, dk, dv))


def rel_err(x, ref):
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    den = max(np.linalg.norm(ref), 1e-30)
    return np.linalg.norm(x - ref) / den


def make_inputs(seed, B, Tq, Tk, Hq, Hkv, D, dtype):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, Tq, Hq, D), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, Tk, Hkv, D), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, Tk, Hkv, D), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (B, Tq, Hq, D), jnp.float32).astype(dtype)
    return q, k, v, do


def fwd_bwd(fn, q, k, v, do, **kw):
    """One jitted (o, dq, dk, dv) so each case compiles once."""
    @jax.jit
    def run(q, k, v, do):
        o, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **kw), q, k, v)
        return (o, *vjp(do))
    return run(q, k, v, do)


# ------------------------------------------------------------------------------ value/grad grid
# (B, Tq, Tk, Hq, Hkv, D, causal, segments, dtype, block)
CASES = [
    pytest.param(2, 17, 17, 2, 2, 16, False, None, "float32", 16, id="f32-odd-noncausal"),
    pytest.param(1, 33, 33, 2, 2, 16, True, None, "float32", 16, id="f32-odd-causal"),
    pytest.param(1, 17, 40, 4, 2, 16, True, None, "float32", 16, id="f32-TqltTk-causal-gqa2"),
    pytest.param(1, 40, 17, 4, 1, 16, True, None, "float32", 16, id="f32-TqgtTk-causal-mqa"),
    pytest.param(1, 24, 37, 8, 2, 32, False, None, "float32", 32, id="f32-cross-gqa4-block32"),
    pytest.param(2, 33, 33, 2, 1, 16, True, "self", "float32", 16, id="f32-segments-causal"),
    pytest.param(1, 20, 35, 2, 2, 16, False, "pair", "float32", 16, id="f32-segments-cross"),
    pytest.param(1, 19, 19, 2, 1, 64, True, None, "float32", 16, id="f32-D64"),
    pytest.param(1, 18, 21, 2, 2, 128, False, None, "float32", 16, id="f32-D128"),
    pytest.param(1, 16, 24, 2, 1, 256, True, None, "float32", 16, id="f32-D256"),
    pytest.param(1, 33, 33, 4, 2, 32, True, None, "bfloat16", 16, id="bf16-causal-gqa2"),
    pytest.param(1, 29, 29, 2, 2, 64, False, "self", "bfloat16", 16, id="bf16-segments"),
    pytest.param(1, 33, 40, 4, 1, 32, True, None, "float16", 16, id="f16-causal-mqa"),
]


def _segments(kind, B, Tq, Tk, seed):
    if kind is None:
        return None, None, None
    rng = np.random.default_rng(seed)
    if kind == "self":
        # packed: sorted ids with 3 segments, plus a padding id at the end
        ids = np.sort(rng.integers(0, 3, size=(B, Tq)), axis=1).astype(np.int32)
        ids[:, -3:] = 7
        return jnp.asarray(ids), ids, ids
    q_ids = rng.integers(0, 2, size=(B, Tq)).astype(np.int32)
    kv_ids = rng.integers(0, 2, size=(B, Tk)).astype(np.int32)
    return (jnp.asarray(q_ids), jnp.asarray(kv_ids)), q_ids, kv_ids


@pytest.mark.parametrize("B,Tq,Tk,Hq,Hkv,D,causal,seg,dtype,block", CASES)
def test_flash_matches_float64(B, Tq, Tk, Hq, Hkv, D, causal, seg, dtype, block):
    q, k, v, do = make_inputs(Tq * 31 + Tk, B, Tq, Tk, Hq, Hkv, D, jnp.dtype(dtype))
    seg_arg, q_ids, kv_ids = _segments(seg, B, Tq, Tk, seed=Tq)
    ref = oracle(q, k, v, do, causal=causal, q_seg=q_ids, kv_seg=kv_ids)
    out = fwd_bwd(flash_attention, q, k, v, do, causal=causal, segment_ids=seg_arg,
                  block_q=block, block_k=block)
    for name, x, r in zip(("o", "dq", "dk", "dv"), out, ref):
        assert x.dtype == q.dtype, name
        assert np.all(np.isfinite(np.asarray(x, np.float32))), name
        err = rel_err(x, r)
        assert err < TOL[dtype], f"{name}: relative error {err:.2e} >= {TOL[dtype]:.0e}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_reference_matches_float64(dtype):
    """The ``xla`` path itself, on a case with GQA, causal Tq != Tk and segments."""
    B, Tq, Tk, Hq, Hkv, D = 2, 13, 19, 6, 2, 8
    q, k, v, do = make_inputs(3, B, Tq, Tk, Hq, Hkv, D, jnp.dtype(dtype))
    seg_arg, q_ids, kv_ids = _segments("pair", B, Tq, Tk, seed=5)
    ref = oracle(q, k, v, do, causal=True, q_seg=q_ids, kv_seg=kv_ids)
    out = fwd_bwd(reference_attention, q, k, v, do, causal=True, segment_ids=seg_arg)
    for name, x, r in zip(("o", "dq", "dk", "dv"), out, ref):
        assert rel_err(x, r) < TOL[dtype], name


# ------------------------------------------------------------------------------ masking edge cases
@pytest.mark.parametrize("fn", [flash_attention, reference_attention], ids=["pallas", "xla"])
def test_fully_masked_rows_are_zero_with_finite_grads(fn):
    B, Tq, Tk, H, D = 1, 20, 18, 2, 16
    q, k, v, do = make_inputs(11, B, Tq, Tk, H, H, D, jnp.float32)
    q_ids = np.zeros((B, Tq), np.int32)
    q_ids[:, 5:9] = 3  # these queries have no key with id 3
    kv_ids = np.zeros((B, Tk), np.int32)
    kw = dict(block_q=16, block_k=16) if fn is flash_attention else {}
    o, dq, dk, dv = fwd_bwd(fn, q, k, v, do, causal=False,
                            segment_ids=(jnp.asarray(q_ids), jnp.asarray(kv_ids)), **kw)
    for x in (o, dq, dk, dv):
        assert np.all(np.isfinite(np.asarray(x)))
    np.testing.assert_array_equal(np.asarray(o[:, 5:9]), 0.0)
    np.testing.assert_array_equal(np.asarray(dq[:, 5:9]), 0.0)
    assert np.abs(np.asarray(o[:, :5])).max() > 0.05  # the other rows are not zero


def test_causal_tq_greater_than_tk_first_rows_empty():
    """Bottom-right alignment: with Tq=24 > Tk=10 the first 14 queries see no key."""
    q, k, v, do = make_inputs(2, 1, 24, 10, 2, 2, 16, jnp.float32)
    o = flash_attention(q, k, v, causal=True, block_q=16, block_k=16)
    np.testing.assert_array_equal(np.asarray(o[:, :14]), 0.0)
    assert np.all(np.abs(np.asarray(o[:, 14:])).max(axis=-1) > 0)


def test_sm_scale_and_default_blocks():
    """Custom sm_scale, default block sizes (None -> table) on a ragged length."""
    q, k, v, do = make_inputs(4, 1, 21, 21, 2, 2, 16, jnp.float32)
    ref = oracle(q, k, v, do, causal=True, sm_scale=0.3)
    out = fwd_bwd(flash_attention, q, k, v, do, causal=True, sm_scale=0.3)
    for x, r in zip(out, ref):
        assert rel_err(x, r) < TOL["float32"]


# ------------------------------------------------------------------------------ transformations
def test_vmap_and_jit_compose():
    """vmap over an extra leading axis == per-slice calls; jit(grad) of the whole thing works."""
    ks = jax.random.split(jax.random.key(9), 3)
    q = jax.random.normal(ks[0], (2, 1, 17, 2, 16))
    k = jax.random.normal(ks[1], (2, 1, 17, 1, 16))
    v = jax.random.normal(ks[2], (2, 1, 17, 1, 16))
    f = lambda q, k, v: flash_attention(q, k, v, causal=True, block_q=16, block_k=16)
    loss = lambda q, k, v: jnp.sum(jax.vmap(f)(q, k, v) ** 2)
    val, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
    ref_loss = lambda q, k, v: sum(jnp.sum(reference_attention(q[i], k[i], v[i], causal=True) ** 2)
                                   for i in range(2))
    rval, rgrads = jax.value_and_grad(ref_loss, argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(val, rval, rtol=1e-5)
    for g, r in zip(grads, rgrads):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ bad inputs
def _x(shape, dtype=jnp.float32):
    return jnp.zeros(shape, dtype)


@pytest.mark.parametrize("fn", [flash_attention, reference_attention], ids=["pallas", "xla"])
@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((_x((1, 8, 2, 16)), _x((1, 8, 2)), _x((1, 8, 2))), {}, ValueError, "4-D"),
    ((_x((1, 8, 3, 16)), _x((1, 8, 2, 16)), _x((1, 8, 2, 16))), {}, ValueError, "multiple"),
    ((_x((1, 8, 2, 16)), _x((1, 8, 2, 32)), _x((1, 8, 2, 32))), {}, ValueError, "head_dim"),
    ((_x((1, 8, 2, 16)), _x((2, 8, 2, 16)), _x((2, 8, 2, 16))), {}, ValueError, "batch"),
    ((_x((1, 8, 2, 16)), _x((1, 8, 2, 16)), _x((1, 9, 2, 16))), {}, ValueError, "same shape"),
    ((_x((1, 8, 2, 16), jnp.int32),) * 3, {}, TypeError, "float32"),
    ((_x((1, 8, 2, 16)), _x((1, 8, 2, 16), jnp.bfloat16), _x((1, 8, 2, 16))), {}, TypeError,
     "one dtype"),
    ((_x((1, 8, 2, 16)), _x((1, 9, 2, 16)), _x((1, 9, 2, 16))),
     {"segment_ids": jnp.zeros((1, 8), jnp.int32)}, ValueError, "pair"),
    ((_x((1, 8, 2, 16)),) * 3, {"segment_ids": jnp.zeros((1, 7), jnp.int32)}, ValueError,
     "shape"),
    ((_x((1, 8, 2, 16)),) * 3, {"segment_ids": jnp.zeros((1, 8))}, TypeError, "integer"),
])
def test_bad_inputs_raise(fn, args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"block_q": 24}, ValueError, "power of two"),
    ({"block_k": 8}, ValueError, "power of two"),
    ({"interpret": "yes"}, TypeError, "interpret"),
    ({"causal": 1}, TypeError, "causal"),
])
def test_flash_bad_options_raise(kwargs, exc, match):
    x = _x((1, 8, 2, 16))
    with pytest.raises(exc, match=match):
        flash_attention(x, x, x, **kwargs)


def test_flash_unsupported_head_dim_raises():
    x = _x((1, 8, 2, 48))
    with pytest.raises(ValueError, match="head_dim must be one of"):
        flash_attention(x, x, x)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the no-GPU error path")
def test_compiled_kernel_without_gpu_raises():
    x = _x((1, 8, 2, 16))
    with pytest.raises(RuntimeError, match="needs a GPU backend"):
        flash_attention(x, x, x, interpret=False)


@pytest.mark.parametrize("fn", [flash_attention, reference_attention], ids=["pallas", "xla"])
@pytest.mark.parametrize("sm_scale", [0.0, -0.125, float("nan"), float("inf"), -float("inf")])
def test_bad_sm_scale_raises_eagerly(fn, sm_scale):
    """sm_scale <= 0 or non-finite: ValueError naming the argument, before anything is traced
    (also under an outer jit, where only the arrays are traced)."""
    x = _x((1, 8, 2, 16))
    with pytest.raises(ValueError, match="sm_scale"):
        fn(x, x, x, sm_scale=sm_scale)
    with pytest.raises(ValueError, match="sm_scale"):
        jax.jit(lambda q: fn(q, x, x, sm_scale=sm_scale))(x)
    with pytest.raises(TypeError, match="sm_scale"):
        fn(x, x, x, sm_scale="0.1")
    ok = fn(x, x, x, sm_scale=np.float32(0.25))   # numpy scalars are fine
    assert ok.shape == x.shape
