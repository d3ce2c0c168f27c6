"""Mosaic GPU (Hopper) FlashAttention forward: Mosaic GPU interpret mode on CPU, compiled on H100.

CPU (no GPU needed):
* values of ``o`` and ``lse2`` from :func:`pallas_kernels.attention.mosaic_fwd.mosaic_flash_fwd` in Mosaic
  GPU interpret mode (simulated SMEM, TMA, barriers, wgmma, three warpgroup threads) against a
  float64 numpy oracle (K/V heads repeated with ``np.repeat``, mask by broadcasting, natural
  log converted to base 2), over a small grid: causal / non-causal, Tq != Tk both ways, GQA,
  ragged lengths (padding masked), rows that see no key, bf16 / fp16, D = 64 / 128, 1-3 SMEM
  slots (the K/V ring wraps around);
* gradients through ``flash_attention(..., backend="mosaic", interpret=True)`` (Mosaic forward
  + Triton-interpret backward) against the float64 oracle of ``tests/test_flash_attention.py``;
* that the compiled variant (P fed to ``wgmma`` from registers, and the SMEM variant the
  interpreter runs) lowers for CUDA: Pallas -> Mosaic GPU layout inference -> NVVM dialect,
  which runs on CPU (PTX generation and the run itself need the GPU);
* the FA3 consumer schedules (``schedule=`` "overlap", "pingpong", "overlap+pingpong"; the
  values test above runs "serial"): values on cases that hit every branch of the rotated loop
  (a query block with no visible key, unmasked and masked steps, ring wrap, 1 slot), the
  interpreter's race detector (``InterpretGPUParams(detect_races=True)``) on every schedule, and
  that the CUDA lowering of the overlapped schedules contains ``wgmma.wait_group 1``. The
  interpreter's barrier simulation is deadlock- and phase-checked (every completed phase of the
  ping-pong "turn" barriers must be observed); its wgmma is synchronous and ignores ``wait_n``,
  so the asynchronous ordering of the overlapped schedules is checked only by reasoning
  (comments in ``attention.mosaic_fwd._consumer_rotated``) and, on a GPU, by the compiled tests;
* that the compiled kernel keeps the running ``o`` in the ``P V`` wgmma accumulator
  (``o_in_acc``: rescaled into it by ``wgmma_accumulator_store``, accumulated in place; no
  ``[64, D]`` float32 add in the jaxpr, ``wgmma_accumulator_store_p`` in the CUDA lowering),
  while interpret mode (which cannot store into an accumulator) runs ``o * alpha + PV``;
* backend selection, the table's schedule column, the ``--tune`` sweep logic of
  ``experiments/bench_attention.py`` (with a stub timer) and the error cases.

GPU (``@pytest.mark.gpu``, and skipped unless the device has compute capability 9.x): the
compiled kernel's values and gradients, and that ``backend=None`` picks it.

Tolerances (relative L2 of ``o`` and of dq/dk/dv against float64 on the same rounded inputs):
bfloat16 1e-2 (observed ~2e-3), float16 2e-3 (observed ~3e-4); ``lse2`` absolute 1e-4 (observed
~1e-6: it is float32 throughout).
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels import flash_attention
from pallas_kernels.attention import tuning
from pallas_kernels.attention.common import AttnStatic
from pallas_kernels.attention.mosaic_common import is_hopper
from pallas_kernels.attention.mosaic_fwd import SCHEDULES, mosaic_flash_fwd
from pallas_kernels.attention.tuning import resolve_backend
from tests.test_flash_attention import make_inputs, oracle, rel_err

O_TOL = {"bfloat16": 1e-2, "float16": 2e-3}
LSE_TOL = 1e-4


hopper_only = pytest.mark.skipif(not is_hopper(),
                                 reason="needs a Hopper GPU (compute capability 9.x)")


def _static(B, Tq, Tk, Hq, Hkv, D, causal, dtype, bk, interpret):
    return AttnStatic(Tq=Tq, Tk=Tk, Tq_pad=-(-Tq // 128) * 128, Tk_pad=-(-Tk // bk) * bk, D=D,
                      group=Hq // Hkv, block_q=128, block_k=bk, causal=causal,
                      has_segments=False, sm_scale=1.0 / np.sqrt(D),
                      dtype=jnp.dtype(dtype).name, interpret=interpret)


def _padded_inputs(st, B, Hq, Hkv, dtype, seed):
    q, k, v, _ = make_inputs(seed, B, st.Tq, st.Tk, Hq, Hkv, st.D, dtype)
    pad = lambda x, T: jnp.pad(x, ((0, 0), (0, T - x.shape[1]), (0, 0), (0, 0)))
    return pad(q, st.Tq_pad), pad(k, st.Tk_pad), pad(v, st.Tk_pad)


def oracle_fwd(q, k, v, st):
    """float64 ``(o [B, Tq, Hq, D], lse2 [B, Hq, Tq])`` from the unpadded inputs."""
    q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
    q, k, v = q[:, :st.Tq], k[:, :st.Tk], v[:, :st.Tk]
    k, v = np.repeat(k, st.group, axis=2), np.repeat(v, st.group, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * st.sm_scale
    vis = np.ones((st.Tq, st.Tk), bool)
    if st.causal:
        vis = np.arange(st.Tk)[None, :] <= np.arange(st.Tq)[:, None] + (st.Tk - st.Tq)
    s = np.where(vis, s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)
    l = e.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", e / np.where(l == 0, 1.0, l), v)
    with np.errstate(divide="ignore"):
        lse2 = (m[..., 0] + np.log(l[..., 0])) / np.log(2.0)
    return o, np.where(l[..., 0] == 0, np.inf, lse2)


def _check_fwd(o, lse, q, k, v, st):
    o_ref, lse_ref = oracle_fwd(q, k, v, st)
    o = np.asarray(jnp.asarray(o, jnp.float32), np.float64)[:, :st.Tq]
    lse = np.asarray(lse, np.float64)[:, :, :st.Tq]
    assert rel_err(o, o_ref) < O_TOL[st.dtype], rel_err(o, o_ref)
    empty = np.isinf(lse_ref)
    np.testing.assert_array_equal(np.isposinf(lse), empty)        # +inf exactly where no key
    np.testing.assert_allclose(lse[~empty], lse_ref[~empty], rtol=0, atol=LSE_TOL)
    rows_empty = empty.transpose(0, 2, 1)                            # [B, Tq, Hq]
    assert np.all(o[rows_empty] == 0.0)                              # rows with no key -> 0


def _fwd_bwd(f, q, k, v, do):
    """``(o, dq, dk, dv)`` of ``f`` in one jitted forward + VJP."""
    @jax.jit
    def run(q, k, v, do):
        o, vjp = jax.vjp(f, q, k, v)
        return (o, *vjp(do))
    return run(q, k, v, do)


# (B, Tq, Tk, Hq, Hkv, D, causal, dtype, block_k, num_slots)
FWD_CASES = [
    (1, 128, 128, 2, 2, 64, False, "bfloat16", 64, 2),     # aligned, one q block, 2 kv blocks
    (1, 256, 320, 2, 1, 64, False, "float16", 64, 2),      # GQA 2:1, Tq != Tk, ring wraps
    (1, 200, 130, 4, 2, 64, True, "bfloat16", 64, 3),      # Tq > Tk: rows with no key; ragged
    (1, 100, 300, 1, 1, 64, True, "float16", 64, 2),       # Tq < Tk causal, ragged q
    (1, 130, 200, 2, 1, 128, True, "bfloat16", 128, 2),    # D=128, bk=128, GQA, ragged both
    (2, 128, 256, 1, 1, 128, False, "float16", 128, 1),    # batch 2, single-slot ring
]


@pytest.mark.parametrize("case", FWD_CASES, ids=lambda c: "-".join(map(str, c)))
def test_mosaic_fwd_interpret_values(case):
    B, Tq, Tk, Hq, Hkv, D, causal, dtype, bk, slots = case
    st = _static(B, Tq, Tk, Hq, Hkv, D, causal, dtype, bk, interpret=True)
    q, k, v = _padded_inputs(st, B, Hq, Hkv, dtype, seed=Tq + Tk + D)
    o, lse = jax.jit(lambda q, k, v: mosaic_flash_fwd(q, k, v, st, interpret=True,
                                                      num_slots=slots))(q, k, v)
    assert o.shape == q.shape and o.dtype == q.dtype
    assert lse.shape == (B, Hq, st.Tq_pad) and lse.dtype == jnp.float32
    _check_fwd(o, lse, q, k, v, st)


ROTATED = [x for x in SCHEDULES if x != "serial"]
SCHED_CASES = [
    # causal, Tq >> Tk: query block 0 sees no key at all (the rotated loop runs one fully
    # masked block), others only masked steps; GQA 2:1; single-slot ring.
    (1, 300, 64, 2, 1, 64, True, "float16", 64, 1),
    # non-causal ragged Tk: 5 key blocks, 4 unmasked steps then 1 masked; ring of 2 wraps; D=128
    (1, 128, 300, 2, 1, 128, False, "bfloat16", 64, 2),
]


@pytest.mark.parametrize("case", SCHED_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("schedule", ROTATED)
def test_mosaic_fwd_schedules_interpret(schedule, case):
    B, Tq, Tk, Hq, Hkv, D, causal, dtype, bk, slots = case
    st = _static(B, Tq, Tk, Hq, Hkv, D, causal, dtype, bk, interpret=True)
    q, k, v = _padded_inputs(st, B, Hq, Hkv, dtype, seed=Tq + Tk + D)
    o, lse = jax.jit(lambda q, k, v: mosaic_flash_fwd(q, k, v, st, interpret=True,
                                                      num_slots=slots, schedule=schedule))(q, k, v)
    _check_fwd(o, lse, q, k, v, st)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_mosaic_fwd_race_detector(schedule):
    """No data race in any schedule, per the interpreter's happens-before race detector (which
    does flag e.g. a consumer storing into its Q tile without waiting for Q's TMA barrier)."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as mgpu_interpret
    st = _static(1, 128, 192, 1, 1, 64, True, "bfloat16", 64, interpret=True)
    q, k, v = _padded_inputs(st, 1, 1, 1, "bfloat16", seed=5)
    o, lse = jax.jit(lambda q, k, v: mosaic_flash_fwd(
        q, k, v, st, interpret=True, num_slots=2, schedule=schedule, detect_races=True))(q, k, v)
    jax.block_until_ready((o, lse))
    assert not mgpu_interpret.get_races().races_found
    _check_fwd(o, lse, q, k, v, st)


def test_flash_attention_uses_table_schedule(monkeypatch):
    """The schedule column of the Mosaic table reaches the kernel (and gives correct values)."""
    monkeypatch.setattr(tuning, "MOSAIC_INTERPRET", (64, 2, "overlap+pingpong"))
    cfg = tuning.mosaic_kernel_config(64, 200, interpret=True)
    assert (cfg.block_k, cfg.num_stages, cfg.schedule) == (64, 2, "overlap+pingpong")
    q, k, v, _ = make_inputs(11, 1, 100, 200, 2, 1, 64, jnp.bfloat16)
    f = lambda q, k, v: flash_attention(q, k, v, causal=True, backend="mosaic", interpret=True)
    # overlap: S_{j+1} is read with one wgmma group (P_j V_j) still in flight
    assert "wait_n=1" in str(jax.make_jaxpr(f)(q, k, v))
    o = jax.jit(f)(q, k, v)
    st = _static(1, 100, 200, 2, 1, 64, True, "bfloat16", 64, interpret=True)
    o_ref, _ = oracle_fwd(q, k, v, st)
    assert rel_err(np.asarray(o, np.float64), o_ref) < O_TOL["bfloat16"]
    monkeypatch.setattr(tuning, "MOSAIC_INTERPRET", (64, 2, "fastest"))
    with pytest.raises(ValueError, match="schedule 'fastest'"):
        tuning.mosaic_kernel_config(64, 200, interpret=True)


def test_table_defaults_serial_until_measured():
    for D, (bk, slots, schedule) in tuning.MOSAIC_TABLE.items():
        assert schedule == "serial", (D, schedule)   # flip only after a GPU measurement
        assert tuning.mosaic_kernel_config(D, 4096, interpret=False).schedule == schedule


def test_bench_tune_mosaic_sweeps_schedules(monkeypatch, capsys):
    """``bench_attention.tune_mosaic`` times every (block_k, slots) x schedule and installs the
    fastest (stub timer: the GPU timing itself needs a Hopper GPU)."""
    from experiments import bench_attention as ba
    fastest = (64, 2, "overlap+pingpong")

    def fake_bench(impl, B, T, H, D, causal, dtype, reps, inner, interpret, fwd_bwd=True):
        assert impl == "mosaic" and not fwd_bwd
        cfg = tuning.MOSAIC_TABLE[D]
        return {"fwd_ms": 1.0 if cfg == fastest else 2.0 + SCHEDULES.index(cfg[2])}

    monkeypatch.setattr(ba, "bench_jax", fake_bench)
    monkeypatch.setitem(tuning.MOSAIC_TABLE, 128, tuning.MOSAIC_TABLE[128])
    recs = []
    ba.tune_mosaic([128], 256, 512, 256, jnp.bfloat16, 1, 1, "cpu", recs)
    want = {(bk, sl, sc) for sc in SCHEDULES for bk, sl in ba.MOSAIC_CANDIDATES[128]}
    assert {tuple(r["config"]) for r in recs} == want
    assert len(recs) == 2 * len(want)                        # causal and non-causal each
    assert tuning.MOSAIC_TABLE[128] == fastest
    assert "schedule pingpong" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown Mosaic schedules"):
        ba.tune_mosaic([128], 256, 512, 256, jnp.bfloat16, 1, 1, "cpu", [], schedules=["fa4"])


@pytest.mark.parametrize("B,Tq,Tk,Hq,Hkv,causal,dtype", [
    (1, 100, 150, 2, 1, True, "bfloat16"),
    (1, 96, 80, 2, 2, False, "float16"),
])
def test_flash_attention_mosaic_interpret_grads(B, Tq, Tk, Hq, Hkv, causal, dtype):
    D = 64
    q, k, v, do = make_inputs(7, B, Tq, Tk, Hq, Hkv, D, dtype)
    f = lambda q, k, v: flash_attention(q, k, v, causal=causal, backend="mosaic", interpret=True)
    jaxpr = str(jax.make_jaxpr(f)(q, k, v))
    assert "mosaic_flash_fwd" in jaxpr and "flash_attention_fwd" not in jaxpr
    bwd = str(jax.make_jaxpr(lambda q, k, v, do: jax.vjp(f, q, k, v)[1](do))(q, k, v, do))
    assert "flash_attention_bwd_dkdv_mosaic" in bwd and "flash_attention_bwd_dq_mosaic" in bwd
    assert not re.search(r"flash_attention_bwd_(dkdv|dq)(?!_mosaic)", bwd)  # no Triton-lowered bwd

    got = _fwd_bwd(f, q, k, v, do)
    want = oracle(q, k, v, do, causal=causal)
    tol = {"bfloat16": 3e-2, "float16": 1e-2}[dtype]  # as tests/test_flash_attention.py
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        assert g.dtype == q.dtype
        assert rel_err(g, w) < tol, (name, rel_err(g, w))


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("D,block_k,slots,causal,p_via_smem", [
    (64, 128, 3, False, False),
    (128, 128, 2, True, False),
    (128, 64, 2, True, True),
])
def test_mosaic_fwd_lowers_for_cuda(D, block_k, slots, causal, p_via_smem, schedule):
    """Compiled path: Pallas -> Mosaic GPU (layout inference) -> NVVM dialect, no GPU needed."""
    st = _static(2, 1000, 1000, 4, 2, D, causal, "bfloat16", block_k, interpret=False)
    q = jax.ShapeDtypeStruct((2, st.Tq_pad, 4, D), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, st.Tk_pad, 2, D), jnp.bfloat16)
    fn = jax.jit(lambda q, k, v: mosaic_flash_fwd(q, k, v, st, interpret=False, num_slots=slots,
                                                  p_via_smem=p_via_smem, schedule=schedule))
    text = fn.trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    # the overlapped schedules await only the older of two wgmma groups (S_{j+1}, not P_j V_j)
    overlapped = "wgmma.wait_group.sync.aligned 1;" in text
    assert overlapped == schedule.startswith("overlap"), schedule
    # compiled default: the running o lives in the P V accumulator (stored into it, rescaled)
    assert "wgmma_accumulator_store_p" in text


def _o_updates(jaxpr_text, D):
    """How many float32 ``[64, D]`` adds (``o * alpha + PV`` in registers) a jaxpr has."""
    return len(re.findall(rf"f32\[64,{D}\] = add ", jaxpr_text))


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("D", [64, 128])
def test_mosaic_fwd_compiled_accumulates_o_in_place(D, schedule):
    """Compiled (``o_in_acc`` default): one ``[64, D]`` float32 accumulator per consumer for
    ``P V``: the running ``o`` is rescaled into the wgmma accumulator
    (``wgmma_accumulator_store``) and the wgmma adds ``P V`` to it in place, so the kernel has
    no ``o * alpha + PV`` add of two ``[64, D]`` register tiles. ``o_in_acc=False`` (what
    interpret mode runs) keeps that add; both lower for CUDA. block_k=64 != D, so a
    ``[64, D]`` add can only be the o update."""
    st = _static(2, 1000, 1000, 4, 2, D, True, "bfloat16", 64, interpret=False)
    q = jax.ShapeDtypeStruct((2, st.Tq_pad, 4, D), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, st.Tk_pad, 2, D), jnp.bfloat16)
    for o_in_acc in (None, False):
        f = lambda q, k, v: mosaic_flash_fwd(q, k, v, st, interpret=False, schedule=schedule,
                                             o_in_acc=o_in_acc)
        jaxpr = str(jax.make_jaxpr(f)(q, k, k))
        text = jax.jit(f).trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text()
        in_place = o_in_acc is None
        assert ("wgmma_accumulator_store" in jaxpr) == in_place, o_in_acc
        assert ("wgmma_accumulator_store_p" in text) == in_place, o_in_acc
        n_pv = 2 if schedule == "serial" else 3    # serial: 2 loops; rotated: 2 loops + tail
        assert _o_updates(jaxpr, D) == (0 if in_place else n_pv), (o_in_acc, schedule)


# ------------------------------------------------------------------------- backend / errors
def test_backend_resolution():
    bf16 = jnp.bfloat16
    assert resolve_backend(None, interpret=True, dtype=bf16, D=128) == "triton"
    assert resolve_backend("triton", interpret=True, dtype=bf16, D=128) == "triton"
    assert resolve_backend("mosaic", interpret=True, dtype=bf16, D=128) == "mosaic"
    # auto never picks mosaic for what it cannot run
    assert resolve_backend(None, interpret=False, dtype=jnp.float32, D=128) == "triton"
    assert resolve_backend(None, interpret=False, dtype=bf16, D=256) == "triton"
    assert resolve_backend(None, interpret=False, dtype=bf16, D=128, has_segments=True) == "triton"
    assert resolve_backend(None, interpret=False, dtype=bf16, D=128, block_q=64) == "triton"
    expect = "mosaic" if (tuning.MOSAIC_AUTO and is_hopper()) else "triton"
    assert resolve_backend(None, interpret=False, dtype=bf16, D=128) == expect


def test_auto_picks_mosaic_only_on_hopper_when_enabled(monkeypatch):
    bf16 = jnp.bfloat16
    monkeypatch.setattr(tuning, "MOSAIC_AUTO", True)
    expect = "mosaic" if is_hopper() else "triton"
    assert resolve_backend(None, interpret=False, dtype=bf16, D=128) == expect
    assert resolve_backend(None, interpret=False, dtype=bf16, D=256) == "triton"
    monkeypatch.setattr(tuning, "MOSAIC_AUTO", False)
    assert resolve_backend(None, interpret=False, dtype=bf16, D=128) == "triton"


def test_auto_in_interpret_mode_uses_triton():
    q, k, v, _ = make_inputs(0, 1, 32, 32, 1, 1, 64, jnp.bfloat16)
    jaxpr = str(jax.make_jaxpr(lambda q, k, v: flash_attention(q, k, v, interpret=True))(q, k, v))
    assert "flash_attention_fwd" in jaxpr and "mosaic_flash_fwd" not in jaxpr


def test_mosaic_errors():
    q, k, v, _ = make_inputs(0, 1, 32, 32, 2, 2, 64, jnp.bfloat16)
    segs = jnp.zeros((1, 32), jnp.int32)
    with pytest.raises(ValueError, match="segment_ids"):
        flash_attention(q, k, v, segment_ids=segs, backend="mosaic", interpret=True)
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    with pytest.raises(ValueError, match="float32"):
        flash_attention(q32, k32, v32, backend="mosaic", interpret=True)
    q2, k2, v2, _ = make_inputs(0, 1, 32, 32, 2, 2, 32, jnp.bfloat16)
    with pytest.raises(ValueError, match="head_dim 32"):
        flash_attention(q2, k2, v2, backend="mosaic", interpret=True)
    with pytest.raises(ValueError, match="block_q=64"):
        flash_attention(q, k, v, block_q=64, backend="mosaic", interpret=True)
    with pytest.raises(ValueError, match="backend must be"):
        flash_attention(q, k, v, backend="cuda", interpret=True)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU-only error")
def test_mosaic_compiled_without_gpu_raises():
    q, k, v, _ = make_inputs(0, 1, 32, 32, 2, 2, 64, jnp.bfloat16)
    with pytest.raises(RuntimeError, match="Hopper"):
        flash_attention(q, k, v, backend="mosaic", interpret=False)


def test_kernel_level_errors():
    st = _static(1, 128, 128, 1, 1, 64, False, "bfloat16", 64, interpret=True)
    q, k, v = _padded_inputs(st, 1, 1, 1, jnp.bfloat16, seed=0)
    with pytest.raises(ValueError, match="registers"):   # interpreter: wgmma operands in SMEM
        mosaic_flash_fwd(q, k, v, st, interpret=True, p_via_smem=False)
    big = _static(1, 128, 128, 1, 1, 128, False, "bfloat16", 128, interpret=False)
    qb, kb, vb = _padded_inputs(big, 1, 1, 1, jnp.bfloat16, seed=0)
    with pytest.raises(ValueError, match="SMEM"):
        mosaic_flash_fwd(qb, kb, vb, big, interpret=False, num_slots=3, p_via_smem=True)
    with pytest.raises(ValueError, match="schedule must be one of"):
        mosaic_flash_fwd(q, k, v, st, interpret=True, schedule="fa3")
    with pytest.raises(ValueError, match="detect_races"):
        mosaic_flash_fwd(qb, kb, vb, big, interpret=False, detect_races=True)
    with pytest.raises(ValueError, match="accumulator"):   # interpreter: no accumulator stores
        mosaic_flash_fwd(q, k, v, st, interpret=True, o_in_acc=True)


# ------------------------------------------------------------------------- GPU (Hopper) only
GPU_FWD_CASES = [
    (2, 1024, 1024, 4, 4, 128, False, "bfloat16", 128, 2),
    (2, 1000, 1100, 4, 2, 128, True, "bfloat16", 128, 2),
    (1, 1000, 700, 4, 1, 64, True, "float16", 128, 3),
    (1, 512, 777, 2, 2, 64, False, "bfloat16", 64, 2),
]


@pytest.mark.gpu
@hopper_only
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("p_via_smem", [False, True], ids=["p_regs", "p_smem"])
@pytest.mark.parametrize("case", GPU_FWD_CASES, ids=lambda c: "-".join(map(str, c)))
def test_mosaic_fwd_compiled_values(case, p_via_smem, schedule):
    B, Tq, Tk, Hq, Hkv, D, causal, dtype, bk, slots = case
    st = _static(B, Tq, Tk, Hq, Hkv, D, causal, dtype, bk, interpret=False)
    q, k, v = _padded_inputs(st, B, Hq, Hkv, dtype, seed=Tq + Tk + D)
    o, lse = jax.jit(lambda q, k, v: mosaic_flash_fwd(
        q, k, v, st, interpret=False, num_slots=slots, p_via_smem=p_via_smem,
        schedule=schedule))(q, k, v)
    _check_fwd(o, lse, q, k, v, st)


@pytest.mark.gpu
@hopper_only
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attention_mosaic_compiled(causal):
    B, Tq, Tk, Hq, Hkv, D, dtype = 2, 700, 900, 4, 2, 128, jnp.bfloat16
    q, k, v, do = make_inputs(3, B, Tq, Tk, Hq, Hkv, D, dtype)
    f = lambda q, k, v: flash_attention(q, k, v, causal=causal, backend="mosaic")
    assert "mosaic_flash_fwd" in str(jax.make_jaxpr(f)(q, k, v))

    got = _fwd_bwd(f, q, k, v, do)
    want = oracle(q, k, v, do, causal=causal)
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        assert rel_err(g, w) < 3e-2, (name, rel_err(g, w))


def test_grid_order_and_compiler_params():
    """Mosaic GPU launches the last grid axis fastest: the forward's grid is (B, Hq, nq), so
    consecutive CTAs are consecutive query blocks of one head; compiled with approx_math, as the
    backward kernels are (and their grids are (B, H, blocks) too)."""
    from pallas_kernels.attention.mosaic_bwd import _mosaic_flash_bwd
    T, D = 512, 64
    st = _static(3, T, T, 5, 5, D, True, "bfloat16", 64, interpret=False)
    q = jax.ShapeDtypeStruct((3, T, 5, D), jnp.bfloat16)
    fwd = str(jax.make_jaxpr(lambda q, k, v: mosaic_flash_fwd(q, k, v, st, interpret=False))(q, q, q))
    assert "grid=(3, 5, 4), grid_names=('b', 'h', 'qb')" in fwd
    assert "approx_math=True" in fwd
    stats = jax.ShapeDtypeStruct((3, 5, T), jnp.float32)
    st_b = dataclasses.replace(st, block_q=64, block_k=128)
    bwd = str(jax.make_jaxpr(lambda *a: _mosaic_flash_bwd(*a, st_b, st, False))(
        q, q, q, q, stats, stats))
    assert "grid=(3, 5, 4), grid_names=('b', 'h', 'kb')" in bwd      # dK/dV: 512 / 128 key blocks
    assert "grid=(3, 5, 4), grid_names=('b', 'h', 'qb')" in bwd      # dQ: 512 / 128 query blocks
    assert bwd.count("approx_math=True") == 2
