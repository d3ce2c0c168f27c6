"""Layers and models. The attention dispatch is ``research.nn.attention.attention``."""
from research.nn.dit import DiT, DiTBlock, init_dit, make_model_fn
from research.nn.embeddings import sincos_1d, sincos_2d, timestep_embedding
from research.nn.layers import Mlp, RMSNorm, modulate, patchify, unpatchify
from research.nn.remat import remat_policy

__all__ = [
    "DiT", "DiTBlock", "Mlp", "RMSNorm", "init_dit", "make_model_fn", "modulate",
    "patchify", "remat_policy", "sincos_1d", "sincos_2d", "timestep_embedding", "unpatchify",
]
