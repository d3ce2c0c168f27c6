"""2-D benchmark: every generative method on the toy distributions with the same MLP budget.

    python -m experiments.bench_2d --config experiments/configs/bench_2d.py [--set k=v ...]
    python -m experiments.bench_2d --config experiments/configs/bench_2d.py:quick   # smoke test preset

Prints one table (method x dataset x sampler: NFE, sliced W2, MMD^2, NLL) and writes
runs/<name>/results.json + results.md.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import resolve_run_dir, run_cli, write_json
from research.data.iterators import batch_iterator
from research.data.toy import eight_gaussians_mixture, get_toy
from research.eval.sample_metrics import mmd_rbf, sliced_wasserstein
from research.generative.methods import get_method
from research.generative.methods.edm import EDM
from research.generative.methods.score_sde import ScoreSDE
from research.nn.mlp import ToyMLP, make_mlp_fn
from research.train.optim import make_optimizer
from research.train.state import create_train_state
from research.train.step import make_train_step


def exact_log_prob(dataset: str):
    """Exact log-density of the data where it exists (the Gaussian mixture), else None."""
    if dataset == "eight_gaussians":
        return eight_gaussians_mixture().log_prob
    return None


def train_method(method, model, data: np.ndarray, cfg, key):
    """Trains ``model`` with ``method.loss``; returns the EMA params and the final loss."""
    tc = cfg.train
    model_fn = make_mlp_fn(model)
    k_init, k_state, k_data = jax.random.split(key, 3)
    params = model.init(k_init, jnp.zeros((2, 2)), jnp.zeros((2,)))["params"]
    opt = make_optimizer(learning_rate=tc.learning_rate, warmup_steps=tc.warmup_steps, total_steps=tc.num_steps,
                         weight_decay=tc.weight_decay, clip_norm=1.0)
    state = create_train_state(params, opt, k_state, ema=True)
    step = make_train_step(lambda p, b, k: method.loss(model_fn, p, b["x"], k), opt, ema_decay=tc.ema_decay)
    it = batch_iterator({"x": data}, tc.batch_size, key=k_data)
    losses = []
    for i in range(tc.num_steps):
        state, metrics = step(state, next(it))
        if i >= tc.num_steps - 100:
            losses.append(metrics["loss"])
    final = float(np.mean(jax.device_get(losses)))
    if not np.isfinite(final):
        raise FloatingPointError(f"{method.name}: non-finite training loss over the last 100 steps ({final})")
    return state.ema_params, final


def sampler_runs(method, ec):
    """(row tag, registered sampler, num_steps, options) evaluated for ``method``: a 50-step Heun PF-ODE
    (EDM: its sigma-space Heun, Algorithm 1), 8 Euler steps, and the method's stochastic sampler
    (score SDEs: Euler-Maruyama; EDM: Heun with churn, Algorithm 2)."""
    if isinstance(method, EDM):
        return [("ode-heun", "heun", ec.ode_steps, {}), ("ode-euler", "euler", ec.few_steps, {}),
                ("sde-churn", "heun", ec.ode_steps,
                 {"s_churn": 30.0, "s_tmin": 0.01, "s_tmax": method.sigma_max, "s_noise": 1.0})]
    grid = ec.sde_grid if isinstance(method, ScoreSDE) else "uniform"
    suffix = "-karras" if grid == "karras" else ""
    runs = [(f"ode-heun{suffix}", "ode", ec.ode_steps, {"solver": "heun", "schedule": grid}),
            (f"ode-euler{suffix}", "ode", ec.few_steps, {"solver": "euler", "schedule": grid})]
    if isinstance(method, ScoreSDE):
        runs.append(("sde-em", "euler_maruyama", ec.sde_steps, {}))
    return runs


def evaluate(method, model, params, dataset: str, cfg, key):
    """Rows of (sampler, nfe, sw2, mmd, nll) for one trained method."""
    ec = cfg.eval
    model_fn = make_mlp_fn(model)
    sampler_fn = get_toy(dataset)
    k_ref, k_s, k_sw, k_nll = jax.random.split(key, 4)
    ref = sampler_fn(k_ref, ec.num_samples)
    n = ec.num_samples
    rows = []

    def metrics(x):
        x = jnp.where(jnp.isfinite(x), x, 1e3)
        sw = float(sliced_wasserstein(k_sw, x, ref, num_projections=ec.num_projections))
        mmd = float(mmd_rbf(x[:2000], ref[:2000]))
        return sw, mmd

    for tag, sampler, steps, opts in sampler_runs(method, ec):
        f = jax.jit(lambda p, k: method.sample(model_fn, p, k, (n, 2), sampler=sampler, num_steps=steps, **opts))
        x, nfe = f(params, k_s)
        rows.append({"sampler": tag, "nfe": int(nfe), **dict(zip(("sw2", "mmd"), metrics(x)))})

    logp_true = exact_log_prob(dataset)
    if logp_true is not None:
        xt = sampler_fn(k_nll, ec.nll_samples)
        logp, aux = jax.jit(lambda p, x: method.log_likelihood(model_fn, p, x, divergence="exact"))(params, xt)
        nll = float(-jnp.mean(logp))
        for r in rows:
            r["nll"] = nll
            r["nll_nfe"] = int(aux["nfe"])
            r["data_nll"] = float(-jnp.mean(logp_true(xt)))
    return rows


def format_table(results) -> str:
    lines = ["| dataset | method | sampler | NFE | SW2 | MMD^2 | NLL (nats) | data NLL | final loss | train s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        nll = f"{r['nll']:.3f}" if "nll" in r else "-"
        dn = f"{r['data_nll']:.3f}" if "data_nll" in r else "-"
        lines.append(f"| {r['dataset']} | {r['method']} | {r['sampler']} | {r['nfe']} | {r['sw2']:.4f} | "
                     f"{r['mmd']:.5f} | {nll} | {dn} | {r['final_loss']:.4f} | {r['train_s']:.0f} |")
    return "\n".join(lines)


def build_method(name: str, mc, *, sigma_data: float):
    """The registered method ``name`` with this benchmark's hyper-parameters."""
    if name in ("vp", "subvp"):
        return get_method(name, sigma_data=sigma_data, precond=mc.sde_precond)
    if name == "ve":
        return get_method(name, sigma_data=sigma_data, precond=mc.sde_precond, sigma_max=mc.ve_sigma_max)
    if name == "edm":
        return get_method(name, sigma_data=sigma_data)
    if name == "rf":
        return get_method(name, timestep_dist=mc.rf_timestep_dist)
    return get_method(name, sigma=mc.cfm_sigma)


def run(cfg) -> list[dict]:
    """Trains and evaluates every (dataset, method) pair of the config; prints and writes the table."""
    run_dir = resolve_run_dir(cfg.run_dir, cfg.name)
    key = jax.random.key(cfg.seed)
    results = []
    model = ToyMLP(hidden_size=cfg.model.hidden_size, depth=cfg.model.depth,
                   time_embed_dim=cfg.model.time_embed_dim)
    for d_i, dataset in enumerate(cfg.datasets.split(",")):
        k_data, k_eval = jax.random.split(jax.random.fold_in(key, d_i))
        data = np.asarray(get_toy(dataset)(k_data, cfg.train_size))
        sigma_data = float(data.std())
        for m_i, name in enumerate(cfg.methods.split(",")):
            method = build_method(name, cfg.method, sigma_data=sigma_data)
            t0 = time.perf_counter()
            params, final = train_method(method, model, data, cfg, jax.random.fold_in(k_data, m_i))
            train_s = time.perf_counter() - t0
            rows = evaluate(method, model, params, dataset, cfg, k_eval)
            for r in rows:
                r.update({"dataset": dataset, "method": name, "final_loss": final, "train_s": train_s})
                print(f"{dataset:16s} {name:6s} {r['sampler']:10s} nfe={r['nfe']:4d} sw2={r['sw2']:.4f} "
                      f"mmd={r['mmd']:.5f} nll={r.get('nll', float('nan')):.3f} loss={final:.4f} "
                      f"train {train_s:.1f}s", flush=True)
            results.extend(rows)
    table = format_table(results)
    print(table)
    write_json(os.path.join(run_dir, "results.json"), results)
    with open(os.path.join(run_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    return results


def main(argv=None):
    return run_cli(run, argv, default_config="experiments/configs/bench_2d.py")


if __name__ == "__main__":
    main()
