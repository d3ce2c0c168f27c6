"""Hopper Mosaic GPU FlashAttention backward (``pallas_kernels.attention.mosaic_bwd``) vs a float64 oracle.

CPU tests run both kernels (dK/dV and dQ) in Pallas' *GPU interpret mode*, which simulates SMEM,
TMA copies, mbarriers, wgmma and the producer / consumer warpgroups as concurrent threads; lse and
delta are the exact statistics of the float64 oracle. A second CPU test lowers the compiled
kernels for CUDA (Mosaic GPU layout inference, wgmma / TMA lowering and the SMEM budget run in
Python, for sm_90) without executing them, and checks that both kernels defer wgmma waits
(``wgmma.wait_group 1``); the race detector runs over the deferred-wait schedule (the
interpreter's wgmma is synchronous, so it checks the SMEM / barrier protocol, not the waits). ``@pytest.mark.gpu`` tests run the compiled kernels on
a Hopper GPU.

The oracle is written independently of ``pallas_kernels``: ``reference_attention`` itself rejects
float64 inputs (``check_attention_args`` allows float32/bfloat16/float16 only), so the float64
helper below repeats K/V heads (``jnp.repeat``) and differentiates with ``jax.vjp`` under
``jax.enable_x64``; ``test_oracle_matches_reference_attention`` ties it to the project reference.

Tolerances (relative L2 error of dq, dk, dv vs float64): the kernel rounds P^T / dS^T (and the
outputs) to the input dtype, ~2^-9 (bf16) / 2^-12 (fp16) relative; observed ~2.5e-3 (bf16) and
~3e-4 (fp16) in interpret mode. Limits: bf16 1e-2, fp16 2e-3.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import reference_attention
from pallas_kernels.attention.common import AttnStatic
from pallas_kernels.attention.mosaic_bwd import _mosaic_flash_bwd, mosaic_flash_bwd, smem_bytes
from pallas_kernels.attention.mosaic_common import is_hopper
from pallas_kernels.attention.tuning import MOSAIC_BWD_TABLE

TOL = {"bfloat16": 1e-2, "float16": 2e-3}


# ------------------------------------------------------------------------------ oracle
def oracle64(q, k, v, do, *, causal, sm_scale):
    """float64 numpy ``(o, lse2, dq, dk, dv)``; ``lse2`` base-2, ``+inf`` for rows with no key."""
    q, k, v, do = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v, do))
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    mask = np.ones((Tq, Tk), bool)
    if causal:
        mask = np.arange(Tk)[None, :] <= np.arange(Tq)[:, None] + (Tk - Tq)
    seen = mask.any(-1)                                            # [Tq]
    with jax.enable_x64(True):
        def f(q, k, v):
            s = jnp.einsum("bqhd,bkhd->bhqk", q, jnp.repeat(k, G, axis=2)) * sm_scale
            s = jnp.where(mask, s, -jnp.inf)
            m = jax.lax.stop_gradient(jnp.where(seen[:, None], s.max(-1, keepdims=True), 0.0))
            e = jnp.where(mask, jnp.exp(s - m), 0.0)
            den = e.sum(-1, keepdims=True)
            o = jnp.einsum("bhqk,bkhd->bqhd", e / jnp.where(den == 0, 1.0, den),
                           jnp.repeat(v, G, axis=2))
            lse2 = jnp.where(seen, (jnp.log(jnp.where(seen, den[..., 0], 1.0)) + m[..., 0])
                             / math.log(2.0), jnp.inf)
            return o, lse2
        args = [jnp.asarray(x) for x in (q, k, v)]
        o, lse2 = f(*args)
        _, vjp = jax.vjp(lambda *a: f(*a)[0], *args)
        dq, dk, dv = vjp(jnp.asarray(do))
        return tuple(np.asarray(x) for x in (o, lse2, dq, dk, dv))


def rel_err(x, ref):
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30)


def make_inputs(seed, B, Tq, Tk, Hq, Hkv, D, dtype):
    ks = jax.random.split(jax.random.key(seed), 4)
    shapes = [(B, Tq, Hq, D), (B, Tk, Hkv, D), (B, Tk, Hkv, D), (B, Tq, Hq, D)]
    return [jax.random.normal(kk, s, jnp.float32).astype(dtype) for kk, s in zip(ks, shapes)]


def _pad_garbage(x, T, seed):
    """Pads the sequence axis to ``T`` with finite nonzero garbage (not zeros)."""
    shape = (x.shape[0], T - x.shape[1], *x.shape[2:])
    junk = (3.0 * jax.random.normal(jax.random.key(seed), shape, jnp.float32)).astype(x.dtype)
    return jnp.concatenate([x, junk], axis=1)


def build_case(B, Tq, Tk, Hq, Hkv, D, causal, dtype, blocks_dkdv, blocks_dq, seed=0,
               interpret=True):
    """Padded kernel inputs + AttnStatics (as attention/op.py builds them) + float64 grads.

    The padding (q, k, v, do rows and lse / delta entries past the true lengths) is finite
    nonzero *garbage*, not zeros: the kernels must mask padded key columns and query rows
    rather than rely on zero padding (with zero-padded q / dO the padded rows would contribute
    nothing even without the row mask, and the test could not see a missing mask).
    """
    dt = jnp.dtype(dtype)
    q, k, v, do = make_inputs(seed, B, Tq, Tk, Hq, Hkv, D, dt)
    sm_scale = 1.0 / math.sqrt(D)
    o, lse2, dq, dk, dv = oracle64(q, k, v, do, causal=causal, sm_scale=sm_scale)
    bq_max = max(blocks_dkdv[0], blocks_dq[0])
    bk_max = max(blocks_dkdv[1], blocks_dq[1])
    Tq_pad, Tk_pad = -(-Tq // bq_max) * bq_max, -(-Tk // bk_max) * bk_max

    def static(bq, bk):
        return AttnStatic(Tq=Tq, Tk=Tk, Tq_pad=Tq_pad, Tk_pad=Tk_pad, D=D, group=Hq // Hkv,
                          block_q=bq, block_k=bk, causal=causal, has_segments=False,
                          sm_scale=sm_scale, dtype=dt.name, interpret=interpret)

    delta = np.einsum("bqhd,bqhd->bhq", np.asarray(jnp.asarray(do, jnp.float32), np.float64), o)
    tail = ((0, 0), (0, 0), (0, Tq_pad - Tq))
    lse_p = jnp.asarray(np.pad(lse2, tail, constant_values=-3.0), jnp.float32)
    delta_p = jnp.asarray(np.pad(delta, tail, constant_values=5.0), jnp.float32)
    args = (_pad_garbage(q, Tq_pad, 1), _pad_garbage(k, Tk_pad, 2), _pad_garbage(v, Tk_pad, 3),
            _pad_garbage(do, Tq_pad, 4), lse_p, delta_p)
    return args, static(*blocks_dkdv), static(*blocks_dq), (dq, dk, dv)


# ------------------------------------------------------------------------------ interpret grid
# (B, Tq, Tk, Hq, Hkv, D, causal, dtype, (bq, bk) dK/dV kernel, (bq, bk) dQ kernel)
CASES = [
    (1, 100, 100, 2, 1, 64, True, "bfloat16", (64, 64), (64, 64)),   # causal, GQA 2, ragged
    (1, 50, 100, 1, 1, 64, False, "float16", (64, 64), (64, 64)),    # non-causal, Tq < Tk
    (1, 50, 100, 2, 1, 64, True, "bfloat16", (64, 64), (64, 64)),    # causal, Tq < Tk, GQA 2
    (1, 100, 50, 2, 1, 64, True, "float16", (64, 64), (64, 64)),     # Tq > Tk: rows see no key
    (2, 70, 70, 4, 2, 64, True, "float16", (64, 128), (128, 64)),    # 2 consumer WGs, B=2
    (1, 60, 60, 1, 1, 128, True, "bfloat16", (64, 64), (64, 64)),    # D=128
]
CASE_IDS = ["bf16-causal-gqa2-ragged", "f16-noncausal-TqltTk", "bf16-causal-TqltTk-gqa2",
            "f16-causal-TqgtTk-emptyrows-gqa2", "f16-causal-2consumerWGs-gqa2-B2",
            "bf16-causal-D128"]


# The garbage-padded query rows can overflow float16 in the dQ kernel; those rows of dq are
# unspecified (sliced off by the caller) and numpy warns inside the simulated wgmma.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("B,Tq,Tk,Hq,Hkv,D,causal,dtype,bkv,bdq", CASES, ids=CASE_IDS)
def test_interpret_matches_float64(B, Tq, Tk, Hq, Hkv, D, causal, dtype, bkv, bdq):
    args, st, st_dq, (dq64, dk64, dv64) = build_case(B, Tq, Tk, Hq, Hkv, D, causal, dtype,
                                                     bkv, bdq, seed=Tq * 7 + Tk)
    dq, dk, dv = mosaic_flash_bwd(*args, st, interpret=True, st_dq=st_dq)
    assert dq.shape == args[0].shape and dk.shape == args[1].shape and dv.shape == args[2].shape
    assert dq.dtype == dk.dtype == dv.dtype == jnp.dtype(dtype)
    errs = {"dq": rel_err(dq[:, :Tq], dq64), "dk": rel_err(dk[:, :Tk], dk64),
            "dv": rel_err(dv[:, :Tk], dv64)}
    assert all(np.isfinite(e) and e < TOL[dtype] for e in errs.values()), errs
    if causal and Tq > Tk:  # rows that see no key: exactly zero gradient
        assert not np.any(np.asarray(dq[:, :Tq - Tk], np.float32))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_interpret_no_races_in_smem_ring():
    """The interpreter's vector-clock race detector sees the producer / consumer protocol
    (TMA into the ring, ``full`` / ``free`` barriers, SMEM staging) as properly ordered, for
    both kernels with two consumer warpgroups. (Dropping the producer's ``free`` wait makes
    it report a race.)"""
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races
    from pallas_kernels.attention.mosaic_bwd import _dkdv_call, _dq_call

    args, st, st_dq, (_, dk64, _) = build_case(1, 70, 70, 4, 2, 64, True, "float16",
                                               (64, 128), (128, 64))
    params = plgpu.InterpretGPUParams(detect_races=True)
    dk, _ = jax.block_until_ready(_dkdv_call(*args, st, params))
    assert not get_races().races_found  # the state is per kernel launch: check each one
    assert rel_err(dk[:, :70], dk64) < TOL["float16"]
    jax.block_until_ready(_dq_call(*args, st_dq, params))
    assert not get_races().races_found


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_interpret_no_races_deferred_wgmma_schedule():
    """Race detector over the deferred-wait schedule with many steps per CTA: the dK/dV CTA
    runs 2 heads x 4 query blocks = 8 steps (ring of 2 wraps 4 times; each step releases the
    *previous* step's slot after its first wgmma wait, the last two releases are predicated
    off) with 2 consumer warpgroups; the dQ CTAs run 4 key blocks of 64 (2 unmasked, 2 masked), with 2
    consumers. Non-causal, ragged (padded rows / columns masked), D=128; values against
    float64 as well."""
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races
    from pallas_kernels.attention.mosaic_bwd import _dkdv_call, _dq_call

    Tq, Tk = 200, 130
    args, st, st_dq, (dq64, dk64, dv64) = build_case(1, Tq, Tk, 2, 1, 128, False, "bfloat16",
                                                     (64, 128), (128, 64), seed=9)
    assert st.Tq_pad // st.block_q * st.group == 8 and st_dq.Tk_pad // st_dq.block_k == 4
    params = plgpu.InterpretGPUParams(detect_races=True)
    dk, dv = jax.block_until_ready(_dkdv_call(*args, st, params))
    assert not get_races().races_found
    dq = jax.block_until_ready(_dq_call(*args, st_dq, params))
    assert not get_races().races_found
    errs = {"dq": rel_err(dq[:, :Tq], dq64), "dk": rel_err(dk[:, :Tk], dk64),
            "dv": rel_err(dv[:, :Tk], dv64)}
    assert all(e < TOL["bfloat16"] for e in errs.values()), errs


def test_oracle_matches_reference_attention():
    """The float64 helper computes what ``reference_attention`` computes (float32 inputs)."""
    B, Tq, Tk, Hq, Hkv, D = 1, 12, 9, 4, 2, 16
    q, k, v, do = make_inputs(3, B, Tq, Tk, Hq, Hkv, D, jnp.float32)
    o64, lse2, dq64, dk64, dv64 = oracle64(q, k, v, do, causal=True, sm_scale=0.3)
    o, vjp = jax.vjp(lambda *a: reference_attention(*a, causal=True, sm_scale=0.3), q, k, v)
    for x, r in zip((o, *vjp(do)), (o64, dq64, dk64, dv64)):
        assert rel_err(x, r) < 1e-5
    # lse2 against an explicit numpy log-sum-exp of the visible scores (row 0 sees no key)
    s = np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64),
                  np.repeat(np.asarray(k, np.float64), 2, axis=2)) * 0.3
    vis = np.arange(Tk)[None, :] <= np.arange(Tq)[:, None] + (Tk - Tq)
    for r in range(Tq):
        if vis[r].any():
            expect = np.log2(np.exp(s[..., r, vis[r]]).sum(-1))
            np.testing.assert_allclose(lse2[..., r], expect, rtol=1e-12)
        else:
            assert np.all(np.isinf(lse2[..., r]) & (lse2[..., r] > 0))


# ------------------------------------------------------------------------------ CUDA lowering
@pytest.mark.parametrize("D", sorted(MOSAIC_BWD_TABLE))
def test_compiled_kernels_lower_for_hopper(D):
    """Lower the compiled kernels (default GPU blocks) for CUDA on this host: Mosaic GPU runs
    layout inference, the wgmma / TMA / barrier lowering and its SMEM check here (sm_90)."""
    bkv, bdq = MOSAIC_BWD_TABLE[D]
    T, Hq, Hkv = 256, 4, 2
    st = AttnStatic(Tq=T - 5, Tk=T - 9, Tq_pad=T, Tk_pad=T, D=D, group=Hq // Hkv,
                    block_q=bkv[0], block_k=bkv[1], causal=True, has_segments=False,
                    sm_scale=D ** -0.5, dtype="bfloat16", interpret=False)
    st_dq = dataclasses.replace(st, block_q=bdq[0], block_k=bdq[1])
    qs = jax.ShapeDtypeStruct((2, T, Hq, D), jnp.bfloat16)
    ks = jax.ShapeDtypeStruct((2, T, Hkv, D), jnp.bfloat16)
    ls = jax.ShapeDtypeStruct((2, Hq, T), jnp.float32)
    fn = jax.jit(lambda *a: _mosaic_flash_bwd(*a, st, st_dq, False))
    text = fn.trace(qs, ks, ks, qs, ls, ls).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 2
    _assert_deferred_waits(text)


def _assert_deferred_waits(text):
    """Both kernels (one custom call each) await a wgmma group with one still in flight
    (``wgmma.wait_group 1``: S^T / S read while dP^T / dP runs, dP^T read while dV runs)."""
    kernels = text.split("stablehlo.custom_call @mosaic_gpu")[1:]
    assert len(kernels) == 2
    for body in kernels:
        assert "wgmma.wait_group.sync.aligned 1;" in body


@pytest.mark.parametrize("D,bkv,bdq,causal", [
    (64, (64, 64), (64, 64), False),       # one consumer warpgroup in both kernels
    (128, (128, 64), (64, 128), True),     # the other block shapes that fit at D=128
])
def test_backward_defers_wgmma_waits_when_lowered(D, bkv, bdq, causal):
    """The deferred-wait schedule lowers for CUDA for other block shapes than the table's."""
    T, Hq, Hkv = 256, 2, 1
    st = AttnStatic(Tq=T - 3, Tk=T, Tq_pad=T, Tk_pad=T, D=D, group=Hq // Hkv,
                    block_q=bkv[0], block_k=bkv[1], causal=causal, has_segments=False,
                    sm_scale=D ** -0.5, dtype="float16", interpret=False)
    st_dq = dataclasses.replace(st, block_q=bdq[0], block_k=bdq[1])
    qs = jax.ShapeDtypeStruct((1, T, Hq, D), jnp.float16)
    ks = jax.ShapeDtypeStruct((1, T, Hkv, D), jnp.float16)
    ls = jax.ShapeDtypeStruct((1, Hq, T), jnp.float32)
    fn = jax.jit(lambda *a: _mosaic_flash_bwd(*a, st, st_dq, False))
    _assert_deferred_waits(fn.trace(qs, ks, ks, qs, ls, ls).lower(
        lowering_platforms=("cuda",)).as_text())


# ------------------------------------------------------------------------------ errors
def _small(dtype="bfloat16", D=64, blocks=(64, 64), **kw):
    args, st, _, _ = build_case(1, 64, 64, 1, 1, D, False, dtype, blocks, blocks)
    if kw:
        st = dataclasses.replace(st, **kw)
    return args, st


def test_rejects_segment_ids():
    args, st = _small(has_segments=True)
    with pytest.raises(ValueError, match="segment_ids"):
        mosaic_flash_bwd(*args, st, interpret=True)


def test_rejects_float32():
    args, st = _small()
    args = tuple(a.astype(jnp.float32) for a in args)
    st = dataclasses.replace(st, dtype="float32")
    with pytest.raises(TypeError, match="bfloat16/float16"):
        mosaic_flash_bwd(*args, st, interpret=True)


def test_rejects_head_dim_and_blocks():
    args, st = _small(D=32)
    with pytest.raises(ValueError, match="head_dim"):
        mosaic_flash_bwd(*args, st, interpret=True)
    args, st = _small()
    with pytest.raises(ValueError, match="block_q must be one of"):
        mosaic_flash_bwd(*args, dataclasses.replace(st, block_q=32), interpret=True)


def test_rejects_smem_overflow():
    st = AttnStatic(Tq=256, Tk=256, Tq_pad=256, Tk_pad=256, D=128, group=1, block_q=128,
                    block_k=128, causal=False, has_segments=False, sm_scale=0.1,
                    dtype="bfloat16", interpret=True)
    assert smem_bytes(st, "dkdv") > 232448  # 2*(2*128*128 + 2*2*128*128 + 2*128*128) + ...
    q = jnp.zeros((1, 256, 1, 128), jnp.bfloat16)
    stats = jnp.zeros((1, 1, 256), jnp.float32)
    with pytest.raises(ValueError, match="SMEM"):
        mosaic_flash_bwd(q, q, q, q, stats, stats, st, interpret=True)


def test_rejects_bad_stats_and_padding():
    args, st = _small()
    q, k, v, do, lse, delta = args
    with pytest.raises(ValueError, match="lse must be float32"):
        mosaic_flash_bwd(q, k, v, do, lse[:, :, :32], delta, st, interpret=True)
    with pytest.raises(ValueError, match="padded lengths"):
        mosaic_flash_bwd(q, k, v, do, lse, delta, dataclasses.replace(st, Tq_pad=128),
                         interpret=True)


def test_interpret_flag_checked():
    args, st = _small()
    with pytest.raises(TypeError, match="interpret must be a bool"):
        mosaic_flash_bwd(*args, st, interpret=None)
    if not is_hopper():
        with pytest.raises(RuntimeError, match="Hopper"):
            mosaic_flash_bwd(*args, st, interpret=False)


# ------------------------------------------------------------------------------ GPU (compiled)
@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_compiled_matches_float64(D, causal, dtype):
    if not is_hopper():
        pytest.skip("compiled Mosaic GPU backward needs a Hopper GPU (compute capability 9.x)")
    bkv, bdq = MOSAIC_BWD_TABLE[D]
    B, Tq, Tk, Hq, Hkv = 2, 300, 333, 4, 2
    args, st, st_dq, (dq64, dk64, dv64) = build_case(B, Tq, Tk, Hq, Hkv, D, causal, dtype,
                                                     bkv, bdq, seed=D, interpret=False)
    dq, dk, dv = jax.jit(lambda *a: mosaic_flash_bwd(*a, st, interpret=False, st_dq=st_dq))(*args)
    errs = {"dq": rel_err(dq[:, :Tq], dq64), "dk": rel_err(dk[:, :Tk], dk64),
            "dv": rel_err(dv[:, :Tk], dv64)}
    assert all(np.isfinite(e) and e < TOL[dtype] for e in errs.values()), errs
