"""Side-by-side speed of the Llama LM: JAX (``research.lm``) vs PyTorch (``transformers``), same weights.

Rows (one record each):

* ``train``: tokens/s of one optimiser step on a fixed batch ``[batch, seq]``.
  ``jax``: ``research.train.step.make_train_step`` over ``research.lm.lm_loss`` with
  ``research.train.optim.adamw`` (the whole step jitted once, state donated).
  ``torch_eager`` / ``torch_compile``: the same weights in ``LlamaForCausalLM``
  (``research.lm.hf.to_torch_model``, SDPA attention), next-token cross-entropy,
  ``torch.optim.AdamW(foreach=True)`` with the same hyper-parameters; ``torch_compile`` compiles
  the forward + loss. ``jax_cpu_tuned``: the ``jax`` row with ``scan_layers=False`` and
  ``custom_matmul_vjp=True`` (the XLA:CPU weight-gradient fix of
  ``research.nn.layers.dense_dot_general``). The step-0 losses all agree (recorded as ``loss0``).
* ``decode``: generated tokens/s (``batch * new_tokens / time``) of greedy generation from a prompt
  of ``prompt`` tokens, at batch 1 and 8. ``jax``: ``research.lm.decode.generate`` (one jitted
  program); ``jax_linear``: the same with ``attention="linear"`` (recurrent state instead of a KV
  cache; its own random weights). ``hf_dynamic``: ``model.generate`` with the default dynamic cache.
  ``hf_static_compile``: ``cache_implementation="static"`` with HF's own torch.compile of the
  decode step (``CompileConfig(mode="default")``, enabled on CPU); a failure is recorded as the
  row's ``error``, never skipped.

Method: both frameworks get the same cores (``torch.set_num_threads`` = the cores XLA:CPU uses, the
process's affinity mask, which is ``os.cpu_count()`` on an unrestricted machine); every
implementation is built and warmed up first (compilation excluded, its time recorded as
``compile_s``); then the implementations are timed interleaved (round-robin) for ``--repeats``
rounds of at least ``--target-seconds`` each; the row's number is the median over rounds.
``os.getloadavg()`` is recorded per row (before and after its rounds): on a shared machine the
numbers are only comparable within one run. On an oversubscribed machine (load above the core
count) torch's OpenMP threads spin-wait at every parallel region and a descheduled thread stalls
the rest: 2-thread torch steps then take 3-15x as long as 1-thread ones. ``OMP_WAIT_POLICY=PASSIVE``
in the environment (recorded in each row) or ``--torch-threads 1`` show how much of a gap is that.

Usage:
  python experiments/bench_lm.py                 # default shapes, ~2-4 min on 2 CPU cores
  python experiments/bench_lm.py --quick --json  # tiny shapes, one JSON record per row on stdout
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python experiments/bench_lm.py` from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TRAIN_IMPLS = ("jax", "jax_cpu_tuned", "torch_eager", "torch_compile")
DECODE_IMPLS = ("jax", "jax_linear", "hf_dynamic", "hf_static_compile")
MODELS = {
    "quick": dict(vocab_size=64, dim=32, depth=2, num_heads=4, num_kv_heads=2, mlp_hidden=64, max_len=64),
    "default": dict(vocab_size=512, dim=256, depth=4, num_heads=8, num_kv_heads=4, mlp_hidden=688, max_len=256),
}
SHAPES = {  # train (batch, seq); decode prompt length, new tokens, batch sizes
    "quick": dict(train=(2, 16), prompt=4, new=8, batches=(1, 8)),
    "default": dict(train=(8, 128), prompt=16, new=64, batches=(1, 8)),
}
LR, WD = 1e-3, 0.01


def _load():
    return [round(x, 2) for x in os.getloadavg()]


def _timed(fn, target_s):
    """Runs fn() (returns the work done, e.g. tokens) until target_s has passed; work per second."""
    work, t0 = 0, time.perf_counter()
    while True:
        work += fn()
        dt = time.perf_counter() - t0
        if dt >= target_s:
            return work / dt


def _unstack_blocks(params, depth):
    """scan_layers=True params (blocks stacked on axis 0) -> the unrolled layout (blocks_0, ...)."""
    import jax

    out = {k: v for k, v in params.items() if k != "blocks"}
    for i in range(depth):
        out[f"blocks_{i}"] = jax.tree.map(lambda a, i=i: a[i], params["blocks"])
    return out


def build_train(impl, params, cfg, batch_np):
    """(run_once() -> tokens, info) for one train implementation, warmed up."""
    import numpy as np

    b, t = batch_np.shape
    info = {}
    if impl in ("jax", "jax_cpu_tuned"):
        import jax
        import jax.numpy as jnp

        from research.lm import lm_loss

        if impl == "jax_cpu_tuned":  # blocks unrolled + the CPU-friendly weight-gradient matmul
            cfg = cfg.replace(scan_layers=False, custom_matmul_vjp=True)
            params = _unstack_blocks(params, cfg.depth)
        from research.train.optim import adamw
        from research.train.state import create_train_state
        from research.train.step import make_train_step

        opt = adamw(LR, weight_decay=WD)
        step = make_train_step(lambda p, batch, key: lm_loss(p, cfg, batch), opt)
        state = create_train_state(params, opt, jax.random.key(0), ema=False)
        batch = {"tokens": jnp.asarray(batch_np, jnp.int32), "segment_ids": jnp.ones((b, t), jnp.int32)}
        t0 = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        info["compile_s"] = time.perf_counter() - t0
        holder = {"state": state}

        def once():
            holder["state"], m = compiled(holder["state"], batch)
            jax.block_until_ready(m["loss"])
            return b * t

        holder["state"], m = compiled(holder["state"], batch)
        info["loss0"] = float(m["loss"])
        return once, info

    import torch

    from research.lm.hf import to_torch_model

    model = to_torch_model(params, cfg, attn_implementation="sdpa").train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, eps=1e-8, foreach=True)
    x = torch.from_numpy(np.asarray(batch_np, np.int64))

    def loss_fn(x):
        logits = model(x).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                 x[:, 1:].reshape(-1))

    loss_impl = torch.compile(loss_fn) if impl == "torch_compile" else loss_fn

    def once():
        opt.zero_grad(set_to_none=True)
        loss = loss_impl(x)
        loss.backward()
        opt.step()
        return b * t

    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = loss_impl(x)  # the first call compiles (torch_compile); errors propagate to the row
    info["loss0"] = loss.item()
    loss.backward()
    opt.step()
    if impl == "torch_compile":
        info["compile_s"] = time.perf_counter() - t0
    once()
    return once, info


def build_decode(impl, params, cfg, prompts_np, new):
    """(run_once() -> generated tokens, info) for one decode implementation, warmed up."""
    import numpy as np

    b, p = prompts_np.shape
    info = {}
    if impl in ("jax", "jax_linear"):
        import jax
        import jax.numpy as jnp

        from research.lm import init_params
        from research.lm.decode import generate

        if impl == "jax_linear":  # the same shapes with linear attention (O(1) state, no KV cache)
            cfg = cfg.replace(attention="linear", num_kv_heads=cfg.num_heads)
            params = init_params(cfg, jax.random.key(1))

        prompts, lengths = jnp.asarray(prompts_np, jnp.int32), jnp.full((b,), p, jnp.int32)
        run = lambda: generate(params, cfg, prompts, lengths, max_new_tokens=new,  # noqa: E731
                               key=jax.random.key(0))
        t0 = time.perf_counter()
        out = jax.block_until_ready(run())
        info["compile_s"] = time.perf_counter() - t0

        def once():
            jax.block_until_ready(run())
            return b * new
    else:
        import torch
        from transformers import CompileConfig

        from research.lm.hf import to_torch_model

        model = to_torch_model(params, cfg, attn_implementation="sdpa")
        x = torch.from_numpy(np.asarray(prompts_np, np.int64))
        kw = dict(attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new, min_new_tokens=new,
                  pad_token_id=0)
        if impl == "hf_static_compile":
            cc = CompileConfig(mode="default", fullgraph=False)
            cc._compile_all_devices = True  # HF's switch for compiling generate's decode step on CPU
            kw.update(cache_implementation="static", compile_config=cc)

        def run():
            with torch.no_grad():
                return model.generate(x, **kw)

        t0 = time.perf_counter()
        out = run()
        if impl == "hf_static_compile":
            info["compile_s"] = time.perf_counter() - t0
            if getattr(model, "_compiled_call", None) is None:  # generate fell back to eager
                raise RuntimeError("generate did not compile the decode step (no model._compiled_call)")
        out = out.numpy()

        def once():
            run()
            return b * new
    if tuple(out.shape) != (b, p + new):
        raise RuntimeError(f"{impl} produced shape {tuple(out.shape)}, expected {(b, p + new)}")
    once()
    return once, info


def _measure(kind, builders, *, repeats, target_s, base, log):
    """Builds (warm-up) every implementation, then times them round-robin; one record each."""
    runners, records = {}, {}
    for impl, build in builders.items():
        rec = dict(base, kind=kind, impl=impl, tokens_per_s=None, tokens_per_s_repeats=[], error=None)
        t0 = time.perf_counter()
        try:
            runners[impl], info = build()
            rec.update(info)
            log(f"  [{kind} {base.get('batch')}] {impl}: built + warmed up in {time.perf_counter() - t0:.1f}s")
        except Exception as e:  # recorded in the row, not skipped
            rec["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"
            log(f"  [{kind} {base.get('batch')}] {impl}: error: {rec['error']}")
        records[impl] = rec
    load_before = _load()
    for _ in range(repeats):
        for impl, once in runners.items():
            records[impl]["tokens_per_s_repeats"].append(_timed(once, target_s))
    load_after = _load()
    for impl in runners:
        r = records[impl]
        r["tokens_per_s"] = statistics.median(r["tokens_per_s_repeats"])
    for r in records.values():
        r["loadavg_before"], r["loadavg_after"] = load_before, load_after
    return list(records.values())


def run(args, log=lambda m: print(m, file=sys.stderr, flush=True)) -> list[dict]:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import numpy as np
    import torch
    import transformers

    from research.lm import LMConfig, init_params

    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(args.torch_threads or cores)
    size = "quick" if args.quick else "default"
    cfg = LMConfig(**MODELS[size], rope_theta=10000.0, init_std=0.02)
    params = init_params(cfg, jax.random.key(args.seed))
    shapes = dict(SHAPES[size])
    if args.prompt:
        shapes["prompt"] = args.prompt
    if args.new:
        shapes["new"] = args.new
    if shapes["prompt"] + shapes["new"] > cfg.max_len:
        cfg = cfg.replace(max_len=shapes["prompt"] + shapes["new"])
    rng = np.random.default_rng(args.seed)
    common = dict(model=MODELS[size], cores=cores, os_cpu_count=os.cpu_count(),
                  torch_threads=torch.get_num_threads(), jax=jax.__version__, torch=torch.__version__,
                  transformers=transformers.__version__, device=f"{jax.default_backend()}",
                  omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"))
    log(f"bench_lm ({size}): {MODELS[size]}; {cores} cores, torch threads {torch.get_num_threads()}; "
        f"load average {_load()}")
    records = []
    if "train" in args.kinds:
        b, t = shapes["train"]
        batch = rng.integers(0, cfg.vocab_size, (b, t))
        builders = {i: (lambda i=i: build_train(i, params, cfg, batch)) for i in args.train_impls}
        records += _measure("train", builders, repeats=args.repeats, target_s=args.target_seconds,
                            base=dict(common, batch=b, seq=t), log=log)
    if "decode" in args.kinds:
        for b in shapes["batches"]:
            prompts = rng.integers(0, cfg.vocab_size, (b, shapes["prompt"]))
            builders = {i: (lambda i=i: build_decode(i, params, cfg, prompts, shapes["new"]))
                        for i in args.decode_impls}
            records += _measure("decode", builders, repeats=args.repeats, target_s=args.target_seconds,
                                base=dict(common, batch=b, prompt=shapes["prompt"], new_tokens=shapes["new"]),
                                log=log)
    return records


def format_table(records: list[dict]) -> str:
    lines = ["| kind | impl | batch | shape | tokens/s (median) | rounds | compile s | note |",
             "|---|---|---:|---|---:|---:|---:|---|"]
    for r in records:
        shape = f"seq {r['seq']}" if r["kind"] == "train" else f"prompt {r['prompt']} + {r['new_tokens']} new"
        tps = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] is not None else "-"
        comp = f"{r['compile_s']:.1f}" if r.get("compile_s") is not None else ""
        note = f"error: {r['error']}" if r["error"] else (f"loss0 {r['loss0']:.5f}" if "loss0" in r else "")
        lines.append(f"| {r['kind']} | {r['impl']} | {r['batch']} | {shape} | {tps} | "
                     f"{len(r['tokens_per_s_repeats'])} | {comp} | {note} |")
    if records:
        r = records[-1]
        lines.append(f"\nload average (1, 5, 15 min): before {records[0]['loadavg_before']}, after "
                     f"{r['loadavg_after']}; {r['cores']} cores, torch threads {r['torch_threads']}, "
                     f"OMP_WAIT_POLICY={r['omp_wait_policy']}; "
                     f"jax {r['jax']}, torch {r['torch']}, transformers {r['transformers']}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    p.add_argument("--json", action="store_true", help="one JSON record per row on stdout (table on stderr)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 5; --quick 2)")
    p.add_argument("--target-seconds", type=float, default=None, help="minimum time per round (default 1.5)")
    p.add_argument("--kinds", default="train,decode", help="comma list of train, decode")
    p.add_argument("--train-impls", default=",".join(TRAIN_IMPLS))
    p.add_argument("--decode-impls", default=",".join(DECODE_IMPLS))
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads (default: the cores XLA uses, for equal threads)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", type=int, default=None, help="decode prompt length (default 16; --quick 4)")
    p.add_argument("--new", type=int, default=None, help="decode new tokens (default 64; --quick 8)")
    args = p.parse_args(argv)
    args.kinds = tuple(k for k in args.kinds.split(",") if k)
    args.train_impls = tuple(k for k in args.train_impls.split(",") if k)
    args.decode_impls = tuple(k for k in args.decode_impls.split(",") if k)
    for name, got, allowed in (("kinds", args.kinds, ("train", "decode")), ("train-impls", args.train_impls,
                               TRAIN_IMPLS), ("decode-impls", args.decode_impls, DECODE_IMPLS)):
        if not got or set(got) - set(allowed):
            p.error(f"--{name} must be a comma list of {allowed}, got {','.join(got)!r}")
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.target_seconds = args.target_seconds or (0.1 if args.quick else 1.5)
    if args.repeats < 1 or args.target_seconds <= 0 or (args.torch_threads is not None and args.torch_threads < 1):
        p.error("--repeats and --torch-threads must be >= 1 and --target-seconds > 0")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    records = run(args)
    if args.json:
        for r in records:
            print(json.dumps(r), flush=True)
        print(format_table(records), file=sys.stderr)
    else:
        print(format_table(records))
    return records


if __name__ == "__main__":
    main()
