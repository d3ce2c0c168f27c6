"""PyTorch twin of ``research.nn.dit.DiT`` (adaLN-Zero DiT with SD3-style QK RMSNorm).

Same architecture, same parameter names (see :mod:`experiments.torch_baselines.convert`) and the
same initialisation scheme as the Flax model:

* ``x_embedder``, ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``: xavier-uniform weights;
* ``t_embedder.mlp_0/mlp_2`` weights and the label table: normal(0, 0.02);
* every ``adaLN_modulation`` and ``final_layer.linear``: zeros (the network outputs 0 at init);
* biases zero, RMSNorm scales one; LayerNorms have no affine parameters (eps 1e-6).

Conventions follow the JAX side exactly: images are NHWC ``[B, H, W, C]`` (not NCHW), patches are
flattened in ``(pi, pj, c)`` order, tokens row-major; the timestep embedding sees
``t * time_scale`` with ``[cos, sin]`` halves; label id ``num_classes`` is the null label of
classifier-free guidance. The output is float32 with the shape of ``x``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """``t [B]`` (already scaled) -> ``[B, dim]`` float32 ``[cos(t f_i), sin(t f_i)]``."""
    if t.ndim != 1:
        raise ValueError(f"t must have shape [B], got {tuple(t.shape)}")
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_2d(embed_dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding ``[grid_h * grid_w, embed_dim]`` float32.

    First half of the channels encodes the row, second half the column; each half is
    ``[sin(p w_i), cos(p w_i)]`` with ``w_i = 10000^(-i / (d/2))``, computed in float64.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for 2-D sin-cos, got {embed_dim}")

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = pos.reshape(-1).astype(np.float64)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    emb = np.concatenate([one_d(embed_dim // 2, rows), one_d(embed_dim // 2, cols)], axis=1)
    return emb.astype(np.float32)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, H, W, C]`` -> ``[B, (H/p)(W/p), p*p*C]`` (row-major tokens, features (pi, pj, c))."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, p: int, h: int, w: int, c: int) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b = tokens.shape[0]
    x = tokens.reshape(b, h // p, w // p, p, p, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x [B, N, D] * (1 + scale[:, None]) + shift[:, None]``."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


class RMSNorm(nn.Module):
    """RMS norm over the last axis, learnt ``scale`` (init 1), statistics in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(torch.mean(x32 * x32, dim=-1, keepdim=True) + self.eps)
        return (y * self.scale.float()).to(x.dtype)


def _linear(n_in: int, n_out: int, init: str) -> nn.Linear:
    layer = nn.Linear(n_in, n_out)
    with torch.no_grad():
        if init == "xavier":
            nn.init.xavier_uniform_(layer.weight)
        elif init == "normal002":
            nn.init.normal_(layer.weight, std=0.02)
        elif init == "zeros":
            nn.init.zeros_(layer.weight)
        else:
            raise ValueError(f"unknown init {init!r}")
        nn.init.zeros_(layer.bias)
    return layer


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256, time_scale: float = 1000.0):
        super().__init__()
        self.freq_dim, self.time_scale = freq_dim, time_scale
        self.mlp_0 = _linear(freq_dim, hidden, "normal002")
        self.mlp_2 = _linear(hidden, hidden, "normal002")

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t.float() * self.time_scale, self.freq_dim)
        return self.mlp_2(F.silu(self.mlp_0(emb)))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, hidden: int, dropout_prob: float):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)
        with torch.no_grad():
            nn.init.normal_(self.embedding_table.weight, std=0.02)

    def forward(self, y, *, train: bool, force_drop_ids=None, generator=None):
        y = y.long()
        if train and self.dropout_prob > 0:
            u = torch.rand(y.shape, generator=generator, device=y.device)
            y = torch.where(u < self.dropout_prob, torch.full_like(y, self.num_classes), y)
        if force_drop_ids is not None:
            y = torch.where(torch.as_tensor(force_drop_ids, device=y.device) == 1,
                            torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, num_heads: int, qk_norm: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden // num_heads
        self.qkv = _linear(hidden, 3 * hidden, "xavier")
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim)
            self.k_norm = RMSNorm(self.head_dim)
        self.proj = _linear(hidden, hidden, "xavier")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(dim=2)  # [B, N, H, hd]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(o.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, hidden: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = _linear(hidden, mlp_hidden, "xavier")
        self.fc2 = _linear(mlp_hidden, hidden, "xavier")

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True):
        super().__init__()
        self.adaLN_modulation = _linear(hidden, 6 * hidden, "zeros")
        self.attn = SelfAttention(hidden, num_heads, qk_norm)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio))

    def forward(self, x, c):
        mod = self.adaLN_modulation(F.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        x = x + gate_msa[:, None, :] * self.attn(modulate(_layer_norm(x), shift_msa, scale_msa))
        x = x + gate_mlp[:, None, :] * self.mlp(modulate(_layer_norm(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out_features: int):
        super().__init__()
        self.adaLN_modulation = _linear(hidden, 2 * hidden, "zeros")
        self.linear = _linear(hidden, out_features, "zeros")

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(F.silu(c)).chunk(2, dim=-1)
        return self.linear(modulate(_layer_norm(x), shift, scale))


class DiT(nn.Module):
    """``(x [B,H,W,C], t [B], y [B] int) -> [B,H,W,C] float32``; arguments as the Flax ``DiT``.

    ``forward(x, t, y, *, train=False, force_drop_ids=None, generator=None)``: with ``train=True``
    labels are replaced by the null label with probability ``class_dropout_prob`` (drawn from
    ``generator``); ``force_drop_ids`` ([B], 1 = drop) forces it, as on the JAX side.
    """

    def __init__(self, *, input_size: int = 8, in_channels: int = 1, patch_size: int = 2,
                 hidden_size: int = 128, depth: int = 4, num_heads: int = 4, mlp_ratio: float = 4.0,
                 num_classes: int = 10, class_dropout_prob: float = 0.1, qk_norm: bool = True,
                 time_scale: float = 1000.0):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} not divisible by num_heads {num_heads}")
        if hidden_size % 4:
            raise ValueError(f"hidden_size must be divisible by 4 (2-D sin-cos), got {hidden_size}")
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} not divisible by patch_size {patch_size}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.input_size, self.in_channels, self.patch_size = input_size, in_channels, patch_size
        self.hidden_size, self.depth, self.num_heads = hidden_size, depth, num_heads
        self.num_classes = num_classes
        grid = input_size // patch_size
        p2c = patch_size * patch_size * in_channels
        self.x_embedder = _linear(p2c, hidden_size, "xavier")
        self.register_buffer(
            "pos_embed", torch.from_numpy(sincos_2d(hidden_size, grid, grid))[None], persistent=False
        )
        self.t_embedder = TimestepEmbedder(hidden_size, time_scale=time_scale)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, p2c)

    def forward(self, x, t, y, *, train: bool = False, force_drop_ids=None, generator=None):
        s, c_in, p = self.input_size, self.in_channels, self.patch_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (s, s, c_in):
            raise ValueError(f"x must have shape [B, {s}, {s}, {c_in}] (NHWC), got {tuple(x.shape)}")
        b = x.shape[0]
        if tuple(t.shape) != (b,) or tuple(y.shape) != (b,):
            raise ValueError(f"t and y must have shape [{b}], got {tuple(t.shape)} and {tuple(y.shape)}")
        if y.is_floating_point():
            raise TypeError(f"y must be integer class ids, got dtype {y.dtype}")
        h = self.x_embedder(patchify(x, p)) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(
            y, train=train, force_drop_ids=force_drop_ids, generator=generator
        )
        for block in self.blocks:
            h = block(h, c)
        out = self.final_layer(h, c)
        return unpatchify(out, p, s, s, c_in).float()


def decay_mask(model: nn.Module) -> dict[str, bool]:
    """``{name: decays}`` for ``model.named_parameters()``, the same rule as the JAX default mask:
    no weight decay on biases, norm scales and the label embedding table; every weight matrix decays.
    """
    out = {}
    for name, _ in model.named_parameters():
        last = name.split(".")[-1]
        out[name] = not (last in ("bias", "scale") or name.endswith("embedding_table.weight"))
    return out
