"""VQ-VAE on 8x8 digits with an EMA codebook and dead-code restart (stage 1 of a code prior).

    python -m experiments.train_digits_vq --config experiments/configs/digits_vq.py [--set k=v ...]

Trains reconstruction MSE + beta * commitment with AdamW; the codebook's EMA statistics are the
train state's model state (``make_train_step(..., stateful=True)``), so checkpoints hold them and
a resumed run is bit-identical. Then reports (metrics.json): test-split reconstruction MSE,
classifier accuracy and Fréchet distance of the reconstructions, codebook usage (perplexity,
utilisation) over all codes of the train and of the test split; and writes reconstructions.png,
final_params.msgpack (encoder, decoder, codebook) + autoencoder.json (``load_vq_run``),
config.json, metrics.jsonl, curves.png, train.log and checkpoints/ to ``runs/<name>/``.
"""
from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import digits_evaluator, make_state, open_run, run_cli, train_resumable, write_json
from experiments.train_digits_vae import (
    check_images, read_autoencoder, reconstruction_report, run_with_log, save_autoencoder,
)
from research.data.digits import load_digits
from research.latent.vq import VQVAE, VQObjective, codebook_usage
from research.train.step import make_train_step


def build_vqvae(features, code_dim: int, num_codes: int) -> VQVAE:
    return VQVAE(features=tuple(int(f) for f in features), code_dim=int(code_dim), num_codes=int(num_codes))


@dataclasses.dataclass(frozen=True)
class VQHandle:
    """A trained VQ-VAE: ``encode(images [N, 8, 8, 1] in [-1, 1]) -> codes int32 [N, h, w]``;
    ``decode(codes int32 [N, h, w]) -> images [N, 8, 8, 1] in [-1, 1]``; ``num_codes``, ``code_shape``
    (h, w); ``num_params`` (encoder + decoder + codebook entries), ``num_decoder_params`` (decoder +
    codebook: what decoding codes uses)."""

    model: VQVAE
    params: dict
    codebook: jax.Array

    @property
    def num_codes(self) -> int:
        return self.model.num_codes

    @property
    def code_shape(self) -> tuple:
        return self.model.code_shape

    @property
    def num_params(self) -> int:
        return self.model.num_params(self.params)

    @property
    def num_decoder_params(self) -> int:
        return self.model.num_params({"decoder": self.params["decoder"]})

    def encode(self, images) -> jax.Array:
        return _jit_codes(self.model, self.params, self.codebook, check_images(images, "VQHandle.encode"))

    def decode(self, codes) -> jax.Array:
        c = np.asarray(codes)
        if c.ndim != 3 or c.shape[1:] != self.code_shape:
            raise ValueError(f"VQHandle.decode: codes must be [N, {self.code_shape[0]}, {self.code_shape[1]}], "
                             f"got shape {c.shape}")
        if not np.issubdtype(c.dtype, np.integer):
            raise TypeError(f"VQHandle.decode: codes must be integers, got dtype {c.dtype}")
        if c.size and (c.min() < 0 or c.max() >= self.num_codes):
            raise ValueError(f"VQHandle.decode: codes must be in [0, {self.num_codes - 1}], got range "
                             f"[{c.min()}, {c.max()}]")
        return _jit_decode_codes(self.model, self.params, self.codebook, jnp.asarray(c, jnp.int32))


@jax.jit(static_argnums=0)
def _jit_codes(model, params, codebook, x):
    return model.codes(params, codebook, x)


@jax.jit(static_argnums=0)
def _jit_decode_codes(model, params, codebook, codes):
    return model.decode_codes(params, codebook, codes)


def load_vq_run(run_dir: str) -> VQHandle:
    """The ``VQHandle`` of a finished ``train_digits_vq`` run (its final_params.msgpack + autoencoder.json)."""
    spec, tree = read_autoencoder(run_dir, "vq")
    model = build_vqvae(spec["features"], spec["code_dim"], spec["num_codes"])
    return VQHandle(model, {"encoder": tree["encoder"], "decoder": tree["decoder"]}, tree["codebook"])


def run(cfg) -> dict:
    """Trains (resuming if a checkpoint exists) and evaluates the VQ-VAE; returns the metrics dict."""
    return run_with_log(cfg, _run)


def _run(cfg, run_dir, log, t_start) -> dict:
    tc, dc, mc = cfg.train, cfg.data, cfg.model
    log.info(f"run_dir={run_dir} devices={jax.devices()}")
    images, labels = load_digits("train", seed=dc.split_seed, test_fraction=dc.test_fraction)
    k_init, k_train, k_data = jax.random.split(jax.random.key(cfg.seed), 3)
    model = build_vqvae(mc.features, mc.code_dim, mc.num_codes)
    params, ema_state = model.init(k_init)
    log.info(f"VQ-VAE: {model.code_shape} codes of {model.num_codes}, dim {model.code_dim}; "
             f"{model.num_params(params):,} params (with the codebook)")

    optimizer, _, state = make_state(
        params, k_train, learning_rate=tc.learning_rate, warmup_steps=tc.warmup_steps, total_steps=tc.num_steps,
        weight_decay=tc.weight_decay, clip_norm=tc.clip_norm, ema_half_life_images=0.0, batch_size=tc.batch_size)
    state = state.replace(model_state=ema_state)
    ckpt, state = open_run(run_dir, cfg, log, state, save_every=tc.checkpoint_every, keep=tc.keep_checkpoints,
                           resume=cfg.resume)
    objective = VQObjective(beta=tc.beta, decay=mc.ema_decay, eps=mc.ema_eps, dead_threshold=tc.dead_threshold)
    step_fn = make_train_step(objective.make_loss_fn(model), optimizer, stateful=True)
    state, start_step, train_time, final_loss = train_resumable(
        run_dir, log, state, step_fn, {"image": images}, k_data, ckpt, num_steps=tc.stop_at_step or tc.num_steps,
        batch_size=tc.batch_size, log_every=tc.log_every, progress=tc.progress, tensorboard=tc.tensorboard)
    log.info(f"trained steps {start_step} -> {int(state.step)} in {train_time:.1f}s; final loss {final_loss}")
    if int(state.step) < tc.num_steps:
        log.info(f"stopped at step {int(state.step)} (train.stop_at_step); rerun to resume. No evaluation written.")
        return {"stopped_at_step": int(state.step)}

    t_eval = time.perf_counter()
    handle = VQHandle(model, state.params, state.model_state["codebook"])
    x_test, y_test = load_digits("test", seed=dc.split_seed, test_fraction=dc.test_fraction)
    test_codes = handle.encode(x_test)
    recon = handle.decode(test_codes)
    evaluator = digits_evaluator(split_seed=dc.split_seed, test_fraction=dc.test_fraction,
                                 pca_components=cfg.eval.pca_components)
    metrics = reconstruction_report(run_dir, evaluator, x_test, y_test, recon, per_class=cfg.sample.per_class,
                                    title=f"{cfg.name}: test images and reconstructions "
                                          f"({model.code_shape[0]}x{model.code_shape[1]} codes of {model.num_codes})")
    for split, codes in (("train", handle.encode(images)), ("test", test_codes)):
        usage = codebook_usage(codes, model.num_codes)
        metrics.update({f"{split}_perplexity": usage["perplexity"], f"{split}_utilisation": usage["utilisation"],
                        f"{split}_codes_used": usage["num_used"]})
        if split == "train":
            metrics["train_code_counts"] = usage["counts"]
    save_autoencoder(run_dir, {"kind": "vq", "features": list(model.features), "code_dim": model.code_dim,
                               "num_codes": model.num_codes, "code_shape": list(model.code_shape),
                               "image_shape": [8, 8, 1], "data_range": [-1.0, 1.0], "steps": int(state.step)},
                     {**state.params, "codebook": state.model_state["codebook"]})
    metrics.update({
        "bits_per_dim": None,
        "bpd_kind": "none",
        "num_params": handle.num_params,
        "num_params_note": "encoder + decoder + codebook entries",
        "num_decoder_params": handle.num_decoder_params,
        "num_codes": model.num_codes,
        "code_shape": list(model.code_shape),
        "code_dim": model.code_dim,
        "final_loss": final_loss,
        "steps": int(state.step),
        "batch_size": tc.batch_size,
        "train_time_s": train_time,
        "eval_time_s": time.perf_counter() - t_eval,
        "wall_time_s": time.perf_counter() - t_start,
        "resumed_from_step": start_step,
    })
    write_json(os.path.join(run_dir, "metrics.json"), metrics)
    log.info(f"reconstructions: MSE {metrics['recon_mse']:.4f}, classifier accuracy "
             f"{metrics['recon_classifier_accuracy']:.4f}, Fréchet {metrics['recon_frechet_distance']:.3f}; "
             f"test perplexity {metrics['test_perplexity']:.1f}, utilisation {metrics['test_utilisation']:.3f}; "
             f"wall time {metrics['wall_time_s']:.1f}s")
    return metrics


def main(argv=None) -> dict:
    return run_cli(run, argv, default_config="experiments/configs/digits_vq.py")


if __name__ == "__main__":
    main()
