"""Class-conditional autoregressive Transformer over token grids of the 8x8 digits (research.ar on research.lm).

    python -m experiments.train_digits_ar --config experiments/configs/digits_ar.py       # pixels
    python -m experiments.train_digits_ar --config experiments/configs/digits_ar.py:vq    # VQ codes + decoder

``data.source = "pixels"``: the 64 pixels (17 levels, raster order) after a class token; the test
split's exact NLL gives bits/dim of the discrete data (``bpd_kind = "exact"``). ``data.source = "vq"``:
the prior of a two-stage model (VQGAN's recipe): the train split is encoded once to the hh x ww codes
of the VQ run ``data.vq_run``, the same model is trained over them, and sampled codes are decoded by
the VQ decoder (``bpd_kind = "none"``; the prior's test NLL is ``prior_nll_bits_per_code``).

Trains with AdamW (warmup + cosine), checkpoints with orbax and resumes bit-identically from the newest
intact checkpoint in the run directory; samples ancestrally with the KV cache (one cached step per
token) and writes to ``runs/<name>/``: samples.png, samples.npz (images [N, 8, 8] on 0..16, labels
[N]), metrics.json, config.json, metrics.jsonl, curves.png, train.log and checkpoints/.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import (
    close_text_log, digits_evaluator, make_state, open_run, resolve_run_dir, run_cli, setup_text_log,
    train_resumable, write_digit_samples_and_metrics, write_json,
)
from research.ar import TokenGrid, bits_per_token, log_likelihood, make_lm_config, nll_loss, sample
from research.data.digits import MAX_VALUE, NUM_CLASSES, load_digits, to_0_16
from research.lm import init_params, num_params
from research.train.step import make_train_step

PIXEL_LEVELS = int(MAX_VALUE) + 1  # 17 intensities 0..16


def images_to_tokens(images) -> np.ndarray:
    """[N, 8, 8, 1] images in [-1, 1] on the 17-level grid -> int32 [N, 8, 8] intensities 0..16."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[1:] != (8, 8, 1):
        raise ValueError(f"images must be [N, 8, 8, 1], got shape {x.shape}")
    levels = to_0_16(x[..., 0])
    tokens = np.rint(levels)
    if np.abs(levels - tokens).max(initial=0.0) > 1e-4:
        raise ValueError("images are not on the 17-level grid k/8 - 1 of the digits")
    return tokens.astype(np.int32)


def tokens_to_images(tokens) -> np.ndarray:
    """int [N, 8, 8] intensities 0..16 -> float32 [N, 8, 8, 1] in [-1, 1]."""
    return (np.asarray(tokens, np.float32) / (MAX_VALUE / 2) - 1.0)[..., None]


@dataclasses.dataclass
class TokenData:
    """The token grids of both splits, how sampled grids become images, and stage-1 facts."""

    grid: TokenGrid
    train: tuple          # (tokens [N, h, w] int32, labels [N] int32)
    test: tuple
    decode: Callable      # tokens [N, h, w] -> images [N, 8, 8, 1] in [-1, 1]
    decoder_calls: int    # network calls of `decode` per sample
    decoder_params: int
    info: dict


def load_token_data(dc) -> TokenData:
    """Pixels, or the codes of the VQ run ``dc.vq_run`` (encoded once), of the configured split."""
    splits = {s: load_digits(s, seed=dc.split_seed, test_fraction=dc.test_fraction) for s in ("train", "test")}
    if dc.source == "pixels":
        return TokenData(TokenGrid(8, 8, PIXEL_LEVELS, NUM_CLASSES),
                         *[(images_to_tokens(x), y) for x, y in splits.values()],
                         decode=tokens_to_images, decoder_calls=0, decoder_params=0, info={})
    if not os.path.isdir(dc.vq_run):
        raise FileNotFoundError(f"data.vq_run={dc.vq_run!r} is not a directory; train the VQ autoencoder first "
                                "(python -m experiments.train_digits_vq) or point data.vq_run at its run")
    from experiments.train_digits_vq import load_vq_run

    h = load_vq_run(dc.vq_run)
    hh, ww = h.code_shape
    coded = [(np.asarray(h.encode(x), np.int32), y) for x, y in splits.values()]
    return TokenData(TokenGrid(hh, ww, int(h.num_codes), NUM_CLASSES), *coded,
                     decode=lambda t: np.asarray(h.decode(jnp.asarray(t, jnp.int32))), decoder_calls=1,
                     decoder_params=int(h.num_decoder_params),
                     info={"vq_run": os.path.abspath(dc.vq_run), "code_shape": [hh, ww], "num_codes": int(h.num_codes),
                           "vq_decoder_num_params": int(h.num_decoder_params), "vq_num_params": int(h.num_params)})


def build_lm_config(grid: TokenGrid, mc):
    """The research.lm config of the grid model from the config's ``model`` block."""
    return make_lm_config(grid, dim=mc.dim, depth=mc.depth, num_heads=mc.num_heads, num_kv_heads=mc.num_kv_heads,
                          mlp_hidden=mc.mlp_hidden or None, rope_theta=mc.rope_theta, attn_impl=mc.attn_impl,
                          init_std=mc.init_std).replace(custom_matmul_vjp=mc.custom_matmul_vjp)


_jit_log_likelihood = jax.jit(log_likelihood, static_argnums=(1, 2))


def split_log_likelihood(params, lm_cfg, grid, tokens, labels, *, batch: int = 512) -> np.ndarray:
    """Exact log p(tokens | labels) in nats per example, in jitted batches (float64 on the host)."""
    return np.concatenate([np.asarray(_jit_log_likelihood(params, lm_cfg, grid, tokens[i:i + batch],
                                                          labels[i:i + batch]), np.float64)
                           for i in range(0, len(labels), batch)])


def run(cfg) -> dict:
    """Trains (resuming if a checkpoint exists), samples and evaluates; returns the metrics dict."""
    t_start = time.perf_counter()
    run_dir = resolve_run_dir(cfg.run_dir, cfg.name)
    log = setup_text_log(run_dir, cfg.name)
    try:
        return _run(cfg, run_dir, log, t_start)
    finally:
        close_text_log(log)


def copy_fraction(tokens, train_tokens) -> float:
    """Fraction of the sampled grids ``tokens`` [N, h, w] identical to some training grid (memorisation)."""
    seen = {row.tobytes() for row in np.asarray(train_tokens, np.int32).reshape(len(train_tokens), -1)}
    rows = np.asarray(tokens, np.int32).reshape(len(tokens), -1)
    return float(np.mean([row.tobytes() in seen for row in rows])) if len(rows) else 0.0


def _draw(params, lm_cfg, data, key, labels, *, temperature, top_k):
    """Sampled grids decoded to images: ``(images [N, 8, 8, 1], train_copy_fraction, seconds)``."""
    t0 = time.perf_counter()
    tokens = sample(params, lm_cfg, data.grid, labels, key, temperature=temperature, top_k=top_k or None)
    images = data.decode(jax.block_until_ready(tokens))
    seconds = time.perf_counter() - t0
    return images, copy_fraction(tokens, data.train[0]), seconds


def _run(cfg, run_dir, log, t_start) -> dict:
    tc, sc, dc = cfg.train, cfg.sample, cfg.data
    log.info(f"run_dir={run_dir} devices={jax.devices()} source={dc.source}")
    data = load_token_data(dc)
    grid = data.grid
    lm_cfg = build_lm_config(grid, cfg.model)
    k_init, k_train, k_data, k_sample = jax.random.split(jax.random.key(cfg.seed), 4)
    params = init_params(lm_cfg, k_init)
    n_params = num_params(params)
    log.info(f"AR params: {n_params:,}; grid {grid}; train grids: {len(data.train[1])}")

    optimizer, ema_decay, state = make_state(
        params, k_train, learning_rate=tc.learning_rate, warmup_steps=tc.warmup_steps, total_steps=tc.num_steps,
        weight_decay=tc.weight_decay, clip_norm=tc.clip_norm, ema_half_life_images=tc.ema_half_life_images,
        batch_size=tc.batch_size)
    ckpt, state = open_run(run_dir, cfg, log, state, save_every=tc.checkpoint_every, keep=tc.keep_checkpoints,
                           resume=cfg.resume)
    step_fn = make_train_step(lambda p, batch, key: nll_loss(p, lm_cfg, grid, batch), optimizer, ema_decay=ema_decay)
    state, start_step, train_time, final_loss = train_resumable(
        run_dir, log, state, step_fn, {"tokens": data.train[0], "label": data.train[1]}, k_data, ckpt,
        num_steps=tc.stop_at_step or tc.num_steps, batch_size=tc.batch_size, log_every=tc.log_every,
        progress=tc.progress, tensorboard=tc.tensorboard, num_classes=NUM_CLASSES)
    log.info(f"trained steps {start_step} -> {int(state.step)} in {train_time:.1f}s; final loss {final_loss}")
    if int(state.step) < tc.num_steps:
        log.info(f"stopped at step {int(state.step)} (train.stop_at_step); rerun to resume. No samples written.")
        return {"stopped_at_step": int(state.step)}
    params = state.ema_params if ema_decay is not None else state.params

    # ---- exact test NLL (bits per token), then class-conditional samples
    test_bits = float(np.mean(bits_per_token(split_log_likelihood(params, lm_cfg, grid, *data.test), grid.length)))
    labels = jnp.repeat(jnp.arange(NUM_CLASSES, dtype=jnp.int32), sc.per_class)
    x, copied, sample_time = _draw(params, lm_cfg, data, k_sample, labels, temperature=sc.temperature,
                                   top_k=sc.top_k)

    t_eval = time.perf_counter()
    imgs, y, metrics = write_digit_samples_and_metrics(
        run_dir, x, labels, split_seed=dc.split_seed, test_fraction=dc.test_fraction,
        pca_components=cfg.eval.pca_components, grid_columns=sc.grid_columns,
        title=f"{cfg.name}: AR over {grid.height}x{grid.width} {dc.source}, T={sc.temperature}")
    keys = ("classifier_accuracy", "frechet_distance")
    by_temperature = {str(float(sc.temperature)): {**{k: metrics[k] for k in keys}, "train_copy_fraction": copied}}
    evaluator = digits_evaluator(split_seed=dc.split_seed, test_fraction=dc.test_fraction,
                                 pca_components=cfg.eval.pca_components) if sc.extra_temperatures else None
    for i, temp in enumerate(sc.extra_temperatures):
        xe, copied_e, _ = _draw(params, lm_cfg, data, jax.random.fold_in(k_sample, i + 1), labels, temperature=temp,
                                top_k=sc.top_k)
        r = evaluator.evaluate(to_0_16(xe[..., 0]), np.asarray(labels))
        by_temperature[str(float(temp))] = {**{k: r[k] for k in keys}, "train_copy_fraction": copied_e}
    pixels = dc.source == "pixels"
    metrics.update({
        "final_loss": final_loss,
        "steps": int(state.step),
        "batch_size": tc.batch_size,
        "source": dc.source,
        "bits_per_dim": test_bits if pixels else None,
        "bpd_kind": "exact" if pixels else "none",
        "bpd_note": ("exact discrete NLL of the 17-level test pixels / ln 2 (mean over the 64 dims)" if pixels else
                     "no likelihood of the pixels: the prior models VQ codes; see prior_nll_bits_per_code"),
        "prior_nll_bits_per_code": None if pixels else test_bits,
        "nfe": grid.length + data.decoder_calls,
        "nfe_note": (f"{grid.length} cached AR steps (one network call each) per sample"
                     + ("" if pixels else " + 1 VQ decoder call")),
        "num_params": n_params + data.decoder_params,  # the networks sampling uses (VQ: + decoder and codebook)
        "prior_num_params": n_params,
        "train_copy_fraction": copied,
        "train_copy_note": "fraction of the sampled token grids identical to a train-split grid (memorisation)",
        "temperature": sc.temperature,
        "top_k": sc.top_k or None,
        "by_temperature": by_temperature,
        "sampled_from": "ema_params" if ema_decay is not None else "params",
        "train_time_s": train_time,
        "sample_time_s": sample_time,
        "eval_time_s": time.perf_counter() - t_eval,
        "wall_time_s": time.perf_counter() - t_start,
        "resumed_from_step": start_step,
        **data.info,
    })
    write_json(os.path.join(run_dir, "metrics.json"), metrics)
    log.info(
        f"classifier accuracy {metrics['classifier_accuracy']:.4f} at T={sc.temperature} (by temperature "
        f"{by_temperature}); Fréchet {metrics['frechet_distance']:.3f} (floor "
        f"{metrics['frechet_floor_train_vs_test']:.3f}); test {test_bits:.4f} bits/token "
        f"({math.log2(grid.num_levels):.3f} uniform); wall time {metrics['wall_time_s']:.1f}s")
    return metrics


def main(argv=None) -> dict:
    return run_cli(run, argv, default_config="experiments/configs/digits_ar.py")


if __name__ == "__main__":
    main()
