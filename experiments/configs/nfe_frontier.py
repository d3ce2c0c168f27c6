"""The NFE frontier: sample quality of every sampler at a given budget of network evaluations.

Command (after training the three digits models, see README "NFE frontier"):
    python -m experiments.nfe_frontier --config experiments/configs/nfe_frontier.py
    # e.g. --set runs=rf:runs/digits_rf --set budgets=5,10 --set per_class=16

Loads the EMA parameters of each trained digits run (newest intact, verified checkpoint; the run's
own config.json rebuilds the model and method), then for every registered sampler that applies and
every NFE budget picks the largest number of steps whose NFE fits the budget, draws
``per_class`` class-conditional samples per digit with CFG and scores classifier accuracy and the
Fréchet distance (PCA-16) against the test digits. Writes runs/<name>/results.json, results.md and
frontier.png. Expected runtime: ~15-25 min on 2 CPU cores (one compile per sampler and step count).
Reference point: each run's own sampler (Heun PF-ODE, 40 NFE for rf, 36 for vp; 35 for edm).
"""
import ml_collections

from research.runs.config import check, check_positive

DEFAULT_SAMPLERS = ("euler", "heun", "euler_ancestral", "lms", "dpm_2", "dpmpp_2m", "dpmpp_2m_sde",
                    "dpmpp_3m_sde", "unipc", "ode:euler", "ode:heun", "ode:rk4", "euler_maruyama", "ddim")


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "nfe_frontier"
    c.run_dir = ""
    c.seed = 0
    # label:run_dir pairs of trained digits runs (train_digits_rf / train_digits_sde)
    c.runs = "rf:runs/digits_rf,edm:runs/digits_edm,vp:runs/digits_vp"
    c.samplers = ",".join(DEFAULT_SAMPLERS)  # "ode:<solver>" = time-space PF-ODE with that integrator
    c.budgets = "5,10,20,50"
    c.per_class = 64
    c.guidance = -1.0  # < 0: each run's own sample.guidance
    c.schedule = ""  # empty: family default (karras sigmas / uniform t); e.g. "exponential"
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    from research.generative.sampling import SAMPLERS
    from research.generative.sampling.ode import ODE_SOLVERS

    check_positive(c, "per_class")
    for b in c.budgets.split(","):
        check(b.strip().isdigit() and int(b) >= 1, f"budgets: expected positive integers, got {b!r}")
    for s in c.samplers.split(","):
        name = s.split(":")[0]
        check(name in SAMPLERS, f"samplers: unknown sampler {name!r}; registered: {sorted(SAMPLERS)}")
        if name == "ode":
            check(s.split(":")[1:] and s.split(":")[1] in ODE_SOLVERS,
                  f"samplers: {s!r} must be ode:<solver> with a solver in {sorted(ODE_SOLVERS)}")
    for r in c.runs.split(","):
        check(":" in r, f"runs: expected label:run_dir pairs, got {r!r}")
