"""SimCLR-style contrastive representation learning on 8x8 digits, evaluated by a linear probe.

    python -m experiments.train_digits_cpc --config experiments/configs/digits_cpc.py [--set k=v ...]

An encoder f (``model.encoder``: a small conv net or an MLP; representation ``h = f(x)``, ReLU,
``model.feature_dim``) and a projection head g (Dense -> ReLU -> Dense) are trained with NT-Xent
(``research.losses.contrastive.nt_xent``, cosine similarity, learnable temperature clamped to
``[contrastive.min_temperature, contrastive.max_temperature]`` by ``temperature_from_log``) on two random
augmentations of each train digit (``augment``: shift by pad + crop, intensity jitter, Gaussian pixel
noise, cutout), drawn on device from the step key ``fold_in(state.key, step)``. The supervised
baseline is the same encoder with a linear classifier trained by cross-entropy on one augmentation,
from the same initial encoder weights, with the same batches, optimiser and number of steps.

Evaluation (linear probe): scikit-learn ``LogisticRegression`` (lbfgs, multinomial, ``probe.C``) on the
standardised frozen features of the un-augmented TRAIN split, accuracy on the TEST split (the split of
every digits experiment), for: the contrastive encoder's h (``linear_probe_accuracy``) and its projection
g(h) (``projection_probe_accuracy``), the supervised encoder (``supervised_probe_accuracy``, next to the
accuracy of its own trained classifier), the random-init encoder and the raw 64 pixels.

Each training resumes from its newest intact checkpoint bit-identically (``open_run`` +
``train_resumable``) in ``runs/<name>/contrastive/`` and ``runs/<name>/supervised/`` (config.json,
checkpoints/, metrics.jsonl, curves.png); ``runs/<name>/`` holds train.log, config.json and metrics.json.

MEASURED (defaults, ``python -m experiments.train_digits_cpc --config experiments/configs/digits_cpc.py``,
2 shared CPU cores, load average 1.3-3.0): 65 s wall; linear probe on the test digits: contrastive
0.9944, supervised 0.9972, random-init encoder 0.9694, raw pixels 0.9721; learned temperature 0.045.
Details and caveats in the config docstring (experiments/configs/digits_cpc.py).
"""
from __future__ import annotations

import functools
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import (
    last_logged_record,
    NUM_DIGIT_CLASSES, close_text_log, open_run, resolve_run_dir, run_cli, setup_text_log, train_resumable,
    write_json,
)
from research.data.digits import IMAGE_SHAPE, load_digits
from research.losses.contrastive import (
    contrastive_accuracy, init_log_temperature, mutual_information_lower_bound, nt_xent, similarity_logits,
    temperature_from_log,
)

BACKGROUND = -1.0  # the value of an empty pixel in [-1, 1] images
PHASES = ("contrastive", "supervised")
OPEN_RUN_IGNORE = ("train.num_steps", "train.stop_at_step", "train.progress", "train.log_every",
                   "train.tensorboard", "train.supervised", "run_dir", "resume", "probe")

# ---------------------------------------------------------------------------- networks


class ConvEncoder(nn.Module):
    """3x3 convs (ReLU; the second with stride 2) -> flatten -> Dense(feature_dim) -> ReLU."""
    channels: tuple[int, ...]
    feature_dim: int

    @nn.compact
    def __call__(self, x):
        h = x.astype(jnp.float32)
        for i, c in enumerate(self.channels):
            h = nn.relu(nn.Conv(c, (3, 3), strides=(2, 2) if i == 1 else (1, 1), padding="SAME")(h))
        return nn.relu(nn.Dense(self.feature_dim)(h.reshape((h.shape[0], -1))))


class MLPEncoder(nn.Module):
    """Flattened pixels -> ReLU MLP -> Dense(feature_dim) -> ReLU."""
    hidden: tuple[int, ...]
    feature_dim: int

    @nn.compact
    def __call__(self, x):
        h = x.reshape((x.shape[0], -1)).astype(jnp.float32)
        for w in self.hidden:
            h = nn.relu(nn.Dense(w)(h))
        return nn.relu(nn.Dense(self.feature_dim)(h))


class ProjectionHead(nn.Module):
    """SimCLR's g: Dense -> ReLU -> Dense."""
    hidden: int
    out: int

    @nn.compact
    def __call__(self, h):
        return nn.Dense(self.out)(nn.relu(nn.Dense(self.hidden)(h)))


def make_encoder(kind: str, *, channels, hidden, feature_dim) -> nn.Module:
    if kind == "conv":
        return ConvEncoder(channels=tuple(channels), feature_dim=feature_dim)
    if kind == "mlp":
        return MLPEncoder(hidden=tuple(hidden), feature_dim=feature_dim)
    raise ValueError(f"unknown encoder {kind!r}; choose 'conv' or 'mlp'")


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------- augmentation (on device)


def augment(key, images, *, max_shift: int, contrast: float, noise_std: float, cutout_size: int,
            cutout_prob: float):
    """A random augmentation of each image of ``images [B, 8, 8, 1]`` (in [-1, 1]; background -1):
    translation by up to ``max_shift`` pixels (padding with background, random crop), ink intensity
    scaled by U(1 - contrast, 1 + contrast), cutout of a ``cutout_size`` square (set to background) with
    probability ``cutout_prob``, and Gaussian noise of std ``noise_std``. Pure function of ``key``."""
    b, h, w, _ = images.shape
    k_shift, k_scale, k_cut, k_pos, k_noise = jax.random.split(key, 5)
    x = images.astype(jnp.float32)
    if max_shift > 0:
        s = max_shift
        padded = jnp.pad(x, ((0, 0), (s, s), (s, s), (0, 0)), constant_values=BACKGROUND)
        offsets = jax.random.randint(k_shift, (b, 2), 0, 2 * s + 1)
        x = jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, 1)))(padded, offsets)
    if contrast > 0:
        scale = jax.random.uniform(k_scale, (b, 1, 1, 1), minval=1.0 - contrast, maxval=1.0 + contrast)
        x = BACKGROUND + (x - BACKGROUND) * scale
    if cutout_size > 0 and cutout_prob > 0:
        corner = jax.random.randint(k_pos, (b, 2), 0, h - cutout_size + 1)
        rows, cols = jnp.arange(h)[None, :], jnp.arange(w)[None, :]
        in_r = (rows >= corner[:, :1]) & (rows < corner[:, :1] + cutout_size)  # [B, H]
        in_c = (cols >= corner[:, 1:]) & (cols < corner[:, 1:] + cutout_size)  # [B, W]
        apply = jax.random.bernoulli(k_cut, cutout_prob, (b, 1, 1))
        erase = (in_r[:, :, None] & in_c[:, None, :] & apply)[..., None]
        x = jnp.where(erase, BACKGROUND, x)
    if noise_std > 0:
        x = x + noise_std * jax.random.normal(k_noise, x.shape)
    return x


# ---------------------------------------------------------------------------- build


def _hparams(cfg) -> dict:
    mc, ac, cc, tc = cfg.model, cfg.augment, cfg.contrastive, cfg.train
    return dict(encoder=mc.encoder, channels=tuple(mc.channels), hidden=tuple(mc.hidden), feature_dim=mc.feature_dim,
                projection_hidden=mc.projection_hidden, projection_dim=mc.projection_dim,
                aug=(("max_shift", ac.max_shift), ("contrast", ac.contrast), ("noise_std", ac.noise_std),
                     ("cutout_size", ac.cutout_size), ("cutout_prob", ac.cutout_prob)),
                learn_temperature=cc.learn_temperature, min_t=cc.min_temperature, max_t=cc.max_temperature,
                t0=cc.temperature, lr=tc.learning_rate, warmup=tc.warmup_steps, total=tc.num_steps,
                weight_decay=tc.weight_decay, clip_norm=tc.clip_norm)


def init_params(cfg, phase: str, key) -> dict:
    """Initial parameters of ``phase``; the encoder's come from ``fold_in(key, 0)`` in both phases (the
    same initial encoder), the head's from ``fold_in(key, 1)``."""
    return _nets_and_step(phase, **_hparams(cfg))["init"](key)


def build(cfg, phase: str, key_init, key_state) -> dict:
    """Networks, initial `TrainState` and jitted step of ``phase`` ("contrastive" | "supervised"):
    dict(state, step, features (jitted params, images -> (h, g(h) or logits)), encode, init)."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    built = dict(_nets_and_step(phase, **_hparams(cfg)))
    built["state"] = built["init_state"](built["init"](key_init), key_state)
    return built


def _decay_mask(params):
    from research.train.optim import default_decay_mask

    mask = default_decay_mask(params)
    if "log_temperature" in mask:
        mask = {**mask, "log_temperature": False}
    return mask


@functools.lru_cache(maxsize=16)
def _nets_and_step(phase, *, encoder, channels, hidden, feature_dim, projection_hidden, projection_dim, aug,
                   learn_temperature, min_t, max_t, t0, lr, warmup, total, weight_decay, clip_norm) -> dict:
    """Cached on the (hashable) hyper-parameters: repeated runs in one process reuse the compiled step."""
    from research.train.optim import make_optimizer
    from research.train.state import create_train_state
    from research.train.step import make_train_step

    enc = make_encoder(encoder, channels=channels, hidden=hidden, feature_dim=feature_dim)
    head = ProjectionHead(projection_hidden, projection_dim)
    classifier = nn.Dense(NUM_DIGIT_CLASSES)
    aug = dict(aug)
    optimizer = make_optimizer(learning_rate=lr, warmup_steps=warmup, total_steps=total, weight_decay=weight_decay,
                               clip_norm=clip_norm or None, decay_mask=_decay_mask)

    def temperature(params):
        if learn_temperature:
            return temperature_from_log(params["log_temperature"], min_t, max_t)
        return jnp.asarray(t0, jnp.float32)

    def embed(params, x):
        h = enc.apply({"params": params["encoder"]}, x)
        return h, head.apply({"params": params["projection"]}, h)

    def contrastive_loss(params, batch, key):
        k1, k2 = jax.random.split(key)
        x = batch["image"]
        _, z1 = embed(params, augment(k1, x, **aug))
        _, z2 = embed(params, augment(k2, x, **aug))
        t = temperature(params)
        loss = nt_xent(z1, z2, temperature=t)
        n = x.shape[0]
        z = jnp.concatenate([z1, z2])
        positive = jnp.concatenate([jnp.arange(n) + n, jnp.arange(n)])
        acc = contrastive_accuracy(similarity_logits(z, z, temperature=t), positive, mask=~jnp.eye(2 * n, dtype=bool))
        return loss, {"temperature": t, "pair_accuracy": acc,
                      "mi_lower_bound": mutual_information_lower_bound(loss, 2 * n - 1)}

    def supervised_loss(params, batch, key):
        h = enc.apply({"params": params["encoder"]}, augment(key, batch["image"], **aug))
        logits = classifier.apply({"params": params["classifier"]}, h)
        labels = batch["label"]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        loss = -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))
        return loss, {"accuracy": jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))}

    if phase == "contrastive":
        step = make_train_step(contrastive_loss, optimizer)

        def features(params, x):
            return embed(params, x)
    else:
        step = make_train_step(supervised_loss, optimizer)

        def features(params, x):
            h = enc.apply({"params": params["encoder"]}, x)
            return h, classifier.apply({"params": params["classifier"]}, h)

    def init(key):
        x = jnp.zeros((1,) + IMAGE_SHAPE, jnp.float32)
        params = {"encoder": enc.init(jax.random.fold_in(key, 0), x)["params"]}
        h = jnp.zeros((1, feature_dim), jnp.float32)
        k_head = jax.random.fold_in(key, 1)
        if phase == "contrastive":
            params["projection"] = head.init(k_head, h)["params"]
            if learn_temperature:
                params["log_temperature"] = init_log_temperature(t0)
        else:
            params["classifier"] = classifier.init(k_head, h)["params"]
        return params

    # jitted: one compilation each instead of one per eager initialiser op
    init_state = jax.jit(lambda params, key: create_train_state(params, optimizer, key, ema=False))
    return {"optimizer": optimizer, "step": step, "features": jax.jit(features), "init": jax.jit(init),
            "init_state": init_state,
            "encode": jax.jit(lambda p, x: enc.apply({"params": p}, x))}


# ---------------------------------------------------------------------------- linear probe (host)


def linear_probe(train_x, train_y, test_x, test_y, *, C: float, max_iter: int) -> float:
    """Test accuracy of a multinomial logistic regression on standardised features (fit on train)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train_x = np.asarray(train_x, np.float64).reshape(len(train_y), -1)
    test_x = np.asarray(test_x, np.float64).reshape(len(test_y), -1)
    if not (np.all(np.isfinite(train_x)) and np.all(np.isfinite(test_x))):
        raise FloatingPointError("non-finite features for the linear probe")
    scaler = StandardScaler().fit(train_x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = LogisticRegression(C=C, max_iter=max_iter).fit(scaler.transform(train_x), train_y)
    return float(clf.score(scaler.transform(test_x), test_y))


# ---------------------------------------------------------------------------- the run


def run(cfg) -> dict:
    """Contrastive + supervised training (resuming), then the linear probes; returns the metrics dict."""
    t_start = time.perf_counter()
    run_dir = resolve_run_dir(cfg.run_dir, cfg.name)
    log = setup_text_log(run_dir, cfg.name)
    try:
        return _run(cfg, run_dir, log, t_start)
    finally:
        close_text_log(log)


def _run(cfg, run_dir, log, t_start) -> dict:
    from research.runs.config import save_config

    tc, dc, pc = cfg.train, cfg.data, cfg.probe
    log.info(f"run_dir={run_dir} devices={jax.devices()} encoder={cfg.model.encoder}")
    train_images, train_labels = load_digits("train", seed=dc.split_seed, test_fraction=dc.test_fraction)
    test_images, test_labels = load_digits("test", seed=dc.split_seed, test_fraction=dc.test_fraction)
    arrays = {"image": train_images, "label": train_labels}
    save_config(cfg, run_dir)

    phases = PHASES if tc.supervised else PHASES[:1]
    results, stopped = {}, None
    for phase in phases:
        phase_dir = os.path.join(run_dir, phase)
        os.makedirs(phase_dir, exist_ok=True)
        # the same keys in both phases (fresh arrays: the step donates the state, its key included)
        k_init, k_state, k_data = jax.random.split(jax.random.key(cfg.seed), 3)
        built = build(cfg, phase, k_init, k_state)
        ignore = OPEN_RUN_IGNORE + (("contrastive",) if phase == "supervised" else ())
        ckpt, state = open_run(phase_dir, cfg, log, built["state"], save_every=tc.checkpoint_every,
                               keep=tc.keep_checkpoints, resume=cfg.resume, ignore_keys=ignore)
        state, start_step, train_time, final_loss = train_resumable(
            phase_dir, log, state, built["step"], arrays, k_data, ckpt, num_steps=tc.stop_at_step or tc.num_steps,
            batch_size=tc.batch_size, log_every=tc.log_every, progress=tc.progress, tensorboard=tc.tensorboard,
            num_classes=NUM_DIGIT_CLASSES, label_key="label")
        log.info(f"{phase}: trained steps {start_step} -> {int(state.step)} in {train_time:.1f}s; final loss "
                 f"{final_loss}")
        if int(state.step) < tc.num_steps:
            stopped = int(state.step)
            continue
        results[phase] = dict(built=built, state=state, start_step=start_step, train_time=train_time,
                              final_loss=final_loss, k_init=k_init)
    if stopped is not None:
        log.info(f"stopped at step {stopped} (train.stop_at_step); rerun to resume. No probe written.")
        return {"stopped_at_step": stopped}

    t_probe = time.perf_counter()
    probe = functools.partial(linear_probe, C=pc.C, max_iter=pc.max_iter)
    xtr, xte = jnp.asarray(train_images), jnp.asarray(test_images)
    con = results["contrastive"]
    h_tr, g_tr = con["built"]["features"](con["state"].params, xtr)
    h_te, g_te = con["built"]["features"](con["state"].params, xte)
    metrics = {
        "linear_probe_accuracy": probe(h_tr, train_labels, h_te, test_labels),
        "projection_probe_accuracy": probe(g_tr, train_labels, g_te, test_labels),
        "raw_pixel_probe_accuracy": probe(train_images, train_labels, test_images, test_labels),
    }
    random_params = con["built"]["init"](con["k_init"])["encoder"]
    encode = con["built"]["encode"]
    metrics["random_encoder_probe_accuracy"] = probe(encode(random_params, xtr), train_labels,
                                                     encode(random_params, xte), test_labels)
    last = last_logged_record(os.path.join(run_dir, "contrastive"))
    temperature = (float(temperature_from_log(con["state"].params["log_temperature"],
                                              cfg.contrastive.min_temperature, cfg.contrastive.max_temperature))
                   if cfg.contrastive.learn_temperature else cfg.contrastive.temperature)
    metrics.update({
        "final_temperature": temperature,
        "final_loss": con["final_loss"],
        "final_loss_note": "NT-Xent, mean over the last logging window",
        "final_pair_accuracy": last.get("pair_accuracy"),
        "final_mi_lower_bound": last.get("mi_lower_bound"),
        "mi_lower_bound_note": f"log(2 batch_size - 1) - NT-Xent = log({2 * tc.batch_size - 1}) - loss (nats)",
        "encoder": cfg.model.encoder,
        "feature_dim": cfg.model.feature_dim,
        "encoder_num_params": count_params(con["state"].params["encoder"]),
        "num_params": count_params(con["state"].params),
        "steps": int(con["state"].step),
        "batch_size": tc.batch_size,
        "contrastive_train_time_s": con["train_time"],
        "resumed_from_step": con["start_step"],
    })
    if "supervised" in results:
        sup = results["supervised"]
        sh_tr, _ = sup["built"]["features"](sup["state"].params, xtr)
        sh_te, logits_te = sup["built"]["features"](sup["state"].params, xte)
        metrics.update({
            "supervised_probe_accuracy": probe(sh_tr, train_labels, sh_te, test_labels),
            "supervised_classifier_accuracy": float(np.mean(np.argmax(np.asarray(logits_te), -1) == test_labels)),
            "supervised_final_loss": sup["final_loss"],
            "supervised_train_time_s": sup["train_time"],
            "supervised_resumed_from_step": sup["start_step"],
        })
    else:
        metrics.update({"supervised_probe_accuracy": None, "supervised_classifier_accuracy": None})
    metrics.update({
        "probe": f"sklearn LogisticRegression(C={pc.C}) on standardised frozen features of the {len(train_labels)} "
                 f"un-augmented train digits, accuracy on the {len(test_labels)} test digits",
        "num_train": int(len(train_labels)),
        "num_test": int(len(test_labels)),
        "probe_time_s": time.perf_counter() - t_probe,
        "wall_time_s": time.perf_counter() - t_start,
    })
    write_json(os.path.join(run_dir, "metrics.json"), metrics)
    sup_text = (f"supervised {metrics['supervised_probe_accuracy']:.4f} (its classifier "
                f"{metrics['supervised_classifier_accuracy']:.4f}), " if "supervised" in results else "")
    log.info(f"linear probe (test): contrastive h {metrics['linear_probe_accuracy']:.4f}, g(h) "
             f"{metrics['projection_probe_accuracy']:.4f}, {sup_text}random encoder "
             f"{metrics['random_encoder_probe_accuracy']:.4f}, raw pixels {metrics['raw_pixel_probe_accuracy']:.4f}; "
             f"temperature {temperature:.4f}; wall time {metrics['wall_time_s']:.1f}s")
    return metrics


def main(argv=None) -> dict:
    return run_cli(run, argv, default_config="experiments/configs/digits_cpc.py")


if __name__ == "__main__":
    main()
