"""Side-by-side speed of one DiT rectified-flow train step: JAX (jitted) vs PyTorch eager vs torch.compile.

The same model (``research.nn.dit.DiT`` / ``torch_baselines.dit.DiT``), batch, loss (rectified flow,
logit-normal t, label dropout 0.1), optimiser (global-norm clip 1.0 -> AdamW with warmup-cosine and
the decay mask) and EMA on every side:

* ``jax``: ``research.train.step.make_train_step`` (the whole step jitted once, state donated),
  AOT-compiled; bf16 compute (``DiT(dtype=bfloat16)``, float32 params) on GPU.
* ``torch_eager``: ``torch_baselines`` model + ``torch.optim.AdamW`` (foreach on CPU, fused on CUDA);
  ``torch.autocast(bfloat16)`` on GPU.
* ``torch_compile``: the same with the loss (model forward + loss) under ``torch.compile``.

Each implementation is warmed up (compilation included), then the implementations are timed
interleaved (jax, eager, compile, jax, eager, ...) for ``--repeats`` rounds; steps/s is the median.
Peak memory: JAX from XLA's buffer assignment of the compiled step (arguments + outputs - donated
aliases + temporaries); torch as the bytes its tensors hold between steps (params, grads, AdamW
state, EMA, batch) plus the largest transient growth during one step (CUDA allocator peak on GPU,
the profiler's allocation events on CPU). Runtime allocator peaks are added where available.

Usage:
  python experiments/bench_train_step.py                       # CPU, small configs
  python3 experiments/bench_train_step.py --gpu --json $OUT/train_step.json   # GPU, bf16, MFU
  python experiments/bench_train_step.py --configs cpu-small --impls jax,torch_eager --repeats 3
  python experiments/bench_train_step.py --cpu-cores 1 --torch-threads 1   # equal cores: both on one core
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

from experiments.bench_measure import (
    _device_name, _torch_threads, _xla_threads, gemm_shape, measure_gemm, timed,
)
from experiments.bench_profile import _parse_hlo, classify_hlo_op, format_profile, profile_breakdown, scope_of  # noqa: F401
from research.runs.host import malloc_keep_freed_memory, pin_cpu_cores

if __package__ in (None, ""):  # `python experiments/bench_train_step.py` from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IMPLS = ("jax", "torch_eager", "torch_compile")
# opt-in JAX variants (--impls), each timed interleaved with the others for an in-process A/B against
# `jax`; the value overrides build_jax's arguments:
#   jax_autodiff_dense: Flax's plain Dense matmul (autodiff weight gradients), i.e. without
#     research.nn.layers.dense_dot_general -- the state before the CPU fix
#   jax_scanned / jax_unscanned: DiT(scan_blocks=True / False) whatever --jax-scan-blocks says
#   jax_scan_loop: scanned blocks as a while loop, nn.scan(unroll=1): the bench's `jax` before 2026-12-02
#   jax_unroll2 / jax_unroll_full: scanned blocks with nn.scan(unroll=2 / depth) (same param layout;
#     unroll=depth is the `jax` default since 2026-12-02, --jax-scan-unroll)
#   jax_flatten_adam: clip + Adam moments on one flat vector (optax.flatten), decay mask per leaf
JAX_VARIANTS: dict[str, dict] = {
    "jax_autodiff_dense": dict(plain_dense=True),
    "jax_scanned": dict(scan_blocks=True),
    "jax_unscanned": dict(scan_blocks=False),
    "jax_scan_loop": dict(scan_blocks=True, scan_unroll=1),
    "jax_unroll2": dict(scan_blocks=True, scan_unroll=2),
    "jax_unroll_full": dict(scan_blocks=True, scan_unroll="full"),
    "jax_flatten_adam": dict(flatten_adam=True),
}
EXTRA_IMPLS = tuple(JAX_VARIANTS)
TARGET_EAGER, TARGET_COMPILE, TARGET_ROOFLINE = 1.3, 1.1, 1.5
# set for --cpu-cores 1 unless --xla-flags / XLA_FLAGS name it: with one core XLA's thunk executor cannot run
# thunks concurrently, and the concurrency-optimized schedule only costs memory and CPU there (cpu-medium,
# 2026-12-02: -8 % CPU time per step, -15 % peak memory)
SINGLE_CORE_XLA_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
H100_BF16_DENSE_FLOPS = 989e12

# name -> (DiT kwargs, batch size). cpu-small has the digits' shape (8x8x1, 16 tokens) at hidden 128,
# batch 64 (the flagship config itself uses hidden 64, batch 128).
PRESETS: dict[str, tuple[dict, int]] = {
    "tiny": (dict(input_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=2), 8),
    "cpu-small": (dict(input_size=8, in_channels=1, patch_size=2, hidden_size=128, depth=4, num_heads=4), 64),
    "cpu-medium": (dict(input_size=16, in_channels=4, patch_size=2, hidden_size=256, depth=6, num_heads=4), 32),
    # DiT-B/2 on a 32x32x4 latent (256 tokens) and DiT-L/2
    "gpu-base": (dict(input_size=32, in_channels=4, patch_size=2, hidden_size=768, depth=12, num_heads=12), 128),
    "gpu-large": (dict(input_size=32, in_channels=4, patch_size=2, hidden_size=1024, depth=24, num_heads=16), 64),
}
DEFAULT_CPU = ("cpu-small", "cpu-medium")
DEFAULT_GPU = ("cpu-small", "gpu-base")

HPARAMS = dict(learning_rate=1e-4, warmup_steps=10, total_steps=100_000, weight_decay=0.01, clip_norm=1.0)
EMA_DECAY = 0.999
CLASS_DROPOUT = 0.1
NUM_CLASSES = 10


def count_flops(model_kw: dict, batch: int, *, mlp_ratio: float = 4.0, freq_dim: int = 256) -> dict[str, float]:
    """Matmul FLOPs (2 per multiply-add) of the DiT: forward, and a train step (3x forward).

    Counted: patch embedding, timestep MLP, per block adaLN, qkv, q k^T, p v, out projection, MLP,
    final adaLN and output projection. Elementwise work (norms, softmax, GELU, AdamW) is not
    counted (the usual MFU convention).
    """
    s, c, p = model_kw["input_size"], model_kw["in_channels"], model_kw["patch_size"]
    d, depth = model_kw["hidden_size"], model_kw["depth"]
    n = (s // p) ** 2
    pp = p * p * c
    m = int(d * mlp_ratio)
    per_block = 2 * batch * (d * 6 * d + n * d * 3 * d + 2 * n * n * d + n * d * d + 2 * n * d * m)
    fwd = 2 * batch * (n * pp * d + freq_dim * d + d * d + d * 2 * d + n * d * pp) + depth * per_block
    return {"forward": float(fwd), "train_step": float(3 * fwd)}


# ----------------------------------------------------------------------------------------------
# implementations: each returns a Runner(run(n) -> None (blocking), peak_bytes(), info)
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Runner:
    impl: str
    run: Callable[[int], None]          # run n steps and wait for them to finish
    peak_bytes: Callable[[], dict]      # {"peak_bytes": int, ...extra}
    info: dict


def make_flat_adam_optimizer(*, learning_rate: float, warmup_steps: int, total_steps: int, weight_decay: float,
                             clip_norm: float = 1.0):
    """``research.train.optim.make_optimizer`` (default decay mask) with the global-norm clip and the
    Adam moments computed on one flat vector (``optax.flatten``): one fused elementwise pass instead of
    one per leaf. The decayed-weight mask and the recorded learning rate stay per leaf, so updates are
    the same up to float32 rounding (tests/test_bench_train_step.py)."""
    import optax

    from research.train import optim

    schedule = optim.warmup_cosine_schedule(learning_rate, warmup_steps=warmup_steps, total_steps=total_steps)
    return optax.chain(
        optax.flatten(optax.chain(optax.clip_by_global_norm(clip_norm), optax.scale_by_adam())),
        optax.add_decayed_weights(weight_decay, mask=optim.default_decay_mask),
        optim.scale_by_learning_rate_recorded(schedule))


def build_jax(model_kw: dict, batch: int, *, gpu: bool, attn_impl: str, seed: int, scan_blocks: bool = True,
              plain_dense: bool = False, scan_unroll: int | str = 1, flatten_adam: bool = False,
              impl: str | None = None) -> Runner:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from research.generative.losses import rectified_flow_loss
    from research.nn.dit import DiT, init_dit, make_model_fn
    from research.train.optim import make_optimizer
    from research.train.state import create_train_state
    from research.train.step import make_train_step

    dtype = jnp.bfloat16 if gpu else jnp.float32
    # jax: DiT(custom_matmul_vjp=True), the Dense weight-gradient fix for XLA:CPU (a no-op on GPU);
    # jax_autodiff_dense: Flax's plain Dense (autodiff of lax.dot_general), for the before/after.
    unroll = model_kw["depth"] if scan_unroll == "full" else int(scan_unroll)
    model = DiT(**model_kw, num_classes=NUM_CLASSES, class_dropout_prob=CLASS_DROPOUT, attn_impl=attn_impl,
                dtype=dtype, scan_blocks=scan_blocks, custom_matmul_vjp=not plain_dense, scan_unroll=unroll)
    k_init, k_state = jax.random.split(jax.random.key(seed))
    params = jax.jit(lambda k: init_dit(model, k))(k_init)
    model_fn = make_model_fn(model)

    def loss_fn(p, b, key):
        return rectified_flow_loss(model_fn, p, b["x"], key, cond=b["y"])

    opt = make_flat_adam_optimizer(**HPARAMS) if flatten_adam else make_optimizer(**HPARAMS)
    state = create_train_state(params, opt, k_state, ema=True)
    rng = np.random.default_rng(seed)
    s, c = model_kw["input_size"], model_kw["in_channels"]
    b = {"x": jax.device_put(rng.standard_normal((batch, s, s, c)).astype(np.float32)),
         "y": jax.device_put(rng.integers(0, NUM_CLASSES, batch).astype(np.int32))}
    step = make_train_step(loss_fn, opt, ema_decay=EMA_DECAY, donate=True)
    t0 = time.perf_counter()
    compiled = step.lower(state, b).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    static_peak = None
    if mem is not None:
        static_peak = int(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                          + mem.temp_size_in_bytes)
    holder = {"state": state}

    def run(n):
        st = holder["state"]
        for _ in range(n):
            st, _metrics = compiled(st, b)
        jax.block_until_ready(st)
        holder["state"] = st

    def peak():
        out = {"peak_bytes": static_peak, "peak_method": "xla_buffer_assignment"}
        stats = jax.devices()[0].memory_stats()
        if stats and "peak_bytes_in_use" in stats:
            out["peak_bytes_runtime"] = int(stats["peak_bytes_in_use"])
        return out

    # (XLA's cost_analysis is not used for FLOPs: it counts a scanned block's body once, not depth times)
    info = {"compile_s": compile_s, "dtype": "bfloat16" if gpu else "float32",
            "attn_impl": attn_impl, "scan_blocks": scan_blocks, "jax_backend": jax.default_backend(),
            "dense_matmul": "lax.dot_general (autodiff)" if plain_dense else "dense_dot_general",
            "scan_unroll": unroll if scan_blocks else None,
            "optimizer": "flatten(clip+adam)+mask+lr" if flatten_adam else "clip+adamw (per leaf)"}
    info["compiled"] = compiled  # for --profile (dropped from the records)
    return Runner(impl or ("jax_autodiff_dense" if plain_dense else "jax"), run, peak, info)


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def build_torch(model_kw: dict, batch: int, *, gpu: bool, compile: bool, seed: int) -> Runner:
    import numpy as np
    import torch

    from experiments.torch_baselines import flow
    from experiments.torch_baselines.dit import DiT
    from experiments.torch_baselines.optim import make_optimizer, train_step

    device = torch.device("cuda" if gpu else "cpu")
    torch.manual_seed(seed)
    model = DiT(**model_kw, num_classes=NUM_CLASSES, class_dropout_prob=CLASS_DROPOUT).to(device)
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    hp = {k: v for k, v in HPARAMS.items() if k != "clip_norm"}
    opt, sched = make_optimizer(model, **hp, fused=True if gpu else None)
    rng = np.random.default_rng(seed)
    s, c = model_kw["input_size"], model_kw["in_channels"]
    x = torch.from_numpy(rng.standard_normal((batch, s, s, c)).astype(np.float32)).to(device)
    y = torch.from_numpy(rng.integers(0, NUM_CLASSES, batch).astype(np.int64)).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)

    def loss_from_noise(x0, yy, t, eps, drop):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            return flow.rectified_flow_loss(model, x0, yy, t=t, eps=eps, train=False, force_drop_ids=drop)

    loss_impl = torch.compile(loss_from_noise) if compile else loss_from_noise

    def loss_fn():
        t, eps, drop = flow.draw_training_noise(x, generator=gen, class_dropout_prob=CLASS_DROPOUT)
        return loss_impl(x, y, t, eps, drop)

    def one():
        return train_step(loss_fn, params, opt, sched, clip_norm=HPARAMS["clip_norm"], ema_params=ema,
                          ema_decay=EMA_DECAY)

    def sync():
        if gpu:
            torch.cuda.synchronize()

    compile_s = None
    if compile:  # the first call compiles; errors propagate to the caller (reported in the table)
        t0 = time.perf_counter()
        one()
        sync()
        compile_s = time.perf_counter() - t0

    def run(n):
        for _ in range(n):
            one()
        sync()

    def resident():
        state_tensors = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
        return _tensor_bytes(params + [p.grad for p in params] + ema + state_tensors + [x, y]
                             + list(model.buffers()))

    def peak():
        res = resident()
        if gpu:
            sync()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            one()
            sync()
            transient = torch.cuda.max_memory_allocated() - base
            method = "resident_tensors+cuda_allocator_peak"
        else:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                one()
            events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                            if e.name() == "[memory]")
            cur = transient = 0
            for _, nb in events:
                cur += nb
                transient = max(transient, cur)
            method = "resident_tensors+profiler_alloc_peak"
        return {"peak_bytes": int(res + transient), "peak_method": method, "resident_bytes": int(res)}

    info = {"compile_s": compile_s, "dtype": "bfloat16-autocast" if gpu else "float32",
            "torch_threads": torch.get_num_threads(), "attn_impl": "sdpa",
            "optimizer": "AdamW(fused)" if gpu else "AdamW(foreach)"}
    return Runner("torch_compile" if compile else "torch_eager", run, peak, info)


# ----------------------------------------------------------------------------------------------
def _peak_flops(device: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if "H100" in device or "H200" in device:
        return H100_BF16_DENSE_FLOPS
    return None


def _framework(impl: str) -> str:
    return "torch" if impl.startswith("torch") else "jax"


def bench_config(name: str, impls, *, gpu: bool, repeats: int, target_s: float, attn_impl: str, seed: int,
                 device: str, peak_flops: float | None, scan_blocks: bool = True, scan_unroll: int | str = 1,
                 log=print,
                 gemm: bool = True, profile: str | None = None, profile_steps: int = 2) -> list[dict]:
    model_kw, batch = PRESETS[name]
    flops = count_flops(model_kw, batch)
    runners: dict[str, Runner] = {}
    errors: dict[str, str] = {}
    for impl in impls:
        t0 = time.perf_counter()
        try:
            if impl == "jax" or impl in JAX_VARIANTS:
                kw = {"scan_blocks": scan_blocks, "scan_unroll": scan_unroll, **JAX_VARIANTS.get(impl, {})}
                r = build_jax(model_kw, batch, gpu=gpu, attn_impl=attn_impl, seed=seed, impl=impl, **kw)
            else:
                r = build_torch(model_kw, batch, gpu=gpu, compile=impl == "torch_compile", seed=seed)
            r.run(2)  # warm-up
            runners[impl] = r
            log(f"  [{name}] {impl}: built + warmed up in {time.perf_counter() - t0:.1f}s")
        except Exception as e:  # reported in the table and the JSON, never silently dropped
            errors[impl] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
            log(f"  [{name}] {impl}: FAILED: {errors[impl]}")
    # steps per repeat from one timed step each, so a repeat lasts about target_s
    n_steps = {}
    for impl, r in runners.items():
        t0 = time.perf_counter()
        r.run(1)
        dt = time.perf_counter() - t0
        n_steps[impl] = max(2, min(1000, int(math.ceil(target_s / max(dt, 1e-6)))))
    times: dict[str, list[float]] = {impl: [] for impl in runners}
    usage: dict[str, list[dict]] = {impl: [] for impl in runners}
    for _ in range(repeats):  # interleaved
        for impl, r in runners.items():
            u = timed(lambda: r.run(n_steps[impl]))
            times[impl].append(n_steps[impl] / u["wall"])
            usage[impl].append({k: v / n_steps[impl] for k, v in u.items()})  # per step
    gemm_rates = None
    if gemm and not gpu and runners:
        gemm_rates = measure_gemm(*gemm_shape(model_kw, batch))
        log(f"  [{name}] f32 GEMM {gemm_rates['shape']}: jax {gemm_rates['jax_gflops']:.1f} GFLOP/s "
            f"({gemm_rates['jax_gflops_cpu']:.1f} per CPU-s), torch {gemm_rates['torch_gflops']:.1f} "
            f"({gemm_rates['torch_gflops_cpu']:.1f})")
    records = []
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    cfg = {"name": name, "model": model_kw, "batch_size": batch, "precision": "bf16" if gpu else "fp32",
           "torch_threads": _torch_threads(), "xla_cpu_threads": None if gpu else _xla_threads(),
           "cpu_cores": len(os.sched_getaffinity(0)), "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "load_average": os.getloadavg()[0], "load_average_1_5_15": list(os.getloadavg()),
           "gemm": gemm_rates}
    for impl in impls:
        rec = {"impl": impl, "device": device, "config": cfg, "steps_per_s": None, "peak_bytes": None,
               "date": date, "model_flops_per_step": flops["train_step"]}
        if impl in runners:
            r = runners[impl]
            sps = statistics.median(times[impl])
            cpu = [u["cpu"] for u in usage[impl]]
            rec.update(steps_per_s=sps, ms_per_step=1000.0 / sps, steps_per_s_repeats=times[impl],
                       steps_per_repeat=n_steps[impl],
                       cpu_s_per_step=statistics.median(cpu), cpu_s_per_step_repeats=cpu,
                       nvcsw_per_step=statistics.median(u["nvcsw"] for u in usage[impl]),
                       nivcsw_per_step=statistics.median(u["nivcsw"] for u in usage[impl]),
                       sys_s_per_step=statistics.median(u["sys"] for u in usage[impl]),
                       minflt_per_step=statistics.median(u["minflt"] for u in usage[impl]),
                       **{k: v for k, v in r.info.items() if k != "compiled"})
            if gemm_rates:  # the step against its matmul roofline at the framework's own GEMM rate
                fw = _framework(impl)
                rec["roofline_s"] = flops["train_step"] / (gemm_rates[f"{fw}_gflops"] * 1e9)
                rec["x_roofline"] = (1.0 / sps) / rec["roofline_s"]
                rec["x_roofline_cpu"] = rec["cpu_s_per_step"] / (
                    flops["train_step"] / (gemm_rates[f"{fw}_gflops_cpu"] * 1e9))
            rec.update(r.peak_bytes())
            rec["achieved_tflops"] = flops["train_step"] * sps / 1e12
            rec["mfu"] = flops["train_step"] * sps / peak_flops if peak_flops else None
            if profile and _framework(impl) == "jax":
                rec["profile"] = profile_breakdown(r, profile_steps, os.path.join(profile, f"{name}_{impl}"))
        else:
            rec["error"] = errors[impl]
        records.append(rec)
    return records


def paired_ratio(a: dict | None, b: dict | None) -> float | None:
    """Median over rounds of ``a``'s steps/s over ``b``'s in the same round (None if either failed)."""
    if not a or not b or not a.get("steps_per_s") or not b.get("steps_per_s"):
        return None
    return statistics.median(x / y for x, y in zip(a["steps_per_s_repeats"], b["steps_per_s_repeats"]))


def paired_cpu_ratio(a: dict | None, b: dict | None) -> float | None:
    """Median over rounds of ``b``'s CPU-seconds per step over ``a``'s (> 1: ``a`` needs less CPU)."""
    if not a or not b or not a.get("cpu_s_per_step_repeats") or not b.get("cpu_s_per_step_repeats"):
        return None
    return statistics.median(y / x for x, y in zip(a["cpu_s_per_step_repeats"], b["cpu_s_per_step_repeats"]))


def format_table(records: list[dict]) -> str:
    def mib(b):
        return f"{b / 2**20:.1f}" if b else "-"

    def num(x, fmt):
        return format(x, fmt) if x is not None else "-"

    lines = ["| config | impl | steps/s | ms/step | CPU ms/step (sys) | vol / invol csw per step | page faults "
             "per step | peak MiB | TFLOP/s | x roofline (wall / CPU) | MFU | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r.get("error"):
            lines.append(f"| {r['config']['name']} | {r['impl']} | - | - | - | - | - | - | - | - | - | "
                         f"error: {r['error']} |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        note = f"compile {r['compile_s']:.1f}s" if r.get("compile_s") else ""
        cpu_ms = 1000 * r["cpu_s_per_step"] if r.get("cpu_s_per_step") is not None else None
        roof = "-"
        if r.get("x_roofline"):
            ok = "ok" if r["x_roofline_cpu"] <= TARGET_ROOFLINE else "ABOVE"
            roof = f"{r['x_roofline']:.2f} / {r['x_roofline_cpu']:.2f} {ok}"
        csw = (f"{r['nvcsw_per_step']:.0f} / {r['nivcsw_per_step']:.1f}" if r.get("nvcsw_per_step") is not None
               else "-")
        sys_ms = 1000 * r["sys_s_per_step"] if r.get("sys_s_per_step") is not None else None
        lines.append(f"| {r['config']['name']} | {r['impl']} | {r['steps_per_s']:.2f} | {r['ms_per_step']:.1f} | "
                     f"{num(cpu_ms, '.1f')} ({num(sys_ms, '.1f')}) | {csw} | {num(r.get('minflt_per_step'), '.0f')} | "
                     f"{mib(r['peak_bytes'])} | {r['achieved_tflops']:.3g} | "
                     f"{roof} | {mfu} | {note} |")
    by_cfg: dict[str, dict[str, Any]] = {}
    for r in records:
        by_cfg.setdefault(r["config"]["name"], {})[r["impl"]] = r
    extras = [i for i in EXTRA_IMPLS if any(r["impl"] == i for r in records)]
    lines += ["", "Ratios (jax / other; > 1: jax faster): median over the interleaved rounds of the per-round ratio "
              "of steps/s (the rounds of one impl and the next run back to back, so they share the machine's load); "
              "in brackets the same ratio of CPU-seconds per step (other / jax), less sensitive to other processes "
              f"on a pinned core. Targets: eager >= {TARGET_EAGER}, compile >= {TARGET_COMPILE}; roofline: step "
              f"CPU time within {TARGET_ROOFLINE}x of counted FLOPs / the same-run GEMM rate.", "",
              f"| config | load avg (1/5/15) | GEMM GFLOP/s jax / torch | jax / torch_eager | jax / torch_compile |"
              + "".join(f" jax / {e} |" for e in extras),
              "|---|---|---|---|---|" + "---|" * len(extras)]
    for name, d in by_cfg.items():
        def ratio(other, target=None):
            p = paired_ratio(d.get("jax"), d.get(other))
            if p is None:
                return "-"
            c = paired_cpu_ratio(d.get("jax"), d.get(other))
            return (f"{p:.2f}x" + ("" if target is None else f" {'ok' if p >= target else 'BELOW'}")
                    + (f" ({c:.2f}x)" if c is not None else ""))
        cfg = next(iter(d.values()))["config"]
        load = "/".join(f"{x:.1f}" for x in cfg.get("load_average_1_5_15") or [cfg.get("load_average", 0)])
        g = cfg.get("gemm")
        gtxt = f"{g['jax_gflops']:.1f} / {g['torch_gflops']:.1f}" if g else "-"
        lines.append(f"| {name} | {load} | {gtxt} | {ratio('torch_eager', TARGET_EAGER)} | "
                     f"{ratio('torch_compile', TARGET_COMPILE)} |" + "".join(f" {ratio(e)} |" for e in extras))
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="run on CUDA (bf16); automatic when torch sees a GPU")
    p.add_argument("--cpu", action="store_true", help="force CPU even when a GPU is present")
    p.add_argument("--configs", default=None, help=f"comma-separated presets from {sorted(PRESETS)}")
    p.add_argument("--impls", default=",".join(IMPLS),
                   help=f"comma-separated subset of {IMPLS + EXTRA_IMPLS} (default: {','.join(IMPLS)})")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds; steps/s is the median")
    p.add_argument("--target-seconds", type=float, default=None, help="length of one timed repeat per impl")
    p.add_argument("--attn-impl", default=None, help="JAX attention impl (default xla; cudnn on GPU if available)")
    p.add_argument("--peak-tflops", type=float, default=None, help="accelerator peak for MFU (H100/H200: 989)")
    p.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--jax-scan-blocks", type=int, choices=(0, 1), default=1,
                   help="JAX DiT scan_blocks (1, the flagship default: nn.scan over blocks; 0: unrolled)")
    p.add_argument("--jax-scan-unroll", default=None, choices=("1", "2", "full"),
                   help="with scanned blocks: nn.scan(unroll=...) of the jax impl (default: full on CPU -- the "
                        "scan's stacked parameter layout without the loop's per-step slicing, measured 20-29 %% "
                        "less CPU time; 1 on GPU; 1 = a while loop, the CPU default before 2026-12-02)")
    p.add_argument("--xla-single-thread", action="store_true",
                   help="CPU: --xla_cpu_multi_thread_eigen=false (Eigen kernels on one thread; XLA's YNNPACK "
                        "dots and concurrent thunks still use one thread per core: use --cpu-cores for equal cores)")
    p.add_argument("--cpu-cores", type=int, default=None,
                   help="pin the whole process (JAX and torch) to this many cores, e.g. 1 with --torch-threads 1 "
                        "for an equal-resources comparison")
    p.add_argument("--xla-flags", default="",
                   help="extra XLA flags (appended to XLA_FLAGS before JAX starts; process-wide, so A/B them in "
                        "separate invocations)")
    p.add_argument("--no-gemm", action="store_true", help="CPU: skip the same-run GEMM rate (roofline column)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after timing, trace --profile-steps steps of the jax impl(s) with jax.profiler into DIR "
                        "and print the split of XLA's thunk time by kind (matmul, loop fusion, copy, ...)")
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--malloc", choices=("reuse", "default"), default="reuse",
                   help="CPU: 'reuse' (default) keeps freed memory in glibc's heap (malloc_keep_freed_memory: no "
                        "per-step page faults of XLA's temporaries); 'default' leaves glibc's malloc as it is")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the records (one per impl and config) to this file")
    args = p.parse_args(argv)
    impls = tuple(i.strip() for i in args.impls.split(",") if i.strip())
    bad = [i for i in impls if i not in IMPLS + EXTRA_IMPLS]
    if bad or not impls:
        p.error(f"unknown impls {bad}; choose from {IMPLS + EXTRA_IMPLS}")
    if args.configs is not None:
        cfgs = tuple(c.strip() for c in args.configs.split(",") if c.strip())
        bad = [c for c in cfgs if c not in PRESETS]
        if bad or not cfgs:
            p.error(f"unknown configs {bad}; choose from {sorted(PRESETS)}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.cpu_cores is not None and not 1 <= args.cpu_cores <= len(os.sched_getaffinity(0)):
        p.error(f"--cpu-cores must be between 1 and {len(os.sched_getaffinity(0))} (the cores this process may use)")
    args.impls = impls
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    malloc = "default"
    if args.malloc == "reuse" and not args.gpu:  # before torch and JAX start their threads (CPU runs)
        malloc = "reuse" if malloc_keep_freed_memory() else "default (mallopt failed)"
    if args.cpu_cores is not None:  # before torch and JAX start their thread pools
        pin_cpu_cores(args.cpu_cores)
    import torch

    if args.gpu and args.cpu:
        raise SystemExit("--gpu and --cpu are exclusive")
    gpu = (args.gpu or torch.cuda.is_available()) and not args.cpu
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu given but torch sees no CUDA device")
    if gpu:  # JAX and torch share the GPU: no 75 % preallocation by JAX
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    else:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    extra_flags = args.xla_flags.split() + (["--xla_cpu_multi_thread_eigen=false"] if args.xla_single_thread else [])
    if (args.cpu_cores == 1 and not args.gpu and SINGLE_CORE_XLA_FLAG.split("=")[0] not in
            " ".join(extra_flags + os.environ.get("XLA_FLAGS", "").split())):
        extra_flags.append(SINGLE_CORE_XLA_FLAG)
    if extra_flags:
        if "jax" in sys.modules and not all(f in os.environ.get("XLA_FLAGS", "").split() for f in extra_flags):
            raise SystemExit("--xla-flags / --xla-single-thread must be set before JAX is imported "
                             "(run the script directly)")
        os.environ["XLA_FLAGS"] = " ".join(os.environ.get("XLA_FLAGS", "").split()
                                           + [f for f in extra_flags if f not in os.environ.get("XLA_FLAGS", "")])
    import jax

    if gpu and jax.default_backend() != "gpu":
        raise SystemExit(f"--gpu: torch sees CUDA but JAX's backend is {jax.default_backend()!r} "
                         "(install jax[cuda13], see requirements-gpu.txt)")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    attn_impl = args.attn_impl
    if attn_impl is None:
        from research.nn.attention import IMPLS as ATTN_IMPLS

        attn_impl = "cudnn" if gpu and "cudnn" in ATTN_IMPLS else "xla"
    configs = tuple(args.configs.split(",")) if args.configs else (DEFAULT_GPU if gpu else DEFAULT_CPU)
    unroll_arg = args.jax_scan_unroll or ("1" if gpu else "full")
    scan_unroll = unroll_arg if unroll_arg == "full" else int(unroll_arg)
    target_s = args.target_seconds or (1.0 if gpu else 3.0)
    device = _device_name(gpu)
    peak_flops = _peak_flops(device, args.peak_tflops) if gpu else None
    print(f"device: {device}; jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"(threads {torch.get_num_threads()}); process on {len(os.sched_getaffinity(0))} core(s)"
          f"{' (--cpu-cores)' if args.cpu_cores else ''}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; attention: jax {attn_impl}, torch sdpa; "
          f"malloc: {malloc}; load average {os.getloadavg()[0]:.1f}")
    records = []
    for name in configs:
        print(f"config {name}: {PRESETS[name][0]} batch {PRESETS[name][1]}", flush=True)
        records += bench_config(name, args.impls, gpu=gpu, repeats=args.repeats, target_s=target_s,
                                attn_impl=attn_impl, seed=args.seed, device=device, peak_flops=peak_flops,
                                scan_blocks=bool(args.jax_scan_blocks),
                                scan_unroll=scan_unroll, log=lambda m: print(m, flush=True),
                                gemm=not args.no_gemm, profile=args.profile, profile_steps=args.profile_steps)
        for r in records:
            r["config"].setdefault("malloc", malloc)
    print()
    la = os.getloadavg()
    print(f"load average (1/5/15 min) at the end: {la[0]:.1f} / {la[1]:.1f} / {la[2]:.1f} on "
          f"{os.cpu_count()} cores; process on {len(os.sched_getaffinity(0))}")
    print(format_table(records))
    for r in records:
        if r.get("profile"):
            print()
            print(format_profile(r["profile"], f"{r['config']['name']} {r['impl']}"))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1, default=str)
        print(f"wrote {args.json}")
    return records


if __name__ == "__main__":
    main()
