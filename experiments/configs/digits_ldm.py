"""Latent diffusion on 8x8 digits (Stable Diffusion's recipe): the flagship class-conditional DiT trained with
rectified flow on the normalised latents of a trained VAE, sampled with the PF-ODE and CFG, decoded by the VAE.

Commands:
    python -m experiments.train_digits_vae --config experiments/configs/digits_vae.py:ldm   # stage 1 first
    python -m experiments.train_digits_ldm --config experiments/configs/digits_ldm.py
    # overrides: --set train.num_steps=500 --set sample.guidance=2.0 --set data.vae_run=runs/x --set run_dir=runs/y

The DiT, optimiser, timestep distribution and sampler are those of digits_rf.py; only the input differs:
the VAE's posterior means of the train split, shifted by their mean and scaled by 1 / their std (SD3's
shift / scaling factors, computed from the data, stored in latent_stats.json; ``latent.shift = false``
scales only, as in SD 1.x's 0.18215), on a ``hh x ww x c`` grid (patch size 1 for the 4x4x2 latents).

Expected runtime (measured 2026-12-01 on the shared 2-core box, load average ~4.5): 4.9 min wall, 5.0
CPU-minutes (user 191 s + sys 107 s); training 2,000 steps: 270 s; sampling + decoding 640 digits: 11 s.
Expected result (runs/digits_ldm/metrics.json, measured on runs/digits_vae_ldm, 4x4x2 latents, shift 0.011,
scale 0.995): classifier accuracy 1.000 of the 640 class-conditional samples; Fréchet 24.4 (real train-vs-test
floor 12.2); final loss 0.94; nfe 40 (heun, 20 steps, CFG w=1.5) + 1 VAE decoder call; 328,834 DiT + 102,914
VAE decoder params.
A rerun with the same run_dir resumes from its latest checkpoint (delete the folder to retrain).
"""
import ml_collections

from experiments.configs.digits_rf import get_config as rf_config
from experiments.configs.digits_rf import validate as rf_validate
from research.runs.config import check, check_positive


def get_config() -> ml_collections.ConfigDict:
    c = rf_config()
    c.name = "digits_ldm"
    c.data.vae_run = "runs/digits_vae_ldm"  # a finished train_digits_vae run (digits_vae.py:ldm)
    c.model.patch_size = 1
    c.train.num_steps = 2000
    c.latent = ml_collections.ConfigDict()
    c.latent.shift = True  # subtract the latents' mean (SD3's shift factor) before scaling
    c.latent.scale_factor = 0.0  # 0: 1 / std of the (shifted) train latents, computed from the data
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    rf_validate(c)
    check(bool(c.data.vae_run), "data.vae_run must name a VAE run directory")
    check_positive(c, "latent.scale_factor", allow_zero=True)
