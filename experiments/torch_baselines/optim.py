"""PyTorch twin of ``research.train.optim`` / ``ema`` / ``step``: AdamW + warmup-cosine + global-norm
clipping + decay mask, the EMA, and one training step.

Semantics match the optax recipe ``chain(clip_by_global_norm(c), adamw(schedule, mask=...))``:

* ``lr(s)`` of update ``s`` (0-based) is ``warmup_cosine(s)``: linear from 0 to ``peak`` over
  ``warmup_steps``, then cosine to ``end_lr_frac * peak`` (``LambdaLR`` stepped after each update);
* gradients are scaled by ``min(1, c / ||g||)`` (``||g||`` = global norm before clipping);
* ``torch.optim.AdamW`` with two parameter groups (decayed / not decayed, rule of
  :func:`experiments.torch_baselines.dit.decay_mask`);
* EMA after the update: ``ema = decay * ema + (1 - decay) * params``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch


def warmup_cosine(peak_lr: float, *, warmup_steps: int, total_steps: int,
                  end_lr_frac: float = 0.0) -> Callable[[int], float]:
    """``s -> lr(s)``, the same function as ``research.train.optim.warmup_cosine_schedule``."""
    if not peak_lr > 0:
        raise ValueError(f"peak_lr must be > 0, got {peak_lr}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps, got {warmup_steps}, {total_steps}")
    if not 0.0 <= end_lr_frac <= 1.0:
        raise ValueError(f"end_lr_frac must be in [0, 1], got {end_lr_frac}")
    end_lr = peak_lr * end_lr_frac
    decay_steps = max(total_steps - warmup_steps, 1)

    def schedule(s: int) -> float:
        if s < warmup_steps:
            return peak_lr * s / max(warmup_steps, 1)
        q = min(max((s - warmup_steps) / decay_steps, 0.0), 1.0)
        return end_lr + (peak_lr - end_lr) * 0.5 * (1.0 + math.cos(math.pi * q))

    return schedule


def make_optimizer(model: torch.nn.Module, *, learning_rate: float, warmup_steps: int, total_steps: int,
                   weight_decay: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   end_lr_frac: float = 0.0, decay_mask: str | dict[str, bool] = "default",
                   fused: bool | None = None):
    """``torch.optim.AdamW`` with decayed / non-decayed groups and a ``LambdaLR`` warmup-cosine.

    decay_mask: "default" (no decay on biases, norm scales, embeddings), "all", or a dict
      ``{param name: bool}``. fused: passed to AdamW (``None`` lets torch choose; foreach on CPU).
    Returns ``(optimizer, scheduler)``; call ``scheduler.step()`` after each ``optimizer.step()``.
    """
    from experiments.torch_baselines.dit import decay_mask as default_mask

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if decay_mask == "default":
        mask = default_mask(model)
    elif decay_mask == "all":
        mask = {n: True for n in names}
    elif isinstance(decay_mask, dict):
        missing = sorted(set(names) - set(decay_mask))
        if missing:
            raise ValueError(f"decay_mask misses parameters {missing[:5]}")
        mask = decay_mask
    else:
        raise ValueError(f"decay_mask must be 'default', 'all' or a dict, got {decay_mask!r}")
    params = dict(model.named_parameters())
    groups = [
        {"params": [params[n] for n in names if mask[n]], "weight_decay": weight_decay},
        {"params": [params[n] for n in names if not mask[n]], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    opt = torch.optim.AdamW(groups, lr=learning_rate, betas=(b1, b2), eps=eps, fused=fused)
    sched_fn = warmup_cosine(learning_rate, warmup_steps=warmup_steps, total_steps=total_steps,
                             end_lr_frac=end_lr_frac)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: sched_fn(s) / learning_rate)
    return opt, scheduler


@torch.no_grad()
def clip_by_global_norm_(grads: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Scales ``grads`` in place by ``min(1, max_norm / ||g||)`` (optax semantics, no epsilon, no host
    sync); returns the global norm before clipping. ``max_norm=None`` only computes the norm."""
    norms = torch._foreach_norm(grads)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    if max_norm is not None:
        coef = torch.where(total < max_norm, torch.ones_like(total), max_norm / total)
        torch._foreach_mul_(grads, coef)
    return total


@torch.no_grad()
def ema_update_(ema_params: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """In place ``ema = decay * ema + (1 - decay) * params`` (a lerp towards params by 1 - decay)."""
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def train_step(loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor], optimizer, scheduler, *,
               clip_norm: float | None, ema_params: list[torch.Tensor] | None = None,
               ema_decay: float | None = None) -> dict[str, torch.Tensor]:
    """One update: ``loss_fn()`` -> backward -> clip -> AdamW step -> schedule step -> EMA.

    Returns device tensors ``{"loss", "grad_norm", "lr"}`` (no host synchronisation).
    """
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    grads = [p.grad for p in params if p.grad is not None]
    gnorm = clip_by_global_norm_(grads, clip_norm)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    if ema_params is not None:
        if ema_decay is None:
            raise ValueError("ema_params given without ema_decay")
        ema_update_(ema_params, params, ema_decay)
    return {"loss": loss.detach(), "grad_norm": gnorm, "lr": torch.tensor(lr)}
