"""PyTorch twin of the rectified-flow pieces in ``research.generative`` (timesteps, loss, samplers, CFG).

Conventions as on the JAX side: data at t = 0, noise at t = 1, ``x_t = (1 - t) x_0 + t eps``,
velocity target ``eps - x_0``; sampling integrates from t = 1 down to t = 0 with uniform steps;
classifier-free guidance ``uncond + w * (cond - uncond)`` with w = 1 meaning no guidance.

Model convention here: ``model(x, t, y, train=..., generator=...) -> velocity`` (the torch DiT).
"""
from __future__ import annotations

from typing import Callable

import torch

TIMESTEP_DISTS = ("uniform", "logit_normal")
METHODS = ("euler", "heun", "rk4")
_U_EPS = 1e-6  # same clipping of the base uniform as research.generative.timesteps


def sample_timesteps(shape, *, generator: torch.Generator | None = None, device=None,
                     dist: str = "logit_normal", loc: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    """float32 timesteps in (0, 1): ``u ~ U(0,1)`` clipped to [1e-6, 1-1e-6], then
    ``uniform: t = u``; ``logit_normal: t = sigmoid(loc + scale * Phi^{-1}(u))`` (SD3)."""
    if dist not in TIMESTEP_DISTS:
        raise ValueError(f"unknown timestep dist {dist!r}; expected one of {TIMESTEP_DISTS}")
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    u = u.clamp(_U_EPS, 1.0 - _U_EPS)
    if dist == "uniform":
        return u
    return torch.sigmoid(loc + scale * torch.special.ndtri(u))


def draw_training_noise(x0: torch.Tensor, *, generator: torch.Generator | None, class_dropout_prob: float,
                        timestep_dist: str = "logit_normal", loc: float = 0.0, scale: float = 1.0):
    """The randomness of one rectified-flow step, drawn outside the (compilable) loss:
    ``eps`` like x0, ``t`` [B], and ``drop_ids`` [B] int (1 = replace the label by the null label,
    probability ``class_dropout_prob``). Pass them to :func:`rectified_flow_loss` with
    ``train=False, force_drop_ids=drop_ids``."""
    if not 0.0 <= class_dropout_prob <= 1.0:
        raise ValueError(f"class_dropout_prob must be in [0, 1], got {class_dropout_prob}")
    b = x0.shape[0]
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
    t = sample_timesteps((b,), generator=generator, device=x0.device, dist=timestep_dist, loc=loc, scale=scale)
    drop = (torch.rand((b,), generator=generator, device=x0.device) < class_dropout_prob).to(torch.int32)
    return t, eps, drop


def rectified_flow_loss(model: Callable, x0: torch.Tensor, y: torch.Tensor, *, t: torch.Tensor | None = None,
                        eps: torch.Tensor | None = None, generator: torch.Generator | None = None,
                        train: bool = True, force_drop_ids: torch.Tensor | None = None,
                        timestep_dist: str = "logit_normal", loc: float = 0.0,
                        scale: float = 1.0) -> torch.Tensor:
    """Rectified-flow loss, float32 scalar: mean over non-batch dims of ``(v(x_t, t) - (eps - x0))^2``,
    then over the batch.

    Args:
      model: ``model(x, t, y, train=..., generator=...)``.
      x0: [B, ...] data; y: [B] labels.
      t, eps: explicit timesteps [B] and noise (shape of x0); drawn from ``generator`` when None
        (eps first, then t).
      train: passed to the model (label dropout drawn from ``generator`` inside the model).
      force_drop_ids: [B] (1 = null label), passed to the model.
    """
    if x0.ndim < 2:
        raise ValueError(f"x0 must have a batch axis and a data axis, got shape {tuple(x0.shape)}")
    x0 = x0.float()
    if eps is None:
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
    if eps.shape != x0.shape:
        raise ValueError(f"eps shape {tuple(eps.shape)} != x0 shape {tuple(x0.shape)}")
    if t is None:
        t = sample_timesteps((x0.shape[0],), generator=generator, device=x0.device, dist=timestep_dist,
                             loc=loc, scale=scale)
    if tuple(t.shape) != (x0.shape[0],):
        raise ValueError(f"t must have shape [{x0.shape[0]}], got {tuple(t.shape)}")
    tb = t.float().reshape((-1,) + (1,) * (x0.ndim - 1))
    x_t = (1.0 - tb) * x0 + tb * eps
    kw = {"force_drop_ids": force_drop_ids} if force_drop_ids is not None else {}
    pred = model(x_t, t, y, train=train, generator=generator, **kw).float()
    err = torch.square(pred - (eps - x0)).reshape(x0.shape[0], -1).mean(dim=1)
    return err.mean()


def guided(model: Callable, cond: torch.Tensor, null_cond, guidance: float) -> Callable:
    """CFG velocity ``fn(x, t) = uncond + w (cond - uncond)`` with one batched call on [cond; null].

    ``null_cond``: a label tensor like ``cond`` or a scalar null label. ``guidance == 1`` calls the
    model once on ``cond``.
    """
    if isinstance(guidance, (int, float)) and guidance == 1:
        return lambda x, t: model(x, t, cond, train=False)
    null = torch.as_tensor(null_cond, device=cond.device)
    if null.ndim == 0:
        null = torch.full_like(cond, int(null))
    elif null.shape != cond.shape:
        raise ValueError(f"null_cond shape {tuple(null.shape)} does not match cond shape {tuple(cond.shape)}")
    both = torch.cat([cond, null.to(cond.dtype)], dim=0)

    def fn(x, t):
        b = x.shape[0]
        out = model(torch.cat([x, x], dim=0), torch.cat([t, t], dim=0), both, train=False)
        c, u = out[:b], out[b:]
        return u + guidance * (c - u)

    return fn


def _step(velocity_fn, method, x, t, t_next):
    b = x.shape[0]
    tv = lambda s: s.expand(b)  # noqa: E731  (float32 scalar -> [B])
    h = t_next - t
    if method == "euler":
        return x + h * velocity_fn(x, tv(t))
    if method == "heun":
        d1 = velocity_fn(x, tv(t))
        d2 = velocity_fn(x + h * d1, tv(t_next))
        return x + 0.5 * h * (d1 + d2)
    t_mid = t + 0.5 * (t_next - t)
    k1 = velocity_fn(x, tv(t))
    k2 = velocity_fn(x + 0.5 * h * k1, tv(t_mid))
    k3 = velocity_fn(x + 0.5 * h * k2, tv(t_mid))
    k4 = velocity_fn(x + h * k3, tv(t_next))
    return x + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


@torch.no_grad()
def ode_sample(velocity_fn: Callable, x_init: torch.Tensor, *, num_steps: int, method: str = "euler",
               t_start: float = 1.0, t_end: float = 0.0) -> torch.Tensor:
    """Integrate ``dx/dt = velocity_fn(x, t)`` from ``t_start`` to ``t_end`` in ``num_steps`` uniform
    steps (the same float32 time grid as ``research.generative.sampling`` ``ode`` sampler``).

    Heun applies its correction on every step, including the last (NFE 2N), like the JAX solver.
    """
    if method not in METHODS:
        raise ValueError(f"unknown ODE method {method!r}; expected one of {METHODS}")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    f32 = dict(dtype=torch.float32, device=x_init.device)
    t0, t1 = torch.tensor(t_start, **f32), torch.tensor(t_end, **f32)
    dt = (t1 - t0) / num_steps
    x = x_init.float()
    for i in range(num_steps):
        t = t0 + torch.tensor(float(i), **f32) * dt
        t_next = t1 if i == num_steps - 1 else t0 + torch.tensor(float(i + 1), **f32) * dt
        x = _step(velocity_fn, method, x, t, t_next)
    return x
