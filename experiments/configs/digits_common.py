"""Blocks shared by the digits experiment configs (``digits_rf.py``, ``digits_sde.py``): the data
split, the DiT, the optimiser / EMA / checkpointing part of ``train``, the sampling grid and the
evaluator. Each config adds its own keys and overrides what differs."""
from __future__ import annotations

import ml_collections


def digits_config(*, hidden_size: int, num_steps: int, checkpoint_every: int) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.run_dir = ""  # empty: runs/<name>
    c.seed = 0
    # resume the newest intact checkpoint in run_dir: "auto" (refuses one saved under another config),
    # "force" (resume it anyway), "never" (refuse a run_dir that holds checkpoints)
    c.resume = "auto"

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
    c.model.scan_unroll = 0  # blocks per scan iteration; 0 = all (fastest on CPU, same params and results)

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = num_steps
    c.train.batch_size = 128
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 200
    c.train.weight_decay = 0.01
    c.train.clip_norm = 1.0  # 0: no clipping
    c.train.ema_half_life_images = 20000.0  # 0: no EMA (samples from the raw params)
    c.train.log_every = 100
    c.train.checkpoint_every = checkpoint_every
    c.train.keep_checkpoints = 2
    c.train.progress = True

    c.sample = ml_collections.ConfigDict()
    c.sample.per_class = 64
    # a name of research.generative.sampling.SAMPLERS: "ode" (time-space PF-ODE, integrator `solver`), or a
    # sigma-space sampler ("heun", "dpmpp_2m", "unipc", ...) on the schedule `schedule`
    c.sample.sampler = "ode"
    c.sample.solver = "heun"
    c.sample.schedule = ""  # empty: the sampler family's default (uniform t / karras sigmas)
    c.sample.grid_columns = 16

    c.eval = ml_collections.ConfigDict()
    c.eval.pca_components = 16
    # bits/dim of the first `bpd_images` test digits under the null-label model: PF-ODE likelihood with the
    # Hutchinson estimator (`bpd_divergence`), Tsit5 at rtol = atol = `bpd_rtol`; 0 images: skip
    c.eval.bpd_images = 256
    c.eval.bpd_divergence = "rademacher"
    c.eval.bpd_rtol = 1e-5
    return c


def validate_digits(c: ml_collections.ConfigDict) -> None:
    """Checks shared by both digits configs (model, optimiser, sampler names against the registries)."""
    from research.generative.likelihood import DIVERGENCES
    from research.generative.sampling import SAMPLERS
    from research.generative.sampling.ode import ODE_SOLVERS
    from research.runs.config import check, check_choice, check_positive, check_range

    check_positive(c, "model.patch_size", "model.hidden_size", "model.depth", "model.num_heads",
                   "model.mlp_ratio", "train.num_steps", "train.batch_size", "train.learning_rate",
                   "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                   "sample.per_class", "sample.num_steps", "sample.grid_columns", "eval.pca_components")
    check_positive(c, "eval.bpd_images", "model.scan_unroll", allow_zero=True)
    check_positive(c, "eval.bpd_rtol")
    check(c.eval.bpd_rtol < 1, f"eval.bpd_rtol must be in (0, 1), got {c.eval.bpd_rtol}")
    check_choice(c, "eval.bpd_divergence", DIVERGENCES)
    check_positive(c, "train.warmup_steps", "train.weight_decay", "train.clip_norm",
                   "train.ema_half_life_images", "sample.guidance", allow_zero=True)
    check(8 % c.model.patch_size == 0, f"model.patch_size must divide 8, got {c.model.patch_size}")
    check(c.model.hidden_size % c.model.num_heads == 0,
          f"model.hidden_size {c.model.hidden_size} must be divisible by model.num_heads {c.model.num_heads}")
    check(c.model.hidden_size % 4 == 0, f"model.hidden_size must be divisible by 4, got {c.model.hidden_size}")
    check_range(c, "model.class_dropout_prob", 0.0, 1.0)
    check_range(c, "data.test_fraction", 0.01, 0.99)
    check_choice(c, "model.attn_impl", ["xla", "pallas", "cudnn"])
    check_choice(c, "resume", ["auto", "force", "never"])
    check(c.train.warmup_steps < c.train.num_steps,
          f"train.warmup_steps ({c.train.warmup_steps}) must be < train.num_steps ({c.train.num_steps})")
    check_choice(c, "sample.sampler", sorted(SAMPLERS))
    check_choice(c, "sample.solver", sorted(ODE_SOLVERS))
    if c.model.remat_policy != "none":
        from research.nn.remat import remat_policy

        try:
            remat_policy(c.model.remat_policy)
        except ValueError as e:
            raise ValueError(f"model.remat_policy: {e}") from None


def check_sampler_fits(c: ml_collections.ConfigDict, method_name: str) -> None:
    """The configured sampler must apply to the method (reverse-SDE samplers and DDIM need a score SDE)."""
    from research.generative.methods import METHODS
    from research.runs.config import check

    check(METHODS[method_name].supports(c.sample.sampler),
          f"sample.sampler={c.sample.sampler!r} does not apply to method={method_name!r} (it needs a score SDE: "
          "vp, subvp, ve); use 'ode' or a sigma-space sampler (heun, dpmpp_2m, unipc, ...)")
