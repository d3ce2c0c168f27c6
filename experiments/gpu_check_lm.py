"""LM-kernel parts of the prepared GPU check: ``decode_attention`` and ``linear_attention``.

``experiments/gpu_check.sh`` runs each part in its own subprocess under ``timeout``
(``python3 -m experiments.gpu_check_lm PART --out DIR [--smoke]``). Every part appends one JSON
record per case or measurement to ``DIR/lm_kernels.jsonl`` as soon as it is done (a part cut by
its limit keeps what it finished; a case that fails to compile or run is recorded with its error
and the next case still runs); :func:`summary_lines` makes the tables of ``summary.md``.
``--smoke``: CPU, tiny shapes, Pallas interpret mode, otherwise the same code.

Parts (fresh random inputs on every run, the seed in each record):

* ``decode-correct``: compiled ``decode_attention`` vs ``reference_decode_attention`` in float32
  on the same (rounded) inputs, bfloat16 and float32: ``ragged-gqa`` (B=8, Tq=1, S=4096, Hq=32,
  Hkv=8, D=128, ragged lengths incl. 1 and S), ``tree-mqa`` (B=4, Tq=8, random tree mask with a
  true diagonal, Hkv=1, S=2000: not a block multiple), ``splits1-vs-auto`` (the ragged-gqa shape
  with ``num_splits=1`` and with the auto plan, on the same inputs). The cache beyond each
  row's length is NaN (must never be read into the result).
* ``decode-bench``: Tq=1, S=8192 (lengths = S), Hq=32, Hkv=8, D=128, bf16, B in (1, 8, 32)
  (smoke: B=2): ms per call and effective GB/s (bytes of K+V read for the lengths / time) of
  the kernel (auto plan), ``reference_decode_attention`` jitted and
  ``jax.nn.dot_product_attention`` (``implementation="xla"``) on the cache sliced to the (equal)
  lengths. One jitted program runs each impl over ``N_SETS`` separate caches (past the L2 at
  B=1; one dispatch per ``N_SETS`` calls, so launch-bound small batches are timed on the
  device, not the host); each output is cross-checked against the first impl's.
* ``linear-correct``: ``linear_attention`` forward and forward+backward (o, dq, dk, dv of
  ``sum(o * do)``) vs ``chunked_linear_attention`` in float32 on the same rounded inputs,
  B=4, T=4096, H=8, D=64, chunk 64; bf16 and f32, causal and not.
* ``linear-bench``: bf16 at that shape, causal and not (smoke: causal only): ms fwd and
  fwd+bwd of the kernel, ``chunked_linear_attention`` jitted and ``reference_linear_attention``
  (quadratic; skipped where its ``[B, H, T, T]`` float32 scores would pass ``QUAD_MAX_BYTES``).

Tolerances: relative L2 error ``||x - ref|| / ||ref||`` < 3e-2 (bfloat16), 1e-4 (float32). Both
kernels pin their float32 dots to ``Precision.HIGHEST`` (IEEE float32 in the Triton lowering,
not TF32); a float32 error in the TF32 range (1e-4 .. 3e-3) fails and its note says so: the
tolerance is not loosened.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python experiments/gpu_check_lm.py` from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.gpu_check import FILES, _append_jsonl, _rel  # noqa: E402

TOL = {"bfloat16": 3e-2, "float32": 1e-4}
DTYPES = ("bfloat16", "float32")
# name -> (GPU shape, smoke shape, tree mask, num_splits); shapes (B, Tq, S, Hq, Hkv, D).
_RAGGED = ((8, 1, 4096, 32, 8, 128), (3, 1, 200, 4, 2, 32))
DECODE_CASES = {
    "ragged-gqa": (*_RAGGED, False, None),
    "tree-mqa": ((4, 8, 2000, 8, 1, 128), (2, 4, 100, 2, 1, 32), True, None),
    "splits1-vs-auto": (*_RAGGED, False, 1),
}
DECODE_BENCH = {"gpu": ((1, 8, 32), 8192, 32, 8, 128), "smoke": ((2,), 256, 4, 2, 32)}
N_SETS = {"gpu": 4, "smoke": 2}
# (B, T, H, D, chunk)
LINEAR_SHAPE = {"gpu": (4, 4096, 8, 64, 64), "smoke": (1, 48, 2, 16, 16)}
QUAD_MAX_BYTES = 8 << 30


def _out(a):
    return Path(a.out) / FILES["lm"]


def _emit(a, rec):
    _append_jsonl(_out(a), rec)
    print(json.dumps(rec, default=str))
    sys.stdout.flush()


def _err(e):
    return f"{type(e).__name__}: {str(e)[:600]}"


def _seed():
    return int.from_bytes(os.urandom(4), "little")


def _device():
    import jax
    return jax.devices()[0].device_kind


def _judge(rec, errs, finite, dtype):
    """Fills rel_err / max_rel_err / tol / finite / passed (and a TF32 note for float32)."""
    worst = max(errs.values())
    rec.update(rel_err=errs, max_rel_err=worst, tol=TOL[dtype], finite=finite,
               passed=bool(finite and worst < TOL[dtype]))
    if dtype == "float32" and not rec["passed"] and finite and 1e-4 <= worst < 3e-3:
        rec["note"] = ("float32 error in the TF32 range: the dots were not exact float32 "
                       "despite Precision.HIGHEST")
    return rec["passed"]


def _time_ms(fn, args, reps, per_call=1):
    """Median ms of ``fn(*args)`` (after one warm-up), divided by ``per_call``."""
    import jax
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append((time.perf_counter() - t0) * 1e3 / per_call)
    return statistics.median(ts)


# ---------------------------------------------------------------------------------- decode
def _decode_inputs(seed, B, Tq, S, Hq, Hkv, D, dtype, tree):
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    L = rng.integers(Tq, S + 1, B)
    fixed = [S, Tq, min(S, max(Tq, 65)), S - 1]          # full, minimal, one past a block
    L[:min(B, 4)] = fixed[:min(B, 4)]
    ks = jax.random.split(jax.random.key(seed), 3)
    dt = jnp.dtype(dtype)
    q = jax.random.normal(ks[0], (B, Tq, Hq, D), jnp.float32).astype(dt)
    live = (np.arange(S)[None, :] < L[:, None])[:, :, None, None]
    k, v = (jnp.where(live, jax.random.normal(kk, (B, S, Hkv, D), jnp.float32), jnp.nan)
            .astype(dt) for kk in ks[1:])              # NaN beyond each row's length
    tm = None
    if tree:
        tm = rng.random((B, Tq, Tq)) < 0.5
        tm[:, np.arange(Tq), np.arange(Tq)] = True
        tm = jnp.asarray(tm)
    return q, k, v, jnp.asarray(L, jnp.int32), tm


@functools.lru_cache(maxsize=None)
def _decode_fn(num_splits, interpret):
    import jax

    from pallas_kernels import decode_attention
    return jax.jit(lambda q, k, v, L, tm: decode_attention(
        q, k, v, L, tree_mask=tm, interpret=interpret, num_splits=num_splits))


@functools.lru_cache(maxsize=None)
def _decode_ref():
    import jax

    from pallas_kernels import reference_decode_attention
    return jax.jit(lambda q, k, v, L, tm: reference_decode_attention(q, k, v, L, tree_mask=tm))


def _decode_case(a, name, dtype):
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels.decode.op import decode_plan

    gpu_shape, smoke_shape, tree, ns = DECODE_CASES[name]
    B, Tq, S, Hq, Hkv, D = smoke_shape if a.smoke else gpu_shape
    seed = _seed()
    plan = decode_plan(B, S, Hkv, D, num_splits=ns)
    rec = {"part": "decode-correct", "case": name, "dtype": dtype, "B": B, "Tq": Tq, "S": S,
           "Hq": Hq, "Hkv": Hkv, "D": D, "tree_mask": tree, "num_splits": plan[0],
           "block_k": plan[1], "interpret": a.smoke, "device": _device(), "seed": seed,
           "cache_beyond_lengths": "nan"}
    t0 = time.perf_counter()
    try:
        q, k, v, L, tm = _decode_inputs(seed, B, Tq, S, Hq, Hkv, D, dtype, tree)
        rec["lengths"] = np.asarray(L).tolist()
        o = np.asarray(_decode_fn(ns, a.smoke)(q, k, v, L, tm).astype(jnp.float32))
        rec["seconds"] = time.perf_counter() - t0
        up = lambda x: x.astype(jnp.float32)
        ref = np.asarray(_decode_ref()(up(q), up(k), up(v), L, tm))
        errs = {"o": _rel(o, ref)}
        finite = bool(np.all(np.isfinite(o)))
        if ns is not None:   # the same inputs through the auto plan
            auto = np.asarray(_decode_fn(None, a.smoke)(q, k, v, L, tm).astype(jnp.float32))
            rec["auto_num_splits"] = decode_plan(B, S, Hkv, D)[0]
            errs["o_auto"] = _rel(auto, ref)
            rec["splits1_vs_auto_rel"] = _rel(o, auto)
            finite &= bool(np.all(np.isfinite(auto)))
        _judge(rec, errs, finite, dtype)
    except Exception as e:  # compile or run failure: recorded, the next case still runs
        rec.update(passed=False, error=_err(e), seconds=time.perf_counter() - t0)
    _emit(a, rec)
    return rec["passed"]


def cmd_decode_correct(a):
    ok = [_decode_case(a, name, dtype) for name in DECODE_CASES for dtype in DTYPES]
    return 0 if all(ok) else 1


def cmd_decode_bench(a):
    import jax
    import jax.numpy as jnp

    from pallas_kernels import decode_attention, reference_decode_attention
    from pallas_kernels.decode.op import decode_plan

    mode = "smoke" if a.smoke else "gpu"
    Bs, S, Hq, Hkv, D = DECODE_BENCH[mode]
    n_sets, reps = N_SETS[mode], (2 if a.smoke else 10)
    dt, interp, failed = jnp.bfloat16, a.smoke, False
    impls = {
        "pallas": lambda q, k, v, L: decode_attention(q, k, v, L, interpret=interp),
        "reference": lambda q, k, v, L: reference_decode_attention(q, k, v, L),
        # lengths are all S here: the cache "sliced to the lengths" is the whole cache
        "xla": lambda q, k, v, L: jax.nn.dot_product_attention(q, k, v, implementation="xla"),
    }
    for B in Bs:
        seed = _seed()
        ks = jax.random.split(jax.random.key(seed), 3 * n_sets)
        mk = lambda kk, shape: jax.random.normal(kk, shape, jnp.float32).astype(dt)
        qs = tuple(mk(ks[3 * i], (B, 1, Hq, D)) for i in range(n_sets))
        kc = tuple(mk(ks[3 * i + 1], (B, S, Hkv, D)) for i in range(n_sets))
        vc = tuple(mk(ks[3 * i + 2], (B, S, Hkv, D)) for i in range(n_sets))
        L = jnp.full((B,), S, jnp.int32)
        kv_bytes = 2 * B * S * Hkv * D * jnp.dtype(dt).itemsize    # K + V for the lengths
        first = None
        for impl, fn in impls.items():
            rec = {"part": "decode-bench", "impl": impl, "dtype": "bfloat16", "B": B, "Tq": 1,
                   "S": S, "Hq": Hq, "Hkv": Hkv, "D": D, "lengths": "S", "n_sets": n_sets,
                   "reps": reps, "kv_bytes": kv_bytes, "interpret": interp,
                   "device": _device(), "seed": seed}
            if impl == "pallas":
                rec["num_splits"], rec["block_k"] = decode_plan(B, S, Hkv, D)
            multi = jax.jit(lambda qs, ks, vs, L, fn=fn: [fn(q, k, v, L)
                                                          for q, k, v in zip(qs, ks, vs)])
            t0 = time.perf_counter()
            try:
                outs = jax.block_until_ready(multi(qs, kc, vc, L))
                rec["compile_s"] = time.perf_counter() - t0
                ms = _time_ms(multi, (qs, kc, vc, L), reps, per_call=n_sets)
                o = outs[0].astype(jnp.float32)
                first = first or (impl, o)          # outputs cross-checked against the first
                rec.update(ms=ms, gbps=kv_bytes / (ms * 1e-3) / 1e9,
                           rel_err_vs=first[0], rel_err=_rel(o, first[1]))
            except Exception as e:
                rec.update(ms=None, gbps=None, error=_err(e))
                failed = True
            _emit(a, rec)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------- linear
def _linear_inputs(seed, B, T, H, D, dtype):
    import jax
    import jax.numpy as jnp

    ks = jax.random.split(jax.random.key(seed), 4)
    n = lambda kk: jax.random.normal(kk, (B, T, H, D), jnp.float32)
    fm = lambda x: jax.nn.elu(x) + 1.0                      # non-negative feature map
    dt = jnp.dtype(dtype)
    return fm(n(ks[0])).astype(dt), fm(n(ks[1])).astype(dt), n(ks[2]).astype(dt), \
        n(ks[3]).astype(dt)


def _linear_impl(impl, causal, chunk, interpret):
    from pallas_kernels import linear_attention, reference_linear_attention
    from pallas_kernels.linear import chunked_linear_attention
    if impl == "pallas":
        return lambda q, k, v: linear_attention(q, k, v, causal=causal, chunk_size=chunk,
                                                interpret=interpret)
    if impl == "chunked":
        return lambda q, k, v: chunked_linear_attention(q, k, v, causal=causal,
                                                        chunk_size=chunk)
    return lambda q, k, v: reference_linear_attention(q, k, v, causal=causal)


def _fwd_bwd(f):
    import jax

    def g(q, k, v, do):
        o, vjp = jax.vjp(f, q, k, v)
        return (o, *vjp(do))
    return jax.jit(g)


@functools.lru_cache(maxsize=None)
def _linear_fb(impl, causal, chunk, interpret):
    """Jitted ``(q, k, v, do) -> (o, dq, dk, dv)``, one per configuration (shared compiles)."""
    return _fwd_bwd(_linear_impl(impl, causal, chunk, interpret))


def _linear_case(a, dtype, causal):
    import jax
    import jax.numpy as jnp
    import numpy as np

    B, T, H, D, C = LINEAR_SHAPE["smoke" if a.smoke else "gpu"]
    seed = _seed()
    rec = {"part": "linear-correct", "case": "causal" if causal else "noncausal",
           "dtype": dtype, "B": B, "T": T, "H": H, "D": D, "chunk": C, "causal": causal,
           "interpret": a.smoke, "device": _device(), "seed": seed}
    t0 = time.perf_counter()
    try:
        q, k, v, do = _linear_inputs(seed, B, T, H, D, dtype)
        try:
            got = jax.block_until_ready(_linear_fb("pallas", causal, C, a.smoke)(q, k, v, do))
        except Exception as e:   # is the forward alone sound?
            rec["fwd_bwd_error"] = _err(e)
            kern = _linear_impl("pallas", causal, C, a.smoke)
            got = (jax.block_until_ready(jax.jit(kern)(q, k, v)),)
        rec["seconds"] = time.perf_counter() - t0
        up = lambda x: x.astype(jnp.float32)
        ref = _linear_fb("chunked", causal, C, False)(up(q), up(k), up(v), up(do))
        errs, finite = {}, True
        for name, x, r in zip(("o", "dq", "dk", "dv"), got, ref):
            xf = np.asarray(x.astype(jnp.float32))
            finite &= bool(np.all(np.isfinite(xf)))
            errs[name] = _rel(xf, np.asarray(r))
        _judge(rec, errs, finite, dtype)
        if "fwd_bwd_error" in rec:
            rec.update(passed=False, error="backward: " + rec["fwd_bwd_error"])
    except Exception as e:
        rec.update(passed=False, error=_err(e), seconds=time.perf_counter() - t0)
    _emit(a, rec)
    return rec["passed"]


def cmd_linear_correct(a):
    ok = [_linear_case(a, dtype, causal) for causal in (True, False) for dtype in DTYPES]
    return 0 if all(ok) else 1


def cmd_linear_bench(a):
    import jax

    mode = "smoke" if a.smoke else "gpu"
    B, T, H, D, C = LINEAR_SHAPE[mode]
    n_sets, reps = N_SETS[mode], (1 if a.smoke else 5)
    failed = False
    for causal in ((True,) if a.smoke else (True, False)):   # smoke: linear-correct has both
        seed = _seed()
        sets = [_linear_inputs(seed + i, B, T, H, D, "bfloat16") for i in range(n_sets)]
        for impl in ("pallas", "chunked", "quadratic"):
            rec = {"part": "linear-bench", "impl": impl, "dtype": "bfloat16", "B": B, "T": T,
                   "H": H, "D": D, "chunk": C if impl != "quadratic" else None,
                   "causal": causal, "n_sets": n_sets, "reps": reps, "interpret": a.smoke,
                   "device": _device(), "seed": seed}
            if impl == "quadratic" and B * H * T * T * 4 > QUAD_MAX_BYTES:
                rec.update(fwd_ms=None, fwd_bwd_ms=None,
                           skipped=f"[B, H, T, T] float32 scores > {QUAD_MAX_BYTES >> 30} GiB")
                _emit(a, rec)
                continue
            f = _linear_impl(impl, causal, C, a.smoke)
            for kind, prog, nargs in (("fwd", jax.jit(f), 3), ("fwd_bwd", _fwd_bwd(f), 4)):
                multi = jax.jit(lambda sets, prog=prog, nargs=nargs:
                                [prog(*s[:nargs]) for s in sets])
                t0 = time.perf_counter()
                try:
                    jax.block_until_ready(multi(sets))
                    rec[f"{kind}_compile_s"] = time.perf_counter() - t0
                    rec[f"{kind}_ms"] = _time_ms(multi, (sets,), reps, per_call=n_sets)
                except Exception as e:
                    rec.update({f"{kind}_ms": None, f"{kind}_error": _err(e)})
                    failed = True
            _emit(a, rec)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------- summary
def _f(x, fmt):
    return "-" if x is None else fmt.format(x)


def summary_lines(recs, copy_gbps=None):
    """Markdown tables of the ``lm_kernels.jsonl`` records (``copy_gbps``: the measured
    device-to-device copy, read + write, for the decode bandwidth column)."""
    lines = ["", "| LM kernel check | case | dtype | max rel err | tol | passed | note |",
             "|---|---|---|---|---|---|---|"]
    for r in recs:
        if r.get("part") not in ("decode-correct", "linear-correct"):
            continue
        extra = ""
        if r.get("num_splits") is not None:
            extra = f"splits {r['num_splits']}, block_k {r.get('block_k')}"
        if r.get("splits1_vs_auto_rel") is not None:
            extra += f"; vs auto ({r.get('auto_num_splits')}) {r['splits1_vs_auto_rel']:.1e}"
        note = "; ".join(x for x in (extra, r.get("note", ""), (r.get("error") or "")[:100]) if x)
        lines.append(f"| {r['part']} | {r['case']} | {r['dtype']} | "
                     f"{_f(r.get('max_rel_err'), '{:.2e}')} | {r.get('tol')} | "
                     f"{r.get('passed')} | {note} |")
    lines += ["", "| decode bench (bf16, Tq=1) | impl | B | S | ms | GB/s (K+V) | % of copy | "
              "note |", "|---|---|---|---|---|---|---|---|"]
    for r in recs:
        if r.get("part") != "decode-bench":
            continue
        pct = 100 * r["gbps"] / copy_gbps if r.get("gbps") and copy_gbps else None
        note = (f"splits {r['num_splits']}" if r.get("num_splits") else "") + \
            (f" {r['error'][:80]}" if r.get("error") else "")
        lines.append(f"| decode | {r['impl']} | {r['B']} | {r['S']} | {_f(r.get('ms'), '{:.4f}')}"
                     f" | {_f(r.get('gbps'), '{:.0f}')} | {_f(pct, '{:.0f}')} | {note.strip()} |")
    lines += ["", "| linear bench (bf16) | impl | B,T,H,D | causal | fwd ms | f+b ms | note |",
              "|---|---|---|---|---|---|---|"]
    for r in recs:
        if r.get("part") != "linear-bench":
            continue
        note = r.get("skipped") or (r.get("fwd_error") or r.get("fwd_bwd_error") or "")[:80]
        lines.append(f"| linear | {r['impl']} | {r['B']},{r['T']},{r['H']},{r['D']} | "
                     f"{r['causal']} | {_f(r.get('fwd_ms'), '{:.3f}')} | "
                     f"{_f(r.get('fwd_bwd_ms'), '{:.3f}')} | {note} |")
    return lines


def main(argv=None):
    parts = {"decode-correct": cmd_decode_correct, "decode-bench": cmd_decode_bench,
             "linear-correct": cmd_linear_correct, "linear-bench": cmd_linear_bench}
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="part", required=True)
    for name in parts:
        s = sub.add_parser(name)
        s.add_argument("--out", required=True)
        s.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, interpret mode")
    a = p.parse_args(argv)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    return parts[a.part](a) or 0


if __name__ == "__main__":
    sys.exit(main())
