"""Class-conditional GAN (non-saturating or WGAN-GP) on 8x8 digits with the multi-model train step.

    python -m experiments.train_digits_gan --config experiments/configs/digits_gan.py:ns [--set k=v ...]
    python -m experiments.train_digits_gan --config experiments/configs/digits_gan.py:wgan_gp

An MLP generator (label embedding concatenated to z, tanh output) and an MLP projection
discriminator / critic, one Adam each, trained by ``research.train.multi`` with the schedule
``n_critic(critic, "generator", gan.n_critic)``; EMA of the generator. Checkpoints with orbax and
resumes from the newest intact checkpoint of the run directory bit-identically; then draws
``sample.per_class`` samples per class from the (EMA) generator, one network call each, and writes to
``runs/<name>/``: samples.png, samples.npz (images [N, 8, 8] on 0..16, labels [N]), metrics.json,
config.json, metrics.jsonl, curves.png, train.log and checkpoints/. No likelihood (bpd_kind "none").
"""
from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp

from experiments.common import (
    last_logged_record,
    NUM_DIGIT_CLASSES, close_text_log, open_run, resolve_run_dir, run_cli, setup_text_log, train_resumable,
    write_digit_samples_and_metrics, write_json,
)
from research.data.digits import IMAGE_SHAPE, load_digits
from research.gan.nets import Generator, ProjectionDiscriminator, count_params
from research.gan.train import (
    GENERATOR, create_gan_state, critic_name, init_gan_params, make_gan_loss_fns, make_gan_optimizers,
    make_gan_step, sample_generator,
)
from research.train.ema import ema_decay_from_half_life


def build_gan(cfg, key_init, key_state) -> dict:
    """Networks, initial `MultiTrainState` and the jitted multi step of the config.

    Returns a dict: generator, critic (modules), critic_name, state, step (jitted, metrics include
    ``loss`` = ``generator/loss`` for ``train_resumable``'s watch), ema_decay (None: no EMA).
    """
    gc, tc, mc = cfg.gan, cfg.train, cfg.model
    use_ema = tc.ema_half_life_images > 0
    ema_decay = ema_decay_from_half_life(tc.ema_half_life_images, tc.batch_size) if use_ema else None
    built = dict(_networks_and_step(
        loss=gc.loss, n_critic=gc.n_critic, latent_dim=gc.latent_dim, gp_weight=gc.gp_weight, drift=gc.drift,
        r1_gamma=gc.r1_gamma, g_hidden=tuple(mc.g_hidden), d_hidden=tuple(mc.d_hidden), embed_dim=mc.embed_dim,
        g_lr=tc.g_learning_rate, d_lr=tc.d_learning_rate, b1=tc.b1, b2=tc.b2, ema_decay=ema_decay))
    g_params, d_params = init_gan_params(built["generator"], built["critic"], key_init, latent_dim=gc.latent_dim,
                                         x_shape=IMAGE_SHAPE)
    built["state"] = create_gan_state(g_params, d_params, built.pop("optimizers"), key_state, loss=gc.loss,
                                      ema=use_ema)
    return built


@functools.lru_cache(maxsize=8)
def _networks_and_step(*, loss, n_critic, latent_dim, gp_weight, drift, r1_gamma, g_hidden, d_hidden, embed_dim,
                       g_lr, d_lr, b1, b2, ema_decay) -> dict:
    """Cached on the (hashable) hyper-parameters, so repeated runs in one process (tests, a resumed run)
    reuse the compiled step instead of compiling it again."""
    generator = Generator(out_shape=IMAGE_SHAPE, hidden=g_hidden, num_classes=NUM_DIGIT_CLASSES, embed_dim=embed_dim)
    critic = ProjectionDiscriminator(hidden=d_hidden, num_classes=NUM_DIGIT_CLASSES)
    optimizers = make_gan_optimizers(loss, g_lr=g_lr, d_lr=d_lr, b1=b1, b2=b2)
    loss_fns = make_gan_loss_fns(generator, critic, loss=loss, latent_dim=latent_dim, gp_weight=gp_weight,
                                 drift=drift, r1_gamma=r1_gamma)
    multi_step = make_gan_step(loss_fns, optimizers, loss=loss, num_critic=n_critic, generator_ema_decay=ema_decay)

    def step(state, batch):
        # train_resumable's loop watches "loss" (NaN/Inf check, window mean): the generator's loss,
        # evaluated every step (forward only on the critic-only steps)
        state, metrics = multi_step(state, batch)
        return state, {**metrics, "loss": metrics[f"{GENERATOR}/loss"]}

    draw = jax.jit(lambda p, k, y: sample_generator(generator, p, k, num=y.shape[0], latent_dim=latent_dim, labels=y))
    return {"generator": generator, "critic": critic, "critic_name": critic_name(loss), "optimizers": optimizers,
            "step": step, "multi_step": multi_step, "ema_decay": ema_decay, "sample": draw}


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
    tc, sc, dc, gc = cfg.train, cfg.sample, cfg.data, cfg.gan
    log.info(f"run_dir={run_dir} devices={jax.devices()}")
    images, labels = load_digits("train", seed=dc.split_seed, test_fraction=dc.test_fraction)
    arrays = {"image": images, "label": labels}

    k_init, k_state, k_data, k_sample = jax.random.split(jax.random.key(cfg.seed), 4)
    built = build_gan(cfg, k_init, k_state)
    d_name, state = built["critic_name"], built["state"]
    n_gen, n_critic = count_params(state.models[GENERATOR].params), count_params(state.models[d_name].params)
    log.info(f"loss={gc.loss}: generator params {n_gen:,}, {d_name} params {n_critic:,}; n_critic={gc.n_critic}; "
             f"train images: {len(labels)}")

    ckpt, state = open_run(run_dir, cfg, log, state, save_every=tc.checkpoint_every, keep=tc.keep_checkpoints,
                           resume=cfg.resume)
    state, start_step, train_time, final_loss = train_resumable(
        run_dir, log, state, built["step"], arrays, k_data, ckpt, num_steps=tc.stop_at_step or tc.num_steps,
        batch_size=tc.batch_size, log_every=tc.log_every, progress=tc.progress, tensorboard=tc.tensorboard,
        num_classes=NUM_DIGIT_CLASSES)
    log.info(f"trained steps {start_step} -> {int(state.step)} in {train_time:.1f}s; final generator loss "
             f"{final_loss}")
    if int(state.step) < tc.num_steps:
        log.info(f"stopped at step {int(state.step)} (train.stop_at_step); rerun to resume. No samples written.")
        return {"stopped_at_step": int(state.step)}

    # ---- one generator call per sample, from the EMA generator
    g_entry = state.models[GENERATOR]
    use_ema = built["ema_decay"] is not None
    t_sample = time.perf_counter()
    y = jnp.repeat(jnp.arange(NUM_DIGIT_CLASSES, dtype=jnp.int32), sc.per_class)
    x = jax.block_until_ready(built["sample"](g_entry.ema_params if use_ema else g_entry.params, k_sample, y))
    sample_time = time.perf_counter() - t_sample

    t_eval = time.perf_counter()
    _, _, metrics = write_digit_samples_and_metrics(
        run_dir, x, y, split_seed=dc.split_seed, test_fraction=dc.test_fraction,
        pca_components=cfg.eval.pca_components, grid_columns=sc.grid_columns,
        title=f"{cfg.name}: {gc.loss} GAN, {int(g_entry.step)} generator updates")
    final = last_logged_record(run_dir)
    metrics.update({
        "gan_loss": gc.loss,
        "final_loss": final_loss,
        "final_loss_note": "generator loss, mean over the last logging window",
        f"final_{d_name}_loss": final.get(f"{d_name}/loss"),
        "bits_per_dim": None,
        "bpd_kind": "none",
        "nfe": 1,
        "num_params": n_gen,
        "num_params_note": "generator only (the network used at sampling time)",
        "critic_num_params": n_critic,
        "steps": int(state.step),
        "generator_steps": int(g_entry.step),
        "n_critic": gc.n_critic,
        "batch_size": tc.batch_size,
        "sampled_from": "ema_params" if use_ema else "params",
        "train_time_s": train_time,
        "sample_time_s": sample_time,
        "eval_time_s": time.perf_counter() - t_eval,
        "wall_time_s": time.perf_counter() - t_start,
        "resumed_from_step": start_step,
    })
    if gc.loss == "wgan_gp":
        metrics["final_critic_w1_estimate"] = final.get("critic/w1_estimate")
        metrics["final_critic_grad_norm_mean"] = final.get("critic/grad_norm_mean")
    write_json(os.path.join(run_dir, "metrics.json"), metrics)
    log.info(f"{gc.loss}: classifier accuracy {metrics['classifier_accuracy']:.4f}, Fréchet "
             f"{metrics['frechet_distance']:.3f} (floor {metrics['frechet_floor_train_vs_test']:.3f}), "
             f"{int(g_entry.step)} generator updates, wall time {metrics['wall_time_s']:.1f}s")
    return metrics


def main(argv=None) -> dict:
    return run_cli(run, argv, default_config="experiments/configs/digits_gan.py")


if __name__ == "__main__":
    main()
