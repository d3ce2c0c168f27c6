"""Score-SDE (VP, epsilon prediction, DSM) or EDM on scikit-learn's 8x8 digits with the flagship DiT.

Commands:
    python -m experiments.train_digits_sde --config experiments/configs/digits_sde.py                 # VP-SDE
    python -m experiments.train_digits_sde --config experiments/configs/digits_sde.py --set method=edm --set sample.sampler=heun
    # other methods of research.generative.methods work too: subvp, ve, rf, icfm, otcfm

Same DiT, optimiser and EMA as experiments/configs/digits_rf.py (the flagship); class-conditional
with label dropout, sampled with CFG. Reports the flagship's metrics (classifier accuracy of the
conditional samples, Fréchet distance in PCA-16 space) plus bits/dim of the held-out test digits
under the unconditional (null-label) model: PF-ODE likelihood with the Hutchinson estimator on
uniformly dequantised data (17 intensity levels, bins of width 1/8 in model space, so a uniform
model scores log2(17) = 4.09 bits/dim; see research/generative/likelihood.py).
Expected runtime: ~10 min each on 2 CPU cores (training ~7-8 min). Measured numbers in
README.md ("Digits with the flagship DiT").
"""
import ml_collections

from experiments.configs.digits_common import check_sampler_fits, digits_config, validate_digits
from research.runs.config import check, check_choice, check_positive


def get_config() -> ml_collections.ConfigDict:
    c = digits_config(hidden_size=96, num_steps=3000, checkpoint_every=1000)
    c.name = ""  # empty: digits_<method>
    c.method = "vp"

    c.sde = ml_collections.ConfigDict()
    c.sde.beta_min = 0.1
    c.sde.beta_max = 20.0
    c.sde.ve_sigma_max = 20.0  # ~ the largest distance between two digits in [-1, 1]^64 space
    c.sde.likelihood_weighting = False
    c.sde.sigma_data = 0.5  # EDM, and the score-SDE epsilon preconditioning
    # score-SDE epsilon network: "edm" = c_skip x + c_out F(c_in x, t) (default), "none" = raw eps (score_sde)
    c.sde.precond = "edm"
    c.sde.P_mean = -1.2
    c.sde.P_std = 1.2

    c.sample.num_steps = 18  # PF-ODE Heun: NFE 2N (EDM's sigma-space heun: 2N - 1)
    c.sample.guidance = 2.0
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    from research.generative.methods import METHODS
    from research.generative.methods.score_sde import PRECONDS

    validate_digits(c)
    check_choice(c, "method", sorted(METHODS))
    check_positive(c, "sde.beta_min", "sde.sigma_data", "sde.ve_sigma_max", "sde.P_std")
    check(c.sde.beta_min <= c.sde.beta_max, f"sde.beta_min ({c.sde.beta_min}) must be <= sde.beta_max ({c.sde.beta_max})")
    check_choice(c, "sde.precond", PRECONDS)
    check_sampler_fits(c, c.method)
