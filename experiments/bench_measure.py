"""Measurement primitives of ``experiments/bench_train_step.py``: the device / thread counts it
reports, per-call wall time with the process's CPU time, context switches and page faults
(``getrusage``), and the same-run f32 GEMM rate of jnp and torch that its roofline column divides by."""
from __future__ import annotations

import os
import platform
import resource
import time
from typing import Callable


def _device_name(gpu: bool) -> str:
    if gpu:
        import torch

        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {cpu} ({len(os.sched_getaffinity(0))} cores)"


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _xla_threads() -> int:
    """Cores XLA:CPU may use: its intra-op pool (YNNPACK dots, the thunk executor's concurrent
    thunks) has one thread per core of the process's affinity mask, whatever
    ``--xla_cpu_multi_thread_eigen`` says (that flag only keeps Eigen's own kernels on one thread)."""
    return len(os.sched_getaffinity(0))


def _usage() -> dict:
    """This process so far: CPU seconds (user + sys, and sys alone), voluntary and involuntary
    context switches, minor page faults."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu": ru.ru_utime + ru.ru_stime, "sys": ru.ru_stime, "nvcsw": ru.ru_nvcsw, "nivcsw": ru.ru_nivcsw,
            "minflt": ru.ru_minflt}


def timed(fn: Callable[[], None]) -> dict:
    """Runs ``fn`` once: wall seconds and the deltas of _usage (CPU seconds, context switches, faults)."""
    u0 = _usage()
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    u1 = _usage()
    return {"wall": wall, **{k: u1[k] - u0[k] for k in u0}}


def gemm_shape(model_kw: dict, batch: int) -> tuple[int, int, int]:
    """The step's largest GEMM, the MLP's first layer: [batch * tokens, hidden] x [hidden, 4 hidden]."""
    n = (model_kw["input_size"] // model_kw["patch_size"]) ** 2
    d = model_kw["hidden_size"]
    return batch * n, d, 4 * d


def measure_gemm(m: int, k: int, n: int, *, rounds: int = 5, target_s: float = 0.25) -> dict:
    """f32 GEMM rate of jnp (jitted ``a @ b``) and torch (``torch.mm``) at [m, k] x [k, n], interleaved
    (jax, torch, jax, ...) in this process, so on the cores and threads the train steps get.
    GFLOP/s is the best round by wall time and by process CPU time (the latter ~ per-core rate)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    mm = jax.jit(jnp.matmul)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    fns = {"jax": lambda: mm(ja, jb).block_until_ready(), "torch": lambda: torch.mm(ta, tb)}
    flops = 2.0 * m * k * n
    iters = {}
    for fw, f in fns.items():
        f()
        t = timed(f)["wall"]
        iters[fw] = max(2, int(target_s / max(t, 1e-6)))
    best = {fw: {"wall": 0.0, "cpu": 0.0} for fw in fns}
    with torch.no_grad():
        for _ in range(rounds):
            for fw, f in fns.items():
                def loop(f=f, it=iters[fw]):
                    for _ in range(it):
                        f()
                u = timed(loop)
                best[fw]["wall"] = max(best[fw]["wall"], flops * iters[fw] / u["wall"] / 1e9)
                best[fw]["cpu"] = max(best[fw]["cpu"], flops * iters[fw] / max(u["cpu"], 1e-9) / 1e9)
    return {"shape": [m, k, n], "jax_gflops": best["jax"]["wall"], "torch_gflops": best["torch"]["wall"],
            "jax_gflops_cpu": best["jax"]["cpu"], "torch_gflops_cpu": best["torch"]["cpu"]}
