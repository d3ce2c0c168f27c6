"""The two entries: ``sample`` (sigma family, k-diffusion convention) and ``sample_time`` (time family).

Both look the sampler up in ``SAMPLERS``, validate the options eagerly (unknown option, missing key,
negative noise parameters, bad sigmas all raise ValueError naming the argument), run it (jit-able:
call them inside ``jax.jit`` with the options closed over) and return ``(x, nfe)`` with the NFE
from the sampler's spec.
"""
from __future__ import annotations

from typing import Callable

from research.generative.sampling._common import check_sigmas, compute_dtype
from research.generative.sampling.registry import get_spec


def sample(name: str, denoiser: Callable, x_init, *, sigmas, key=None, **options):
    """k-diffusion convention: ``denoiser(x, sigma [B]) -> D(x; sigma)``; ``sigmas`` descending 1-D ending
    in 0; ``x_init`` already at sigmas[0] (e.g. sigmas[0] * N(0, I)). Returns (x at sigma = 0, nfe)."""
    spec = get_spec(name, "sigma")
    opts = spec.resolve(options)
    if spec.needs_key(opts) and key is None:
        raise ValueError(f"sample({name!r}): this sampler draws noise with these options; pass key=...")
    dtype = compute_dtype(x_init)
    sigmas = check_sigmas(f"sample({name!r})", sigmas, dtype)
    kw = {"key": key} if spec.needs_key(opts) else {}
    x = spec.fn(denoiser, x_init.astype(dtype), sigmas, **kw, **opts)
    return x, spec.nfe(sigmas.shape[0] - 1, **opts)


def sample_time(name: str, fn: Callable, x_init, *, key=None, **options):
    """Time-family samplers (data at t = 0): ``fn`` is the score (euler_maruyama, pc; option ``sde=``),
    x0_eps_fn (ddim; option ``path=``) or velocity (ode, ode_adaptive); grids from ``num_steps`` or
    ``ts`` and ``t_start`` / ``t_end``. Returns (x, nfe)."""
    spec = get_spec(name, "time")
    opts = spec.resolve(options)
    if spec.needs_key(opts) and key is None:
        raise ValueError(f"sample_time({name!r}): this sampler draws noise with these options; pass key=...")
    kw = {"key": key} if spec.needs_key(opts) else {}
    out = spec.fn(fn, x_init, **kw, **opts)
    if spec.nfe is None:
        return out
    ts = opts.get("ts")
    n = opts.get("num_steps") if ts is None else len(ts) - 1
    return out, spec.nfe(n, **opts)
