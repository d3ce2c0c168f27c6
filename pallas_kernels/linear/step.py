"""O(1)-per-token decode step of causal linear attention (the RNN view).

The state after tokens ``0..t`` is ``S = sum_{j<=t} k_j^T v_j`` (``[B, H, Dk, Dv]``) and
``z = sum_{j<=t} k_j`` (``[B, H, Dk]``), both float32 whatever the input dtype. One step adds
token ``t`` to the state *first* (causal attention includes the diagonal) and then reads it::

    S <- S + k_t^T v_t,   z <- z + k_t,   o_t = q_t S / (q_t . z + eps)

so running the step from :func:`linear_attention_init_state` over a sequence reproduces the
causal output of :func:`pallas_kernels.linear_attention` at every position, with a state whose
size does not depend on the sequence length.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.linear.reference import check_eps

__all__ = ["linear_attention_init_state", "linear_attention_step"]

_HI = jax.lax.Precision.HIGHEST


def linear_attention_init_state(batch, heads, dk, dv, dtype=jnp.float32):
    """The empty state ``(S [batch, heads, dk, dv], z [batch, heads, dk])`` of zeros.

    ``dtype`` must be float32 (the state is always carried in float32; the argument exists so a
    caller can spell it out). Raises ``ValueError`` for non-positive sizes.
    """
    for name, n in (("batch", batch), ("heads", heads), ("dk", dk), ("dv", dv)):
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    if jnp.dtype(dtype) != jnp.float32:
        raise TypeError(f"the linear-attention state is float32, got dtype={jnp.dtype(dtype)}")
    return (jnp.zeros((batch, heads, dk, dv), jnp.float32),
            jnp.zeros((batch, heads, dk), jnp.float32))


def _check_step_args(state, q_t, k_t, v_t):
    if not (isinstance(state, (tuple, list)) and len(state) == 2):
        raise TypeError("state must be the pair (S, z) from linear_attention_init_state")
    S, z = state
    if getattr(S, "ndim", None) != 4 or getattr(z, "ndim", None) != 3:
        raise ValueError(f"state must be (S [B, H, Dk, Dv], z [B, H, Dk]), got shapes "
                         f"{getattr(S, 'shape', None)} and {getattr(z, 'shape', None)}")
    B, H, Dk, Dv = S.shape
    if z.shape != (B, H, Dk):
        raise ValueError(f"state z must have shape {(B, H, Dk)} to match S {S.shape}, got "
                         f"{z.shape}")
    for name, x, shape in (("q_t", q_t, (B, H, Dk)), ("k_t", k_t, (B, H, Dk)),
                           ("v_t", v_t, (B, H, Dv))):
        if getattr(x, "shape", None) != shape:
            raise ValueError(f"{name} must have shape {shape} [batch, heads, dim] to match the "
                             f"state, got {getattr(x, 'shape', None)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be a float array, got dtype {x.dtype}")
    return S, z


def linear_attention_step(state, q_t, k_t, v_t, *, eps=1e-6):
    """One decode step: add token ``t`` to the state, then attend with ``q_t``.

    Args:
      state: ``(S [B, H, Dk, Dv], z [B, H, Dk])`` float32 (from
        :func:`linear_attention_init_state` or a previous step).
      q_t, k_t: ``[B, H, Dk]`` feature-mapped; v_t: ``[B, H, Dv]``.
      eps: added to the normaliser, a finite number > 0.

    Returns:
      ``(o_t [B, H, Dv] in q_t.dtype, new_state)``; the cost is O(Dk * Dv) per (batch, head),
      independent of how many tokens came before.
    """
    S, z = _check_step_args(state, q_t, k_t, v_t)
    eps = check_eps(eps)
    q, k, v = (x.astype(jnp.float32) for x in (q_t, k_t, v_t))
    S = S + k[..., :, None] * v[..., None, :]
    z = z + k
    num = jnp.einsum("bhd,bhde->bhe", q, S, precision=_HI)
    den = jnp.sum(q * z, axis=-1)
    o = num / (den + eps)[..., None]
    return o.astype(q_t.dtype), (S, z)
