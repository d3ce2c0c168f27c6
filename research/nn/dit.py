"""Diffusion Transformer (DiT, Peebles & Xie 2023) with SD3-style QK RMSNorm, in flax.linen.

Images NHWC ``[B, H, W, C]`` are cut into ``p x p`` patches, embedded with a linear layer plus a
fixed 2-D sin-cos position embedding, processed by ``depth`` adaLN-Zero blocks conditioned on
``c = embed(t) + embed(y)``, and mapped back to ``[B, H, W, C]`` by a zero-initialised final
adaLN layer, so the network outputs exactly zero at initialisation.

Label id ``num_classes`` is the null label used for classifier-free guidance; with
``train=True`` labels are replaced by it with probability ``class_dropout_prob`` (rng stream
``'dropout'``).

Labels outside ``[0, num_classes]`` embed as NaN (or, for -1, silently as the null label). The data
pipeline checks them eagerly (``research.data.iterators.check_labels`` / ``batch_iterator(...,
num_classes=...)``); inside the model ``LabelEmbedder`` carries a ``jax.experimental.checkify``
debug check, free and inactive in plain code, reported when the caller checkifies::

    err, out = jax.jit(checkify.checkify(model_fn))(params, x, t, y)
    err.throw()   # JaxRuntimeError: DiT: class labels must be in [0, 10] ...
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import checkify

from research.nn.attention import attention
from research.nn.embeddings import sincos_2d, timestep_embedding
from research.nn.layers import (
    Mlp, RMSNorm, dense_dot_general, modulate, patchify, unpatchify, xavier_uniform,
)
from research.nn.remat import remat_policy

_normal002 = nn.initializers.normal(0.02)
_DOT_POLICIES = ("dots_saveable", "dots_with_no_batch_dims_saveable")
_zeros = nn.initializers.zeros


def _dot(custom: bool):
    return dense_dot_general if custom else None


class TimestepEmbedder(nn.Module):
    """t [B] -> sinusoidal(t * time_scale, freq_dim) -> Dense -> SiLU -> Dense -> [B, hidden]."""

    hidden_size: int
    freq_dim: int = 256
    time_scale: float = 1000.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    custom_matmul_vjp: bool = False  # see DiT.custom_matmul_vjp

    @nn.compact
    def __call__(self, t):
        emb = timestep_embedding(t * self.time_scale, self.freq_dim).astype(self.dtype)
        kw = dict(kernel_init=_normal002, dtype=self.dtype, param_dtype=self.param_dtype,
                  dot_general=_dot(self.custom_matmul_vjp))
        h = nn.silu(nn.Dense(self.hidden_size, name="mlp_0", **kw)(emb))
        return nn.Dense(self.hidden_size, name="mlp_2", **kw)(h)


class LabelEmbedder(nn.Module):
    """y [B] int -> [B, hidden]; table has ``num_classes + 1`` rows (the last is the null label).

    ``y`` must lie in ``[0, num_classes]``: a checkify debug check (active under
    ``checkify.checkify``, a no-op otherwise) reports the first bad label."""

    num_classes: int
    hidden_size: int
    dropout_prob: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, y, *, train: bool, force_drop_ids=None):
        y = jnp.asarray(y, jnp.int32)
        bad = (y < 0) | (y > self.num_classes)
        k = self.num_classes
        checkify.debug_check(~jnp.any(bad), f"DiT: class labels must be in [0, {k}] ({k} is the null label); got "
                             "{} bad label(s), the first is {}", jnp.sum(bad), y.reshape(-1)[jnp.argmax(bad.reshape(-1))])
        if train and self.dropout_prob > 0:
            drop = jax.random.bernoulli(self.make_rng("dropout"), self.dropout_prob, y.shape)
            y = jnp.where(drop, self.num_classes, y)
        if force_drop_ids is not None:
            y = jnp.where(jnp.asarray(force_drop_ids) == 1, self.num_classes, y)
        table = nn.Embed(
            self.num_classes + 1, self.hidden_size, embedding_init=_normal002,
            dtype=self.dtype, param_dtype=self.param_dtype, name="embedding_table",
        )
        return table(y)


class SelfAttention(nn.Module):
    """QKV projection, optional RMSNorm on q and k per head, attention dispatch, out projection."""

    hidden_size: int
    num_heads: int
    qk_norm: bool = True
    attn_impl: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    custom_matmul_vjp: bool = False  # Dense matmuls through dense_dot_general (see DiT)

    @nn.compact
    def __call__(self, x):
        b, n, _ = x.shape
        hd = self.hidden_size // self.num_heads
        kw = dict(kernel_init=xavier_uniform, dtype=self.dtype, param_dtype=self.param_dtype,
                  dot_general=dense_dot_general if self.custom_matmul_vjp else None)
        qkv = nn.Dense(3 * self.hidden_size, name="qkv", **kw)(x)
        qkv = checkpoint_name(qkv, "qkv")
        q, k, v = jnp.split(qkv.reshape(b, n, 3, self.num_heads, hd), 3, axis=2)
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # [B, N, H, hd]
        if self.qk_norm:
            q = RMSNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="q_norm")(q)
            k = RMSNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="k_norm")(k)
        o = attention(q, k, v, impl=self.attn_impl)
        o = checkpoint_name(o, "attn_out")
        return nn.Dense(self.hidden_size, name="proj", **kw)(o.reshape(b, n, self.hidden_size))


def _layer_norm(dtype, name):
    return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype, name=name)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block. ``(x [B,N,D], c [B,D]) -> (x, None)`` (scan-compatible)."""

    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    qk_norm: bool = True
    attn_impl: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    custom_matmul_vjp: bool = False  # see DiT.custom_matmul_vjp

    @nn.compact
    def __call__(self, x, c):
        d = self.hidden_size
        mod = nn.Dense(
            6 * d, kernel_init=_zeros, dtype=self.dtype, param_dtype=self.param_dtype,
            dot_general=dense_dot_general if self.custom_matmul_vjp else None, name="adaLN_modulation",
        )(nn.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        h = modulate(_layer_norm(self.dtype, "norm1")(x), shift_msa, scale_msa)
        h = SelfAttention(
            d, self.num_heads, self.qk_norm, self.attn_impl, self.dtype, self.param_dtype,
            custom_matmul_vjp=self.custom_matmul_vjp, name="attn",
        )(h)
        x = x + gate_msa[:, None, :] * h
        h = modulate(_layer_norm(self.dtype, "norm2")(x), shift_mlp, scale_mlp)
        h = Mlp(
            int(d * self.mlp_ratio), d, self.dtype, self.param_dtype, hidden_name="mlp_hidden",
            custom_matmul_vjp=self.custom_matmul_vjp, name="mlp",
        )(h)
        x = x + gate_mlp[:, None, :] * h
        return x, None


class FinalLayer(nn.Module):
    """adaLN (shift, scale) -> LayerNorm -> zero-initialised Dense to p*p*C."""

    hidden_size: int
    out_features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    custom_matmul_vjp: bool = False  # see DiT.custom_matmul_vjp

    @nn.compact
    def __call__(self, x, c):
        mod = nn.Dense(
            2 * self.hidden_size, kernel_init=_zeros, dtype=self.dtype,
            param_dtype=self.param_dtype, dot_general=_dot(self.custom_matmul_vjp), name="adaLN_modulation",
        )(nn.silu(c))
        shift, scale = jnp.split(mod, 2, axis=-1)
        x = modulate(_layer_norm(self.dtype, "norm_final")(x), shift, scale)
        return nn.Dense(
            self.out_features, kernel_init=_zeros, dtype=self.dtype,
            param_dtype=self.param_dtype, dot_general=_dot(self.custom_matmul_vjp), name="linear",
        )(x)


class DiT(nn.Module):
    """Class-conditional DiT. ``(x [B,H,W,C], t [B], y [B] int32) -> [B,H,W,C] float32``.

    With ``scan_blocks=True`` the blocks' params are stacked under ``blocks`` with a leading
    ``depth`` axis; otherwise they live under ``blocks_0 ... blocks_{depth-1}``.
    """

    input_size: int = 8
    in_channels: int = 1
    patch_size: int = 2
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10
    class_dropout_prob: float = 0.1
    qk_norm: bool = True
    attn_impl: str = "xla"
    remat_policy: str = "none"
    scan_blocks: bool = True
    time_scale: float = 1000.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    # Dense matmuls through research.nn.layers.dense_dot_general: a custom VJP whose weight
    # gradient runs 10-25 % faster per train step on XLA:CPU (a no-op elsewhere). Off by default:
    # a custom_vjp function has no forward-mode derivative, so jax.jvp through the model (the
    # PF-ODE likelihood's divergence) raises; turn it on for CPU training runs.
    custom_matmul_vjp: bool = False
    # with scan_blocks=True: the `unroll` of the nn.scan over the blocks (1: a while loop of depth
    # iterations, the default; k: k blocks per iteration; depth: fully unrolled). Parameter layout
    # (stacked under `blocks`) and results are the same for every value.
    scan_unroll: int = 1

    def _check(self, x, t, y):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size must be divisible by 4 (2-D sin-cos), got {self.hidden_size}")
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} not divisible by patch_size {self.patch_size}")
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        expect = (self.input_size, self.input_size, self.in_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != expect:
            raise ValueError(f"x must have shape [B, {expect[0]}, {expect[1]}, {expect[2]}] (NHWC), got {x.shape}")
        b = x.shape[0]
        if jnp.shape(t) != (b,):
            raise ValueError(f"t must have shape [{b}], got {jnp.shape(t)}")
        if jnp.shape(y) != (b,):
            raise ValueError(f"y must have shape [{b}], got {jnp.shape(y)}")
        if not jnp.issubdtype(jnp.asarray(y).dtype, jnp.integer):
            raise TypeError(f"y must be integer class ids, got dtype {jnp.asarray(y).dtype}")

    @nn.compact
    def __call__(self, x, t, y, *, train: bool = False, force_drop_ids=None):
        self._check(x, t, y)
        p, d, s = self.patch_size, self.hidden_size, self.input_size
        grid = s // p
        tokens = patchify(x.astype(self.dtype), p)
        h = nn.Dense(
            d, kernel_init=xavier_uniform, dtype=self.dtype, param_dtype=self.param_dtype,
            dot_general=_dot(self.custom_matmul_vjp), name="x_embedder",
        )(tokens)
        h = h + jnp.asarray(sincos_2d(d, grid, grid), self.dtype)[None]
        c = TimestepEmbedder(
            d, time_scale=self.time_scale, dtype=self.dtype, param_dtype=self.param_dtype,
            custom_matmul_vjp=self.custom_matmul_vjp, name="t_embedder",
        )(jnp.asarray(t, jnp.float32))
        c = c + LabelEmbedder(
            self.num_classes, d, self.class_dropout_prob, self.dtype, self.param_dtype,
            name="y_embedder",
        )(y, train=train, force_drop_ids=force_drop_ids)

        block_cls = DiTBlock
        policy_name = self.remat_policy
        if policy_name != "none":
            block_cls = nn.remat(
                DiTBlock, policy=remat_policy(policy_name), prevent_cse=not self.scan_blocks
            )
        else:
            remat_policy(policy_name)  # validates
        block_kw = dict(
            hidden_size=d, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
            qk_norm=self.qk_norm, attn_impl=self.attn_impl, dtype=self.dtype,
            param_dtype=self.param_dtype,
            # the dots_* remat policies look for dot_general primitives, which the custom VJP hides
            custom_matmul_vjp=self.custom_matmul_vjp and policy_name not in _DOT_POLICIES,
        )
        if self.scan_blocks:
            blocks = nn.scan(
                block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=nn.broadcast, length=self.depth, unroll=self.scan_unroll,
            )(**block_kw, name="blocks")
            h, _ = blocks(h, c)
        else:
            for i in range(self.depth):
                h, _ = block_cls(**block_kw, name=f"blocks_{i}")(h, c)

        out = FinalLayer(d, p * p * self.in_channels, self.dtype, self.param_dtype,
                         custom_matmul_vjp=self.custom_matmul_vjp, name="final_layer")(h, c)
        return unpatchify(out, p, s, s, self.in_channels).astype(jnp.float32)


def make_model_fn(model: nn.Module):
    """``model_fn(params, x, t, cond, key) -> out``; ``key=None`` means eval mode (no label dropout)."""

    def model_fn(params, x, t, cond, key=None):
        return model.apply(
            {"params": params}, x, t, cond, train=key is not None,
            rngs={"dropout": key} if key is not None else {},
        )

    return model_fn


def init_dit(model: DiT, key, batch_size: int = 1):
    """Initialises ``model`` on dummy inputs; returns the params pytree."""
    x = jnp.zeros((batch_size, model.input_size, model.input_size, model.in_channels), jnp.float32)
    t = jnp.zeros((batch_size,), jnp.float32)
    y = jnp.zeros((batch_size,), jnp.int32)
    return jax.jit(lambda k: model.init({"params": k}, x, t, y, train=False)["params"])(key)
