"""Free-form continuous normalizing flow (FFJORD-style) on a 2-D toy distribution, trained by maximum
likelihood through the PF-ODE log-likelihood (research.flows.cnf).

    python -m experiments.train_2d_cnf --config experiments/configs/cnf_2d.py [--set k=v ...]

Trains (resuming from the newest intact checkpoint in the run directory) with AdamW, then reports the
held-out NLL (nats) at initialisation and after training, the NLL under the true density where it is
known (eight_gaussians: the data entropy, estimated on the same test points, so their difference
estimates KL(data || model)), and writes runs/<name>/: metrics.json, samples.npz, samples.png,
config.json, metrics.jsonl, curves.png, train.log and checkpoints/.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import close_text_log, resolve_run_dir, run_cli, setup_text_log, write_json
from experiments.train_digits_flow import train_with_loss
from research.data.toy import eight_gaussians_mixture, get_toy
from research.flows.cnf import cnf_log_prob, cnf_sample, make_cnf_loss, velocity_from_model
from research.flows.models import num_params
from research.nn.mlp import ToyMLP, make_mlp_fn


def build(cfg, key):
    """``(model_fn, initial params)`` of the velocity network."""
    mc = cfg.model
    model = ToyMLP(hidden_size=mc.hidden_size, depth=mc.depth, time_embed_dim=mc.time_embed_dim,
                   time_scale=mc.time_scale)
    params = model.init(key, jnp.zeros((1, 2), jnp.float32), jnp.zeros((1,), jnp.float32))["params"]
    return make_mlp_fn(model), params


def make_test_nll(model_fn, *, rtol: float, num_steps: int):
    """``nll(params, x, solver) -> mean held-out NLL (nats)`` with the exact divergence; one compiled
    program per solver, reused for every parameter set."""
    cache = {}

    def nll(params, x, solver: str) -> float:
        if solver not in cache:
            cache[solver] = jax.jit(lambda p, x_: -jnp.mean(cnf_log_prob(
                velocity_from_model(model_fn, p), x_, divergence="exact", solver=solver, num_steps=num_steps,
                rtol=rtol, atol=rtol)[0]))
        return float(cache[solver](params, x))

    return nll


def save_scatter(path: str, data: np.ndarray, samples: np.ndarray, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(7, 3.6), sharex=True, sharey=True)
    for ax, pts, name in ((axes[0], data, "data"), (axes[1], samples, "CNF samples")):
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
        ax.set_title(name, fontsize=9)
        ax.set_aspect("equal")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(cfg) -> dict:
    """Trains (resuming if a checkpoint exists), evaluates the NLL and samples; returns the metrics dict."""
    t_start = time.perf_counter()
    run_dir = resolve_run_dir(cfg.run_dir, cfg.name)
    log = setup_text_log(run_dir, cfg.name)
    try:
        return _run(cfg, run_dir, log, t_start)
    finally:
        close_text_log(log)


def _run(cfg, run_dir, log, t_start) -> dict:
    tc, ec, dc = cfg.train, cfg.eval, cfg.data
    k_train_data, k_test_data, k_init, k_state, k_data, k_sample = jax.random.split(jax.random.key(cfg.seed), 6)
    sampler = get_toy(dc.dataset)
    x_train = np.asarray(sampler(k_train_data, dc.num_train))
    x_test = np.asarray(sampler(k_test_data, dc.num_test))
    model_fn, init_params = build(cfg, k_init)
    n_params = num_params(init_params)
    log.info(f"run_dir={run_dir} dataset={dc.dataset} velocity MLP params: {n_params:,}")

    loss_fn = make_cnf_loss(model_fn, num_steps=cfg.cnf.num_steps, solver=cfg.cnf.solver,
                            divergence=cfg.cnf.divergence)
    state, ema_decay, start_step, train_time, final_loss = train_with_loss(
        run_dir, log, cfg, loss_fn, init_params, {"x": x_train}, key_state=k_state, key_data=k_data)
    if int(state.step) < tc.num_steps:
        log.info(f"stopped at step {int(state.step)} (train.stop_at_step); rerun to resume. No samples written.")
        return {"stopped_at_step": int(state.step)}
    params = state.ema_params if ema_decay is not None else state.params

    t_eval = time.perf_counter()
    nll_fn = make_test_nll(model_fn, rtol=ec.rtol, num_steps=cfg.cnf.num_steps)
    nll_init, nll = nll_fn(init_params, x_test, ec.solver), nll_fn(params, x_test, ec.solver)
    nll_train_solver = nll_fn(params, x_test, cfg.cnf.solver)
    eval_time = time.perf_counter() - t_eval
    true_nll = None
    if dc.dataset == "eight_gaussians":
        true_nll = float(-jnp.mean(eight_gaussians_mixture().log_prob(x_test)))
    t_sample = time.perf_counter()
    draw = jax.jit(lambda p, k: cnf_sample(velocity_from_model(model_fn, p), k, ec.num_samples, 2,
                                           num_steps=ec.sample_steps, solver="heun"))
    samples = np.asarray(jax.block_until_ready(draw(params, k_sample)))
    sample_time = time.perf_counter() - t_sample
    if not np.all(np.isfinite(samples)):
        raise FloatingPointError("non-finite CNF samples; the sampling ODE diverged (try more eval.sample_steps)")
    np.savez_compressed(os.path.join(run_dir, "samples.npz"), samples=samples.astype(np.float32))
    tag = f"NLL {nll:.3f} nats" + (f" (data entropy {true_nll:.3f})" if true_nll is not None else "")
    save_scatter(os.path.join(run_dir, "samples.png"), x_test, samples, f"{cfg.name} {dc.dataset}: {tag}")

    metrics = {
        "dataset": dc.dataset, "nll_init": nll_init, "nll": nll, "nll_solver": ec.solver,
        "nll_train_solver": nll_train_solver, "true_nll": true_nll,
        "kl_estimate": None if true_nll is None else nll - true_nll,
        "final_loss": final_loss, "steps": int(state.step), "num_params": n_params,
        "bits_per_dim": None, "bpd_kind": "none",  # continuous 2-D data: NLL in nats instead
        "nfe": 2 * ec.sample_steps, "train_time_s": train_time, "sample_time_s": sample_time,
        "eval_time_s": eval_time, "wall_time_s": time.perf_counter() - t_start, "resumed_from_step": start_step,
    }
    write_json(os.path.join(run_dir, "metrics.json"), metrics)
    log.info(f"{cfg.name}: test NLL {nll_init:.3f} -> {nll:.3f} nats ({ec.solver}; {nll_train_solver:.3f} with the "
             f"training solver), true {true_nll}; wall {metrics['wall_time_s']:.0f}s")
    return metrics


def main(argv=None) -> dict:
    return run_cli(run, argv, default_config="experiments/configs/cnf_2d.py")


if __name__ == "__main__":
    main()
