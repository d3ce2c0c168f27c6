"""One sampler protocol, one registry (``SAMPLERS``).

Sigma family (k-diffusion convention, EDM form x = x0 + sigma eps):
    x, nfe = sample(name, denoiser, x_init, *, sigmas, key=None, **options)
    denoiser(x, sigma [B]) -> D(x; sigma); sigmas descending 1-D ending in 0 (``karras``, ...);
    x_init already at sigmas[0]. Any path model becomes a denoiser with
    ``parameterization.as_edm_denoiser(fn, path, src=...)``.
Time family (data at t = 0, noise at t = 1):
    x, nfe = sample_time(name, fn, x_init, *, key=None, **options)
    euler_maruyama / pc (fn = score, sde=...), ddim (fn = x0_eps_fn, path=...), ode / ode_adaptive
    (fn = velocity, solver=...); grids from num_steps or ts and t_start / t_end.
Adding a sampler: a file with the function under ``@register(name, family=..., nfe=...)`` and its
import below.
"""
from research.generative.sampling.registry import SAMPLERS, SamplerSpec, get_spec, register  # noqa: F401
from research.generative.sampling import euler, heun, dpm, lms, unipc, ode, score_sde, ddim  # noqa: F401,E402
from research.generative.sampling.api import sample, sample_time  # noqa: F401,E402
from research.generative.sampling.ode import adaptive_nfe, pf_ode_velocity  # noqa: F401,E402
from research.generative.sampling.schedules import (  # noqa: F401,E402
    exponential,
    flow_sigmas,
    karras,
    polyexponential,
    shift_time,
    uniform_time,
)
from research.generative.sampling.score_sde import langevin_correct  # noqa: F401,E402
