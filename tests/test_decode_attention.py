"""Decode attention (split-K Pallas kernel in interpret mode on CPU, and its plain-JAX reference)
against an independent float64 oracle.

The oracle is written from the semantics alone, not from ``pallas_kernels``: the visibility mask
is built element by element with Python loops (query ``i`` of row ``b`` sees ``j < L - Tq`` and
``L - Tq + k`` where ``k <= i`` / ``tree_mask[b, i, k]``), the forward loops over (batch, query
head) with the kv head ``h // (Hq // Hkv)`` picked explicitly, and the gradients come from
``jax.vjp`` of a ``jnp.repeat``-the-heads transcription in float64 (``jax.enable_x64``).

Tolerances (outputs are unit scale: softmax averages of N(0, 1) values):
  float32   atol = rtol = 1e-5 elementwise (exact float32 products; observed ~3e-7);
            gradients: relative L2 error 2e-5.
  bfloat16  atol = rtol = 2e-2 against the oracle on the bf16-rounded inputs: P is rounded to
            bf16 before P @ V and the output is rounded to bf16 (eps 2^-7 ~ 8e-3, so a few ulps
            of a unit-scale value; observed ~4e-3).
"""
from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels import decode_attention, reference_attention, reference_decode_attention
from pallas_kernels.decode.op import decode_plan

TOL = {"float32": 1e-5, "bfloat16": 2e-2}

# jitted entry points: one compilation per case instead of one per eager op (lengths stay traced)
kernel = jax.jit(decode_attention, static_argnames=("sm_scale", "num_splits", "block_k"))
reference = jax.jit(reference_decode_attention, static_argnames=("sm_scale",))


@jax.jit
def kernel_grads(q, k, v, lengths, w, tree_mask=None):
    """(dq, dk, dv) of sum(decode_attention(...) * w), 2 splits of 16-key blocks."""
    loss = lambda q, k, v: jnp.sum(decode_attention(q, k, v, lengths, tree_mask=tree_mask,
                                                    num_splits=2, block_k=16) * w)
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


# shapes shared by the property tests below (so they share compilations)
B_, TQ_, S_, HQ_, HKV_, D_ = 2, 3, 37, 4, 2, 16


# ------------------------------------------------------------------------------ oracle
def np_mask(lengths, tree, Tq, S):
    """bool [B, Tq, S] by loops, straight from the semantics."""
    B = len(lengths)
    mask = np.zeros((B, Tq, S), bool)
    for b in range(B):
        prefix = int(lengths[b]) - Tq
        for i in range(Tq):
            for j in range(int(lengths[b])):
                if j < prefix:
                    mask[b, i, j] = True
                else:
                    kk = j - prefix
                    mask[b, i, j] = (kk <= i) if tree is None else bool(tree[b, i, kk])
    return mask


def f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def oracle(q, k, v, lengths, tree=None, sm_scale=None):
    """float64 output [B, Tq, Hq, D], per (batch, query head) in numpy."""
    q, k, v = f64(q), f64(k), f64(v)
    B, Tq, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    scale = 1.0 / np.sqrt(D) if sm_scale is None else sm_scale
    mask = np_mask(lengths, tree, Tq, S)
    o = np.zeros_like(q)
    for b in range(B):
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            s = q[b, :, h] @ k[b, :, kh].T * scale                  # [Tq, S]
            s = np.where(mask[b], s, -np.inf)
            mx = s.max(axis=1, keepdims=True)
            e = np.where(mask[b], np.exp(s - np.where(np.isfinite(mx), mx, 0.0)), 0.0)
            den = e.sum(axis=1, keepdims=True)
            o[b, :, h] = (e / np.where(den == 0, 1.0, den)) @ v[b, :, kh]
    return o


def oracle_grads(q, k, v, lengths, w, tree=None):
    """float64 (dq, dk, dv) of sum(o * w) by jax.vjp in x64 (K/V heads repeated)."""
    q, k, v, w = f64(q), f64(k), f64(v), f64(w)
    Tq, Hq, D = q.shape[1:]
    S, Hkv = k.shape[1], k.shape[2]
    mask = np_mask(lengths, tree, Tq, S)[:, None]                    # [B, 1, Tq, S]
    with jax.enable_x64(True):
        def f(q, k, v):
            kr, vr = jnp.repeat(k, Hq // Hkv, axis=2), jnp.repeat(v, Hq // Hkv, axis=2)
            s = jnp.einsum("bqhd,bkhd->bhqk", q, kr) / np.sqrt(D)
            s = jnp.where(mask, s, -1e300)
            e = jnp.where(mask, jnp.exp(s - jax.lax.stop_gradient(s.max(-1, keepdims=True))), 0)
            p = e / jnp.maximum(e.sum(-1, keepdims=True), 1e-300)
            return jnp.sum(jnp.einsum("bhqk,bkhd->bqhd", p, vr) * w)
        grads = jax.grad(f, argnums=(0, 1, 2))(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
        return tuple(np.asarray(g) for g in grads)


def rel_l2(x, ref):
    return np.linalg.norm(f64(x) - ref) / max(np.linalg.norm(ref), 1e-30)


def make(seed, B, Tq, S, Hq, Hkv, D, dtype="float32"):
    """Unit-normal q, k_cache, v_cache (numpy RNG: no per-shape compilation)."""
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)
                 for shape in ((B, Tq, Hq, D), (B, S, Hkv, D), (B, S, Hkv, D)))


def make_tree(seed, B, Tq, two_d=False):
    """Random bool tree mask with a true diagonal (every query sees itself)."""
    rng = np.random.default_rng(seed)
    shape = (Tq, Tq) if two_d else (B, Tq, Tq)
    return (rng.random(shape) < 0.5) | np.eye(Tq, dtype=bool)


# ------------------------------------------------------------------------------ values
# id, B, Tq, S, Hq, Hkv, D, lengths, num_splits, block_k, tree ("", "3d", "2d"), dtype
CASES = [
    ("mha-tq1-ns1", 3, 1, 40, 2, 2, 16, [1, 40, 23], 1, 16, "", "float32"),
    ("mha-tq1-ns3", 3, 1, 40, 2, 2, 16, [1, 40, 23], 3, 16, "", "float32"),
    ("gqa2-tq3-ns3", 3, 3, 45, 4, 2, 16, [3, 45, 20], 3, 16, "", "float32"),
    ("mqa-tq4-ns8-empty-splits", 2, 4, 37, 4, 1, 16, [4, 37], 8, 16, "", "float32"),
    ("gqa4-tq5-rows20-bk32", 2, 5, 70, 8, 2, 32, [5, 61], 2, 32, "", "float32"),
    ("tree3d-gqa2", 2, 5, 33, 4, 2, 16, [33, 14], 2, 16, "3d", "float32"),
    ("tree2d-tq34-two-words", 2, 34, 48, 1, 1, 16, [48, 40], 2, 16, "2d", "float32"),
    ("bf16-gqa2-tq2", 2, 2, 50, 4, 2, 32, [2, 50], 2, 16, "", "bfloat16"),
    ("bf16-tree-mqa", 2, 3, 41, 2, 1, 16, [41, 9], 4, 16, "3d", "bfloat16"),
]


def _case_inputs(B, Tq, S, Hq, Hkv, D, lengths, tree, dtype, seed):
    q, k, v = make(seed, B, Tq, S, Hq, Hkv, D, dtype)
    tm = None if not tree else make_tree(seed, B, Tq, two_d=(tree == "2d"))
    tm_b = None if tm is None else np.broadcast_to(tm, (B, Tq, Tq))
    return q, k, v, np.asarray(lengths, np.int32), tm, tm_b


@pytest.mark.parametrize("cid,B,Tq,S,Hq,Hkv,D,lengths,ns,bk,tree,dtype", CASES,
                         ids=[c[0] for c in CASES])
def test_kernel_matches_float64(cid, B, Tq, S, Hq, Hkv, D, lengths, ns, bk, tree, dtype):
    q, k, v, L, tm, tm_b = _case_inputs(B, Tq, S, Hq, Hkv, D, lengths, tree, dtype, seed=S + Tq)
    o = kernel(q, k, v, jnp.asarray(L), tree_mask=None if tm is None else jnp.asarray(tm),
               num_splits=ns, block_k=bk)
    assert o.shape == q.shape and o.dtype == q.dtype
    np.testing.assert_allclose(f64(o), oracle(q, k, v, L, tm_b), atol=TOL[dtype],
                               rtol=TOL[dtype])


@pytest.mark.parametrize("cid,B,Tq,S,Hq,Hkv,D,lengths,ns,bk,tree,dtype", CASES,
                         ids=[c[0] for c in CASES])
def test_reference_matches_float64(cid, B, Tq, S, Hq, Hkv, D, lengths, ns, bk, tree, dtype):
    q, k, v, L, tm, tm_b = _case_inputs(B, Tq, S, Hq, Hkv, D, lengths, tree, dtype, seed=S + Tq)
    o = reference(q, k, v, jnp.asarray(L), tree_mask=None if tm is None else jnp.asarray(tm))
    assert o.dtype == q.dtype
    np.testing.assert_allclose(f64(o), oracle(q, k, v, L, tm_b), atol=TOL[dtype],
                               rtol=TOL[dtype])


def test_auto_plan_and_sm_scale():
    """num_splits/block_k = None (auto plan: 2 splits of 64-key blocks here), custom sm_scale."""
    assert decode_plan(2, 300, 1, 16) == (2, 64)
    q, k, v = make(7, 2, 2, 300, 2, 1, 16)
    L = np.array([37, 300], np.int32)
    o = kernel(q, k, v, jnp.asarray(L), sm_scale=0.3)
    np.testing.assert_allclose(f64(o), oracle(q, k, v, L, sm_scale=0.3), atol=1e-5, rtol=1e-5)


def test_decode_plan_heuristic():
    # few programs (B * Hkv = 8): split the 64 blocks 16 ways -> 128 programs
    assert decode_plan(1, 4096, 8, 128) == (16, 64)
    # enough programs already: one split
    assert decode_plan(64, 4096, 8, 128) == (1, 64)
    # at most 32 splits, at least two blocks per split, smaller blocks for D = 256 / short S
    assert decode_plan(1, 1 << 16, 1, 64) == (32, 64)
    assert decode_plan(1, 200, 1, 64) == (2, 64)
    assert decode_plan(1, 4096, 1, 256)[1] == 32
    assert decode_plan(1, 20, 1, 64) == (1, 32)
    assert decode_plan(1, 20, 1, 64, num_splits=5, block_k=16) == (5, 16)


def test_all_false_tree_row_is_zero():
    """Query 1's tree row is all false: over an empty prefix (lengths == Tq) it sees nothing and
    returns exactly 0; with a prefix it sees only the prefix."""
    q, k, v = make(3, B_, TQ_, S_, HQ_, HKV_, D_)
    L = np.array([TQ_, 17], np.int32)
    tm = np.tril(np.ones((B_, TQ_, TQ_), bool))
    tm[:, 1] = False
    ref = oracle(q, k, v, L, tm)
    for fn, kw in ((kernel, dict(num_splits=2, block_k=16)), (reference, {})):
        o = fn(q, k, v, jnp.asarray(L), tree_mask=jnp.asarray(tm), **kw)
        np.testing.assert_array_equal(np.asarray(o[0, 1]), 0.0)
        assert np.abs(np.asarray(o[0, 0])).max() > 0.05 and np.abs(np.asarray(o[1, 1])).max() > 0.05
        np.testing.assert_allclose(f64(o), ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ properties
def test_equals_last_rows_of_full_causal_attention():
    """Decoding the last Tq positions of a length-L sequence == the last Tq rows of full causal
    attention over the sequence (per row, different L; the cache holds junk beyond L)."""
    Ls = [29, 17]
    q_all, k_cache, v_cache = make(11, B_, S_, S_, HQ_, HKV_, D_)
    q = jnp.stack([q_all[b, L - TQ_:L] for b, L in enumerate(Ls)])
    o = kernel(q, k_cache, v_cache, jnp.asarray(Ls, jnp.int32), num_splits=2, block_k=16)
    for b, L in enumerate(Ls):
        full = reference_attention(q_all[b:b + 1, :L], k_cache[b:b + 1, :L], v_cache[b:b + 1, :L],
                                   causal=True)
        np.testing.assert_allclose(np.asarray(o[b]), np.asarray(full[0, -TQ_:]), atol=1e-5,
                                   rtol=1e-5)


def test_garbage_beyond_lengths_has_no_effect():
    """Overwriting k/v at positions >= lengths (stale entries after a rollback) with NaN, inf or
    1e30 changes neither the outputs nor the gradients; the gradients there are exactly 0."""
    q, k, v = make(5, B_, TQ_, S_, HQ_, HKV_, D_)
    w = jnp.ones_like(q)
    L = jnp.asarray([20, 35], jnp.int32)
    beyond = (np.arange(S_)[None, :] >= np.asarray(L)[:, None])[:, :, None, None]
    kw = dict(num_splits=2, block_k=16)
    clean, ref_clean = kernel(q, k, v, L, **kw), reference(q, k, v, L)
    g_clean = kernel_grads(q, k, v, L, w)
    for junk in (np.nan, np.inf, 1e30):
        kj, vj = jnp.where(beyond, junk, k), jnp.where(beyond, -junk, v)
        np.testing.assert_array_equal(np.asarray(kernel(q, kj, vj, L, **kw)), np.asarray(clean))
        np.testing.assert_array_equal(np.asarray(reference(q, kj, vj, L)), np.asarray(ref_clean))
        g_dirty = kernel_grads(q, kj, vj, L, w)
        for a, b in zip(g_dirty, g_clean):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-6)
        for g in g_dirty[1:]:
            np.testing.assert_array_equal(np.asarray(g)[np.broadcast_to(beyond, g.shape)], 0.0)


@pytest.mark.parametrize("tree", [False, True], ids=["causal", "tree"])
def test_gradients_match_float64(tree):
    """jax.grad through the custom VJP (the reference's VJP) vs the float64 oracle."""
    q, k, v = make(13, B_, TQ_, S_, HQ_, HKV_, D_)
    w = jnp.asarray(np.random.default_rng(14).standard_normal(q.shape, np.float32))
    L = np.array([TQ_, 30], np.int32)
    tm = make_tree(15, B_, TQ_) if tree else None
    grads = kernel_grads(q, k, v, jnp.asarray(L), w,
                         tree_mask=None if tm is None else jnp.asarray(tm))
    for name, g, r in zip(("dq", "dk", "dv"), grads, oracle_grads(q, k, v, L, w, tm)):
        assert g.dtype == jnp.float32
        err = rel_l2(g, r)
        assert err < 2e-5, f"{name}: relative error {err:.2e}"


def test_jit_with_traced_lengths():
    """lengths is a traced argument: one compilation serves different lengths; traced values
    outside [Tq, S] are clamped (S + 5 behaves as S)."""
    q, k, v = make(17, B_, TQ_, S_, HQ_, HKV_, D_)
    f = jax.jit(lambda q, k, v, L: decode_attention(q, k, v, L, num_splits=2, block_k=16))
    for L in ([TQ_, S_], [19, 7]):
        L = np.asarray(L, np.int32)
        np.testing.assert_allclose(f64(f(q, k, v, jnp.asarray(L))), oracle(q, k, v, L),
                                   atol=1e-5, rtol=1e-5)
    over = f(q, k, v, jnp.asarray([S_ + 5, S_], jnp.int32))
    np.testing.assert_allclose(np.asarray(over), np.asarray(f(q, k, v, jnp.asarray([S_, S_]))),
                               atol=1e-6)
    assert f._cache_size() == 1


# ------------------------------------------------------------------------------ bad inputs
def _x(shape, dtype=jnp.float32):
    return jnp.zeros(shape, dtype)


_Q, _KV, _L = _x((1, 2, 4, 16)), _x((1, 8, 2, 16)), jnp.asarray([5], jnp.int32)


@pytest.mark.parametrize("fn", [decode_attention, reference_decode_attention],
                         ids=["pallas", "xla"])
@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((_x((1, 2, 4)), _KV, _KV, _L), {}, ValueError, "4-D"),
    ((_x((1, 2, 3, 16)), _KV, _KV, _L), {}, ValueError, "multiple of kv heads"),
    ((_Q, _x((1, 8, 2, 32)), _x((1, 8, 2, 32)), _L), {}, ValueError, "head_dim mismatch"),
    ((_Q, _KV, _x((1, 9, 2, 16)), _L), {}, ValueError, "same shape"),
    ((_Q, _x((2, 8, 2, 16)), _x((2, 8, 2, 16)), _L), {}, ValueError, "batch"),
    ((_x((1, 2, 4, 16), jnp.int32), _KV, _KV, _L), {}, TypeError, "float32"),
    ((_Q, _x((1, 8, 2, 16), jnp.bfloat16), _KV, _L), {}, TypeError, "one dtype"),
    ((_x((1, 9, 4, 16)), _KV, _KV, jnp.asarray([9])), {}, ValueError, "must not exceed"),
    ((_Q, _KV, _KV, jnp.asarray([5, 5])), {}, ValueError, r"lengths must have shape \(1,\)"),
    ((_Q, _KV, _KV, 5), {}, ValueError, "lengths must have shape"),
    ((_Q, _KV, _KV, jnp.asarray([5.0])), {}, TypeError, "lengths must be an integer"),
    ((_Q, _KV, _KV, jnp.asarray([1])), {}, ValueError, "Tq <= lengths"),
    ((_Q, _KV, _KV, jnp.asarray([9])), {}, ValueError, "Tq <= lengths"),
    ((_Q, _KV, _KV, _L), {"tree_mask": jnp.ones((1, 2, 2), jnp.int32)}, TypeError, "bool"),
    ((_Q, _KV, _KV, _L), {"tree_mask": jnp.ones((1, 2, 3), bool)}, ValueError,
     "tree_mask must have shape"),
    ((_Q, _KV, _KV, _L), {"sm_scale": 0.0}, ValueError, "sm_scale"),
    ((_Q, _KV, _KV, _L), {"sm_scale": float("nan")}, ValueError, "sm_scale"),
    ((_Q, _KV, _KV, _L), {"sm_scale": "0.1"}, TypeError, "sm_scale"),
])
def test_bad_inputs_raise(fn, args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"block_k": 24}, ValueError, "power of two"),
    ({"block_k": 8}, ValueError, "power of two"),
    ({"num_splits": 0}, ValueError, "num_splits must be >= 1"),
    ({"num_splits": 2.0}, TypeError, "num_splits"),
    ({"interpret": "yes"}, TypeError, "interpret"),
])
def test_kernel_bad_options_raise(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        decode_attention(_Q, _KV, _KV, _L, **kwargs)


def test_kernel_unsupported_head_dim_raises():
    with pytest.raises(ValueError, match="head_dim must be one of"):
        decode_attention(_x((1, 2, 4, 48)), _x((1, 8, 2, 48)), _x((1, 8, 2, 48)), _L)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the no-GPU error path")
def test_compiled_kernel_without_gpu_raises():
    with pytest.raises(RuntimeError, match="needs a GPU backend"):
        decode_attention(_Q, _KV, _KV, _L, interpret=False)


# ------------------------------------------------------------------------------ GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("Tq,tree", [(1, False), (4, False), (5, True)])
def test_compiled_kernel_matches_reference(dtype, Tq, tree):
    """Compiled (Triton-lowered) kernel vs the reference in float32 on upcast inputs; relative L2
    error 1e-4 (float32), 1e-2 (float16), 3e-2 (bfloat16)."""
    B, S, Hq, Hkv, D = 4, 1000, 32, 8, 128
    q, k, v = make(19, B, Tq, S, Hq, Hkv, D, dtype)
    L = jnp.asarray([Tq, 1000, 517, 64], jnp.int32)
    tm = jnp.asarray(make_tree(20, B, Tq)) if tree else None
    up = lambda x: x.astype(jnp.float32)
    ref = reference_decode_attention(up(q), up(k), up(v), L, tree_mask=tm)
    for ns in (None, 1, 7):
        o = decode_attention(q, k, v, L, tree_mask=tm, interpret=False, num_splits=ns)
        err = rel_l2(o, np.asarray(ref, np.float64))
        assert err < {"float32": 1e-4, "float16": 1e-2, "bfloat16": 3e-2}[dtype], (ns, err)
