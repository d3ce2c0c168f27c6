"""Attention benchmark: ms and TFLOP/s of forward and forward+backward, plus memory versus T.

Implementations: ``pallas`` (our Pallas kernels, Triton lowering: ``backend="triton"``), ``mosaic``
(our Hopper forward and backward in Pallas Mosaic GPU, ``backend="mosaic"``; compute capability 9.x
only: elsewhere it is skipped, since Mosaic GPU interpret mode on CPU is a correctness simulator and
far too slow to time), ``triton`` (the jax-triton baseline forward,
``experiments/baselines/jax_triton_fwd.py``; needs the ``jax_triton`` package),
``xla`` (plain-JAX reference), ``cudnn`` (``jax.nn.dot_product_attention(implementation=
"cudnn")``) and ``torch_sdpa`` (PyTorch ``scaled_dot_product_attention``, flash backend). An
implementation that cannot run here is printed as skipped with the reason.

FLOPs (the FlashAttention papers' count): forward ``4 * B * H * Tq * Tk * D``, backward 2.5x
that, forward+backward 3.5x; halved for causal.

Usage::

    python -m experiments.bench_attention                      # GPU: full sweep
    python -m experiments.bench_attention --small              # tiny sizes (default on CPU)
    python -m experiments.bench_attention --json out.jsonl --D 128 --T 4096 8192
    python -m experiments.bench_attention --impls mosaic cudnn --D 128 --tune   # Hopper: sweeps
        # the Mosaic forward's (block_k, slots) x schedule (serial / overlap / pingpong /
        # overlap+pingpong) at T=--tune-T, then benchmarks the best

Shapes: the papers' convention, ``B * T = tokens`` (default 16384) and ``H * D = 2048``.
``peak_bytes``: for JAX impls the compiled forward+backward's ``memory_analysis()`` (arguments +
outputs + temporaries); for torch the increase of ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.attention import tuning
from pallas_kernels.attention.mosaic_common import is_hopper, mosaic_unsupported_reason
from pallas_kernels.attention.mosaic_fwd import SCHEDULES as MOSAIC_SCHEDULES

IMPLS = ("pallas", "mosaic", "triton", "xla", "cudnn", "torch_sdpa")


def attention_flops(B, T, H, D, causal, kind):
    f = 4.0 * B * H * T * T * D
    f *= {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[kind]
    return f / 2 if causal else f


# ------------------------------------------------------------------------------ jax impls
def _jax_fn(impl, causal, interpret):
    from pallas_kernels import flash_attention, reference_attention

    if impl == "pallas":
        return lambda q, k, v: flash_attention(q, k, v, causal=causal, interpret=interpret,
                                               backend="triton")
    if impl == "mosaic":
        return lambda q, k, v: flash_attention(q, k, v, causal=causal, interpret=interpret,
                                               backend="mosaic")
    if impl == "xla":
        return lambda q, k, v: reference_attention(q, k, v, causal=causal)
    if impl == "cudnn":
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                            implementation="cudnn")
    if impl == "triton":
        from experiments.baselines.jax_triton_fwd import triton_flash_forward
        return lambda q, k, v: triton_flash_forward(q, k, v, causal=causal)
    raise ValueError(impl)


def _mosaic_config(D):
    """The Mosaic forward's (block_k, slots, schedule) table entry used for head dim ``D``."""
    return list(tuning.MOSAIC_TABLE[D]) if D in tuning.MOSAIC_TABLE else None


def _skip_reason(impl, on_gpu, D=None, dtype=None):
    if impl in ("triton", "cudnn") and not on_gpu:
        return "needs a CUDA GPU"
    if impl == "mosaic":
        if not is_hopper():
            return ("needs a Hopper GPU (compute capability 9.x); Mosaic GPU interpret mode is "
                    "too slow to time (tests/test_mosaic_attention.py covers it on CPU)")
        why = mosaic_unsupported_reason(dtype, D, False) if D is not None else None
        if why is not None:
            return f"mosaic kernel does not support {why}"
    if impl == "triton":
        try:
            import jax_triton  # noqa: F401
        except Exception as e:  # ImportError or a triton version mismatch
            return f"jax_triton not importable ({type(e).__name__}: {e})"
    if impl == "torch_sdpa":
        try:
            import torch
        except ImportError:
            return "torch not installed"
        if not torch.cuda.is_available():
            return "torch has no CUDA device"
    return None


def _time_jax(f, args, reps, inner):
    """Median ms per call over ``reps`` batches of ``inner`` back-to-back calls."""
    jax.block_until_ready(f(*args))  # compile + warm-up
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = f(*args)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t0) / inner * 1e3)
    return float(np.median(ts))


def _memory_bytes(compiled):
    try:
        m = compiled.memory_analysis()
        return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes)
    except Exception:  # backend without memory analysis
        return None


def bench_jax(impl, B, T, H, D, causal, dtype, reps, inner, interpret, fwd_bwd=True):
    ks = jax.random.split(jax.random.key(T * 7 + D), 4)
    q = jax.random.normal(ks[0], (B, T, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, T, H, D), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, H, D), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (B, T, H, D), jnp.float32).astype(dtype)
    attn = _jax_fn(impl, causal, interpret)
    fwd = jax.jit(attn)
    rec = {"fwd_ms": _time_jax(fwd, (q, k, v), reps, inner)}
    peak = _memory_bytes(fwd.lower(q, k, v).compile())
    if fwd_bwd:
        def fb(q, k, v, do):
            o, vjp = jax.vjp(attn, q, k, v)
            return vjp(do)
        fbj = jax.jit(fb)
        rec["fwd_bwd_ms"] = _time_jax(fbj, (q, k, v, do), reps, inner)
        peak = _memory_bytes(fbj.lower(q, k, v, do).compile())
    rec["peak_bytes"] = peak
    return rec


# ------------------------------------------------------------------------------ torch impl
def bench_torch(B, T, H, D, causal, dtype, reps, inner):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    tdt = {"bfloat16": torch.bfloat16, "float16": torch.float16}[jnp.dtype(dtype).name]
    g = torch.Generator(device="cuda").manual_seed(T)
    mk = lambda: torch.randn(B, H, T, D, device="cuda", dtype=tdt, generator=g)
    q, k, v, do = mk().requires_grad_(), mk().requires_grad_(), mk().requires_grad_(), mk()

    def fwd():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def fb():
        o = fwd()
        return torch.autograd.grad(o, (q, k, v), do)

    def timed(fn):
        fn(); fn(); torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(inner):
                fn()
            b.record(); torch.cuda.synchronize()
            ts.append(a.elapsed_time(b) / inner)
        return float(np.median(ts))

    rec = {"fwd_ms": timed(lambda: fwd())}
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    rec["fwd_bwd_ms"] = timed(fb)
    rec["peak_bytes"] = int(torch.cuda.max_memory_allocated() - base) + 4 * q.numel() * q.element_size()
    return rec


# ------------------------------------------------------------------------------ tuning
FWD_CANDIDATES = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 4)]
BWD_CANDIDATES = [((64, 64, 8, 2), (64, 64, 8, 2)), ((64, 128, 8, 2), (128, 64, 8, 2)),
                  ((32, 128, 4, 3), (128, 32, 4, 3)), ((64, 64, 4, 3), (64, 64, 4, 3))]


def tune(Ds, T, tokens, hidden, dtype, reps, inner, device, out_records):
    """Times the Pallas kernel for each candidate launch config (GPU); installs the best
    (by the sum over causal/non-causal) into the kernel table for the rest of the run."""
    for D in Ds:
        H, B = max(1, hidden // D), max(1, tokens // T)
        orig = tuning.GPU_TABLE[D]
        scores = {}
        for part, cands in (("fwd", FWD_CANDIDATES), ("bwd", BWD_CANDIDATES)):
            for cand in cands:
                tuning.GPU_TABLE[D] = ((cand,) + orig[1:]) if part == "fwd" else (orig[0],) + cand
                tot = 0.0
                for causal in (False, True):
                    try:
                        r = bench_jax("pallas", B, T, H, D, causal, dtype, reps, inner, False,
                                      fwd_bwd=(part == "bwd"))
                        ms = r["fwd_ms"] if part == "fwd" else r["fwd_bwd_ms"] - r["fwd_ms"]
                    except Exception as e:
                        ms = float("inf")
                        print(f"  {part} {cand} failed: {type(e).__name__}: {str(e)[:120]}")
                    tot += ms
                    out_records.append(dict(impl="pallas", section="tune", part=part, config=cand,
                                            D=D, T=T, B=B, H=H, causal=causal, ms=ms,
                                            device=device, dtype=jnp.dtype(dtype).name))
                    print(f"tune D={D} T={T} causal={causal!s:<5} {part} {cand}: {ms:.3f} ms")
                scores[(part, cand)] = tot
            tuning.GPU_TABLE[D] = orig
        best_f = min(FWD_CANDIDATES, key=lambda c: scores[("fwd", c)])
        best_b = min(BWD_CANDIDATES, key=lambda c: scores[("bwd", c)])
        tuning.GPU_TABLE[D] = (best_f,) + best_b
        print(f"tune D={D}: best fwd {best_f}, best bwd (dkdv, dq) {best_b}")


MOSAIC_CANDIDATES = {64: [(64, 2), (64, 3), (128, 2), (128, 3)],
                     128: [(64, 2), (64, 3), (128, 2)]}   # (block_k, K/V SMEM slots)


def mosaic_schedules():
    """The Mosaic GPU forward's consumer schedules ("serial", "overlap", "pingpong", ...)."""
    return MOSAIC_SCHEDULES


def tune_mosaic(Ds, T, tokens, hidden, dtype, reps, inner, device, out_records, schedules=None):
    """Hopper: times the Mosaic GPU forward for each (block_k, slots) candidate x consumer
    schedule (all of ``mosaic_schedules()`` unless ``schedules`` is given) and installs the best
    (sum over causal/non-causal) into its table for the rest of the run."""
    schedules = tuple(schedules or mosaic_schedules())
    bad = [x for x in schedules if x not in mosaic_schedules()]
    if bad:
        raise ValueError(f"unknown Mosaic schedules {bad}; choose from {mosaic_schedules()}")
    for D in Ds:
        if D not in tuning.MOSAIC_TABLE:
            continue
        H, B = max(1, hidden // D), max(1, tokens // T)
        orig, scores = tuning.MOSAIC_TABLE[D], {}
        cands = [(bk, slots, sched) for sched in schedules
                 for bk, slots in MOSAIC_CANDIDATES[D]]
        for cand in cands:
            tuning.MOSAIC_TABLE[D] = cand
            tot = 0.0
            for causal in (False, True):
                try:
                    ms = bench_jax("mosaic", B, T, H, D, causal, dtype, reps, inner, False,
                                   fwd_bwd=False)["fwd_ms"]
                except Exception as e:
                    ms = float("inf")
                    print(f"  mosaic {cand} failed: {type(e).__name__}: {str(e)[:120]}")
                tot += ms
                out_records.append(dict(impl="mosaic", section="tune", part="fwd", config=cand,
                                        D=D, T=T, B=B, H=H, causal=causal, ms=ms,
                                        device=device, dtype=jnp.dtype(dtype).name))
                print(f"tune mosaic D={D} T={T} causal={causal!s:<5} {cand}: {ms:.3f} ms")
            scores[cand] = tot
        best = min(scores, key=scores.get)
        tuning.MOSAIC_TABLE[D] = best if scores[best] < float("inf") else orig
        print(f"tune mosaic D={D}: best (block_k, slots, schedule) {tuning.MOSAIC_TABLE[D]}")
        for sched in schedules:   # best per schedule, to read the schedules' effect directly
            mine = {c: t for c, t in scores.items() if c[2] == sched}
            c = min(mine, key=mine.get)
            print(f"tune mosaic D={D}: schedule {sched:<17} best {c}: {mine[c]:.3f} ms "
                  "(sum causal + non-causal)")


# ------------------------------------------------------------------------------ driver
def measure(impl, B, T, H, D, causal, dtype, reps, inner, interpret, on_gpu, device,
            section="main", skip_reason=None):
    """One benchmark record (ms, TFLOP/s, peak bytes) of ``impl``, or a record that says why it
    was skipped or failed. ``skip_reason`` replaces the default :func:`_skip_reason` check (a
    callable ``(impl) -> str | None``)."""
    rec = dict(impl=impl, dtype=jnp.dtype(dtype).name, B=B, T=T, H=H, D=D, causal=causal,
               device=device, section=section)
    if impl == "mosaic":
        rec["mosaic_config"] = _mosaic_config(D)
    reason = (skip_reason(impl) if skip_reason is not None
              else _skip_reason(impl, on_gpu, D, dtype))
    if reason is None:
        try:
            if impl == "torch_sdpa":
                rec.update(bench_torch(B, T, H, D, causal, dtype, reps, inner))
            else:
                rec.update(bench_jax(impl, B, T, H, D, causal, dtype, reps, inner, interpret,
                                     fwd_bwd=(impl != "triton")))
        except Exception as e:  # OOM, unsupported shape, ...: reported
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            reason = f"failed: {type(e).__name__}: {msg[:160]}"
    if reason is not None:
        rec.update(fwd_ms=None, fwd_bwd_ms=None, peak_bytes=None, skipped=reason)
    rec.setdefault("fwd_bwd_ms", None)
    for kind in ("fwd", "fwd_bwd"):
        ms = rec.get(f"{kind}_ms")
        rec[f"{kind}_tflops"] = (attention_flops(B, T, H, D, causal, kind) / (ms * 1e-3) / 1e12
                                 if ms else None)
    return rec


def run(impls, Ds, Ts, causals, dtype, tokens, hidden, reps, inner, interpret, on_gpu, device,
        out_records, fixed_B=None, fixed_H=None, section="main"):
    for D in Ds:
        H = fixed_H or max(1, hidden // D)
        for T in Ts:
            B = fixed_B or max(1, tokens // T)
            for causal in causals:
                for impl in impls:
                    rec = measure(impl, B, T, H, D, causal, dtype, reps, inner, interpret, on_gpu,
                                  device, section)
                    out_records.append(rec)
                    _print_row(rec)
                    sys.stdout.flush()


class _Records(list):
    """A list that also appends each record as one JSON line to ``path`` (if given), so a run
    cut short keeps what it measured."""

    def __init__(self, path, append=False):
        super().__init__()
        self.path = path
        if path and not append:
            open(path, "w").close()

    def append(self, rec):
        super().append(rec)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")


def _fmt(x, f="{:.3f}"):
    return "-" if x is None else f.format(x)


HEADER = (f"{'impl':<11}{'D':>4}{'T':>7}{'B':>4}{'H':>4} {'causal':<7}{'fwd ms':>9}"
          f"{'TFLOP/s':>9}{'f+b ms':>10}{'TFLOP/s':>9}{'peak MiB':>10}  note")


def _print_row(r):
    print(f"{r['impl']:<11}{r['D']:>4}{r['T']:>7}{r['B']:>4}{r['H']:>4} {str(r['causal']):<7}"
          f"{_fmt(r['fwd_ms']):>9}{_fmt(r['fwd_tflops'], '{:.1f}'):>9}"
          f"{_fmt(r['fwd_bwd_ms']):>10}{_fmt(r['fwd_bwd_tflops'], '{:.1f}'):>9}"
          f"{_fmt(r['peak_bytes'] and r['peak_bytes'] / 2**20, '{:.1f}'):>10}"
          f"  {r.get('skipped', '')}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--D", nargs="+", type=int, default=None)
    p.add_argument("--T", nargs="+", type=int, default=None)
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tokens", type=int, default=16384, help="B * T per measurement")
    p.add_argument("--hidden", type=int, default=2048, help="H * D per measurement")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--inner", type=int, default=None)
    p.add_argument("--small", action="store_true", default=None,
                   help="tiny sizes in interpret mode (default when there is no GPU)")
    p.add_argument("--memory-sweep", action="store_true",
                   help="also sweep T at B=1 to show peak memory O(T) vs O(T^2)")
    p.add_argument("--tune", action="store_true",
                   help="GPU: time candidate block sizes/warps/stages (pallas) and block_k/SMEM "
                        "slots x consumer schedule (mosaic, Hopper) at T=--tune-T first and use "
                        "the best for the rest of the run")
    p.add_argument("--mosaic-schedules", nargs="+", default=None, choices=mosaic_schedules(),
                   help="--tune: the Mosaic forward schedules to sweep (default: all of "
                        "pallas_kernels.attention.mosaic_fwd.SCHEDULES)")
    p.add_argument("--tune-T", type=int, default=4096)
    p.add_argument("--json", default=None, help="write one JSON record per line here")
    a = p.parse_args(argv)

    on_gpu = jax.default_backend() == "gpu"
    small = (not on_gpu) if a.small is None else a.small
    device = jax.devices()[0].device_kind
    dtype = jnp.dtype(a.dtype)
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[a.causal]
    if small:
        Ds, Ts = a.D or [16], a.T or [32, 64]
        tokens, hidden = a.tokens if a.tokens != 16384 else 64, a.hidden if a.hidden != 2048 else 32
        reps, inner, interpret = a.reps or 2, a.inner or 1, not on_gpu
    else:
        Ds, Ts = a.D or [64, 128], a.T or [512, 1024, 2048, 4096, 8192, 16384]
        tokens, hidden = a.tokens, a.hidden
        reps, inner, interpret = a.reps or 5, a.inner or 5, False
    print(f"device: {device}  backend: {jax.default_backend()}  jax {jax.__version__}  "
          f"dtype {dtype.name}  interpret={interpret}")
    records = _Records(a.json)
    if a.tune and on_gpu:
        if "pallas" in a.impls:
            tune(Ds, a.tune_T, tokens, hidden, dtype, reps, inner, device, records)
        if "mosaic" in a.impls and is_hopper():
            tune_mosaic(Ds, a.tune_T, tokens, hidden, dtype, reps, inner, device, records,
                        schedules=a.mosaic_schedules)
    print(HEADER)
    run(a.impls, Ds, Ts, causals, dtype, tokens, hidden, reps, inner, interpret, on_gpu, device,
        records)
    if a.memory_sweep:
        print("\nmemory sweep (B=1, fwd+bwd peak bytes):")
        print(HEADER)
        mem_impls = [i for i in a.impls if i in ("pallas", "mosaic", "xla", "cudnn")]
        run(mem_impls, [Ds[-1]], Ts, (False,), dtype, 0, hidden, 1, 1, interpret, on_gpu,
            device, records, fixed_B=1, section="memory")
    return list(records)


if __name__ == "__main__":
    main()
