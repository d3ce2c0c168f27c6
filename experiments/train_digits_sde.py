"""Score-SDE / EDM (or any registered method) on 8x8 digits with the flagship DiT.

    python -m experiments.train_digits_sde --config experiments/configs/digits_sde.py [--set method=edm ...]

Trains (resuming from the newest intact checkpoint in the run directory), samples class-conditionally
with CFG from the EMA params, and writes runs/<name>/: samples.png, samples.npz, metrics.json
(classifier accuracy, Fréchet distance, bits/dim, NFE, timings), config.json, metrics.jsonl, curves.png.
"""
from __future__ import annotations

import os
import time

import jax
import numpy as np

from experiments.common import (
    TRAIN_KEYS, build_digits_dit, build_digits_method, close_text_log, resolve_run_dir, run_cli, sample_digits,
    setup_text_log, test_split_bits_per_dim, train_digits, write_digit_samples_and_metrics, write_json,
)
from research.data.digits import load_digits
from research.nn.dit import init_dit, make_model_fn


def run(cfg) -> dict:
    """Trains (resuming if a checkpoint exists), samples, evaluates bits/dim; returns the metrics dict."""
    name = cfg.name or f"digits_{cfg.method}"
    run_dir = resolve_run_dir(cfg.run_dir, name)
    log = setup_text_log(run_dir, name)
    try:
        return _run(cfg, name, run_dir, log)
    finally:
        close_text_log(log)


def _run(cfg, name, run_dir, log) -> dict:
    t_start = time.perf_counter()
    tc, sc, dc = cfg.train, cfg.sample, cfg.data
    images, labels = load_digits("train", seed=dc.split_seed, test_fraction=dc.test_fraction)
    arrays = {"image": images, "label": labels}
    k_init, k_train, k_data, k_sample, k_bpd = jax.random.split(jax.random.key(cfg.seed), 5)

    method = build_digits_method(cfg.method, **cfg.sde.to_dict())
    model = build_digits_dit(**cfg.model.to_dict())
    model_fn = make_model_fn(model)
    params = init_dit(model, k_init)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    log.info(f"method={cfg.method} DiT params: {n_params:,}; train images: {len(labels)}")

    state, ema_decay, start_step, train_time, final_loss = train_digits(
        run_dir, log, cfg, method=method, model_fn=model_fn, params=params, arrays=arrays, key_state=k_train,
        key_data=k_data, resume=cfg.resume, **{k: tc[k] for k in TRAIN_KEYS})
    params = state.ema_params if ema_decay is not None else state.params

    # ---- class-conditional samples with CFG (one jitted sampler)
    t_sample = time.perf_counter()
    x, ys, nfe = sample_digits(method, model_fn, params, k_sample, per_class=sc.per_class, sampler=sc.sampler,
                               solver=sc.solver, schedule=sc.schedule, num_steps=sc.num_steps,
                               guidance=sc.guidance)
    sample_time = time.perf_counter() - t_sample

    t_eval = time.perf_counter()
    sampler_tag = f"{sc.sampler}/{sc.solver}" if sc.sampler == "ode" else sc.sampler
    imgs, y, metrics = write_digit_samples_and_metrics(
        run_dir, x, ys, split_seed=dc.split_seed, test_fraction=dc.test_fraction,
        pca_components=cfg.eval.pca_components, grid_columns=sc.grid_columns,
        title=f"{name}: {sampler_tag} NFE {nfe}, CFG w={sc.guidance}")
    metrics.update(test_split_bits_per_dim(cfg, method, model_fn, params, k_bpd))
    metrics.update({
        "method": cfg.method, "final_loss": final_loss, "steps": int(state.step), "num_params": n_params,
        "sampler": sampler_tag, "sample_steps": sc.num_steps, "nfe": nfe, "guidance": sc.guidance,
        "train_time_s": train_time, "sample_time_s": sample_time, "eval_time_s": time.perf_counter() - t_eval,
        "wall_time_s": time.perf_counter() - t_start, "resumed_from_step": start_step,
    })
    write_json(os.path.join(run_dir, "metrics.json"), metrics)
    log.info(f"{name}: accuracy {metrics['classifier_accuracy']:.4f}, Fréchet {metrics['frechet_distance']:.3f} "
             f"(floor {metrics['frechet_floor_train_vs_test']:.3f}), bits/dim {metrics.get('bits_per_dim')}, "
             f"NFE {nfe}, wall {metrics['wall_time_s']:.0f}s")
    return metrics


def main(argv=None) -> dict:
    return run_cli(run, argv, default_config="experiments/configs/digits_sde.py")


if __name__ == "__main__":
    main()
