"""2-D benchmark of every Gaussian-path method with the same MLP budget.

Command:
    python -m experiments.bench_2d --config experiments/configs/bench_2d.py            # full table
    python -m experiments.bench_2d --config experiments/configs/bench_2d.py:quick      # smoke test (~1 min)
    # overrides: --set train.num_steps=1000 --set datasets=eight_gaussians,two_moons

Trains VP-SDE, sub-VP SDE, VE-SDE (epsilon prediction, DSM), EDM (preconditioned, log-normal
sigma), rectified flow, I-CFM (sigma 0.1) and OT-CFM (sigma 0.1, exact minibatch OT on device) on
each toy distribution, with the same ToyMLP (3 x 256, SiLU), optimiser, batch size and steps.
Reports sliced Wasserstein-2 and MMD^2 to fresh data, NLL (nats, PF-ODE with the exact
divergence) where the exact density is known (eight_gaussians), and NFE per sample.
Expected runtime: ~15-20 min on 2 busy CPU cores for 4 datasets x 7 methods x 3000 steps.
Expected result: every method reaches SW2 of a few 1e-2 on eight_gaussians with the 100-NFE ODE
sampler, NLL within ~0.1-0.2 nats of the data entropy; OT-CFM is the best at 8 Euler steps.
"""
import ml_collections

from research.data.toy import TOY_DISTRIBUTIONS
from research.generative.methods import METHODS
from research.generative.methods.score_sde import PRECONDS
from research.generative.timesteps import TIMESTEP_DISTS
from research.runs.config import check, check_choice, check_positive, check_range

DEFAULT_METHODS = ("vp", "subvp", "ve", "edm", "rf", "icfm", "otcfm")
DATASETS = ("eight_gaussians", "two_moons", "checkerboard", "spirals")
PRESETS = ("quick",)


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """The full benchmark, or ``preset="quick"``: one dataset, 60 steps, small evaluation (smoke test)."""
    c = ml_collections.ConfigDict()
    c.name = "bench_2d"
    c.run_dir = ""  # empty: runs/<name>
    c.seed = 0
    c.methods = ",".join(DEFAULT_METHODS)
    c.datasets = ",".join(DATASETS)
    c.train_size = 100_000  # fixed training set per dataset (fresh data for the metrics)

    c.model = ml_collections.ConfigDict()
    c.model.hidden_size = 256
    c.model.depth = 3
    c.model.time_embed_dim = 64

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 3000
    c.train.batch_size = 256
    c.train.learning_rate = 2e-3
    c.train.warmup_steps = 100
    c.train.weight_decay = 0.0
    c.train.ema_decay = 0.999

    c.method = ml_collections.ConfigDict()
    c.method.ve_sigma_max = 10.0  # ~ the largest pairwise distance of the toy data (score_sde's rule)
    c.method.cfm_sigma = 0.1
    c.method.rf_timestep_dist = "uniform"  # Liu et al.'s uniform t (the registry's rf defaults to SD3's logit-normal)
    # score-SDE epsilon network: "edm" = c_skip x + c_out F(c_in x, t) with sigma_data = data std (default;
    # fixes the poor VP / sub-VP probability-flow ODE samples), "none" = raw eps network (score_sde)
    c.method.sde_precond = "edm"

    c.eval = ml_collections.ConfigDict()
    c.eval.num_samples = 4000
    c.eval.ode_steps = 50  # Heun: NFE 100 (EDM 99)
    c.eval.few_steps = 8  # Euler: NFE 8
    c.eval.sde_grid = "uniform"  # ODE time grid of the score-SDE methods: "uniform" in t or "karras" (in sigma/alpha)
    c.eval.sde_steps = 500  # Euler-Maruyama NFE 500; EDM churn with ode_steps
    c.eval.nll_samples = 1000
    c.eval.num_projections = 512
    if preset == "quick":
        c.train.num_steps, c.train.warmup_steps, c.train_size = 60, 10, 4096
        c.datasets = "eight_gaussians"
        c.model.hidden_size = 64
        c.eval.num_samples, c.eval.nll_samples, c.eval.sde_steps, c.eval.ode_steps = 256, 64, 50, 10
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    check_positive(c, "train.num_steps", "train.batch_size", "train.learning_rate", "model.hidden_size",
                   "model.depth", "model.time_embed_dim", "eval.num_samples", "eval.ode_steps", "eval.few_steps",
                   "eval.sde_steps", "eval.nll_samples", "eval.num_projections", "train_size")
    check_positive(c, "train.warmup_steps", "train.weight_decay", "method.cfm_sigma", allow_zero=True)
    check_positive(c, "method.ve_sigma_max")
    for m in c.methods.split(","):
        check(m in METHODS, f"methods: unknown method {m!r}; registered: {sorted(METHODS)}")
    for d in c.datasets.split(","):
        check(d in TOY_DISTRIBUTIONS, f"datasets: unknown dataset {d!r}; expected some of {sorted(TOY_DISTRIBUTIONS)}")
    check_choice(c, "method.sde_precond", PRECONDS)
    check_choice(c, "method.rf_timestep_dist", TIMESTEP_DISTS)
    check_choice(c, "eval.sde_grid", ["uniform", "karras"])
    check_range(c, "train.ema_decay", 0.0, 0.999999)
    check(c.train.warmup_steps < c.train.num_steps,
          f"train.warmup_steps ({c.train.warmup_steps}) must be < train.num_steps ({c.train.num_steps})")
    check(c.train.batch_size <= c.train_size, f"train.batch_size ({c.train.batch_size}) must be <= train_size")
