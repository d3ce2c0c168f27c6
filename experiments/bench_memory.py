"""Activation memory and step time of the DiT train step per remat policy.

For every (depth, width, policy) the full train step (rectified-flow loss, AdamW, EMA) is
compiled ahead of time; ``compile().memory_analysis().temp_size_in_bytes`` is the peak scratch
memory XLA plans for the step (activations kept for the backward pass plus temporaries; params,
optimiser state and the batch are arguments, not temps). Step time is the median wall time of
the executed steps after one warm-up, timed round-robin over the policies (``--rounds`` rounds of
``--steps`` steps) so that changes in machine load hit every policy alike.

Usage (CPU defaults finish in a few minutes)::

    python -m experiments.bench_memory                       # depths 4,12; widths 64,128
    python -m experiments.bench_memory --depths 12 --widths 128 --json docs/benchmarks/remat.json
    python -m experiments.bench_memory --no-scan              # unrolled blocks, for comparison

Target (issue 5): for a 12-block DiT, ``full`` remat uses >= 3x less temp memory than ``none`` at
<= 35% more step time. ``--json PATH`` writes one record per row with keys ``policy``, ``depth``,
``width``, ``temp_bytes``, ``step_ms`` (plus the run's settings).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from research.generative.losses import rectified_flow_loss
from research.nn.dit import DiT, init_dit, make_model_fn
from research.train.optim import adamw
from research.train.state import create_train_state
from research.train.step import make_train_step

DEFAULT_POLICIES = ("none", "dots_saveable", "dots_with_no_batch_dims_saveable",
                    "save_names:attn_out,mlp_hidden", "full")


def build_step(*, depth: int, width: int, policy: str, batch_size: int, input_size: int,
               patch_size: int, num_heads: int, scan_blocks: bool = True, precision=None,
               dtype=jnp.float32, seed: int = 0):
    """(jitted step, state, batch) for a DiT of the given size and remat policy."""
    model = DiT(input_size=input_size, in_channels=1, patch_size=patch_size, hidden_size=width,
                depth=depth, num_heads=num_heads, remat_policy=policy, scan_blocks=scan_blocks,
                dtype=dtype)
    model_fn = make_model_fn(model)

    def loss_fn(params, batch, key):
        return rectified_flow_loss(model_fn, params, batch["x"], key, cond=batch["y"])

    opt = adamw(1e-4)
    key = jax.random.key(seed)
    params = init_dit(model, key)
    state = create_train_state(params, opt, jax.random.fold_in(key, 1), ema=True)
    rng = np.random.default_rng(seed)
    batch = {"x": rng.standard_normal((batch_size, input_size, input_size, 1)).astype(np.float32),
             "y": rng.integers(0, 10, size=batch_size).astype(np.int32)}
    step = make_train_step(loss_fn, opt, ema_decay=0.999, precision=precision)
    return step, state, batch


def measure(*, depth: int, width: int, policies=DEFAULT_POLICIES, batch_size: int = 16,
            input_size: int = 16, patch_size: int = 2, num_heads: int = 4, steps: int = 5,
            rounds: int = 3, scan_blocks: bool = True, precision=None,
            dtype=jnp.float32) -> list[dict]:
    """Rows for one (depth, width): compiled temp bytes and median step time (ms) per policy.

    All policies are compiled first, then timed round-robin (``rounds`` rounds of ``steps``
    steps each), so a change in machine load affects every policy alike.
    """
    runs = {}
    for policy in policies:
        step, state, batch = build_step(depth=depth, width=width, policy=policy,
                                        batch_size=batch_size, input_size=input_size,
                                        patch_size=patch_size, num_heads=num_heads,
                                        scan_blocks=scan_blocks, precision=precision, dtype=dtype)
        t0 = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        temp = int(mem.temp_size_in_bytes) if mem is not None else -1
        state, m = compiled(state, batch)  # warm-up
        jax.block_until_ready(m)
        runs[policy] = dict(compiled=compiled, state=state, batch=batch, temp=temp,
                            compile_s=compile_s, times=[], loss=float(m["loss"]))
    for _ in range(rounds):
        for policy, r in runs.items():
            for _ in range(steps):
                t0 = time.perf_counter()
                r["state"], m = r["compiled"](r["state"], r["batch"])
                jax.block_until_ready(m)
                r["times"].append((time.perf_counter() - t0) * 1e3)
    return [{"policy": policy, "depth": depth, "width": width, "temp_bytes": r["temp"],
             "step_ms": statistics.median(r["times"]), "compile_s": round(r["compile_s"], 2),
             "batch_size": batch_size, "tokens": (input_size // patch_size) ** 2,
             "scan_blocks": scan_blocks, "backend": jax.default_backend(), "loss": r["loss"]}
            for policy, r in runs.items()]


def _fmt_bytes(n):
    return f"{n / 2**20:8.2f} MiB"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depths", default="4,12", help="comma-separated block counts")
    ap.add_argument("--widths", default="64,128", help="comma-separated hidden sizes")
    ap.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                    help="policies separated by ';' or ',' (save_names:a,b is kept whole if "
                         "separated by ';')")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--input-size", type=int, default=16)
    ap.add_argument("--patch-size", type=int, default=2)
    ap.add_argument("--num-heads", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per policy and round")
    ap.add_argument("--rounds", type=int, default=3, help="round-robin timing rounds (median)")
    ap.add_argument("--no-scan", action="store_true", help="unrolled blocks instead of nn.scan")
    ap.add_argument("--precision", default=None, help="precision policy, e.g. bf16")
    ap.add_argument("--json", default=None, help="write one JSON record per row to this file")
    args = ap.parse_args(argv)

    if ";" in args.policies:
        policies = [p for p in args.policies.split(";") if p]
    else:  # re-join "save_names:a,b" pieces split by the comma
        policies = []
        for p in args.policies.split(","):
            if policies and policies[-1].startswith("save_names:") and ":" not in p and p not in \
                    ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"):
                policies[-1] += "," + p
            elif p:
                policies.append(p)
    depths = [int(d) for d in args.depths.split(",")]
    widths = [int(w) for w in args.widths.split(",")]
    dtype = jnp.float32
    if args.precision is not None:
        from research.train.precision import get_policy
        dtype = get_policy(args.precision).compute_dtype

    rows = []
    print(f"backend={jax.default_backend()} batch={args.batch_size} tokens="
          f"{(args.input_size // args.patch_size) ** 2} scan_blocks={not args.no_scan}")
    print(f"{'depth':>5} {'width':>5} {'policy':<34} {'temp':>12} {'vs none':>8} {'step_ms':>9} {'vs none':>8}")
    for depth in depths:
        for width in widths:
            group = measure(depth=depth, width=width, policies=policies, batch_size=args.batch_size,
                            input_size=args.input_size, patch_size=args.patch_size,
                            num_heads=args.num_heads, steps=args.steps, rounds=args.rounds,
                            scan_blocks=not args.no_scan, precision=args.precision, dtype=dtype)
            base = next((r for r in group if r["policy"] == "none"), None)
            for r in group:
                r["precision"] = args.precision or "fp32"
                rows.append(r)
                mem_ratio = f"{base['temp_bytes'] / r['temp_bytes']:7.2f}x" if base else "      -"
                time_ratio = f"{r['step_ms'] / base['step_ms']:7.2f}x" if base else "      -"
                print(f"{depth:>5} {width:>5} {r['policy']:<34} {_fmt_bytes(r['temp_bytes'])} "
                      f"{mem_ratio} {r['step_ms']:9.1f} {time_ratio}", flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(f"wrote {len(rows)} records to {args.json}")
    return rows


if __name__ == "__main__":
    main()
