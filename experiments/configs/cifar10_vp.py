"""Score SDE, VP (Song et al. 2021: beta_min 0.1, beta_max 20, denoising score matching on an
epsilon network) on CIFAR-10 with a DiT, sampled with the predictor-corrector sampler.

Commands (experiments/train_images.py; presets via the loader's ``:preset`` suffix):
    # GPU preset: DiT-B/2, global batch 128, 1.3M steps, bf16, Pallas flash attention
    python -m experiments.train_images --config experiments/configs/cifar10_vp.py \\
        --set data.root=/data/cifar10          # the folder holding cifar-10-batches-py/
    # CPU smoke preset (tiny DiT, batch 8, 6 steps, checkpoint at step 3; seconds after compiling)
    python -m experiments.train_images --config experiments/configs/cifar10_vp.py:smoke \\
        --set data.root=/data/cifar10          # or --set data.name=digits (no files needed)
    # multi-GPU / multi-host: docs/scaling.md, "Multi-host launch of the CIFAR-10 configs"

Model and training (GPU preset), following score_sde's CIFAR-10 recipe where a DiT allows:
unconditional, batch 128, 1.3M iterations (the paper's default training length), lr 2e-4 with
5k warm-up, gradient clipping 1, EMA 0.9999 per step (half-life 887k images), x-flips, raw
epsilon network (precond "none", as score_sde), no likelihood weighting. DiT-B/2 (hidden 768,
depth 12, 12 heads, patch 2 on 32x32x3), bf16 compute, remat "none" (why: images_common.py),
data parallel over all devices (``--set train.sharding=fsdp`` splits the state). Samples at the
end: predictor-corrector (reverse diffusion + one Langevin step, snr 0.16), 1000 steps (2000 NFE).

Expected result: NOT yet reproduced here (no GPU run of this config so far). Literature (Song et
al. 2021, U-Net backbones): the headline CIFAR-10 FID 2.20 (IS 9.89) is NCSN++ cont. (deep, VE),
i.e. the VE SDE, not this VP config; for the VP SDE the paper reports FID 2.41 with DDPM++ cont.
(deep, VP) and the PC sampler (Table 3; quoted from the paper as we read it -- the research brief
and the seeds give no FID figures). This config uses a DiT, not NCSN++/DDPM++, so the numbers are
not directly comparable.

Expected time on one H200 (estimate from FLOPs, not measured): count_flops (experiments/
bench_train_step.py) gives 1.77e13 FLOP per step (DiT-B/2, 256 tokens, batch 128, 3 x forward);
x 1,300,000 steps = 2.30e19 FLOP; / (0.30 MFU x 989e12 FLOP/s bf16 dense peak) = 7.7e4 s ~ 21.5 h.
"""
import ml_collections

from experiments.configs.images_common import PRESETS, images_config, validate_images  # noqa: F401
from research.runs.config import check, check_choice, check_positive


def get_config(preset: str = "gpu") -> ml_collections.ConfigDict:
    c = images_config(preset)
    smoke = preset == "smoke"
    c.name = "cifar10_vp" + ("_smoke" if smoke else "")
    c.method = ml_collections.ConfigDict()  # research.generative.methods.get_method(name, **rest)
    c.method.name = "vp"
    c.method.beta_min = 0.1
    c.method.beta_max = 20.0
    c.method.precond = "none"  # raw epsilon network, as score_sde ("edm": c_skip x + c_out F(c_in x, t))
    c.method.sigma_data = 0.5
    c.method.likelihood_weighting = False
    c.train.conditional = False
    c.model.class_dropout_prob = 0.0
    if not smoke:
        c.train.num_steps = 1_300_000
        c.train.checkpoint_every = 50_000
    c.sample.sampler = "pc"
    c.sample.num_steps = 20 if smoke else 1000  # smoke: PC at 2 steps gave NaN samples, 20 are finite
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    from research.generative.methods.score_sde import PRECONDS

    validate_images(c)
    check_positive(c, "method.beta_min", "method.sigma_data")
    check(c.method.beta_min <= c.method.beta_max,
          f"method.beta_min ({c.method.beta_min}) must be <= method.beta_max ({c.method.beta_max})")
    check_choice(c, "method.precond", PRECONDS)
