"""Chunked linear-attention kernels (Pallas, Triton lowering on GPU / interpret mode on CPU).

Notation for one (batch, head): the sequence is cut into ``n = T_pad / C`` chunks of ``C``
rows; ``q_c, k_c [C, Dk]``, ``v_c [C, Dv]`` are chunk ``c``; ``mask`` keeps the lower triangle
*including* the diagonal (row ``i`` of a chunk sees its columns ``j <= i``). Every dot product
accumulates in float32; float32 inputs use exact float32 products (``Precision.HIGHEST``).

Grid ``(B, H)``; one program owns a whole (batch, head) sequence and walks its chunks in a
sequential ``fori_loop``, carrying the float32 state in registers (no ``[T, T]`` array, no
state written to memory).

**Forward** (``linear_fwd``; state ``S = sum k_j^T v_j [Dk, Dv]``, ``z = sum k_j [Dk]`` over
the earlier chunks)::

    A     = mask(q_c k_c^T)                                   [C, C]
    num_c = A v_c + q_c S,     den_c = rowsum(A) + q_c . z
    o_c   = num_c / (den_c + eps);   S += k_c^T v_c,   z += colsum(k_c)

The kernel writes ``o`` and the float32 denominator ``den`` (without ``eps``), which the
backward needs. Non-causal: a first pass sums ``S, z`` over all chunks, a second writes
``o_c = q_c S / (q_c . z + eps)``.

**Backward** (``linear_bwd``). With ``o = N / (d + eps)`` the op's custom VJP turns ``dO`` into
the cotangents of the un-normalised numerator and denominator (plain JAX, O(T)):
``g = dO / (d + eps)`` ``[T, Dv]`` and ``gd = -rowsum(dO * o) / (d + eps)`` ``[T]``. Writing
``P_ij = g_i . v_j + gd_i`` (the cotangent of the score ``q_i . k_j``, for ``j <= i``)::

    dq_i = sum_{j<=i} P_ij k_j                 -> forward direction, state (S, z)
    dk_j = sum_{i>=j} P_ij q_i                 -> reverse direction, state
    dv_j = sum_{i>=j} (q_i . k_j) g_i             dS = sum q_i^T g_i [Dk, Dv], dz = sum gd_i q_i

so, per chunk::

    dq_c = mask(P) k_c + g_c S^T + gd_c z^T                       (S, z: earlier chunks)
    dk_c = mask(P)^T q_c + v_c dS^T + 1 dz^T,  dv_c = mask(A)^T g_c + k_c dS   (dS, dz: later)

One program runs the forward-direction loop (``dq``) and then the reverse-direction loop
(``dk``, ``dv``); the transposed scores ``A^T = k_c q_c^T`` and ``P^T = v_c g_c^T + gd^T`` are
built directly (upper-triangular mask) so no register tile is transposed. Non-causal: the
totals ``S, z`` / ``dS, dz`` come from a first pass, and there is no intra-chunk term.

Padding: the wrapper zero-pads ``T`` to a chunk multiple (and ``Dk``, ``Dv`` to powers of two
>= 16). A zero key row adds exactly nothing to any score, to ``S`` or to ``z``; zero padded
``g``/``gd`` rows add nothing to ``dS``/``dz``; so no in-kernel mask is needed for the padding
and the padded output rows/columns are sliced off by the wrapper.

Low-precision inputs (bfloat16 / float16): the masked scores and the float32 states are cast to
the input dtype right before the matmuls that use them (tensor-core operands, as FlashAttention
does with ``P``); the state itself is always accumulated in float32.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

__all__ = ["LinearStatic", "linear_fwd", "linear_bwd"]


@dataclasses.dataclass(frozen=True)
class LinearStatic:
    """Static (hashable) description of one linear-attention call, shared by both kernels."""

    T: int            # true sequence length
    T_pad: int        # padded to a multiple of chunk
    chunk: int        # C, a power of two >= 16
    Dk: int           # padded key dim (power of two >= 16)
    Dv: int           # padded value dim (power of two >= 16)
    causal: bool
    eps: float
    dtype: str        # input dtype name
    interpret: bool

    @property
    def n_chunks(self) -> int:
        return self.T_pad // self.chunk

    @property
    def precision(self):
        # float32 inputs: exact float32 products (Triton would otherwise be free to use TF32).
        return jax.lax.Precision.HIGHEST if self.dtype == "float32" else None


# ------------------------------------------------------------------------------ helpers
def _dot(a, b, dims, precision):
    return jax.lax.dot_general(a, b, (dims, ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def dot_nn(a, b, precision):   # a @ b
    return _dot(a, b, ((1,), (0,)), precision)


def dot_nt(a, b, precision):   # a @ b.T
    return _dot(a, b, ((1,), (1,)), precision)


def dot_tn(a, b, precision):   # a.T @ b
    return _dot(a, b, ((0,), (0,)), precision)


def _tril(C):
    """``[C, C]`` bool, True where column <= row (causal, diagonal included)."""
    r = jnp.arange(C, dtype=jnp.int32)
    return r[None, :] <= r[:, None]


def _triu(C):
    """The transposed mask: True where row <= column."""
    r = jnp.arange(C, dtype=jnp.int32)
    return r[:, None] <= r[None, :]


def _chunk(ref, c, C):
    start = pl.multiple_of(c * C, C)
    return start, ref[pl.ds(start, C), :]


def _rowvec(ref, start, C):
    return ref[pl.ds(start, C)]


# ------------------------------------------------------------------------------ forward
def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, den_ref, *, st: LinearStatic):
    C, n, prec, eps = st.chunk, st.n_chunks, st.precision, st.eps

    def kv_sum(c, carry):   # S += k_c^T v_c, z += colsum(k_c)
        S, z = carry
        _, k = _chunk(k_ref, c, C)
        _, v = _chunk(v_ref, c, C)
        return S + dot_tn(k, v, prec), z + jnp.sum(k.astype(jnp.float32), axis=0)

    def write(start, num, den):
        o_ref[pl.ds(start, C), :] = (num / (den + eps)[:, None]).astype(o_ref.dtype)
        den_ref[pl.ds(start, C)] = den

    def inter(q, S, z):     # q_c S and q_c . z from the float32 state
        return (dot_nn(q, S.astype(q.dtype), prec),
                jnp.sum(q.astype(jnp.float32) * z[None, :], axis=1))

    state0 = (jnp.zeros((st.Dk, st.Dv), jnp.float32), jnp.zeros((st.Dk,), jnp.float32))
    if st.causal:
        tril = _tril(C)

        def step(c, carry):
            S, z = carry
            start, q = _chunk(q_ref, c, C)
            _, k = _chunk(k_ref, c, C)
            _, v = _chunk(v_ref, c, C)
            a = jnp.where(tril, dot_nt(q, k, prec), 0.0)                 # [C, C] float32
            num, den = inter(q, S, z)
            write(start, num + dot_nn(a.astype(v.dtype), v, prec), den + jnp.sum(a, axis=1))
            return kv_sum(c, carry)

        jax.lax.fori_loop(0, n, step, state0)
    else:
        S, z = jax.lax.fori_loop(0, n, kv_sum, state0)

        def out(c, _):
            start, q = _chunk(q_ref, c, C)
            write(start, *inter(q, S, z))
            return 0

        jax.lax.fori_loop(0, n, out, 0)


def _seq_spec(st, D):
    return pl.BlockSpec((None, st.T_pad, None, D), lambda b, h: (b, 0, h, 0))


def _row_spec(st):
    return pl.BlockSpec((None, None, st.T_pad), lambda b, h: (b, h, 0))


def linear_fwd(q, k, v, st: LinearStatic, compiler_params=None):
    """Padded ``q, k [B, T_pad, H, Dk]``, ``v [B, T_pad, H, Dv]`` ->
    ``(o [B, T_pad, H, Dv] in the input dtype, den [B, H, T_pad] float32)``."""
    B, T_pad, H, _ = q.shape
    return pl.pallas_call(
        functools.partial(_fwd_kernel, st=st),
        grid=(B, H),
        in_specs=[_seq_spec(st, st.Dk), _seq_spec(st, st.Dk), _seq_spec(st, st.Dv)],
        out_specs=[_seq_spec(st, st.Dv), _row_spec(st)],
        out_shape=[jax.ShapeDtypeStruct(v.shape, v.dtype),
                   jax.ShapeDtypeStruct((B, H, T_pad), jnp.float32)],
        interpret=st.interpret,
        compiler_params=compiler_params,
        name="linear_attention_fwd",
    )(q, k, v)


# ------------------------------------------------------------------------------ backward
def _bwd_kernel(q_ref, k_ref, v_ref, g_ref, gd_ref, dq_ref, dk_ref, dv_ref, *,
                st: LinearStatic):
    C, n, prec = st.chunk, st.n_chunks, st.precision
    f32 = jnp.float32

    def load(c):
        start, q = _chunk(q_ref, c, C)
        _, k = _chunk(k_ref, c, C)
        _, v = _chunk(v_ref, c, C)
        _, g = _chunk(g_ref, c, C)
        return start, q, k, v, g, _rowvec(gd_ref, start, C)

    def kv_sum(c, carry):   # forward-direction state: S += k^T v, z += colsum(k)
        S, z = carry
        _, k = _chunk(k_ref, c, C)
        _, v = _chunk(v_ref, c, C)
        return S + dot_tn(k, v, prec), z + jnp.sum(k.astype(f32), axis=0)

    def qg_sum(c, carry):   # reverse-direction state: dS += q^T g, dz += sum gd_i q_i
        dS, dz = carry
        start, q = _chunk(q_ref, c, C)
        _, g = _chunk(g_ref, c, C)
        gd = _rowvec(gd_ref, start, C)
        return dS + dot_tn(q, g, prec), dz + jnp.sum(gd[:, None] * q.astype(f32), axis=0)

    def dq_inter(g, gd, S, z):      # g_c S^T + gd_c z^T
        return dot_nt(g, S.astype(g.dtype), prec) + gd[:, None] * z[None, :]

    def dkdv_inter(k, v, dS, dz):   # (v_c dS^T + 1 dz^T, k_c dS)
        dSc = dS.astype(v.dtype)
        return dot_nt(v, dSc, prec) + dz[None, :], dot_nn(k, dSc, prec)

    def store(start, dq=None, dk=None, dv=None):
        for ref, x in ((dq_ref, dq), (dk_ref, dk), (dv_ref, dv)):
            if x is not None:
                ref[pl.ds(start, C), :] = x.astype(ref.dtype)

    zeros_kv = (jnp.zeros((st.Dk, st.Dv), f32), jnp.zeros((st.Dk,), f32))
    if st.causal:
        tril, triu = _tril(C), _triu(C)

        def dq_step(c, carry):
            S, z = carry
            start, q, k, v, g, gd = load(c)
            p = jnp.where(tril, dot_nt(g, v, prec) + gd[:, None], 0.0)   # [C_i, C_j]
            store(start, dq=dot_nn(p.astype(k.dtype), k, prec) + dq_inter(g, gd, S, z))
            return kv_sum(c, carry)

        def dkdv_step(i, carry):
            c = n - 1 - i
            dS, dz = carry
            start, q, k, v, g, gd = load(c)
            at = jnp.where(triu, dot_nt(k, q, prec), 0.0)                 # [C_j, C_i]
            pt = jnp.where(triu, dot_nt(v, g, prec) + gd[None, :], 0.0)
            dk, dv = dkdv_inter(k, v, dS, dz)
            store(start, dk=dk + dot_nn(pt.astype(q.dtype), q, prec),
                  dv=dv + dot_nn(at.astype(g.dtype), g, prec))
            return qg_sum(c, carry)

        jax.lax.fori_loop(0, n, dq_step, zeros_kv)
        jax.lax.fori_loop(0, n, dkdv_step, zeros_kv)
    else:
        S, z = jax.lax.fori_loop(0, n, kv_sum, zeros_kv)
        dS, dz = jax.lax.fori_loop(0, n, qg_sum, zeros_kv)

        def out(c, _):
            start, q, k, v, g, gd = load(c)
            dk, dv = dkdv_inter(k, v, dS, dz)
            store(start, dq=dq_inter(g, gd, S, z), dk=dk, dv=dv)
            return 0

        jax.lax.fori_loop(0, n, out, 0)


def linear_bwd(q, k, v, g, gd, st: LinearStatic, compiler_params=None):
    """Padded ``q, k, v``, ``g [B, T_pad, H, Dv]`` (input dtype) and ``gd [B, H, T_pad]``
    (float32) -> ``(dq, dk, dv)`` in the input dtype, shaped like ``q, k, v``."""
    B, T_pad, H, _ = q.shape
    sk, sv = _seq_spec(st, st.Dk), _seq_spec(st, st.Dv)
    return pl.pallas_call(
        functools.partial(_bwd_kernel, st=st),
        grid=(B, H),
        in_specs=[sk, sk, sv, sv, _row_spec(st)],
        out_specs=[sk, sk, sv],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)],
        interpret=st.interpret,
        compiler_params=compiler_params,
        name="linear_attention_bwd",
    )(q, k, v, g, gd)
