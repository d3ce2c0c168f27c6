"""Score-SDE / EDM (or any research.generative.methods method) on 8x8 digits with the flagship DiT.

    python -m experiments.train_digits_sde --config experiments/configs/digits_sde.py [--set method=edm]

Trains (resuming from the latest checkpoint in the run directory), samples class-conditionally with
CFG from the EMA params, and writes runs/<name>/: samples.png, samples.npz, metrics.json
(classifier accuracy, Fréchet distance, bits/dim, NFE, timings), config.json, metrics.jsonl.
"""
from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import (close_text_log, make_digits_state, resolve_run_dir, setup_text_log,
                                train_resumable, write_digit_samples_and_metrics, write_json)
from experiments.train_digits_rf import build_model
from research.data.digits import NUM_CLASSES, load_digits, to_0_16
from research.generative.likelihood import bits_per_dim, dequantize, digits_dequantization
from research.generative.methods import make_method
from research.generative.samplers import guided_model_fn
from research.nn.dit import init_dit, make_model_fn
from research.runs.config import config_from_cli, save_config
from research.train.step import make_train_step


def build_method(cfg):
    s = cfg.sde
    return make_method(cfg.method, beta_min=s.beta_min, beta_max=s.beta_max, ve_sigma_max=s.ve_sigma_max,
                       likelihood_weighting=s.likelihood_weighting, sigma_data=s.sigma_data, P_mean=s.P_mean,
                       P_std=s.P_std, sde_precond=s.precond)


def digits_bits_per_dim(method, model_fn, params, images, key, *, divergence: str, rtol: float):
    """Bits/dim of [-1, 1] digit images under the unconditional (null-label) model.

    Dequantises the 0..16 integers with uniform noise (bins of width 1/8 in model space), evaluates
    log p(z) by the PF-ODE and converts with the bin-width Jacobian (research/generative/likelihood.py).
    """
    k_deq, k_probe = jax.random.split(key)
    ints = jnp.asarray(np.rint(to_0_16(images)), jnp.float32)
    bin_width, offset = digits_dequantization()
    z = dequantize(k_deq, ints, bin_width=bin_width, offset=offset)
    null = jnp.full((images.shape[0],), NUM_CLASSES, jnp.int32)
    f = jax.jit(lambda p, x, k: method.log_likelihood(model_fn, p, x, key=k, divergence=divergence, cond=null,
                                                      rtol=rtol, atol=rtol))
    logp, aux = f(params, z, k_probe)
    bpd = bits_per_dim(logp, int(np.prod(images.shape[1:])), bin_width=bin_width)
    return float(jnp.mean(bpd)), int(aux["nfe"])


def run(cfg) -> dict:
    name = cfg.name or f"digits_{cfg.method}"
    run_dir = resolve_run_dir(cfg.run_dir, name)
    log = setup_text_log(run_dir, name)
    try:
        return _run(cfg, name, run_dir, log)
    finally:
        close_text_log(log)


def _run(cfg, name, run_dir, log) -> dict:
    t_start = time.perf_counter()
    save_config(cfg, run_dir)
    tc, sc = cfg.train, cfg.sample
    images, labels = load_digits("train", seed=cfg.data.split_seed, test_fraction=cfg.data.test_fraction)
    arrays = {"image": images, "label": labels}
    k_init, k_train, k_data, k_sample, k_bpd = jax.random.split(jax.random.key(cfg.seed), 5)

    method = build_method(cfg)
    model = build_model(cfg.model)
    model_fn = make_model_fn(model)
    params = init_dit(model, k_init)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    log.info(f"method={cfg.method} DiT params: {n_params:,}; train images: {len(labels)}")

    optimizer, ema_decay, state = make_digits_state(tc, params, k_train)
    use_ema = ema_decay is not None

    def loss_fn(p, batch, key):
        return method.loss(model_fn, p, batch["image"], key, cond=batch["label"])

    step_fn = make_train_step(loss_fn, optimizer, ema_decay=ema_decay)
    state, start_step, train_time, final_loss = train_resumable(
        run_dir, log, state, step_fn, arrays, k_data, tc, num_steps=tc.num_steps)
    params = state.ema_params if use_ema else state.params

    # ---- class-conditional samples with CFG (one jitted sampler)
    t_sample = time.perf_counter()
    ys = jnp.repeat(jnp.arange(NUM_CLASSES, dtype=jnp.int32), sc.per_class)
    g_model = guided_model_fn(model_fn, NUM_CLASSES, sc.guidance)
    if sc.method == "heun" or method.kind != "edm":
        sampler = jax.jit(lambda p, k: method.sample_ode(g_model, p, k, (ys.shape[0], 8, 8, 1),
                                                         num_steps=sc.num_steps, solver=sc.method, cond=ys))
    else:
        raise ValueError(f"sample.method {sc.method!r} is not supported for EDM (use heun)")
    x, nfe = jax.block_until_ready(sampler(params, k_sample))
    sample_time = time.perf_counter() - t_sample

    t_eval = time.perf_counter()
    imgs, y, metrics = write_digit_samples_and_metrics(
        run_dir, x, ys, cfg, title=f"{name}: {sc.method} NFE {int(nfe)}, CFG w={sc.guidance}")
    if cfg.eval.bpd_images > 0:
        test_images, _ = load_digits("test", seed=cfg.data.split_seed, test_fraction=cfg.data.test_fraction)
        bpd, bpd_nfe = digits_bits_per_dim(method, model_fn, params, test_images[:cfg.eval.bpd_images], k_bpd,
                                           divergence=cfg.eval.bpd_divergence, rtol=cfg.eval.bpd_rtol)
        metrics.update({"bits_per_dim": bpd, "bpd_nfe": bpd_nfe, "bpd_images": int(min(cfg.eval.bpd_images,
                                                                                          len(test_images))),
                        "bpd_uniform_reference": float(np.log2(17.0))})
    metrics.update({
        "method": cfg.method, "final_loss": final_loss, "steps": int(state.step), "num_params": n_params,
        "sampler": sc.method, "sample_steps": sc.num_steps, "nfe": int(nfe), "guidance": sc.guidance,
        "train_time_s": train_time, "sample_time_s": sample_time, "eval_time_s": time.perf_counter() - t_eval,
        "wall_time_s": time.perf_counter() - t_start, "resumed_from_step": start_step,
    })
    write_json(os.path.join(run_dir, "metrics.json"), metrics)
    log.info(f"{name}: accuracy {metrics['classifier_accuracy']:.4f}, Fréchet {metrics['frechet_distance']:.3f} "
             f"(floor {metrics['frechet_floor_train_vs_test']:.3f}), bits/dim {metrics.get('bits_per_dim')}, "
             f"NFE {int(nfe)}, wall {metrics['wall_time_s']:.0f}s")
    return metrics


def main(argv=None) -> dict:
    cfg, _ = config_from_cli(argv, default_config="experiments/configs/digits_sde.py")
    return run(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
