"""Flagship experiment: class-conditional rectified flow (SD3 recipe) on 8x8 digits with a DiT.

    python -m experiments.train_digits_rf --config experiments/configs/digits_rf.py [--set k=v ...]

Trains with logit-normal timesteps, AdamW (warmup + cosine), EMA; checkpoints with orbax (verified
digests) and resumes from the newest intact checkpoint in the run directory; then samples with the
configured sampler and classifier-free guidance from the EMA params and writes to ``runs/<name>/``:
samples.png, samples.npz (images [N, 8, 8] on 0..16, labels [N]), metrics.json, config.json,
metrics.jsonl, curves.png, train.log and checkpoints/.
"""
from __future__ import annotations

import os
import time

import jax
import numpy as np

from experiments.common import (
    TRAIN_KEYS, build_digits_dit, close_text_log, resolve_run_dir, run_cli, sample_digits, setup_text_log,
    test_split_bits_per_dim, train_digits, write_digit_samples_and_metrics, write_json,
)
from research.data.digits import load_digits
from research.generative.methods import get_method
from research.nn.dit import init_dit, make_model_fn


def run(cfg) -> dict:
    """Trains (resuming if a checkpoint exists), samples and evaluates; returns the metrics dict."""
    t_start = time.perf_counter()
    run_dir = resolve_run_dir(cfg.run_dir, cfg.name)
    log = setup_text_log(run_dir, cfg.name)
    try:
        return _run(cfg, run_dir, log, t_start)
    finally:
        close_text_log(log)


def _run(cfg, run_dir, log, t_start) -> dict:
    tc, sc, dc = cfg.train, cfg.sample, cfg.data
    log.info(f"run_dir={run_dir} devices={jax.devices()}")
    images, labels = load_digits("train", seed=dc.split_seed, test_fraction=dc.test_fraction)
    arrays = {"image": images, "label": labels}

    k_init, k_train, k_data, k_sample = jax.random.split(jax.random.key(cfg.seed), 4)
    k_bpd = jax.random.fold_in(k_sample, 1)
    model = build_digits_dit(**cfg.model.to_dict())
    model_fn = make_model_fn(model)
    params = init_dit(model, k_init)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    log.info(f"DiT params: {n_params:,}; train images: {len(labels)}")

    method = get_method("rf", timestep_dist=tc.timestep_dist, loc=tc.timestep_loc, scale=tc.timestep_scale)
    state, ema_decay, start_step, train_time, final_loss = train_digits(
        run_dir, log, cfg, method=method, model_fn=model_fn, params=params, arrays=arrays, key_state=k_train,
        key_data=k_data, resume=cfg.resume, stop_at_step=tc.stop_at_step, tensorboard=tc.tensorboard,
        **{k: tc[k] for k in TRAIN_KEYS})
    log.info(f"trained steps {start_step} -> {int(state.step)} in {train_time:.1f}s; final loss {final_loss}")
    if int(state.step) < tc.num_steps:
        log.info(f"stopped at step {int(state.step)} (train.stop_at_step); rerun to resume. No samples written.")
        return {"stopped_at_step": int(state.step)}

    # ---- sample from the EMA params with CFG, inside one jitted function
    t_sample = time.perf_counter()
    sample_params = state.ema_params if ema_decay is not None else state.params
    x, y, nfe = sample_digits(method, model_fn, sample_params, k_sample, per_class=sc.per_class,
                              sampler=sc.sampler, solver=sc.solver, schedule=sc.schedule,
                              num_steps=sc.num_steps, guidance=sc.guidance)
    sample_time = time.perf_counter() - t_sample

    # ---- artefacts and metrics
    t_eval = time.perf_counter()
    sampler_tag = f"{sc.sampler}/{sc.solver}" if sc.sampler == "ode" else sc.sampler
    imgs, y, metrics = write_digit_samples_and_metrics(
        run_dir, x, y, split_seed=dc.split_seed, test_fraction=dc.test_fraction,
        pca_components=cfg.eval.pca_components, grid_columns=sc.grid_columns,
        title=f"{cfg.name}: {sampler_tag} {sc.num_steps} steps, CFG w={sc.guidance}")
    metrics.update(test_split_bits_per_dim(cfg, method, model_fn, sample_params, k_bpd))
    metrics.update({
        "final_loss": final_loss,
        "steps": int(state.step),
        "batch_size": tc.batch_size,
        "num_params": n_params,
        "sampler": sampler_tag,
        "sample_steps": sc.num_steps,
        "nfe": nfe,
        "nfe_note": "network evaluations per sample path; with guidance != 1 each is one call on a doubled batch",
        "guidance": sc.guidance,
        "sampled_from": "ema_params" if ema_decay is not None else "params",
        "train_time_s": train_time,
        "sample_time_s": sample_time,
        "eval_time_s": time.perf_counter() - t_eval,
        "wall_time_s": time.perf_counter() - t_start,
        "resumed_from_step": start_step,
    })
    write_json(os.path.join(run_dir, "metrics.json"), metrics)
    log.info(
        f"classifier accuracy {metrics['classifier_accuracy']:.4f} (real test digits "
        f"{metrics['real_test_accuracy']:.4f}); Fréchet {metrics['frechet_distance']:.3f} "
        f"(floor train-vs-test {metrics['frechet_floor_train_vs_test']:.3f}); "
        f"wall time {metrics['wall_time_s']:.1f}s"
    )
    return metrics


def main(argv=None) -> dict:
    return run_cli(run, argv, default_config="experiments/configs/digits_rf.py")


if __name__ == "__main__":
    main()
