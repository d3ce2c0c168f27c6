"""Pallas TPU FlashAttention (``backend="tpu"``) in TPU interpret mode vs a float64 oracle.

Everything here runs the Mosaic TPU kernels (``tpu_fwd.py``, ``tpu_bwd.py``) in Pallas TPU
interpret mode (``pltpu.InterpretParams``: simulated VMEM scratch, grid with dimension
semantics, uninitialised buffers filled with NaN) on CPU; nothing is compiled for a TPU.
The oracle (float64, repeated K/V heads, element-wise mask, ``jax.vjp`` under x64) is the one
of ``tests/test_flash_attention.py``.

Tolerances (relative L2 error ``||x - x64|| / ||x64||`` of o, dq, dk, dv):
  float32   8 * eps * sqrt(n), n = the reduction length (Tk for o/dq, Tq * group for dk/dv)
            (exact float32 products; 8e-6 at n=72, 1.9e-5 at n=400; observed <= 5.2e-7)
  bfloat16  1e-2 (P and dS rounded to bfloat16 before the matmuls; observed <= 2.6e-3)
A top-left instead of bottom-right causal offset fails the Tq != Tk cases (o error ~2), and
dropping the GQA sum in the dK/dV kernel fails the grouped cases (dk error ~0.7).
The forward's log-sum-exp (base 2) is compared with the float64 one to ``64 * eps`` absolute
(rows with no visible key must be ``+inf``).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import flash_attention
from pallas_kernels.attention import op, tuning
from pallas_kernels.attention.common import AttnStatic
from pallas_kernels.attention.tpu_fwd import check_tpu_blocks, tpu_flash_fwd
from tests.test_flash_attention import _mask_np, _segments, make_inputs, oracle, rel_err

EPS32 = float(np.finfo(np.float32).eps)
TOL_BF16 = 1e-2


def _tol(dtype, n):
    return 8 * EPS32 * math.sqrt(n) if dtype == "float32" else TOL_BF16


def _fwd_bwd(q, k, v, do, **kw):
    """One jitted (o, dq, dk, dv) through ``flash_attention(backend="tpu", interpret=True)``."""
    @jax.jit
    def run(q, k, v, do):
        o, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, backend="tpu", interpret=True,
                                                         **kw), q, k, v)
        return (o, *vjp(do))
    return run(q, k, v, do)


# (B, Tq, Tk, Hq, Hkv, D, causal, segments, dtype, block_q, block_k, sm_scale);
# blocks None: the interpret-mode defaults of tuning.tpu_kernel_config.
CASES = [
    pytest.param(1, 200, 200, 4, 2, 64, True, None, "float32", 128, 128, None,
                 id="f32-causal-gqa2-ragged200"),
    pytest.param(1, 72, 200, 2, 1, 128, True, None, "float32", 64, 128, None,
                 id="f32-causal-TqltTk-mqa-D128"),
    pytest.param(1, 200, 72, 2, 2, 64, True, None, "float32", 64, 64, 0.3,
                 id="f32-causal-TqgtTk-empty-rows-scale0.3"),
    pytest.param(2, 160, 160, 2, 2, 64, True, "self", "float32", 64, 64, None,
                 id="f32-segments-causal"),
    pytest.param(1, 96, 160, 4, 2, 64, False, "pair", "float32", 64, 64, None,
                 id="f32-segments-pair-gqa2-cross"),
    pytest.param(1, 256, 256, 4, 2, 128, True, None, "bfloat16", 128, 128, None,
                 id="bf16-causal-gqa2-D128"),
    pytest.param(1, 128, 128, 2, 1, 64, False, "self", "bfloat16", None, None, None,
                 id="bf16-segments-mqa-default-blocks"),
]


@pytest.mark.parametrize("B,Tq,Tk,Hq,Hkv,D,causal,seg,dtype,bq,bk,scale", CASES)
def test_tpu_flash_matches_float64(B, Tq, Tk, Hq, Hkv, D, causal, seg, dtype, bq, bk, scale):
    q, k, v, do = make_inputs(Tq * 7 + Tk, B, Tq, Tk, Hq, Hkv, D, jnp.dtype(dtype))
    seg_arg, q_ids, kv_ids = _segments(seg, B, Tq, Tk, seed=Tk)
    ref = oracle(q, k, v, do, causal=causal, q_seg=q_ids, kv_seg=kv_ids, sm_scale=scale)
    out = _fwd_bwd(q, k, v, do, causal=causal, segment_ids=seg_arg, block_q=bq, block_k=bk,
                   sm_scale=scale)
    G = Hq // Hkv
    for name, x, r, n in zip(("o", "dq", "dk", "dv"), out, ref, (Tk, Tk, Tq * G, Tq * G)):
        assert x.dtype == q.dtype and x.shape == r.shape, name
        assert np.all(np.isfinite(np.asarray(x, np.float32))), name
        err, tol = rel_err(x, r), _tol(dtype, n)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.1e}"
    if causal and Tq > Tk:  # bottom-right alignment: the first Tq - Tk rows see nothing
        np.testing.assert_array_equal(np.asarray(out[0][:, :Tq - Tk]), 0.0)
        np.testing.assert_array_equal(np.asarray(out[1][:, :Tq - Tk]), 0.0)


# ------------------------------------------------------------------------------ forward lse
def _lse2_oracle(q, k, causal, q_ids, kv_ids):
    """float64 base-2 log-sum-exp ``[B, Hq, Tq]`` (``+inf`` where no key is visible)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    B, Tq, Hq, D = q.shape
    G = Hq // k.shape[2]
    s = np.einsum("bqhd,bkhd->bhqk", q, np.repeat(k, G, axis=2)) / math.sqrt(D)
    mask = _mask_np(Tq, k.shape[1], causal, q_ids, kv_ids, B)[:, None]
    s = np.where(mask, s, -np.inf)
    m = s.max(-1, keepdims=True)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    l = np.exp(s - m_safe).sum(-1)
    with np.errstate(divide="ignore"):
        lse = np.where(l > 0, (m_safe[..., 0] + np.log(l)) / math.log(2), np.inf)
    return lse


def test_tpu_forward_lse():
    """Causal with Tq > Tk and a segment pair: both kinds of empty rows get lse = +inf."""
    B, Tq, Tk, Hq, Hkv, D, blk, causal, seg = 1, 40, 24, 2, 1, 64, 16, True, "pair"
    q, k, v, _ = make_inputs(Tq + Tk, B, Tq, Tk, Hq, Hkv, D, jnp.float32)
    seg_arg, q_ids, kv_ids = _segments(seg, B, Tq, Tk, seed=3)
    q_ids[:, 20:23] = 5  # rows with no visible key (beyond the causal ones)
    seg_arg = (jnp.asarray(q_ids), seg_arg[1])
    Tq_pad, Tk_pad = -(-Tq // blk) * blk, -(-Tk // blk) * blk
    st = AttnStatic(Tq=Tq, Tk=Tk, Tq_pad=Tq_pad, Tk_pad=Tk_pad, D=D, group=Hq // Hkv,
                    block_q=blk, block_k=blk, causal=causal, has_segments=seg is not None,
                    sm_scale=1 / math.sqrt(D), dtype="float32", interpret=True)
    q_seg, kv_seg = op._pad_segs(None if seg is None else seg_arg, Tq_pad, Tk_pad)
    _, lse = jax.jit(lambda q, k, v: tpu_flash_fwd(
        op._pad_seq(q, Tq_pad), op._pad_seq(k, Tk_pad), op._pad_seq(v, Tk_pad), q_seg, kv_seg,
        st))(q, k, v)
    lse = np.asarray(lse)[:, :, :Tq]
    ref = _lse2_oracle(q, k, causal, q_ids, kv_ids)
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(ref))
    assert np.isinf(ref[:, :, :Tq - Tk]).all() and np.isinf(ref[:, :, 20:23]).all()
    fin = np.isfinite(ref)
    np.testing.assert_allclose(lse[fin], ref[fin], rtol=0, atol=64 * EPS32 * np.abs(ref[fin]).max())


# ------------------------------------------------------------------------------ TPU mode, dispatch
def test_runs_in_tpu_interpret_mode(monkeypatch):
    """Every kernel is a pallas_call in TPU interpret mode with VMEM scratch and dimension
    semantics whose innermost axis (the reduction) is "arbitrary"."""
    calls = []
    real = pl.pallas_call

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(pl, "pallas_call", spy)
    q, k, v, _ = make_inputs(0, 1, 32, 32, 2, 1, 64, jnp.float32)
    loss = lambda q, k, v: jnp.sum(flash_attention(q, k, v, causal=True, backend="tpu"))
    jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    assert [c["name"] for c in calls] == ["tpu_flash_attention_fwd",
                                          "tpu_flash_attention_bwd_dkdv",
                                          "tpu_flash_attention_bwd_dq"]
    for c in calls:
        assert isinstance(c["interpret"], pltpu.InterpretParams)
        sem = c["compiler_params"].dimension_semantics
        assert len(sem) == len(c["grid"]) and tuple(sem[-1:]) == ("arbitrary",)
        assert all(type(s).__name__ == "MemoryRef" for s in c["scratch_shapes"])


def test_compiled_tpu_without_tpu_raises():
    if jax.default_backend() == "tpu":
        pytest.skip("checks the no-TPU error path")
    x = jnp.zeros((1, 8, 2, 64), jnp.float32)
    with pytest.raises(RuntimeError, match=r"backend='tpu', interpret=False\) needs a TPU"):
        flash_attention(x, x, x, backend="tpu", interpret=False)


def test_resolve_backend_picks_tpu_on_tpu(monkeypatch):
    bf16 = jnp.bfloat16
    assert tuning.resolve_backend("tpu", interpret=True, dtype=bf16, D=64) == "tpu"
    if jax.default_backend() != "tpu":
        assert tuning.resolve_backend(None, interpret=True, dtype=bf16, D=64) == "triton"
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert tuning.resolve_backend(None, interpret=False, dtype=bf16, D=128) == "tpu"
    assert tuning.resolve_backend(None, interpret=True, dtype=jnp.float32, D=64,
                                  has_segments=True) == "tpu"
    # auto on a (pretend) TPU host dispatches the TPU kernel; interpret=True keeps it on CPU
    q, k, v, _ = make_inputs(0, 1, 32, 32, 1, 1, 64, jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda q, k, v: flash_attention(q, k, v, interpret=True))(q, k, v))
    assert "tpu_flash_attention_fwd" in jaxpr


def test_illegal_compiled_blocks_raise_eagerly(monkeypatch):
    check_tpu_blocks(16, 32, interpret=True)   # fine in interpret mode
    check_tpu_blocks(128, 256, interpret=False)
    with pytest.raises(ValueError, match="block_k to be a multiple of 128"):
        check_tpu_blocks(128, 64, interpret=False)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    x = jnp.zeros((1, 8, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="block_q to be a multiple of 128"):
        flash_attention(x, x, x, backend="tpu", interpret=False, block_q=64)
    # compiled defaults are TPU-legal for short and long sequences
    for T in (8, 200, 4096):
        for c in tuning.tpu_kernel_config(64, T, T, interpret=False):
            assert c.block_q % 128 == 0 and c.block_k % 128 == 0, (T, c)
