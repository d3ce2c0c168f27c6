"""Blocks shared by the digits experiment configs (``digits_rf.py``, ``digits_sde.py``): the data
split, the DiT, the optimiser / EMA / checkpointing part of ``train``, the sampling grid and the
evaluator. Each config adds its own keys and overrides what differs."""
from __future__ import annotations

import ml_collections


def digits_config(*, hidden_size: int, num_steps: int, checkpoint_every: int) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.run_dir = ""  # empty: runs/<name>
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.split_seed = 0
    c.data.test_fraction = 0.2

    c.model = ml_collections.ConfigDict()
    c.model.patch_size = 2
    c.model.hidden_size = hidden_size
    c.model.depth = 4
    c.model.num_heads = 4
    c.model.mlp_ratio = 4.0
    c.model.class_dropout_prob = 0.1
    c.model.qk_norm = True
    c.model.attn_impl = "xla"
    c.model.remat_policy = "none"
    c.model.scan_blocks = True

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = num_steps
    c.train.batch_size = 128
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 200
    c.train.weight_decay = 0.01
    c.train.clip_norm = 1.0
    c.train.ema_half_life_images = 20000.0  # 0: no EMA (samples from the raw params)
    c.train.log_every = 100
    c.train.checkpoint_every = checkpoint_every
    c.train.keep_checkpoints = 2
    c.train.progress = True

    c.sample = ml_collections.ConfigDict()
    c.sample.per_class = 64
    c.sample.method = "heun"
    c.sample.grid_columns = 16

    c.eval = ml_collections.ConfigDict()
    c.eval.pca_components = 16
    return c
