"""Blocks shared by the image-dataset configs (``cifar10_rf_dit.py``, ``cifar10_edm.py``,
``cifar10_vp.py``) run by ``experiments/train_images.py``.

Presets: every config file lists ``PRESETS = ("gpu", "smoke")`` and defines ``get_config(preset="gpu")``;
the repository's loader (research/runs/config.py) selects one with a ``:preset`` suffix::

    python -m experiments.train_images --config experiments/configs/cifar10_edm.py        # gpu (default)
    python -m experiments.train_images --config experiments/configs/cifar10_edm.py:smoke  # CPU smoke

``images_config(preset)`` returns the shared skeleton (GPU values unless ``preset == "smoke"``);
each config then sets its method block and overrides what its recipe changes. Library code never
sees the config: ``train_images.py`` passes explicit values.

The DiT-B/2 numbers used for the expected-hours estimates in the configs' docstrings come from
``gpu_hours_estimate`` (``experiments.bench_train_step.count_flops``: matmul FLOPs, a train step =
3 forward passes, the usual MFU convention; remat's recomputation is extra hardware work, counted
in the assumed MFU, not in the FLOPs).
"""
from __future__ import annotations

import ml_collections

PRESETS = ("gpu", "smoke")
H200_BF16_DENSE_FLOPS = 989e12  # the H100/H200 SXM bf16 dense peak (experiments/bench_train_step.py)
IMAGE_DATASETS = ("cifar10", "cifar100", "mnist", "fashion_mnist", "image_folder", "digits")


def images_config(preset: str) -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {list(PRESETS)}")
    smoke = preset == "smoke"
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.name = ""  # set by each config
    c.run_dir = ""  # empty: runs/<name>
    c.seed = 0  # the run seed: model init, train-step keys, the Grain shuffle and augmentation draws
    c.resume = "auto"  # "auto" | "force" | "never" (experiments/common.py: open_run)
    # multi-host: True lets JAX detect the cluster itself (TPU pod slices, SLURM, Open MPI) when no RESEARCH_* /
    # JAX_* variables are set (research/parallel/distributed.py; docs/scaling.md)
    c.distributed_auto_detect = False

    c.data = ml_collections.ConfigDict()
    c.data.name = "cifar10"  # research.data.datasets.DATASETS, or "digits" (scikit-learn's embedded 8x8 digits)
    # directory holding the dataset on EVERY host (for cifar10: the folder containing cifar-10-batches-py/,
    # or that folder itself); must be set by the user (ignored for digits)
    c.data.root = ""
    c.data.split = "train"
    c.data.image_size = 32  # image_folder only: shorter side resized, then centre-cropped
    c.data.augment = ("flip",)  # names from research.data.pipeline.AUGMENTATIONS; () for none. EDM: x-flips
    c.data.worker_count = 0 if smoke else 4  # Grain worker processes per host (0: read in the main process)
    c.data.digits_split_seed = 0  # digits only: the train/test split of research/data/digits.py
    c.data.digits_test_fraction = 0.2
    # debugging / tests: append the sha256 of every batch this process reads to <run_dir>/batches*.jsonl
    c.data.record_batches = False

    c.model = ml_collections.ConfigDict()  # research.nn.dit.DiT; input size / channels / classes from the data
    c.model.patch_size = 4 if smoke else 2
    c.model.hidden_size = 32 if smoke else 768  # DiT-B/2: 768, depth 12, 12 heads, patch 2
    c.model.depth = 1 if smoke else 12
    c.model.num_heads = 2 if smoke else 12
    c.model.mlp_ratio = 4.0
    c.model.class_dropout_prob = 0.1
    c.model.qk_norm = True
    c.model.attn_impl = "xla" if smoke else "pallas"  # research.nn.attention: "xla" | "pallas" | "cudnn"
    # research/nn/remat.py. "none" for DiT-B/2 at batch 128. Measured (AOT compile of the bf16 train step,
    # XLA attention, XLA:CPU memory_analysis, batch 8, 2026-12-02): temp memory 2819 MiB with "none",
    # 868 MiB with "save_names:attn_out,mlp_hidden", 757 MiB with "full", i.e. ~352 / 109 / 95 MiB per
    # sample. At batch 128 "none" plans ~44 GiB, which fits an H200's 141 GB next to the ~2 GB of fp32
    # params + Adam + EMA, and remat would only add recomputation (README: ~20-35% step time for "full"
    # on GPUs; not measured here). At batch 512 (cifar10_edm.py) "none" would need ~176 GiB, so that
    # preset uses "save_names:attn_out,mlp_hidden" (~54 GiB; 3.2x less than none here, 4.7x in the
    # README's 12-block benchmark, and cheaper to recompute than "full"). GPU plans may differ from CPU's.
    c.model.remat_policy = "none"
    c.model.scan_blocks = True

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 6 if smoke else 400_000
    c.train.stop_at_step = 0  # >0: stop after this step (simulated pre-emption; the schedule still uses num_steps)
    c.train.batch_size = 8 if smoke else 128  # GLOBAL batch; each of P processes loads batch_size / P
    c.train.conditional = True  # False: every example gets the null label (unconditional model)
    c.train.learning_rate = 1e-3 if smoke else 2e-4
    c.train.warmup_steps = 1 if smoke else 5000
    c.train.weight_decay = 0.0
    c.train.clip_norm = 1.0  # 0: no clipping
    # EMA half-life in images (0: none). 887k images = decay 0.9999 per step at batch 128 (score_sde, torchcfm)
    c.train.ema_half_life_images = 100.0 if smoke else 887_000.0
    c.train.precision = "fp32" if smoke else "bf16"  # research.train.precision.get_policy
    c.train.sharding = "dp"  # research.parallel.sharding: "dp" (replicated state) | "fsdp" (state split over devices)
    c.train.log_every = 2 if smoke else 500
    c.train.checkpoint_every = 3 if smoke else 10_000
    c.train.keep_checkpoints = 2 if smoke else 3
    c.train.progress = not smoke
    c.train.tensorboard = False

    c.sample = ml_collections.ConfigDict()  # end-of-run sample grid (from the EMA params)
    c.sample.num_images = 20 if smoke else 100  # labels cycle through the classes
    c.sample.grid_columns = 10
    c.sample.sampler = "ode"  # a name of research.generative.sampling.SAMPLERS
    c.sample.solver = "heun"  # the time-space "ode" sampler's integrator
    c.sample.schedule = ""  # empty: the sampler family's default grid
    c.sample.num_steps = 2 if smoke else 25
    c.sample.guidance = 1.0  # classifier-free guidance weight (1: none)

    c.eval = ml_collections.ConfigDict()
    # FID: >0 writes that many samples (EMA params, random labels if conditional, the sample.* sampler)
    # as resumable shards to <run_dir>/fid_samples (research.eval.fid_sampling); 50_000 for the paper numbers
    c.eval.fid_num_samples = 0
    c.eval.fid_batch_size = 8 if smoke else 500  # per call, split over all devices
    # both set: FID + Inception Score of those samples go into metrics.json (else: experiments/eval_fid.py fid)
    c.eval.inception_weights = ""  # pytorch-fid's .pth or its converted .npz (a local file; never downloaded)
    c.eval.fid_reference = ""      # reference statistics .npz (experiments/eval_fid.py stats, or pytorch-fid's)
    c.eval.inception_batch_size = 50
    return c


def validate_images(c: ml_collections.ConfigDict) -> None:
    """Checks shared by the image configs; raises ValueError with the offending key."""
    from research.data.pipeline import AUGMENTATIONS
    from research.generative.methods import METHODS
    from research.generative.sampling import SAMPLERS
    from research.generative.sampling.ode import ODE_SOLVERS
    from research.parallel.sharding import SHARDING_MODES
    from research.runs.config import check, check_choice, check_positive, check_range

    check_choice(c, "data.name", IMAGE_DATASETS)
    if c.data.name != "digits":
        check(bool(c.data.root), f"data.root is not set: pass --set data.root=/path/to/{c.data.name} (the directory "
                                 f"holding the {c.data.name} files, present on every host), or use "
                                 "--set data.name=digits for the embedded 8x8 digits")
    bad = [a for a in c.data.augment if a not in AUGMENTATIONS]
    check(not bad, f"data.augment: unknown augmentation(s) {bad}; known: {list(AUGMENTATIONS)}")
    check_positive(c, "data.worker_count", "train.stop_at_step", "train.warmup_steps", "train.weight_decay",
                   "train.clip_norm", "train.ema_half_life_images", "eval.fid_num_samples", allow_zero=True)
    check_positive(c, "eval.fid_batch_size", "eval.inception_batch_size")
    check(bool(c.eval.inception_weights) == bool(c.eval.fid_reference),
          "eval.inception_weights and eval.fid_reference go together: set both (FID in metrics.json) or neither")
    check_positive(c, "model.patch_size", "model.hidden_size", "model.depth", "model.num_heads", "model.mlp_ratio",
                   "train.num_steps", "train.batch_size", "train.learning_rate", "train.log_every",
                   "train.checkpoint_every", "train.keep_checkpoints", "sample.num_images", "sample.grid_columns",
                   "sample.num_steps", "sample.guidance", "data.image_size")
    check(c.model.hidden_size % c.model.num_heads == 0,
          f"model.hidden_size {c.model.hidden_size} must be divisible by model.num_heads {c.model.num_heads}")
    check(c.model.hidden_size % 4 == 0, f"model.hidden_size must be divisible by 4, got {c.model.hidden_size}")
    check_range(c, "model.class_dropout_prob", 0.0, 1.0)
    check_choice(c, "model.attn_impl", ["xla", "pallas", "cudnn"])
    check_choice(c, "train.precision", ["fp32", "float32", "bf16", "bfloat16"])
    check_choice(c, "train.sharding", list(SHARDING_MODES))
    check_choice(c, "resume", ["auto", "force", "never"])
    check(c.train.warmup_steps < c.train.num_steps,
          f"train.warmup_steps ({c.train.warmup_steps}) must be < train.num_steps ({c.train.num_steps})")
    check(c.train.stop_at_step <= c.train.num_steps,
          f"train.stop_at_step ({c.train.stop_at_step}) must be <= train.num_steps ({c.train.num_steps})")
    check(0 <= c.seed < 2 ** 32, f"seed must be in [0, 2**32) (Grain's limit), got {c.seed}")
    check_choice(c, "method.name", sorted(METHODS))
    check_choice(c, "sample.sampler", sorted(SAMPLERS))
    check_choice(c, "sample.solver", sorted(ODE_SOLVERS))
    check(METHODS[c.method.name].supports(c.sample.sampler),
          f"sample.sampler={c.sample.sampler!r} does not apply to method={c.method.name!r}")
    if c.model.remat_policy != "none":
        from research.nn.remat import remat_policy

        try:
            remat_policy(c.model.remat_policy)
        except ValueError as e:
            raise ValueError(f"model.remat_policy: {e}") from None


def gpu_hours_estimate(*, batch_size: int, num_steps: int, mfu: float, hidden_size: int = 768, depth: int = 12,
                       patch_size: int = 2, image_size: int = 32, channels: int = 3) -> dict:
    """Model FLOPs per step (count_flops, 3 forward passes) x steps / (mfu x the H200 bf16 dense peak)."""
    from experiments.bench_train_step import count_flops

    kw = dict(input_size=image_size, in_channels=channels, patch_size=patch_size, hidden_size=hidden_size,
              depth=depth)
    step = count_flops(kw, batch_size)["train_step"]
    hours = step * num_steps / (mfu * H200_BF16_DENSE_FLOPS) / 3600
    return {"flops_per_step": step, "total_flops": step * num_steps, "hours": hours}
