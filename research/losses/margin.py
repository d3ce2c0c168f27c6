"""Margin-based softmax losses on the hypersphere: NormFace, SphereFace (A-Softmax), CosFace, ArcFace.

All of them compute ``cos θ_j = <x̂, ŵ_j>`` between the L2-normalised feature ``x̂`` of an example and
the L2-normalised class weight ``ŵ_j`` and replace the TARGET class's logit by a harder one:

  kind          non-target logit        target logit                                       papers
  "softmax"     <x, w_j> (+ b_j)        <x, w_y> (+ b_y)        plain linear softmax (baseline)
  "normface"    s cos θ_j               s cos θ_y                                          Wang et al. 2017
  "sphereface"  ‖x‖ cos θ_j             ‖x‖ (λ cos θ_y + ψ(θ_y)) / (1 + λ)                 Liu et al. 2017
  "cosface"     s cos θ_j               s (cos θ_y − m)                                    Wang et al. 2018
  "arcface"     s cos θ_j               s cos(θ_y + m)  (threshold / easy_margin below)    Deng et al. 2019

SphereFace: ψ(θ) = (−1)^k cos(mθ) − 2k for θ ∈ [kπ/m, (k+1)π/m], k = 0..m−1, integer m ≥ 1 (monotone
decreasing and continuous on [0, π], ψ(0) = 1, ψ(π) = 1 − 2m). A-Softmax keeps the feature norm
``‖x‖`` as the scale (``scale=None``); a float ``scale`` uses ``s`` instead (the normalised-feature
variant). ``lam`` is the original code's annealing blend λ (``sphereface_lambda`` gives its schedule;
λ = 0 is the pure margin, large λ is plain A-Softmax without margin).

ArcFace (insightface): by default the "threshold" form — ``cos(θ+m)`` while ``θ + m < π`` (i.e. while
``cos θ > cos(π − m)``) and ``cos θ − m sin m`` (``sin(π − m) m``) beyond, so the target logit stays
monotone decreasing in θ on [0, π] (the plain ``cos(θ+m)`` turns back up past π − m).
``easy_margin=True`` instead applies the margin only where ``cos θ > 0`` (target = cos θ elsewhere).

Numerics: no ``arccos`` anywhere. ``cos(θ+m) = cos θ cos m − sin θ sin m`` with
``sin θ = sqrt(1 − cos²θ)`` through a safe square root (value 0 and gradient 0 exactly at
cos θ = ±1, where the true derivative is infinite), and ``cos(mθ) = T_m(cos θ)`` (Chebyshev
polynomial) with ``k`` counted by comparing cos θ with the thresholds cos(jπ/m). Normalisation is
``x / max(‖x‖, eps)`` (``torch.nn.functional.normalize``) written as ``x * rsqrt(max(‖x‖², eps²))``,
so zero features give finite values and gradients. Values and gradients are therefore finite for
features parallel or antiparallel to a class weight and for zero features, in float32 and float64.

The cross-entropy runs in float32 (float64 for float64 logits) whatever the logits' dtype.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

# ---------------------------------------------------------------------------- building blocks


def l2_normalize(x: jax.Array, *, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """``x / max(‖x‖, eps)`` along ``axis`` (torch's ``F.normalize``), finite gradients at ``x = 0``."""
    x = jnp.asarray(x)
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, jnp.asarray(eps * eps, x.dtype)))


def safe_norm(x: jax.Array, *, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """``max(‖x‖, eps)`` along ``axis`` (no kept dim), with a finite gradient (0) at ``x = 0``."""
    x = jnp.asarray(x)
    sq = jnp.sum(x * x, axis=axis)
    return jnp.sqrt(jnp.maximum(sq, jnp.asarray(eps * eps, x.dtype)))


def _clip_unit(c: jax.Array) -> jax.Array:
    # rounding can give |cos| slightly above 1; select (not clip) so the gradient is 1 inside and at ±1
    one = jnp.ones((), c.dtype)
    return jnp.where(c > one, one, jnp.where(c < -one, -one, c))


def cosine_matrix(features: jax.Array, weights: jax.Array, *, eps: float = 1e-12) -> jax.Array:
    """``cos θ [N, C]`` between the rows of ``features [N, D]`` and ``weights [C, D]``, in [−1, 1]."""
    dtype = jnp.result_type(features, weights)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float32
    x = l2_normalize(jnp.asarray(features, dtype), eps=eps)
    w = l2_normalize(jnp.asarray(weights, dtype), eps=eps)
    return _clip_unit(x @ w.T)


def safe_sin_from_cos(c: jax.Array) -> jax.Array:
    """``sqrt(1 − c²)`` for ``c`` in [−1, 1]; exactly 0 with gradient 0 at ``c = ±1`` (no inf / NaN)."""
    s2 = (1 - c) * (1 + c)
    pos = s2 > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, s2, jnp.ones_like(s2))), jnp.zeros_like(s2))


def chebyshev_t(c: jax.Array, m: int) -> jax.Array:
    """``T_m(c) = cos(m arccos c)`` by the recurrence T_{n+1} = 2c T_n − T_{n−1} (integer m ≥ 0)."""
    t_prev, t = jnp.ones_like(c), c
    if m == 0:
        return t_prev
    for _ in range(m - 1):
        t_prev, t = t, 2 * c * t - t_prev
    return t


# ---------------------------------------------------------------------------- target-logit transforms
# each maps the target class's cos θ (any shape) to the cos-like value that replaces it


def normface_target(cos: jax.Array, margin: float = 0.0) -> jax.Array:
    """NormFace: the target keeps ``cos θ`` (``margin`` must be 0; it exists for a uniform signature)."""
    if margin != 0:
        raise ValueError(f"normface has no margin; got margin={margin} (use cosface or arcface)")
    return cos


def cosface_target(cos: jax.Array, margin: float) -> jax.Array:
    """CosFace / AM-Softmax: ``cos θ − m``."""
    return cos - jnp.asarray(margin, cos.dtype)


def arcface_target(cos: jax.Array, margin: float, *, easy_margin: bool = False) -> jax.Array:
    """ArcFace: ``cos(θ + m)`` (computed without arccos); beyond ``θ + m ≥ π`` the threshold form
    ``cos θ − m sin m`` (default), or with ``easy_margin`` the margin only where ``cos θ > 0``."""
    m = jnp.asarray(margin, cos.dtype)
    phi = cos * jnp.cos(m) - safe_sin_from_cos(cos) * jnp.sin(m)
    if easy_margin:
        return jnp.where(cos > 0, phi, cos)
    th = jnp.cos(jnp.pi - m)       # θ < π − m  <=>  cos θ > cos(π − m)
    mm = jnp.sin(jnp.pi - m) * m   # insightface's "mm"
    return jnp.where(cos > th, phi, cos - mm)


def sphereface_psi(cos: jax.Array, margin: int) -> jax.Array:
    """SphereFace's ``ψ(θ) = (−1)^k cos(mθ) − 2k``, θ ∈ [kπ/m, (k+1)π/m], from ``cos θ`` (integer m ≥ 1).

    ``cos(mθ)`` is the Chebyshev polynomial ``T_m(cos θ)``; ``k`` counts the thresholds
    ``cos(jπ/m)``, j = 1..m−1, that ``cos θ`` is at or below (ψ is continuous, so the side a boundary
    point falls on does not change the value)."""
    m = _check_sphereface_margin(margin)
    k = jnp.zeros_like(cos)
    for j in range(1, m):
        k = k + (cos <= jnp.asarray(math.cos(j * math.pi / m), cos.dtype)).astype(cos.dtype)
    sign = 1 - 2 * jnp.mod(k, 2)
    return sign * chebyshev_t(cos, m) - 2 * k


def sphereface_target(cos: jax.Array, margin: int, *, lam=0.0) -> jax.Array:
    """SphereFace's annealed target ``(λ cos θ + ψ(θ)) / (1 + λ)`` (λ = 0: pure ψ)."""
    psi = sphereface_psi(cos, margin)
    if isinstance(lam, (int, float)) and lam == 0:
        return psi
    lam = jnp.asarray(lam, cos.dtype)
    return (lam * cos + psi) / (1 + lam)


def sphereface_lambda(step, *, base: float = 1000.0, gamma: float = 0.12, power: float = 1.0,
                      lambda_min: float = 5.0):
    """The original SphereFace annealing ``λ = max(lambda_min, base (1 + gamma step)^(−power))``."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.maximum(lambda_min, base * (1 + gamma * step) ** (-power))


def _check_sphereface_margin(margin) -> int:
    if isinstance(margin, bool) or not float(margin).is_integer() or margin < 1:
        raise ValueError(f"sphereface needs an integer margin m >= 1 (cos(m θ) by a Chebyshev polynomial), "
                         f"got {margin!r}")
    return int(margin)


# ---------------------------------------------------------------------------- registry and unified entry

TARGET_FNS: dict[str, Callable] = {
    "normface": normface_target,
    "sphereface": sphereface_target,
    "cosface": cosface_target,
    "arcface": arcface_target,
}
KINDS = ("softmax",) + tuple(TARGET_FNS)


def _check_args(kind, scale, margin):
    if kind not in KINDS:
        raise ValueError(f"unknown margin-softmax kind {kind!r}; kinds: {list(KINDS)}")
    if kind == "softmax":
        if scale is not None or margin not in (None, 0):
            raise ValueError("kind='softmax' (plain linear logits) takes no scale or margin")
        return
    if kind == "sphereface":
        _check_sphereface_margin(4 if margin is None else margin)
    elif kind != "normface":
        if margin is None:
            raise ValueError(f"kind={kind!r} needs a margin")
        if isinstance(margin, (int, float)) and not margin >= 0:
            raise ValueError(f"margin must be >= 0, got {margin!r}")
    if scale is None and kind != "sphereface":
        raise ValueError(f"kind={kind!r} needs a scale s (only sphereface can use the feature norm, scale=None)")
    if isinstance(scale, (int, float)) and not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")


def margin_logits(features: jax.Array, weights: jax.Array, labels: jax.Array | None = None, *, kind: str,
                  scale=None, margin=None, easy_margin: bool = False, lam=0.0, bias: jax.Array | None = None,
                  eps: float = 1e-12) -> jax.Array:
    """Logits ``[N, C]`` of a margin softmax (see the module docstring for each ``kind``).

    Args:
      features: [N, D] embeddings (float32 or float64; computed in their promoted dtype with ``weights``).
      weights: [C, D] class weights (one row per class).
      labels: [N] int class ids in [0, C); the margin applies to ``logits[i, labels[i]]`` only. None:
        inference logits without any margin (``s cos θ``, ``‖x‖ cos θ`` or the linear logits).
      kind: one of ``KINDS``: "softmax", "normface", "sphereface", "cosface", "arcface".
      scale: s (> 0; may be a traced array, e.g. a learned scale). Required except for "softmax"
        (none) and "sphereface" (None = the feature norm ‖x‖, the original A-Softmax).
      margin: cosface m (cosine), arcface m (radians), sphereface integer m (default 4); "normface": 0/None.
      easy_margin: arcface only: margin only where cos θ > 0 (else the threshold form).
      lam: sphereface only: the annealing blend λ (scalar, may be traced).
      bias: "softmax" only: optional [C] bias.
      eps: normalisation floor (``max(‖x‖, eps)``).
    """
    _check_args(kind, scale, margin)
    if kind == "softmax":
        logits = jnp.asarray(features) @ jnp.asarray(weights).T
        return logits if bias is None else logits + bias
    if bias is not None:
        raise ValueError(f"bias applies to kind='softmax' only, got kind={kind!r}")
    if easy_margin and kind != "arcface":
        raise ValueError(f"easy_margin applies to kind='arcface' only, got kind={kind!r}")
    cos = cosine_matrix(features, weights, eps=eps)
    if kind == "sphereface" and scale is None:
        s = safe_norm(jnp.asarray(features, cos.dtype), eps=eps)[:, None]
    else:
        s = jnp.asarray(scale, cos.dtype)
    if labels is None:
        return s * cos
    labels = jnp.asarray(labels)
    cos_y = jnp.take_along_axis(cos, labels[:, None].astype(jnp.int32), axis=1)  # [N, 1]
    if kind == "arcface":
        target = arcface_target(cos_y, margin, easy_margin=easy_margin)
    elif kind == "sphereface":
        target = sphereface_target(cos_y, 4 if margin is None else margin, lam=lam)
    else:
        target = TARGET_FNS[kind](cos_y, 0.0 if margin is None else margin)
    is_target = jnp.arange(cos.shape[1])[None, :] == labels[:, None]
    return s * jnp.where(is_target, target, cos)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, *, reduction: str = "mean") -> jax.Array:
    """Cross-entropy of integer ``labels [N]`` under ``logits [N, C]`` in float32 (float64 for float64
    logits); ``reduction`` "mean" | "sum" | "none" (the same as ``torch.nn.functional.cross_entropy``)."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    logits = jnp.asarray(logits)
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.asarray(labels)[:, None].astype(jnp.int32), axis=-1)[:, 0]
    if reduction == "none":
        return nll
    return jnp.sum(nll) if reduction == "sum" else jnp.mean(nll)


def margin_softmax_loss(features: jax.Array, weights: jax.Array, labels: jax.Array, *, kind: str, scale=None,
                        margin=None, easy_margin: bool = False, lam=0.0, bias: jax.Array | None = None,
                        eps: float = 1e-12, reduction: str = "mean") -> jax.Array:
    """Cross-entropy (float32 / float64) of the margin logits of ``margin_logits`` (same arguments)."""
    logits = margin_logits(features, weights, labels, kind=kind, scale=scale, margin=margin,
                           easy_margin=easy_margin, lam=lam, bias=bias, eps=eps)
    return softmax_cross_entropy(logits, labels, reduction=reduction)
