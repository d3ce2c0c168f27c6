"""Python side of the prepared GPU check (``experiments/gpu_check.sh`` runs each part in its own
subprocess under ``timeout``; ``--smoke`` runs the same code on CPU at tiny sizes, interpret mode).

Parts (``python3 -m experiments.gpu_check PART --out DIR [--smoke] ...``), each writing one of
the result files in ``DIR``:

* ``device``: device / library info and the measured ceilings (bf16 matmul TFLOP/s through
  torch and JAX on random data, device-to-device copy GB/s counting bytes read + written)
  -> ``device.json``.
* ``correct --case NAME``: the Mosaic GPU kernels (``flash_attention(backend="mosaic")``,
  forward and backward; or one FA3 forward schedule) against ``reference_attention`` in float32
  on the same rounded inputs, fresh random inputs per run -> one line of ``correctness.jsonl``.
* ``ptxas --dump DIR``: compiles the Mosaic kernels with ``MOSAIC_GPU_DUMP_TO`` /
  ``MOSAIC_GPU_DUMP_PTXAS`` / ``MOSAIC_GPU_DUMP_SASS`` and collects registers, spills and a
  SASS instruction census (HGMMA, LDL/STL) -> ``ptxas.txt`` (says so where unobtainable).
* ``bench --impl NAME --T N``: attention ms / TFLOP/s, causal and not, forward and
  forward+backward (``experiments.bench_attention.measure``) -> lines of ``attention.jsonl``.
* ``merge-train FILES``: the DiT train-step records of ``bench_train_step.py`` -> one
  ``train_step.json``.
* ``summary``: the short tables of everything above (and ``steps.tsv``) -> ``summary.md``.

The LM kernels (``decode_attention``, ``linear_attention``: correctness and timings) have their
own parts in :mod:`experiments.gpu_check_lm` -> ``lm_kernels.jsonl``, tabulated here too.
``steps.tsv`` is removed from ``DIR`` by ``gpu_check.sh`` once ``summary.md`` holds its table
(appended to ``log.txt``): the device tool returns at most 8 files.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python experiments/gpu_check.py` from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FILES = {"device": "device.json", "correctness": "correctness.jsonl", "ptxas": "ptxas.txt",
         "attention": "attention.jsonl", "lm": "lm_kernels.jsonl", "train": "train_step.json",
         "steps": "steps.tsv", "log": "log.txt", "summary": "summary.md"}   # steps.tsv: see above

# name -> (GPU shape, CPU-smoke shape, causal, dtype, schedule); shapes (B, Tq, Tk, Hq, Hkv, D).
# schedule None: flash_attention's Mosaic forward + backward with the table's schedule; else that
# FA3 forward schedule only.
_RAGGED_GQA = ((1, 1000, 1100, 8, 2, 128), (1, 100, 150, 2, 1, 64))
CASES = {
    "fwdbwd-gqa-causal-ragged": (*_RAGGED_GQA, True, "bfloat16", None),
    "fwdbwd-noncausal": ((2, 1024, 1024, 4, 4, 128), (1, 128, 128, 1, 1, 64), False, "bfloat16",
                         None),
    "fwdbwd-d64-mqa-causal-ragged-f16": ((2, 777, 777, 4, 1, 64), (1, 70, 70, 2, 1, 64), True,
                                         "float16", None),
    **{f"fwd-{s}": (*_RAGGED_GQA, True, "bfloat16", s)
       for s in ("overlap", "pingpong", "overlap+pingpong")},
}
# relative L2 error against the float32 reference on the same (rounded) inputs
TOL = {"bfloat16": 3e-2, "float16": 1e-2}


def _append_jsonl(path, rec):
    with open(path, "a") as f:
        f.write(json.dumps(rec, default=str) + "\n")


def _median_ms(fn, sync, reps):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


# ---------------------------------------------------------------------------------- device
def _nvidia_smi():
    if not shutil.which("nvidia-smi"):
        return None
    q = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi failed: {e}"
    return dict(zip(q.split(","), (x.strip() for x in out.split(",")))) if out else None


def _torch_ceilings(smoke):
    import torch
    cuda = torch.cuda.is_available() and not smoke
    dev = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    n = 8192 if cuda else 256
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)    # random data, never zeros
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync()
    reps = 10 if cuda else 3
    if cuda:
        ts = []
        for _ in range(reps):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            a @ b
            e1.record()
            e1.synchronize()
            ts.append(e0.elapsed_time(e1))
        mm_ms = statistics.median(ts)
    else:
        mm_ms = _median_ms(lambda: a @ b, sync, reps)
    nbytes = (2 << 30) if cuda else (16 << 20)                 # 2 GiB: far past the 60 MB L2
    src = torch.randint(0, 255, (nbytes,), device=dev, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync()
    cp_ms = _median_ms(lambda: dst.copy_(src), sync, reps)
    ok = bool(torch.equal(dst[:4096], src[:4096]))
    info = {"torch": torch.__version__, "torch_device": torch.cuda.get_device_name() if cuda
            else "cpu"}
    if cuda:
        p = torch.cuda.get_device_properties(0)
        info.update(sm_count=p.multi_processor_count, total_memory_bytes=p.total_memory,
                    capability=f"{p.major}.{p.minor}",
                    l2_cache_bytes=getattr(p, "L2_cache_size", None))
    return info, {"torch_matmul_bf16": {"n": n, "ms": mm_ms, "tflops": 2 * n ** 3 / mm_ms / 1e9},
                  "torch_copy": {"bytes": nbytes, "ms": cp_ms, "copied_ok": ok,
                                 "gbps_read_plus_write": 2 * nbytes / cp_ms / 1e6}}


def _jax_ceiling(smoke):
    import jax
    import jax.numpy as jnp
    n = 256 if smoke else 8192
    ka, kb = jax.random.split(jax.random.key(int.from_bytes(os.urandom(4), "little")))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(mm(a, b))
    holder = {}

    def call():
        holder["o"] = mm(a, b)

    ms = _median_ms(call, lambda: jax.block_until_ready(holder["o"]), 3 if smoke else 10)
    dev = jax.devices()[0]
    info = {"jax": jax.__version__, "jax_backend": jax.default_backend(),
            "jax_device": dev.device_kind,
            "jax_compute_capability": getattr(dev, "compute_capability", None)}
    return info, {"jax_matmul_bf16": {"n": n, "ms": ms, "tflops": 2 * n ** 3 / ms / 1e9,
                                      "note": "host timer around one dispatch: a lower bound"}}


def cmd_device(a):
    rec = {"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "smoke": a.smoke,
           "nvidia_smi": _nvidia_smi(), "python": sys.version.split()[0], "ceilings": {}}
    for part in (_torch_ceilings, _jax_ceiling):
        try:
            info, ceil = part(a.smoke)
            rec.update(info)
            rec["ceilings"].update(ceil)
        except Exception as e:  # reported, the other part still runs
            rec.setdefault("errors", []).append(f"{part.__name__}: {type(e).__name__}: {e}"[:400])
    with open(Path(a.out) / FILES["device"], "w") as f:
        json.dump(rec, f, indent=1, default=str)
    print(json.dumps(rec["ceilings"], default=str))


# ---------------------------------------------------------------------------------- correct
def _rel(x, r):
    import numpy as np
    x, r = np.asarray(x, np.float64), np.asarray(r, np.float64)
    return float(np.linalg.norm(x - r) / max(np.linalg.norm(r), 1e-30))


def cmd_correct(a):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels import flash_attention, reference_attention
    from pallas_kernels.attention import tuning

    gpu_shape, smoke_shape, causal, dtype, schedule = CASES[a.case]
    B, Tq, Tk, Hq, Hkv, D = smoke_shape if a.smoke else gpu_shape
    interpret = a.smoke
    rec = {"case": a.case, "B": B, "Tq": Tq, "Tk": Tk, "Hq": Hq, "Hkv": Hkv, "D": D,
           "causal": causal, "dtype": dtype, "interpret": interpret,
           "device": jax.devices()[0].device_kind}
    if schedule is not None:   # the FA3 schedule under test, through the public op's table
        bk, slots, _ = tuning.MOSAIC_INTERPRET if interpret else tuning.MOSAIC_TABLE[D]
        if interpret:
            tuning.MOSAIC_INTERPRET = (bk, slots, schedule)
        else:
            tuning.MOSAIC_TABLE[D] = (bk, slots, schedule)
    cfg = tuning.mosaic_kernel_config(D, Tk, interpret=interpret)
    rec.update(kernel="mosaic fwd" if schedule else "mosaic fwd+bwd", schedule=cfg.schedule,
               block_k=cfg.block_k, slots=cfg.num_stages)
    seed = int.from_bytes(os.urandom(4), "little")        # fresh inputs on every run
    rec["seed"] = seed
    ks = jax.random.split(jax.random.key(seed), 4)
    dt = jnp.dtype(dtype)
    mk = lambda k, s: jax.random.normal(k, s, jnp.float32).astype(dt)
    q, k, v, do = (mk(ks[0], (B, Tq, Hq, D)), mk(ks[1], (B, Tk, Hkv, D)),
                   mk(ks[2], (B, Tk, Hkv, D)), mk(ks[3], (B, Tq, Hq, D)))
    grads = schedule is None

    def run(fn, *args):
        def f(q, k, v, do):
            if not grads:
                return (fn(q, k, v),)
            o, vjp = jax.vjp(fn, q, k, v)
            return (o, *vjp(do))
        return jax.jit(f)(*args)

    kern = lambda q, k, v: flash_attention(q, k, v, causal=causal, backend="mosaic",
                                           interpret=interpret)
    jaxpr = str(jax.make_jaxpr(kern)(q, k, v))
    rec["mosaic_in_jaxpr"] = "mosaic_flash_fwd" in jaxpr
    t0 = time.perf_counter()
    try:
        got = jax.block_until_ready(run(kern, q, k, v, do))
    except Exception as e:
        rec.update(passed=False, error=f"{type(e).__name__}: {str(e)[:600]}",
                   seconds=time.perf_counter() - t0)
        _append_jsonl(Path(a.out) / FILES["correctness"], rec)
        print(json.dumps(rec))
        return 1
    rec["seconds"] = time.perf_counter() - t0
    up = lambda x: x.astype(jnp.float32)
    ref = run(lambda q, k, v: reference_attention(q, k, v, causal=causal),
              up(q), up(k), up(v), up(do))
    names = ("o", "dq", "dk", "dv")[:len(got)]
    errs, finite = {}, True
    for name, x, r in zip(names, got, ref):
        xf = np.asarray(x.astype(jnp.float32))
        finite &= bool(np.all(np.isfinite(xf)))
        errs[name] = _rel(xf, r)
    if causal and Tq > Tk:   # rows that see no key must be exactly zero
        finite &= bool(np.all(np.asarray(got[0][:, :Tq - Tk].astype(jnp.float32)) == 0))
    rec.update(rel_err=errs, tol=TOL[dtype], finite=finite,
               passed=finite and rec["mosaic_in_jaxpr"] and max(errs.values()) < TOL[dtype])
    _append_jsonl(Path(a.out) / FILES["correctness"], rec)
    print(json.dumps(rec))
    return 0 if rec["passed"] else 1


# ---------------------------------------------------------------------------------- ptxas
_PTXAS_LINE = re.compile(r"ptxas|Used \d+ registers|bytes spill|bytes stack frame|Compiling entry")


def collect_ptxas(dump: Path) -> list[str]:
    """Lines about registers / spills from a Mosaic GPU dump folder, plus a SASS census."""
    lines = []
    files = sorted(p for p in dump.rglob("*") if p.is_file()) if dump.is_dir() else []
    for p in files:
        if p.suffix in (".mlir", ".ptx", ".sass") or p.stat().st_size > 8 << 20:
            continue
        hits = [ln.rstrip() for ln in p.read_text(errors="replace").splitlines()
                if _PTXAS_LINE.search(ln)]
        if hits:
            lines += [f"== {p.name}"] + hits[:60]
    for p in files:
        if p.name.endswith("resources.txt"):   # Mosaic GPU's SMEM / resource estimate
            lines += [f"== {p.name}"] + p.read_text(errors="replace").splitlines()[:20]
    for p in files:
        if p.suffix == ".sass" or "sass" in p.name.lower():
            text = p.read_text(errors="replace")
            census = {op: len(re.findall(rf"\b{op}\b", text))
                      for op in ("HGMMA", "HMMA", "LDL", "STL", "SYNCS", "UTMALDG")}
            lines.append(f"== {p.name}: SASS census {census}")
    ptxas = shutil.which("ptxas") or next(iter(glob.glob("/usr/local/cuda*/bin/ptxas")), None)
    if not any(ln.startswith("== ") and "census" not in ln for ln in lines) and ptxas:
        for p in (q for q in files if q.suffix == ".ptx"):
            try:
                r = subprocess.run([ptxas, "-v", "-arch=sm_90a", str(p), "-o", os.devnull],
                                   capture_output=True, text=True, timeout=60)
                lines += [f"== {ptxas} -v {p.name}"] + [
                    ln for ln in (r.stdout + r.stderr).splitlines() if _PTXAS_LINE.search(ln)][:60]
            except (OSError, subprocess.TimeoutExpired) as e:
                lines.append(f"== ptxas -v {p.name} failed: {e}")
    return lines, [p.name for p in files]


def cmd_ptxas(a):
    dump = Path(a.dump)
    dump.mkdir(parents=True, exist_ok=True)
    # read by jaxlib's Mosaic GPU compiler when it compiles a kernel (before jax is imported)
    os.environ.update(MOSAIC_GPU_DUMP_TO=str(dump), MOSAIC_GPU_DUMP_PTXAS="1",
                      MOSAIC_GPU_DUMP_PTX="1", MOSAIC_GPU_DUMP_SASS="1")
    import jax
    import jax.numpy as jnp

    from pallas_kernels import flash_attention

    head = [f"# ptxas / SASS of the Mosaic GPU kernels ({time.strftime('%Y-%m-%d', time.gmtime())},"
            f" {jax.devices()[0].device_kind}); env MOSAIC_GPU_DUMP_TO, _PTXAS, _PTX, _SASS"]
    B, T, H, D = (1, 128, 1, 64) if a.smoke else (1, 1024, 4, 128)
    q = jax.random.normal(jax.random.key(1), (B, T, H, D), jnp.float32).astype(jnp.bfloat16)
    f = lambda q, k, v: flash_attention(q, k, v, causal=True, backend="mosaic",
                                        interpret=a.smoke)
    if a.smoke:
        # no GPU: the compiled forward lowers (Mosaic GPU dialect, sm_90) but never reaches ptxas
        from pallas_kernels.attention.common import AttnStatic
        from pallas_kernels.attention.mosaic_fwd import mosaic_flash_fwd
        st = AttnStatic(Tq=T, Tk=T, Tq_pad=T, Tk_pad=T, D=D, group=1, block_q=128, block_k=64,
                        causal=True, has_segments=False, sm_scale=D ** -0.5, dtype="bfloat16",
                        interpret=False)
        fwd = jax.jit(lambda q, k, v: mosaic_flash_fwd(q, k, v, st, interpret=False))
        text = fwd.trace(q, q, q).lower(lowering_platforms=("cuda",)).as_text()
        head.append(f"--cpu-smoke: unobtainable on CPU (no ptxas run); the compiled forward "
                    f"lowered for CUDA ({text.count('mosaic_gpu')} mosaic_gpu mentions)")
    else:
        fb = jax.jit(lambda q, k, v, do: jax.vjp(f, q, k, v)[1](do))
        # the compiler may print its reports to fd 1 rather than into the dump folder: keep them
        saved, log = os.dup(1), os.open(dump / "stdout.log", os.O_WRONLY | os.O_CREAT, 0o644)
        sys.stdout.flush()
        os.dup2(log, 1)
        try:
            jax.block_until_ready(fb(q, q, q, q))   # forward (table schedule) + both bwd kernels
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(log)
    lines, names = collect_ptxas(dump)
    if not lines:
        lines = ["unobtainable: the Mosaic GPU dump produced no ptxas / SASS output and no ptxas "
                 "binary was found for the dumped PTX; files in the dump: "
                 + (", ".join(names[:40]) or "none")]
    lines.append("Pallas-Triton kernels: not collected (XLA compiles them; no ptxas report).")
    (Path(a.out) / FILES["ptxas"]).write_text("\n".join(head + lines) + "\n")
    print("\n".join((head + lines)[:40]))


# ---------------------------------------------------------------------------------- bench
def cmd_bench(a):
    import jax
    import jax.numpy as jnp

    from experiments import bench_attention as ba

    on_gpu = jax.default_backend() == "gpu"
    D, dtype = (64, jnp.bfloat16) if a.smoke else (128, jnp.bfloat16)
    H = 1 if a.smoke else 2048 // D
    B = max(1, (a.T if a.smoke else 16384) // a.T)
    reps, inner = (1, 1) if a.smoke else (5, 3)
    skip = None
    if a.smoke:  # interpret mode: our kernels run (slowly), the GPU-only impls say why not
        skip = lambda impl: (None if impl in ("pallas", "mosaic", "xla")
                             else ba._skip_reason(impl, on_gpu, D, dtype))
    device = jax.devices()[0].device_kind
    for causal in (False, True):
        rec = ba.measure(a.impl, B, a.T, H, D, causal, dtype, reps, inner, a.smoke, on_gpu,
                         device, section="gpu_check", skip_reason=skip)
        _append_jsonl(Path(a.out) / FILES["attention"], rec)
        ba._print_row(rec)


# ---------------------------------------------------------------------------------- train
def cmd_merge_train(a):
    recs = []
    for p in a.files:
        if Path(p).is_file():
            recs += json.loads(Path(p).read_text())
    with open(Path(a.out) / FILES["train"], "w") as f:
        json.dump(recs, f, indent=1, default=str)
    print(f"train_step.json: {len(recs)} records")


# ---------------------------------------------------------------------------------- summary
def _read_jsonl(path):
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _f(x, fmt="{:.1f}"):
    return "-" if x is None else fmt.format(x)


def summarize(out: Path) -> str:
    """Markdown tables of every result file in ``out``."""
    lines = ["# GPU check summary", ""]
    dev = json.loads((out / FILES["device"]).read_text()) if (out / FILES["device"]).is_file() else {}
    c = dev.get("ceilings", {})
    mm = c.get("torch_matmul_bf16", {}).get("tflops")
    lines += [f"device: {dev.get('torch_device', '?')} / {dev.get('jax_device', '?')} (cc "
              f"{dev.get('jax_compute_capability')}), jax {dev.get('jax')}, torch {dev.get('torch')}",
              f"ceilings: bf16 matmul torch {_f(mm)} TFLOP/s, jax "
              f"{_f(c.get('jax_matmul_bf16', {}).get('tflops'))} TFLOP/s; copy "
              f"{_f(c.get('torch_copy', {}).get('gbps_read_plus_write'), '{:.0f}')} GB/s "
              "(read + write)", ""]
    lines += ["| correctness case | kernel | schedule | max rel err | tol | passed |",
              "|---|---|---|---|---|---|"]
    for r in _read_jsonl(out / FILES["correctness"]):
        err = max(r["rel_err"].values()) if r.get("rel_err") else None
        lines.append(f"| {r['case']} | {r.get('kernel')} | {r.get('schedule')} | "
                     f"{_f(err, '{:.2e}')} | {r.get('tol')} | {r.get('passed')}"
                     f"{' ' + r['error'][:80] if r.get('error') else ''} |")
    lines += ["", "| impl | T | causal | fwd TFLOP/s | f+b TFLOP/s | fwd % of matmul | note |",
              "|---|---|---|---|---|---|---|"]
    for r in _read_jsonl(out / FILES["attention"]):
        pct = 100 * r["fwd_tflops"] / mm if r.get("fwd_tflops") and mm else None
        lines.append(f"| {r['impl']} | {r['T']} | {r['causal']} | {_f(r.get('fwd_tflops'))} | "
                     f"{_f(r.get('fwd_bwd_tflops'))} | {_f(pct)} | {r.get('skipped', '')[:80]} |")
    from experiments.gpu_check_lm import summary_lines   # LM kernels: correctness + benches
    lines += summary_lines(_read_jsonl(out / FILES["lm"]),
                           c.get("torch_copy", {}).get("gbps_read_plus_write"))
    train = json.loads((out / FILES["train"]).read_text()) if (out / FILES["train"]).is_file() else []
    lines += ["", "| train step | impl | steps/s | ms/step | TFLOP/s | MFU (989) | MFU (measured "
              "matmul) |", "|---|---|---|---|---|---|---|"]
    for r in train:
        tf = r.get("achieved_tflops")
        lines.append(f"| {r['config']['name']} | {r['impl']} | {_f(r.get('steps_per_s'), '{:.2f}')}"
                     f" | {_f(r.get('ms_per_step'))} | {_f(tf)} | "
                     f"{_f(r.get('mfu') and 100 * r['mfu'])}% | "
                     f"{_f(tf and mm and 100 * tf / mm)}% |"
                     + (f" error: {r['error'][:80]}" if r.get("error") else ""))
    steps = out / FILES["steps"]
    if steps.is_file():
        lines += ["", "| step | status | seconds |", "|---|---|---|"]
        for ln in steps.read_text().splitlines():
            name, status, secs = (ln.split("\t") + ["", ""])[:3]
            lines.append(f"| {name} | {status} | {secs} |")
    return "\n".join(lines) + "\n"


def cmd_summary(a):
    if a.files:
        cmd_merge_train(a)
    text = summarize(Path(a.out))
    (Path(a.out) / FILES["summary"]).write_text(text)
    print(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="part", required=True)
    for name in ("device", "correct", "ptxas", "bench", "merge-train", "summary"):
        s = sub.add_parser(name)
        s.add_argument("--out", required=True)
        s.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, interpret mode")
        if name == "correct":
            s.add_argument("--case", required=True, choices=sorted(CASES))
        if name == "ptxas":
            s.add_argument("--dump", required=True)
        if name == "bench":
            s.add_argument("--impl", required=True)
            s.add_argument("--T", type=int, required=True)
        if name in ("merge-train", "summary"):
            s.add_argument("files", nargs="*", help="bench_train_step.py --json outputs to merge "
                           "into train_step.json")
    a = p.parse_args(argv)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    fn = {"device": cmd_device, "correct": cmd_correct, "ptxas": cmd_ptxas, "bench": cmd_bench,
          "merge-train": cmd_merge_train, "summary": cmd_summary}[a.part]
    return fn(a) or 0


if __name__ == "__main__":
    sys.exit(main())
