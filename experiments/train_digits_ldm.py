"""Latent diffusion on 8x8 digits (Stable Diffusion's recipe, SD3's rectified flow and DiT).

    python -m experiments.train_digits_ldm --config experiments/configs/digits_ldm.py [--set k=v ...]

Stage 1 is a trained VAE run (``data.vae_run``, e.g. ``train_digits_vae --config digits_vae.py:ldm``):
the train split is encoded once to posterior means ``z [N, hh, ww, c]``, normalised to
``(z - shift) * scale`` (``shift`` the mean of all latent values or 0, ``scale`` 1 / their std unless
``latent.scale_factor`` is set; written to latent_stats.json), and the flagship class-conditional
DiT (``input_size = hh``, ``in_channels = c``) is trained on them with rectified flow, logit-normal
timesteps, AdamW + EMA and resumable checkpoints (``experiments.common.train_digits``). Samples: the
PF-ODE sampler with classifier-free guidance from the EMA params, un-normalised and decoded by the
VAE decoder (one call). Writes to ``runs/<name>/``: samples.png, samples.npz (images [N, 8, 8] on
0..16, labels [N]), metrics.json, latent_stats.json, config.json, metrics.jsonl, curves.png,
train.log and checkpoints/.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import (
    NUM_DIGIT_CLASSES, TRAIN_KEYS, build_digits_dit, close_text_log, resolve_run_dir, run_cli, setup_text_log,
    train_digits, write_digit_samples_and_metrics, write_json,
)
from research.data.digits import load_digits
from research.generative.guidance import guided_model_fn
from research.generative.methods import get_method
from research.nn.dit import init_dit, make_model_fn


def latent_normaliser(z, *, shift: bool, scale_factor: float = 0.0) -> tuple[float, float]:
    """``(shift, scale)`` so that ``(z - shift) * scale`` has mean 0 (with ``shift``) and std 1 over all
    values of ``z`` (float64 statistics); a given ``scale_factor > 0`` replaces the computed scale."""
    z = np.asarray(z, np.float64)
    if z.size < 2 or not np.all(np.isfinite(z)):
        raise ValueError(f"latent_normaliser: need >= 2 finite latent values, got {z.size} (finite: "
                         f"{bool(np.all(np.isfinite(z)))})")
    mu = float(z.mean()) if shift else 0.0
    std = float(np.sqrt(np.mean(np.square(z - mu))))
    if scale_factor == 0.0 and not std > 0:
        raise ValueError("latent_normaliser: the latents are constant (std 0); the VAE collapsed")
    return mu, float(scale_factor) if scale_factor > 0 else 1.0 / std


def build_latent_dit(model_cfg: dict, latent_shape):
    """The flagship digits DiT (``build_digits_dit`` with the config's model keys) on ``hh x hh x c`` latents,
    with the custom-VJP matmuls (faster on XLA:CPU; nothing here needs forward-mode derivatives)."""
    hh, ww, c = (int(s) for s in latent_shape)
    if hh != ww:
        raise ValueError(f"the DiT needs a square latent grid, got latent_shape {tuple(latent_shape)}")
    if hh % model_cfg["patch_size"]:
        raise ValueError(f"model.patch_size={model_cfg['patch_size']} must divide the latent grid size {hh}")
    return build_digits_dit(**model_cfg).clone(input_size=hh, in_channels=c, custom_matmul_vjp=True)


def sample_latents(method, model_fn, params, key, labels, latent_shape, *, sampler: str, solver: str, schedule: str,
                   num_steps: int, guidance: float):
    """``(latents [N, *latent_shape], nfe)`` given ``labels`` [N] with CFG, one jitted call (the latent-shape
    counterpart of ``experiments.common.sample_digits``)."""
    opts = {"solver": solver} if sampler == "ode" else {}
    opts.update({"schedule": schedule} if schedule else {})
    g_model = guided_model_fn(model_fn, NUM_DIGIT_CLASSES, guidance)
    fn = jax.jit(lambda p, k: method.sample(g_model, p, k, (labels.shape[0], *latent_shape), sampler=sampler,
                                            num_steps=num_steps, cond=labels, **opts))
    z, nfe = jax.block_until_ready(fn(params, key))
    return z, int(nfe)


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
    if not os.path.isdir(dc.vae_run):
        raise FileNotFoundError(f"data.vae_run={dc.vae_run!r} is not a directory; train the VAE first (python -m "
                                "experiments.train_digits_vae --config experiments/configs/digits_vae.py:ldm)")
    from experiments.train_digits_vae import load_vae_run

    log.info(f"run_dir={run_dir} devices={jax.devices()} vae_run={os.path.abspath(dc.vae_run)}")
    vae = load_vae_run(dc.vae_run)
    images, labels = load_digits("train", seed=dc.split_seed, test_fraction=dc.test_fraction)
    z = np.asarray(vae.encode(images, labels if vae.conditional else None))
    shift, scale = latent_normaliser(z, shift=cfg.latent.shift, scale_factor=cfg.latent.scale_factor)
    stats = {"vae_run": os.path.abspath(dc.vae_run), "latent_shape": list(vae.latent_shape), "shift": shift,
             "scale": scale, "raw_mean": float(z.mean()), "raw_std": float(z.std()),
             "normalised_std_per_channel": ((z - shift) * scale).std(axis=(0, 1, 2)).tolist()}
    write_json(os.path.join(run_dir, "latent_stats.json"), stats)
    arrays = {"image": ((z - shift) * scale).astype(np.float32), "label": labels}

    k_init, k_train, k_data, k_sample = jax.random.split(jax.random.key(cfg.seed), 4)
    model = build_latent_dit(cfg.model.to_dict(), vae.latent_shape)
    model_fn = make_model_fn(model)
    params = init_dit(model, k_init)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    log.info(f"latents {vae.latent_shape} (shift {shift:.4f}, scale {scale:.4f}); DiT params {n_params:,}; "
             f"VAE decoder params {vae.num_decoder_params:,}")

    method = get_method("rf", timestep_dist=tc.timestep_dist, loc=tc.timestep_loc, scale=tc.timestep_scale)
    state, ema_decay, start_step, train_time, final_loss = train_digits(
        run_dir, log, cfg, method=method, model_fn=model_fn, params=params, arrays=arrays, key_state=k_train,
        key_data=k_data, resume=cfg.resume, stop_at_step=tc.stop_at_step, tensorboard=tc.tensorboard,
        **{k: tc[k] for k in TRAIN_KEYS})
    log.info(f"trained steps {start_step} -> {int(state.step)} in {train_time:.1f}s; final loss {final_loss}")
    if int(state.step) < tc.num_steps:
        log.info(f"stopped at step {int(state.step)} (train.stop_at_step); rerun to resume. No samples written.")
        return {"stopped_at_step": int(state.step)}

    # ---- sample latents from the EMA params with CFG, un-normalise, decode with the VAE (one call)
    t_sample = time.perf_counter()
    y = jnp.repeat(jnp.arange(NUM_DIGIT_CLASSES, dtype=jnp.int32), sc.per_class)
    z_s, nfe = sample_latents(method, model_fn, state.ema_params if ema_decay is not None else state.params,
                              k_sample, y, vae.latent_shape, sampler=sc.sampler, solver=sc.solver,
                              schedule=sc.schedule, num_steps=sc.num_steps, guidance=sc.guidance)
    x = jax.block_until_ready(vae.decode(np.asarray(z_s) / scale + shift, y if vae.conditional else None))
    sample_time = time.perf_counter() - t_sample

    t_eval = time.perf_counter()
    sampler_tag = f"{sc.sampler}/{sc.solver}" if sc.sampler == "ode" else sc.sampler
    _, _, metrics = write_digit_samples_and_metrics(
        run_dir, x, y, split_seed=dc.split_seed, test_fraction=dc.test_fraction,
        pca_components=cfg.eval.pca_components, grid_columns=sc.grid_columns,
        title=f"{cfg.name}: latent {'x'.join(map(str, vae.latent_shape))}, {sampler_tag} {sc.num_steps} steps, "
              f"CFG w={sc.guidance}")
    metrics.update({
        "final_loss": final_loss,
        "steps": int(state.step),
        "batch_size": tc.batch_size,
        "bits_per_dim": None,
        "bpd_kind": "none",
        "bpd_note": "no likelihood of the pixels: the flow models VAE latents (decoded by the mean image)",
        "nfe": nfe + 1,
        "sampler_nfe": nfe,
        "nfe_note": (f"{nfe} DiT evaluations of the PF-ODE sampler (each one call on a doubled batch when "
                     "guidance != 1) + 1 VAE decoder call"),
        "num_params": n_params + vae.num_decoder_params,
        "dit_num_params": n_params,
        "vae_decoder_num_params": vae.num_decoder_params,
        "sampler": sampler_tag,
        "sample_steps": sc.num_steps,
        "guidance": sc.guidance,
        "sampled_from": "ema_params" if ema_decay is not None else "params",
        "latent_shape": list(vae.latent_shape),
        "latent_shift": shift,
        "latent_scale": scale,
        "vae_run": stats["vae_run"],
        "train_time_s": train_time,
        "sample_time_s": sample_time,
        "eval_time_s": time.perf_counter() - t_eval,
        "wall_time_s": time.perf_counter() - t_start,
        "resumed_from_step": start_step,
    })
    write_json(os.path.join(run_dir, "metrics.json"), metrics)
    log.info(
        f"classifier accuracy {metrics['classifier_accuracy']:.4f}; Fréchet {metrics['frechet_distance']:.3f} "
        f"(floor train-vs-test {metrics['frechet_floor_train_vs_test']:.3f}); nfe {nfe} + 1 decoder call; "
        f"wall time {metrics['wall_time_s']:.1f}s")
    return metrics


def main(argv=None) -> dict:
    return run_cli(run, argv, default_config="experiments/configs/digits_ldm.py")


if __name__ == "__main__":
    main()
