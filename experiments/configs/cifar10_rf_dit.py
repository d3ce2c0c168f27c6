"""Class-conditional rectified flow (SD3 recipe: logit-normal timesteps, QK-norm DiT) on CIFAR-10.

Commands (experiments/train_images.py; presets via the loader's ``:preset`` suffix):
    # GPU preset: DiT-B/2, global batch 128, 400k steps, bf16, Pallas flash attention
    python -m experiments.train_images --config experiments/configs/cifar10_rf_dit.py \\
        --set data.root=/data/cifar10          # the folder holding cifar-10-batches-py/
    # CPU smoke preset (tiny DiT, batch 8, 6 steps, checkpoint at step 3; seconds after compiling)
    python -m experiments.train_images --config experiments/configs/cifar10_rf_dit.py:smoke \\
        --set data.root=/data/cifar10          # or --set data.name=digits (no files needed)
    # multi-GPU / multi-host: docs/scaling.md, "Multi-host launch of the CIFAR-10 configs"

Model and training (GPU preset): DiT-B/2 (hidden 768, depth 12, 12 heads, patch 2 on 32x32x3 =
256 tokens, ~130M parameters), class-conditional with label dropout 0.1 (enables CFG), AdamW lr
2e-4 (warmup 5k, cosine), EMA half-life 887k images (= 0.9999 per step at batch 128), random
x-flips, bf16 compute on fp32 master weights, remat "none" (why: images_common.py), data parallel
over all devices (``--set train.sharding=fsdp`` splits the state). Samples at the end: PF-ODE Heun,
25 steps (~50 NFE), CFG w = 1.5 (use w = 1 for an FID comparable with the unguided literature).

Expected result: NOT yet reproduced here (no GPU run of this config so far). Literature, CIFAR-10
FID, all with U-Net backbones (this config uses a DiT, so the numbers are not directly comparable):
Lipman et al. 2023 (Flow Matching) report FID 6.35 for FM with OT paths (142 NFE, dopri5);
torchcfm's CIFAR-10 example (Tong et al. 2023, OT-CFM, 400k steps at batch 128, lr 2e-4, EMA
0.9999, dopri5) reports "an FID of 3.5". The issue also quotes "flow matching 2.07 at 50 NFE"; no
source for that number was found in the research brief or the seeds, so it is not used as a target.

Expected time on one H200 (estimate from FLOPs, not measured): count_flops (experiments/
bench_train_step.py) gives 1.77e13 FLOP per step (DiT-B/2, 256 tokens, batch 128, 3 x forward);
x 400,000 steps = 7.07e18 FLOP; / (0.30 MFU x 989e12 FLOP/s bf16 dense peak) = 2.4e4 s ~ 6.6 h.
"""
import ml_collections

from experiments.configs.images_common import PRESETS, images_config, validate_images  # noqa: F401
from research.generative.timesteps import TIMESTEP_DISTS
from research.runs.config import check_choice, check_positive


def get_config(preset: str = "gpu") -> ml_collections.ConfigDict:
    c = images_config(preset)
    c.name = "cifar10_rf_dit" + ("_smoke" if preset == "smoke" else "")
    c.method = ml_collections.ConfigDict()  # research.generative.methods.get_method(name, **rest)
    c.method.name = "rf"
    c.method.timestep_dist = "logit_normal"  # SD3: logit-normal(0, 1) timesteps
    c.method.loc = 0.0
    c.method.scale = 1.0
    c.sample.guidance = 1.5
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    validate_images(c)
    check_choice(c, "method.timestep_dist", TIMESTEP_DISTS)
    check_positive(c, "method.scale")
