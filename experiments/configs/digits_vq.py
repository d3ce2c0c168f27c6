"""VQ-VAE on scikit-learn's 8x8 digits: a 4x4 grid of codes from a 64-entry EMA codebook.

Command:
    python -m experiments.train_digits_vq --config experiments/configs/digits_vq.py
    # overrides: --set model.num_codes=128 --set model.features='(32, 64, 64)' (2x2 codes) --set run_dir=runs/x

Unconditional; the codebook is an EMA of the assigned encoder outputs (decay model.ema_decay,
Laplace smoothing model.ema_eps) with dead-code restart (usage below train.dead_threshold), kept
in the train state's model state; the encoder gets the commitment loss (train.beta). No parameter
EMA (the codebook tracks the raw encoder). An autoregressive prior over the codes is trained
elsewhere on ``load_vq_run(run_dir)``.
Expected runtime (measured 2026-12-01 on the shared 2-core box, nice 5, load average 3.9-4.5): 2000
steps 211 s wall / 201 CPU-s.
Expected result (runs/digits_vq/metrics.json, measured): test reconstructions MSE 0.0137, classifier
accuracy 0.986, Fréchet 1.68; codebook utilisation 1.00 (64/64 codes) and perplexity 50.6 (train) /
50.4 (test); 214k params (encoder + decoder + codebook).
A rerun with the same run_dir resumes from its latest checkpoint (delete the folder to retrain).
"""
import ml_collections

from experiments.configs.digits_vae import autoencoder_config, validate_autoencoder
from research.runs.config import check, check_positive, check_range


def get_config() -> ml_collections.ConfigDict:
    c = autoencoder_config(name="digits_vq", num_steps=2000, checkpoint_every=500)
    c.model.features = (32, 64)  # 8x8, 4x4: a 4x4 grid of codes
    c.model.code_dim = 16
    c.model.num_codes = 64
    c.model.ema_decay = 0.99
    c.model.ema_eps = 1e-5
    c.train.beta = 0.25  # commitment weight
    c.train.dead_threshold = 1.0  # codes with EMA usage (assignments per batch) below this are restarted
    c.train.ema_half_life_images = 0.0  # no parameter EMA (must stay 0)
    c.sample.per_class = 8  # test images per class in reconstructions.png
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    validate_autoencoder(c)
    check_positive(c, "model.code_dim", "model.num_codes", "model.ema_eps", "train.beta", "train.dead_threshold")
    check_range(c, "model.ema_decay", 0.0, 0.9999)
    check(c.model.num_codes >= 2, f"model.num_codes must be >= 2, got {c.model.num_codes}")
    check(c.train.ema_half_life_images == 0,
          "train.ema_half_life_images must be 0 for the VQ-VAE: the EMA codebook follows the raw encoder, "
          f"not an EMA of its params (got {c.train.ema_half_life_images})")
