"""EDM (Karras et al. 2022) on CIFAR-10 with a DiT: preconditioned denoiser, log-normal sigmas
(P_mean -1.2, P_std 1.2, sigma_data 0.5), deterministic Heun sampler, 18 steps = 35 NFE, rho 7.

Commands (experiments/train_images.py; presets via the loader's ``:preset`` suffix):
    # GPU preset: DiT-B/2, global batch 512, 200 Mimg (390,625 steps), bf16, Pallas flash attention
    python -m experiments.train_images --config experiments/configs/cifar10_edm.py \\
        --set data.root=/data/cifar10          # the folder holding cifar-10-batches-py/
    #   unconditional variant (EDM's 1.97 row): --set train.conditional=false
    # CPU smoke preset (tiny DiT, batch 8, 6 steps, checkpoint at step 3; seconds after compiling)
    python -m experiments.train_images --config experiments/configs/cifar10_edm.py:smoke \\
        --set data.root=/data/cifar10          # or --set data.name=digits (no files needed)
    # multi-GPU / multi-host: docs/scaling.md, "Multi-host launch of the CIFAR-10 configs"

Model and training (GPU preset), following EDM's CIFAR-10 recipe where a DiT allows: batch 512,
lr 1e-3 with a 10 Mimg warm-up (19,531 steps; EDM ramps linearly, here warmup + cosine), 200 Mimg
in all, EMA half-life 0.5 Mimg, no weight decay; class-conditional without label dropout (EDM's
conditional models use no CFG); random x-flips (EDM itself used its non-leaking geometric
augmentation at p = 0.12 with augmentation labels and dropout 0.13 in DDPM++; neither is
reproduced). DiT-B/2 (hidden 768, depth 12, 12 heads, patch 2 on 32x32x3), bf16 compute, remat
"save_names:attn_out,mlp_hidden": the bf16 train step's planned temp memory (AOT, XLA:CPU, batch
8) is ~352 MiB per sample without remat, i.e. ~176 GiB at batch 512 -- more than an H200's 141
GB -- and ~109 MiB per sample (~54 GiB at 512) with this policy, which recomputes less than
"full" (~95 MiB per sample); numbers in experiments/configs/images_common.py (model.remat_policy).
Data parallel over all devices (``--set train.sharding=fsdp`` splits the state).

Expected result: NOT yet reproduced here (no GPU run of this config so far). Literature: EDM
(Karras et al. 2022, Table 2, DDPM++ U-Net backbone, VP config, 35 NFE): CIFAR-10 FID 1.79
class-conditional, 1.97 unconditional. This config uses a DiT, not the paper's U-Net, so the
numbers are not directly comparable.

Expected time on one H200 (estimate from FLOPs, not measured): count_flops (experiments/
bench_train_step.py) gives 7.07e13 FLOP per step (DiT-B/2, 256 tokens, batch 512, 3 x forward);
x 390,625 steps = 2.76e19 FLOP; / (0.30 MFU x 989e12 FLOP/s bf16 dense peak) = 9.3e4 s ~ 25.8 h.
"""
import ml_collections

from experiments.configs.images_common import PRESETS, images_config, validate_images  # noqa: F401
from research.runs.config import check_positive


def get_config(preset: str = "gpu") -> ml_collections.ConfigDict:
    c = images_config(preset)
    smoke = preset == "smoke"
    c.name = "cifar10_edm" + ("_smoke" if smoke else "")
    c.method = ml_collections.ConfigDict()  # research.generative.methods.get_method(name, **rest)
    c.method.name = "edm"
    c.method.sigma_data = 0.5
    c.method.P_mean = -1.2
    c.method.P_std = 1.2
    c.model.class_dropout_prob = 0.0
    if not smoke:
        c.model.remat_policy = "save_names:attn_out,mlp_hidden"
        c.train.batch_size = 512
        c.train.num_steps = 390_625  # 200 Mimg / 512
        c.train.learning_rate = 1e-3
        c.train.warmup_steps = 19_531  # 10 Mimg / 512
        c.train.checkpoint_every = 5_000
        c.train.ema_half_life_images = 500_000.0
    c.sample.sampler = "heun"  # EDM Algorithm 1 (s_churn = 0): NFE 2N - 1
    c.sample.schedule = "karras"  # rho = 7, sigma 80 -> 0.002 -> 0
    c.sample.num_steps = 2 if smoke else 18  # 18 steps = 35 NFE
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    validate_images(c)
    check_positive(c, "method.sigma_data", "method.P_std")
