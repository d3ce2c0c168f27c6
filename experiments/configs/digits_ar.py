"""Class-conditional autoregressive Transformer (research.lm stack) over token grids of the 8x8 digits.

Presets (``--config experiments/configs/digits_ar.py[:preset]``):
  pixels (default): the 64 pixels, 17 intensity levels, raster order; exact bits/dim on the test split.
  vq: the prior of a two-stage model (VQGAN's recipe): the same model over the hh x ww codes of a
      trained VQ autoencoder (``data.vq_run``), decoded by it; run name ``digits_vq_ar``.

Commands:
    python -m experiments.train_digits_ar --config experiments/configs/digits_ar.py
    python -m experiments.train_digits_vq --config experiments/configs/digits_vq.py   # stage 1 first
    python -m experiments.train_digits_ar --config experiments/configs/digits_ar.py:vq
    # overrides: --set train.num_steps=500 --set sample.temperature=0.8 --set run_dir=runs/x

Expected runtime (measured 2026-12-01 on the shared 2-core box): pixels 2.5 min wall at load average
1.5-2.2 (user 191 s + sys 77 s = 4.5 CPU-minutes; training 700 steps of batch 64: 129 s; sampling 640
digits, 64 cached steps each: 4.3 s); an earlier identical run took 5.0 min at load 5-7. vq: 48 s wall
(1.1 CPU-minutes; 300 steps: 18 s), after the VQ run (train_digits_vq, its own config).
Expected result, measured (runs/<name>/metrics.json; real train-vs-test Fréchet floor 12.2):
  pixels (digits_ar): classifier accuracy of the 640 samples at temperature 1: 0.955 (0.975 at T=0.8);
    Fréchet 19.3 (28.0 at T=0.8); exact test bits/dim 1.719 (uniform over 17 levels: 4.09); 337,632 params;
    nfe 64; final train NLL 1.02 nats/pixel; no sample is a copy of a training image. Training longer
    overfits the 1,438 train digits (the test bits/dim rises: 1.75 -> 2.35 from 600 to 1,200 steps).
  vq (digits_vq_ar, on runs/digits_vq: 4x4 codes of 64): accuracy 0.773 at T=1 (0.900 at T=0.8); Fréchet
    38.3 (28.1 at T=0.8); prior test NLL 3.53 bits/code (uniform: 6); nfe 16 + 1 decoder call; 346,656 prior
    + 111,713 VQ decoder/codebook params. With 1,400 steps the samples score 0.955 / Fréchet 18.4, but 83% of
    the sampled code grids are copies of training grids and the test NLL is 7.4 bits/code: memorisation.
A rerun with the same run_dir resumes from its latest checkpoint (delete the folder to retrain).
"""
import ml_collections

from experiments.configs.digits_common import digits_config
from research.runs.config import check, check_choice, check_positive, check_range

PRESETS = ("pixels", "vq")


def get_config(preset: str = "pixels") -> ml_collections.ConfigDict:
    c = digits_config(hidden_size=96, num_steps=700, checkpoint_every=350)
    c.name = "digits_ar" if preset == "pixels" else "digits_vq_ar"
    c.data.source = preset  # "pixels" | "vq"
    c.data.vq_run = "runs/digits_vq"  # the stage-1 run directory (source "vq")

    c.model = ml_collections.ConfigDict()
    c.model.dim = 96
    c.model.depth = 3
    c.model.num_heads = 4
    c.model.num_kv_heads = 4
    c.model.mlp_hidden = 0  # 0: Llama's default width for dim
    c.model.rope_theta = 10000.0
    c.model.init_std = 0.02
    c.model.attn_impl = "xla"
    c.model.custom_matmul_vjp = True  # same numbers, ~1.5x faster weight gradients on XLA:CPU

    c.train.batch_size = 64
    c.train.learning_rate = 2e-3
    c.train.warmup_steps = 50
    c.train.weight_decay = 0.05
    c.train.ema_half_life_images = 3000.0  # ~47 steps of 64; 0: no EMA (sample from the raw params)
    c.train.stop_at_step = 0  # >0: stop after this step (simulated pre-emption; schedule still uses num_steps)
    c.train.tensorboard = False

    for key in ("sampler", "solver", "schedule"):  # the diffusion samplers' keys do not apply
        del c.sample[key]
    c.sample.temperature = 1.0
    c.sample.top_k = 0  # 0: no top-k filter
    c.sample.extra_temperatures = (0.8,)  # also sampled and scored (metrics["by_temperature"]); () for none
    if preset == "vq":
        # 16 tokens of 64 codes from 1,438 train images: the prior's test NLL is lowest near 250-300 steps and
        # then climbs past the uniform 6 bits/code while the samples turn into copies of training code grids
        c.train.num_steps = 300
        c.train.checkpoint_every = 150
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    check_choice(c, "data.source", list(PRESETS))
    check_choice(c, "resume", ["auto", "force", "never"])
    check_choice(c, "model.attn_impl", ["xla", "pallas"])
    check_positive(c, "model.dim", "model.depth", "model.num_heads", "model.num_kv_heads", "model.rope_theta",
                   "model.init_std", "train.num_steps", "train.batch_size", "train.learning_rate",
                   "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "sample.per_class",
                   "sample.grid_columns", "eval.pca_components")
    check_positive(c, "model.mlp_hidden", "train.warmup_steps", "train.weight_decay", "train.clip_norm",
                   "train.ema_half_life_images", "train.stop_at_step", "sample.temperature", "sample.top_k",
                   allow_zero=True)
    check_range(c, "data.test_fraction", 0.01, 0.99)
    check(c.model.dim % c.model.num_heads == 0 and (c.model.dim // c.model.num_heads) % 2 == 0,
          f"model.dim ({c.model.dim}) / model.num_heads ({c.model.num_heads}) must be an even integer (RoPE pairs)")
    check(c.model.num_heads % c.model.num_kv_heads == 0,
          f"model.num_heads ({c.model.num_heads}) must be divisible by model.num_kv_heads ({c.model.num_kv_heads})")
    check(c.train.warmup_steps < c.train.num_steps,
          f"train.warmup_steps ({c.train.warmup_steps}) must be < train.num_steps ({c.train.num_steps})")
    check(c.train.stop_at_step <= c.train.num_steps,
          f"train.stop_at_step ({c.train.stop_at_step}) must be <= train.num_steps ({c.train.num_steps})")
    check(all(isinstance(t, (int, float)) and not isinstance(t, bool) and t >= 0 for t in c.sample.extra_temperatures),
          f"sample.extra_temperatures must be numbers >= 0, got {c.sample.extra_temperatures!r}")
    check(c.data.source != "vq" or bool(c.data.vq_run), "data.source='vq' needs data.vq_run (a VQ run directory)")
