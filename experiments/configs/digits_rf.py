"""Class-conditional rectified flow (SD3 recipe) on scikit-learn's 8x8 digits with a small DiT.

Command:
    make demo
    # = python -m experiments.train_digits_rf --config experiments/configs/digits_rf.py
    # overrides: --set train.num_steps=500 --set sample.guidance=2.0 --set run_dir=runs/x

Expected runtime: <= ~10 minutes on 2 CPU cores. Measured (2026-11-23, 2-core box shared with
other jobs, load average 5-9): 15.7 min wall while getting ~51% of the CPU, 8.0 CPU-minutes in
all (user 317 s + sys 166 s), i.e. an estimated 4-8 min on 2 otherwise idle cores.
Expected result (runs/digits_rf/metrics.json): classifier accuracy of the 640 class-conditional
samples ~1.00 (measured 1.000; the classifier scores 0.997 on real test digits); Fréchet
distance to the test split in PCA-16 space ~23 (real train-vs-test floor 12.2); final loss ~0.37;
bits/dim of 256 test digits under the null-label model (PF-ODE, Hutchinson) 2.32 (measured 2026-12-01).
A rerun with the same run_dir resumes from its latest checkpoint (delete the folder to retrain).
"""
import ml_collections

from experiments.configs.digits_common import check_sampler_fits, digits_config, validate_digits
from research.generative.timesteps import TIMESTEP_DISTS
from research.runs.config import check, check_choice, check_positive


def get_config() -> ml_collections.ConfigDict:
    c = digits_config(hidden_size=64, num_steps=2500, checkpoint_every=500)
    c.name = "digits_rf"
    c.train.stop_at_step = 0  # >0: stop after this step (simulated pre-emption; schedule still uses num_steps)
    c.train.timestep_dist = "logit_normal"
    c.train.timestep_loc = 0.0
    c.train.timestep_scale = 1.0
    c.train.tensorboard = False
    c.sample.num_steps = 20
    c.sample.guidance = 1.5
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    validate_digits(c)
    check_positive(c, "train.stop_at_step", allow_zero=True)
    check_choice(c, "train.timestep_dist", TIMESTEP_DISTS)
    check_positive(c, "train.timestep_scale")
    check(c.train.stop_at_step <= c.train.num_steps,
          f"train.stop_at_step ({c.train.stop_at_step}) must be <= train.num_steps ({c.train.num_steps})")
    check_sampler_fits(c, "rf")
