"""Public decode-attention op: checks, the interpret switch, the split plan, the combine, the VJP.

``decode_attention(q, k_cache, v_cache, lengths, *, tree_mask=None, sm_scale=None,
interpret=None, num_splits=None, block_k=None) -> o`` computes exactly what
:func:`pallas_kernels.reference_decode_attention` computes (semantics in
:mod:`pallas_kernels.decode.reference`) with the flash-decoding algorithm:

1. The cache is padded to a multiple of ``block_k`` (only when ``S`` is not one already; the
   padding is masked) and the queries are regrouped per kv head into ``[B, Hkv, Tq * G, D]``.
2. The split-K kernel (:mod:`.triton`) runs over the grid ``(B, Hkv, num_splits)``; each program
   reduces one contiguous chunk of the row's live cache blocks and writes its normalised partial
   output and base-2 log-sum-exp ``lse2_s``.
3. The splits are combined in plain JAX: ``o = sum_s 2^(lse2_s - M) o_s / sum_s 2^(lse2_s - M)``
   with ``M = max_s lse2_s`` (empty splits have ``lse2_s = -inf`` and weight 0; a query that saw
   no key anywhere gets 0).

Split plan (:func:`decode_plan`), when not given:

* ``block_k = min(64 if D <= 128 else 32, max(16, next_pow2(S)))``: 64 keys per step keeps a
  ``[R_pad, 64]`` score tile and the K/V blocks in registers for head dims up to 128.
* ``num_splits = max(1, min(cdiv(128, B * Hkv), 32, n_blocks // 2))`` with
  ``n_blocks = cdiv(S, block_k)``: enough programs for about one wave on a 100-130 SM GPU
  when ``B * Hkv`` alone is too small, at most 32 partials, and at least two blocks per split
  at full length. The kernel divides each row's *live* blocks (``cdiv(lengths[b], block_k)``)
  among the splits at run time, so short rows stay balanced and splits beyond a row's blocks
  are empty (they load nothing).

Given values are validated: ``block_k`` a power of two >= 16, ``num_splits`` an int >= 1 (any
number; splits without blocks contribute nothing).

``interpret=None`` picks interpret mode iff ``jax.default_backend() != "gpu"``;
``interpret=False`` without a GPU raises ``RuntimeError``. There is no fallback to the reference.

Gradients: decoding is inference, but the op is differentiable through a ``jax.custom_vjp``
whose backward is the VJP of the plain-JAX reference (recomputed from q, k_cache, v_cache; it
materialises the ``[B, Hq, Tq, S]`` scores) - not a kernel.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._interpret import resolve_interpret
from pallas_kernels.decode.reference import check_decode_args, decode_reference_core
from pallas_kernels.decode.triton import DecodeStatic, decode_partials

__all__ = ["decode_attention", "decode_plan"]

_HEAD_DIMS = (16, 32, 64, 128, 256)
_TARGET_PROGRAMS = 128      # about one wave of programs on a 100-130 SM GPU
_MAX_SPLITS = 32
_MIN_BLOCKS_PER_SPLIT = 2


def _is_pow2(n):
    return isinstance(n, int) and not isinstance(n, bool) and n > 0 and (n & (n - 1)) == 0


def _next_pow2(n):
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a, b):
    return -(-a // b)


def decode_plan(B, S, Hkv, D, *, num_splits=None, block_k=None):
    """``(num_splits, block_k)`` for a call: the heuristic of the module docstring for ``None``,
    else the validated given values."""
    if block_k is None:
        block_k = min(64 if D <= 128 else 32, max(16, _next_pow2(S)))
    elif not _is_pow2(block_k) or block_k < 16:
        raise ValueError(f"block_k must be a power of two >= 16, got {block_k!r}")
    if num_splits is None:
        n_blocks = _cdiv(S, block_k)
        num_splits = max(1, min(_cdiv(_TARGET_PROGRAMS, B * Hkv), _MAX_SPLITS,
                                n_blocks // _MIN_BLOCKS_PER_SPLIT))
    elif not isinstance(num_splits, int) or isinstance(num_splits, bool):
        raise TypeError(f"num_splits must be None or an int, got {num_splits!r}")
    elif num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    return num_splits, block_k


def _compiler_params(st: DecodeStatic):
    if st.interpret:
        return None
    from jax.experimental.pallas import triton as pltriton  # GPU only
    return pltriton.CompilerParams(num_warps=st.num_warps, num_stages=st.num_stages)


def _pack_tree(tree_mask, G, R_pad):
    """bool ``[B, Tq, Tq]`` -> int32 ``[B, W, R_pad]``: bit ``k % 32`` of word ``k // 32`` of
    row ``t * G + g`` is ``tree_mask[b, t, k]`` (padding rows are 0)."""
    B, Tq, _ = tree_mask.shape
    W = _cdiv(Tq, 32)
    bits = jnp.pad(tree_mask, ((0, 0), (0, 0), (0, W * 32 - Tq))).reshape(B, Tq, W, 32)
    weights = jnp.left_shift(jnp.uint32(1), jnp.arange(32, dtype=jnp.uint32))
    words = jnp.sum(bits.astype(jnp.uint32) * weights, axis=-1, dtype=jnp.uint32)  # distinct bits
    words = jax.lax.bitcast_convert_type(words, jnp.int32)           # [B, Tq, W]
    words = jnp.repeat(words, G, axis=1)                              # [B, Tq * G, W]
    words = jnp.pad(words, ((0, 0), (0, R_pad - Tq * G), (0, 0)))
    return jnp.transpose(words, (0, 2, 1))


def _combine(o_parts, lse2):
    """Log-sum-exp merge of the splits: ``[B, Hkv, ns, R, D]``, ``[B, Hkv, ns, R]`` -> ``[B, Hkv, R, D]``."""
    m = jnp.max(lse2, axis=2, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)          # no split saw a key: all weights 0
    w = jnp.exp2(lse2 - m)                          # empty splits: 2^-inf = 0
    den = jnp.sum(w, axis=2)
    o = jnp.sum(w[..., None] * o_parts, axis=2)
    return o / jnp.where(den == 0.0, 1.0, den)[..., None]


def _forward(q, k_cache, v_cache, lengths, tree_mask, st: DecodeStatic):
    B, Tq, Hq, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    R = Tq * st.G
    q_rows = q.reshape(B, Tq, Hkv, st.G, D).transpose(0, 2, 1, 3, 4).reshape(B, Hkv, R, D)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, st.R_pad - R), (0, 0)))
    if st.S_pad != S:
        pad = ((0, 0), (0, st.S_pad - S), (0, 0), (0, 0))
        k_cache, v_cache = jnp.pad(k_cache, pad), jnp.pad(v_cache, pad)
    bits = None if tree_mask is None else _pack_tree(tree_mask, st.G, st.R_pad)
    o_parts, lse2 = decode_partials(q_rows, k_cache, v_cache, lengths, bits, st,
                                    _compiler_params(st))
    o = _combine(o_parts, lse2)[:, :, :R]                     # [B, Hkv, Tq * G, D]
    o = o.reshape(B, Hkv, Tq, st.G, D).transpose(0, 2, 1, 3, 4).reshape(B, Tq, Hq, D)
    return o.astype(q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _decode(q, k_cache, v_cache, lengths, tree_mask, st):
    return _forward(q, k_cache, v_cache, lengths, tree_mask, st)


def _decode_fwd_rule(q, k_cache, v_cache, lengths, tree_mask, st):
    return (_forward(q, k_cache, v_cache, lengths, tree_mask, st),
            (q, k_cache, v_cache, lengths, tree_mask))


def _decode_bwd_rule(st, res, do):
    q, k_cache, v_cache, lengths, tree_mask = res
    ref = lambda q, k, v: decode_reference_core(q, k, v, lengths, tree_mask, st.sm_scale)
    _, vjp = jax.vjp(ref, q, k_cache, v_cache)
    return (*vjp(do), None, None)


_decode.defvjp(_decode_fwd_rule, _decode_bwd_rule)


def decode_attention(q, k_cache, v_cache, lengths, *, tree_mask=None, sm_scale=None,
                     interpret=None, num_splits=None, block_k=None):
    """Split-K (flash-decoding) attention of the last ``Tq`` cache positions over the cache.

    Same result as :func:`pallas_kernels.reference_decode_attention` (semantics there).

    Args:
      q: ``[B, Tq, Hq, D]``, the queries of positions ``lengths[b] - Tq + i``; ``D`` one of
        16, 32, 64, 128, 256.
      k_cache, v_cache: ``[B, S, Hkv, D]``, ``Hq % Hkv == 0``; one float dtype with q
        (float32, bfloat16 or float16). Entries at positions ``>= lengths[b]`` are ignored.
      lengths: int ``[B]``, ``Tq <= lengths[b] <= S``; may be traced (it is never static).
      tree_mask: ``None`` (causal among the new positions) or bool ``[B, Tq, Tq]`` / ``[Tq, Tq]``.
      sm_scale: score scale, default ``1/sqrt(D)``; a finite number > 0.
      interpret: ``None`` (interpret iff no GPU backend), ``True`` or ``False``.
      num_splits: number of split-K chunks per (row, kv head); ``None`` -> :func:`decode_plan`.
      block_k: keys per kernel step, a power of two >= 16; ``None`` -> :func:`decode_plan`.

    Returns:
      ``o [B, Tq, Hq, D]`` in ``q.dtype`` (0 for a query that sees no key).

    Differentiable in q, k_cache, v_cache, but the backward is the VJP of the plain-JAX
    reference (not a kernel): fine for tests and occasional use, not for training at scale.
    """
    (B, Tq, S, Hq, Hkv, D), lengths, tree_mask, sm_scale = check_decode_args(
        q, k_cache, v_cache, lengths, tree_mask, sm_scale)
    if D not in _HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {_HEAD_DIMS} for the Pallas kernel, got {D}")
    num_splits, block_k = decode_plan(B, S, Hkv, D, num_splits=num_splits, block_k=block_k)
    interpret = resolve_interpret(interpret, "decode_attention")
    G = Hq // Hkv
    st = DecodeStatic(Tq=Tq, G=G, R_pad=max(16, _next_pow2(Tq * G)),
                      S_pad=_cdiv(S, block_k) * block_k, D=D, block_k=block_k,
                      num_splits=num_splits,
                      tree_words=0 if tree_mask is None else _cdiv(Tq, 32),
                      sm_scale=sm_scale, dtype=jnp.dtype(q.dtype).name, interpret=interpret)
    return _decode(q, k_cache, v_cache, lengths, tree_mask, st)
