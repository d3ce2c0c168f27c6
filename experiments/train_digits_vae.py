"""Gaussian VAE on 8x8 digits: the VAE family row (class-conditional) or a latent-diffusion stage 1.

    python -m experiments.train_digits_vae --config experiments/configs/digits_vae.py[:ldm] [--set k=v ...]

Trains the negative ELBO (discretised-logistic decoder over the 17 intensity levels, analytic KL
with weight ``train.kl_weight``) with AdamW + EMA through ``experiments.common.train_digits``
(checkpoints, bit-identical resume), then from the EMA params:
  * bits/dim of the held-out test split: ``bits_per_dim`` = the ELBO bound (``bpd_kind`` "elbo")
    on the unconditional discrete likelihood P(x) (for a CVAE: logsumexp over the 10 classes of
    the per-class ELBOs - log 10, see ``research.latent.vae.class_marginal_bound``), plus the
    IWAE bound and, for a CVAE, the class-conditional bounds on P(x | y);
  * samples z ~ N(0, I) -> decoder location (``sample.decode="mean"``) or a pixel sample: for a
    CVAE ``sample.per_class`` per class (classifier accuracy, Fréchet); unconditional: 10 *
    per_class samples, grouped by the classifier's predicted class, Fréchet only;
  * reconstructions of the test split (posterior mean -> decoder location): MSE, classifier
    accuracy, Fréchet; train-split statistics of the posterior means (for a latent model).
Writes to ``runs/<name>/``: metrics.json, samples.npz / samples.png, reconstructions.png,
final_params.msgpack + autoencoder.json (``load_vae_run``), config.json, metrics.jsonl, curves.png,
train.log, checkpoints/.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import (
    NUM_DIGIT_CLASSES, TRAIN_KEYS, close_text_log, digits_evaluator, resolve_run_dir, run_cli, save_image_grid,
    setup_text_log, train_digits, write_digit_samples_and_metrics, write_json,
)
from research.data.digits import IMAGE_SHAPE, load_digits, to_0_16
from research.data.iterators import check_labels
from research.latent.vae import VAE, VAEObjective, bound_bits_per_dim, class_marginal_bound

PARAMS_FILE, SPEC_FILE = "final_params.msgpack", "autoencoder.json"


# ------------------------------------------------------------------ saved autoencoders (shared with VQ)
def save_autoencoder(run_dir: str, spec: dict, tree) -> None:
    """Writes ``tree`` (a dict of arrays) as final_params.msgpack and ``spec`` as autoencoder.json."""
    from flax import serialization

    with open(os.path.join(run_dir, PARAMS_FILE), "wb") as f:
        f.write(serialization.msgpack_serialize(jax.tree.map(np.asarray, tree)))
    write_json(os.path.join(run_dir, SPEC_FILE), spec)


def read_autoencoder(run_dir: str, kind: str) -> tuple[dict, dict]:
    """(spec, tree) of a run written by ``save_autoencoder``; the spec's kind must be ``kind``."""
    from flax import serialization

    for name in (SPEC_FILE, PARAMS_FILE):
        if not os.path.isfile(os.path.join(run_dir, name)):
            raise FileNotFoundError(f"{os.path.join(run_dir, name)} not found; train the run to the end first")
    with open(os.path.join(run_dir, SPEC_FILE), encoding="utf-8") as f:
        spec = json.load(f)
    if spec.get("kind") != kind:
        raise ValueError(f"{run_dir} holds a {spec.get('kind')!r} autoencoder, not a {kind!r} one")
    with open(os.path.join(run_dir, PARAMS_FILE), "rb") as f:
        tree = serialization.msgpack_restore(f.read())
    return spec, jax.tree.map(jnp.asarray, tree)


def check_images(images, who: str) -> jax.Array:
    """float32 [N, 8, 8, 1] in [-1, 1] (tolerance 1e-3), or a ValueError / TypeError naming the problem."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[1:] != (8, 8, 1):
        raise ValueError(f"{who}: images must be [N, 8, 8, 1], got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{who}: images must be floating point in [-1, 1], got dtype {x.dtype}")
    if x.size and not (np.all(np.isfinite(x)) and x.min() >= -1.001 and x.max() <= 1.001):
        raise ValueError(f"{who}: images must be finite and in [-1, 1], got range [{x.min()}, {x.max()}]")
    return jnp.asarray(x, jnp.float32)


def reconstruction_report(run_dir: str, evaluator, x, y, recon, *, title: str, per_class: int = 8) -> dict:
    """Scores reconstructions ``recon`` of the images ``x`` (both [N, 8, 8, 1] in [-1, 1], labels y):
    mean squared error, classifier accuracy and Fréchet distance (``recon_*`` keys); saves
    reconstructions.png (per class row: original, reconstruction, original, ...)."""
    imgs, rec = to_0_16(np.asarray(x)[..., 0]), to_0_16(np.asarray(recon)[..., 0])
    m = evaluator.evaluate(rec, y)
    picks = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(NUM_DIGIT_CLASSES)])
    pairs = np.stack([imgs[picks], rec[picks]], axis=1).reshape(-1, 8, 8)
    save_image_grid(os.path.join(run_dir, "reconstructions.png"), pairs, np.repeat(y[picks], 2),
                    columns=2 * per_class, title=title)
    return {"recon_mse": float(np.mean(np.square(np.asarray(recon) - np.asarray(x)))),
            "recon_classifier_accuracy": m["classifier_accuracy"], "recon_frechet_distance": m["frechet_distance"],
            "recon_images": int(len(y))}


# ------------------------------------------------------------------ the VAE handle
def build_vae(features, latent_channels: int, conditional: bool, min_log_scale: float) -> VAE:
    return VAE(features=tuple(int(f) for f in features), latent_channels=int(latent_channels),
               num_classes=NUM_DIGIT_CLASSES if conditional else 0, min_log_scale=float(min_log_scale))


@dataclasses.dataclass(frozen=True)
class VAEHandle:
    """A trained VAE: ``encode(images [N, 8, 8, 1] in [-1, 1], labels=None) -> posterior means float32
    [N, h, w, c]``; ``decode(latents [N, h, w, c], labels=None) -> images [N, 8, 8, 1] in [-1, 1]`` (the
    decoder location, clipped). Labels (int [N] in 0..9) are required by a class-conditional VAE and
    refused by an unconditional one. ``num_params`` counts encoder + decoder, ``num_decoder_params``
    the decoder only; ``latent_mean`` / ``latent_std`` are per-channel statistics of the train
    split's posterior means (to standardise latents for a latent model)."""

    vae: VAE
    params: dict
    latent_mean: tuple
    latent_std: tuple

    @property
    def latent_shape(self) -> tuple:
        return self.vae.latent_shape

    @property
    def conditional(self) -> bool:
        return self.vae.conditional

    @property
    def num_params(self) -> int:
        return self.vae.num_params(self.params)

    @property
    def num_decoder_params(self) -> int:
        return self.vae.num_params(self.params, "decoder")

    def _labels(self, labels, n: int, who: str):
        if not self.conditional:
            if labels is not None:
                raise ValueError(f"{who}: this VAE is unconditional; do not pass labels")
            return None
        if labels is None:
            raise ValueError(f"{who}: this VAE is class-conditional; pass labels int [N] in 0..9")
        labels = check_labels(labels, NUM_DIGIT_CLASSES, name=f"{who}: labels")
        if labels.shape != (n,):
            raise ValueError(f"{who}: labels must be [{n}], got shape {labels.shape}")
        return jnp.asarray(labels, jnp.int32)

    def encode(self, images, labels=None) -> jax.Array:
        x = check_images(images, "VAEHandle.encode")
        return _jit_posterior_mean(self.vae, self.params, x, self._labels(labels, x.shape[0], "VAEHandle.encode"))

    def decode(self, latents, labels=None) -> jax.Array:
        z = np.asarray(latents)
        if z.ndim != 4 or z.shape[1:] != self.latent_shape:
            raise ValueError(f"VAEHandle.decode: latents must be [N, {', '.join(map(str, self.latent_shape))}], "
                             f"got shape {z.shape}")
        if not np.issubdtype(z.dtype, np.floating):
            raise TypeError(f"VAEHandle.decode: latents must be floating point, got dtype {z.dtype}")
        return _jit_mean_image(self.vae, self.params, jnp.asarray(z, jnp.float32),
                               self._labels(labels, z.shape[0], "VAEHandle.decode"))


@jax.jit(static_argnums=0)
def _jit_posterior_mean(vae, params, x, labels):
    return vae.posterior(params, x, labels)[0]


@jax.jit(static_argnums=0)
def _jit_mean_image(vae, params, z, labels):
    return vae.mean_image(params, z, labels)


@jax.jit(static_argnums=0)
def _jit_sample_image(vae, params, z, labels, key):
    return vae.sample_image(params, z, key, labels)


@jax.jit(static_argnums=(0, 1))
def _jit_bounds(vae, num_samples, params, x, labels, key):
    return vae.bounds(params, x, key, labels, num_samples=num_samples)


def load_vae_run(run_dir: str) -> VAEHandle:
    """The ``VAEHandle`` of a finished ``train_digits_vae`` run (its final_params.msgpack + autoencoder.json)."""
    spec, params = read_autoencoder(run_dir, "vae")
    vae = build_vae(spec["features"], spec["latent_channels"], spec["conditional"], spec["min_log_scale"])
    return VAEHandle(vae, params, tuple(spec["latent_mean"]), tuple(spec["latent_std"]))


# ------------------------------------------------------------------ evaluation
def test_bounds(vae: VAE, params, x, y, key, *, num_samples: int) -> dict:
    """Bits/dim bounds of the images x (labels y) from ``num_samples`` posterior draws per image: the
    ELBO and the IWAE bound on P(x) and, for a CVAE, both on P(x | y) (``*_given_label``)."""
    if vae.conditional:  # [C, B] bounds with every label
        rows = [_jit_bounds(vae, num_samples, params, x, jnp.full((x.shape[0],), c, jnp.int32),
                            jax.random.fold_in(key, c)) for c in range(vae.num_classes)]
        out = _summarise_bounds(*[jnp.stack(r) for r in zip(*rows)], jnp.asarray(y))
    else:
        out = _summarise_bounds(*[b[None] for b in _jit_bounds(vae, num_samples, params, x, None, key)], None)
    return {**{k: float(v) for k, v in out.items()}, "bound_samples": num_samples}


@jax.jit
def _summarise_bounds(elbo, iwae, labels):
    """Mean bits/dim of per-label bounds [C, B]: on P(x) (class-marginal when C > 1) and on P(x | y)."""
    d, out = math.prod(IMAGE_SHAPE), {}
    for name, bound in (("elbo", elbo), ("iwae", iwae)):
        marginal = class_marginal_bound(bound) if bound.shape[0] > 1 else bound[0]
        out[f"bits_per_dim_{name}"] = jnp.mean(bound_bits_per_dim(marginal, d))
        if labels is not None:
            given = bound[labels, jnp.arange(labels.shape[0])]
            out[f"bits_per_dim_{name}_given_label"] = jnp.mean(bound_bits_per_dim(given, d))
    return out


def _latent_stats(vae, params, x, y):
    z = np.asarray(_jit_posterior_mean(vae, params, x, jnp.asarray(y) if vae.conditional else None))
    return z.mean(axis=(0, 1, 2)).tolist(), z.std(axis=(0, 1, 2)).tolist()


# ------------------------------------------------------------------ the experiment
def run_with_log(cfg, body) -> dict:
    """``body(cfg, run_dir, log, t_start)`` with run_dir = ``resolve_run_dir(cfg.run_dir, cfg.name)`` and
    its text log open (closed afterwards, whatever happens); shared with train_digits_vq."""
    t_start = time.perf_counter()
    run_dir = resolve_run_dir(cfg.run_dir, cfg.name)
    log = setup_text_log(run_dir, cfg.name)
    try:
        return body(cfg, run_dir, log, t_start)
    finally:
        close_text_log(log)


def run(cfg) -> dict:
    """Trains (resuming if a checkpoint exists), evaluates bounds, samples; returns the metrics dict."""
    return run_with_log(cfg, _run)


def _run(cfg, run_dir, log, t_start) -> dict:
    tc, sc, dc, mc = cfg.train, cfg.sample, cfg.data, cfg.model
    log.info(f"run_dir={run_dir} devices={jax.devices()}")
    images, labels = load_digits("train", seed=dc.split_seed, test_fraction=dc.test_fraction)
    k_init, k_train, k_data, k_sample, k_eval = jax.random.split(jax.random.key(cfg.seed), 5)
    vae = build_vae(mc.features, mc.latent_channels, mc.conditional, mc.min_log_scale)
    params = vae.init(k_init)
    log.info(f"VAE latent {vae.latent_shape}, conditional={vae.conditional}: encoder "
             f"{vae.num_params(params, 'encoder'):,} + decoder {vae.num_params(params, 'decoder'):,} params")

    state, ema_decay, start_step, train_time, final_loss = train_digits(
        run_dir, log, cfg, method=VAEObjective(kl_weight=tc.kl_weight), model_fn=vae, params=params,
        arrays={"image": images, "label": labels}, key_state=k_train, key_data=k_data, resume=cfg.resume,
        stop_at_step=tc.stop_at_step, tensorboard=tc.tensorboard, **{k: tc[k] for k in TRAIN_KEYS})
    log.info(f"trained steps {start_step} -> {int(state.step)} in {train_time:.1f}s; final loss {final_loss}")
    if int(state.step) < tc.num_steps:
        log.info(f"stopped at step {int(state.step)} (train.stop_at_step); rerun to resume. No samples written.")
        return {"stopped_at_step": int(state.step)}
    p = state.ema_params if ema_decay is not None else state.params

    # ---- bounds on the test split
    t_eval = time.perf_counter()
    x_test, y_test = load_digits("test", seed=dc.split_seed, test_fraction=dc.test_fraction)
    bpd = test_bounds(vae, p, jnp.asarray(x_test), y_test, k_eval, num_samples=cfg.eval.bound_samples)
    bound_time = time.perf_counter() - t_eval

    # ---- prior samples: z ~ N(0, I) -> decoder location (or a pixel sample)
    t_sample = time.perf_counter()
    n = NUM_DIGIT_CLASSES * sc.per_class
    y = jnp.repeat(jnp.arange(NUM_DIGIT_CLASSES, dtype=jnp.int32), sc.per_class) if vae.conditional else None
    k_z, k_pix = jax.random.split(k_sample)
    z = jax.random.normal(k_z, (n, *vae.latent_shape), jnp.float32)
    x = _jit_mean_image(vae, p, z, y) if sc.decode == "mean" else _jit_sample_image(vae, p, z, y, k_pix)
    x = jax.block_until_ready(x)
    sample_time = time.perf_counter() - t_sample

    evaluator = digits_evaluator(split_seed=dc.split_seed, test_fraction=dc.test_fraction,
                                 pca_components=cfg.eval.pca_components)
    grid_labels = y if vae.conditional else evaluator.classifier.predict(to_0_16(np.asarray(x)[..., 0]).reshape(n, -1))
    what = "class-conditional" if vae.conditional else "unconditional (rows: predicted class)"
    _, _, metrics = write_digit_samples_and_metrics(
        run_dir, x, grid_labels, split_seed=dc.split_seed, test_fraction=dc.test_fraction,
        pca_components=cfg.eval.pca_components, grid_columns=sc.grid_columns,
        title=f"{cfg.name}: {what}, z ~ N(0, I) -> decoder {sc.decode}")
    if not vae.conditional:
        metrics.pop("per_class_accuracy")
        metrics["classifier_accuracy"] = None  # the grid's labels are predictions: no accuracy to report
        metrics["predicted_class_histogram"] = np.bincount(grid_labels, minlength=NUM_DIGIT_CLASSES).tolist()

    # ---- reconstructions of the test split, latent statistics, the saved autoencoder
    recon = _jit_mean_image(vae, p, _jit_posterior_mean(vae, p, jnp.asarray(x_test), jnp.asarray(y_test)
                                                        if vae.conditional else None),
                            jnp.asarray(y_test) if vae.conditional else None)
    metrics.update(reconstruction_report(run_dir, evaluator, x_test, y_test, recon,
                                         title=f"{cfg.name}: test images and reconstructions"))
    latent_mean, latent_std = _latent_stats(vae, p, jnp.asarray(images), labels)
    spec = {"kind": "vae", "features": list(vae.features), "latent_channels": vae.latent_channels,
            "conditional": vae.conditional, "num_classes": vae.num_classes, "min_log_scale": vae.min_log_scale,
            "latent_shape": list(vae.latent_shape), "image_shape": [8, 8, 1], "data_range": [-1.0, 1.0],
            "params_from": "ema_params" if ema_decay is not None else "params",
            "latent_mean": latent_mean, "latent_std": latent_std, "steps": int(state.step)}
    save_autoencoder(run_dir, spec, p)

    metrics.update(bpd)
    metrics.update({
        "bits_per_dim": bpd["bits_per_dim_elbo"],
        "bpd_kind": "elbo",
        "bpd_note": ("ELBO bound on the discrete likelihood P(x) of the 17-level test digits (discretised-logistic "
                     "decoder; " + ("CVAE: logsumexp over classes of the per-class ELBOs - log 10" if vae.conditional
                                    else "unconditional") + f"; {cfg.eval.bound_samples} posterior draws per image)"),
        "bpd_uniform_reference": float(np.log2(17.0)),
        "nfe": 1,
        "num_params": vae.num_params(p, "decoder"),
        "num_params_note": "decoder only (the network used at sampling time); num_params_total adds the encoder",
        "num_params_total": vae.num_params(p),
        "latent_shape": list(vae.latent_shape),
        "conditional": vae.conditional,
        "sample_decode": sc.decode,
        "sampled_from": spec["params_from"],
        "latent_mean": latent_mean,
        "latent_std": latent_std,
        "final_loss": final_loss,
        "steps": int(state.step),
        "batch_size": tc.batch_size,
        "kl_weight": tc.kl_weight,
        "train_time_s": train_time,
        "sample_time_s": sample_time,
        "bound_time_s": bound_time,
        "wall_time_s": time.perf_counter() - t_start,
        "resumed_from_step": start_step,
    })
    write_json(os.path.join(run_dir, "metrics.json"), metrics)
    acc = metrics["classifier_accuracy"]
    log.info(f"bits/dim ELBO {metrics['bits_per_dim']:.4f} (IWAE {metrics.get('bits_per_dim_iwae')}); "
             f"classifier accuracy {acc if acc is None else round(acc, 4)}; Fréchet {metrics['frechet_distance']:.3f} "
             f"(floor {metrics['frechet_floor_train_vs_test']:.3f}); reconstructions: accuracy "
             f"{metrics['recon_classifier_accuracy']:.4f}, MSE {metrics['recon_mse']:.4f}; "
             f"wall time {metrics['wall_time_s']:.1f}s")
    return metrics


def main(argv=None) -> dict:
    return run_cli(run, argv, default_config="experiments/configs/digits_vae.py")


if __name__ == "__main__":
    main()
