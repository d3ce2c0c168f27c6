"""Digit embeddings trained with margin softmax losses (softmax, NormFace, SphereFace, CosFace, ArcFace).

    python -m experiments.train_digits_margin --config experiments/configs/digits_margin.py [--set k=v ...]

For each loss of ``margin.losses`` an MLP embedding net (64 pixels -> ``model.hidden`` ReLU ->
``model.embed_dim``) and a class-weight matrix [10, embed_dim] are trained on the train split of the
8x8 digits (``research.data.digits.load_digits``, the split of every digits experiment) with the
loss of ``research.losses.margin``; the same initial weights, batches and optimiser (AdamW,
warmup + cosine) for every loss. Each loss has its own run directory ``runs/<name>/<loss>/``
(config.json, checkpoints/, metrics.jsonl, curves.png, metrics.json, embeddings.npz) and resumes
from its newest intact checkpoint bit-identically (``open_run`` + ``train_resumable``).

Evaluation of each loss on the TEST split (never trained on):
  * classification accuracy of the margin-free logits (argmax cos θ; linear logits for softmax);
  * verification on held-out pairs: ``eval.num_pairs`` same-class and as many different-class
    pairs of test digits, score = cosine similarity of the L2-normalised embeddings.
    ``verification_accuracy``: threshold chosen on pairs of TRAIN digits (drawn the same way),
    applied to the test pairs. ``verification_accuracy_10fold``: LFW protocol on the test pairs
    (threshold chosen on 9 folds, accuracy on the 10th, mean over folds). ``verification_auc``:
    threshold-free ROC AUC of the test pairs;
  * angular separation of the normalised embeddings (degrees): mean angle of a test embedding to
    its class centre (the normalised mean of its class's normalised embeddings), min and mean
    angle between the 10 class centres.
The top-level ``runs/<name>/`` holds train.log, config.json, metrics.json (``losses``: the per-loss
table) and embeddings.png (one panel per loss: the 2-D test embeddings as they are, coloured by class,
with the class-weight directions; for embed_dim > 2 the PCA-2 projection of the normalised embeddings).

Measured (2026-12-01, 2-core box shared with other jobs, `uptime` load average 4.48-4.59), default config:
    python -m experiments.train_digits_margin --config experiments/configs/digits_margin.py --set train.progress=false
0:36.1 wall (user 34.8 s + sys 1.8 s); test split, embed_dim 2 (details and the 16-D run: config docstring):

| loss | test acc | verif. acc | verif. 10-fold | AUC | intra-class | min inter-class | mean inter-class | final loss |
|---|---|---|---|---|---|---|---|---|
| softmax | 0.942 | 0.907 | 0.906 | 0.9611 | 7.4° | 14.7° | 98.2° | 0.000 |
| normface | 0.939 | 0.938 | 0.942 | 0.9774 | 6.1° | 27.4° | 99.2° | 0.100 |
| sphereface | 0.930 | 0.927 | 0.927 | 0.9722 | 6.7° | 23.8° | 98.1° | 0.000 |
| cosface | 0.947 | 0.951 | 0.952 | 0.9839 | 5.4° | 32.2° | 99.7° | 0.383 |
| arcface | 0.936 | 0.948 | 0.950 | 0.9838 | 4.7° | 30.0° | 99.8° | 0.512 |
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
    NUM_DIGIT_CLASSES, close_text_log, open_run, resolve_run_dir, run_cli, setup_text_log, train_resumable,
    write_json,
)
from research.data.digits import load_digits
from research.losses.margin import margin_logits, softmax_cross_entropy, sphereface_lambda

OPEN_RUN_IGNORE = ("train.num_steps", "train.stop_at_step", "train.progress", "train.log_every",
                   "train.tensorboard", "run_dir", "resume", "margin.losses", "eval")


class EmbeddingMLP(nn.Module):
    """Flattened image -> ReLU MLP -> linear embedding [B, embed_dim]."""
    hidden: tuple[int, ...]
    embed_dim: int

    @nn.compact
    def __call__(self, x):
        h = x.reshape((x.shape[0], -1)).astype(jnp.float32)
        for width in self.hidden:
            h = nn.relu(nn.Dense(width)(h))
        return nn.Dense(self.embed_dim)(h)


def loss_options(cfg, loss: str) -> dict:
    """The ``margin_logits`` keyword arguments of ``loss`` from the config (plain values)."""
    mc = cfg.margin
    if loss == "softmax":
        return {}
    if loss == "normface":
        return {"scale": mc.normface.scale}
    if loss == "cosface":
        return {"scale": mc.cosface.scale, "margin": mc.cosface.margin}
    if loss == "arcface":
        return {"scale": mc.arcface.scale, "margin": mc.arcface.margin, "easy_margin": mc.arcface.easy_margin}
    if loss == "sphereface":
        return {"margin": mc.sphereface.margin, "scale": mc.sphereface.scale or None}
    raise ValueError(f"unknown loss {loss!r}")


def lambda_options(cfg, loss: str) -> tuple | None:
    """SphereFace's (base, gamma, power, lambda_min) annealing; None for the other losses."""
    if loss != "sphereface":
        return None
    s = cfg.margin.sphereface
    return (s.lambda_base, s.lambda_gamma, s.lambda_power, s.lambda_min)


def build(cfg, loss: str, key_init, key_state) -> dict:
    """The network, initial `TrainState` and jitted step of ``loss``: dict(net, state, step, embed)."""
    from research.train.state import create_train_state

    mc, tc = cfg.model, cfg.train
    built = dict(_net_and_step(loss=loss, options=tuple(sorted(loss_options(cfg, loss).items())),
                               lambdas=lambda_options(cfg, loss), hidden=tuple(mc.hidden), embed_dim=mc.embed_dim,
                               lr=tc.learning_rate, warmup=tc.warmup_steps, total=tc.num_steps,
                               weight_decay=tc.weight_decay, clip_norm=tc.clip_norm))
    params = init_params(built["net"], key_init, embed_dim=mc.embed_dim, linear_bias=loss == "softmax")
    built["state"] = create_train_state(params, built["optimizer"], key_state, ema=False)
    return built


def init_params(net: EmbeddingMLP, key, *, embed_dim: int, linear_bias: bool) -> dict:
    k_net, k_head = jax.random.split(key)
    head = {"kernel": jax.random.normal(k_head, (NUM_DIGIT_CLASSES, embed_dim), jnp.float32)
            / np.sqrt(embed_dim)}
    if linear_bias:
        head["bias"] = jnp.zeros((NUM_DIGIT_CLASSES,), jnp.float32)
    return {"net": net.init(k_net, jnp.zeros((1, 8, 8, 1), jnp.float32))["params"], "head": head}


@functools.lru_cache(maxsize=16)
def _net_and_step(*, loss, options, lambdas, hidden, embed_dim, lr, warmup, total, weight_decay, clip_norm) -> dict:
    """Cached on the (hashable) hyper-parameters: repeated runs in one process reuse the compiled step."""
    from research.train.optim import make_optimizer
    from research.train.step import make_train_step

    net = EmbeddingMLP(hidden=hidden, embed_dim=embed_dim)
    options = dict(options)
    kind = loss
    optimizer = make_optimizer(learning_rate=lr, warmup_steps=warmup, total_steps=total, weight_decay=weight_decay,
                               clip_norm=clip_norm or None)

    def logits_fn(params, images, labels, step):
        emb = net.apply({"params": params["net"]}, images)
        head = params["head"]
        extra = {"bias": head["bias"]} if "bias" in head else {}
        if lambdas is not None:
            base, gamma, power, lam_min = lambdas
            extra["lam"] = sphereface_lambda(step, base=base, gamma=gamma, power=power, lambda_min=lam_min)
        train_logits = margin_logits(emb, head["kernel"], labels, kind=kind, **options, **extra)
        extra.pop("lam", None)
        plain_logits = margin_logits(emb, head["kernel"], None, kind=kind, **options, **extra)
        return train_logits, plain_logits

    def loss_fn(params, batch, key):
        del key  # deterministic loss
        labels = batch["label"]
        train_logits, plain_logits = logits_fn(params, batch["image"], labels, batch["step"])
        loss_value = softmax_cross_entropy(train_logits, labels)
        acc = jnp.mean((jnp.argmax(plain_logits, axis=-1) == labels).astype(jnp.float32))
        aux = {"accuracy": acc}
        if lambdas is not None:
            base, gamma, power, lam_min = lambdas
            aux["lambda"] = sphereface_lambda(batch["step"], base=base, gamma=gamma, power=power, lambda_min=lam_min)
        return loss_value, aux

    inner = make_train_step(loss_fn, optimizer, jit=False)

    def step(state, batch):
        # the step number rides in the batch so the loss can anneal SphereFace's lambda
        return inner(state, {**batch, "step": state.step})

    def embed_and_logits(params, images):
        emb = net.apply({"params": params["net"]}, images)
        head = params["head"]
        extra = {"bias": head["bias"]} if "bias" in head else {}
        return emb, margin_logits(emb, head["kernel"], None, kind=kind, **options, **extra)

    return {"net": net, "optimizer": optimizer, "step": jax.jit(step, donate_argnums=(0,)),
            "embed": jax.jit(embed_and_logits)}


# ---------------------------------------------------------------------------- evaluation (host, numpy)


def make_pairs(labels: np.ndarray, num_pairs: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``num_pairs`` same-class pairs (class uniform, two distinct images) and ``num_pairs`` different-class
    pairs (two distinct classes uniform); returns (index pairs [2 num_pairs, 2], same [2 num_pairs] bool)."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    by_class = {c: np.flatnonzero(labels == c) for c in classes}
    pos = []
    for c in rng.choice(classes, size=num_pairs):
        i, j = rng.choice(by_class[c], size=2, replace=False)
        pos.append((i, j))
    neg = []
    for _ in range(num_pairs):
        a, b = rng.choice(classes, size=2, replace=False)
        neg.append((rng.choice(by_class[a]), rng.choice(by_class[b])))
    pairs = np.asarray(pos + neg, np.int64)
    return pairs, np.concatenate([np.ones(num_pairs, bool), np.zeros(num_pairs, bool)])


def pair_scores(embeddings: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    e = normalize(embeddings)
    return np.sum(e[pairs[:, 0]] * e[pairs[:, 1]], axis=1)


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """The threshold (midpoint between sorted scores) maximising the accuracy of ``score > t``."""
    order = np.argsort(scores)
    s, y = scores[order], same[order]
    # predicting "same" for the items above position k: correct = negatives in [0, k) + positives in [k, n)
    neg_below = np.concatenate([[0], np.cumsum(~y)])
    pos_above = np.concatenate([np.cumsum(y[::-1])[::-1], [0]])
    k = int(np.argmax(neg_below + pos_above))
    if k == 0:
        return float(s[0] - 1e-9)
    if k == len(s):
        return float(s[-1] + 1e-9)
    return float(0.5 * (s[k - 1] + s[k]))


def verification_accuracy(scores: np.ndarray, same: np.ndarray, threshold: float) -> float:
    return float(np.mean((scores > threshold) == same))


def kfold_verification_accuracy(scores: np.ndarray, same: np.ndarray, folds: int, rng: np.random.Generator) -> float:
    """LFW protocol: threshold chosen on the other folds, accuracy on each fold, mean over folds."""
    fold_of = rng.permutation(len(scores)) % folds
    accs = []
    for f in range(folds):
        t = best_threshold(scores[fold_of != f], same[fold_of != f])
        accs.append(verification_accuracy(scores[fold_of == f], same[fold_of == f], t))
    return float(np.mean(accs))


def roc_auc(scores: np.ndarray, same: np.ndarray) -> float:
    """P(score of a same pair > score of a different pair) (ties count 1/2), the Mann-Whitney statistic."""
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    n_pos, n_neg = int(same.sum()), int((~same).sum())
    return float((ranks[same].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def angular_separation(embeddings: np.ndarray, labels: np.ndarray) -> dict:
    """Angles (degrees) of the normalised embeddings: to their class centre (mean), between centres (min, mean)."""
    e = normalize(embeddings)
    classes = np.unique(labels)
    centres = normalize(np.stack([e[labels == c].mean(axis=0) for c in classes]))
    idx = np.searchsorted(classes, labels)
    intra = np.degrees(np.arccos(np.clip(np.sum(e * centres[idx], axis=1), -1.0, 1.0)))
    cc = np.clip(centres @ centres.T, -1.0, 1.0)
    iu = np.triu_indices(len(classes), k=1)
    inter = np.degrees(np.arccos(cc[iu]))
    return {"intra_class_angle_deg": float(intra.mean()), "inter_class_angle_min_deg": float(inter.min()),
            "inter_class_angle_mean_deg": float(inter.mean())}


def evaluate(embed_fn, params, cfg, train_images, train_labels, test_images, test_labels) -> tuple[dict, np.ndarray]:
    """Metrics of one loss and its test embeddings."""
    ec = cfg.eval
    emb_train, _ = embed_fn(params, jnp.asarray(train_images))
    emb_test, logits_test = embed_fn(params, jnp.asarray(test_images))
    emb_train, emb_test = np.asarray(emb_train, np.float64), np.asarray(emb_test, np.float64)
    if not (np.all(np.isfinite(emb_train)) and np.all(np.isfinite(emb_test))):
        raise FloatingPointError("non-finite embeddings after training")
    rng = np.random.default_rng(ec.pair_seed)
    train_pairs, train_same = make_pairs(train_labels, ec.num_pairs, rng)
    test_pairs, test_same = make_pairs(test_labels, ec.num_pairs, rng)
    train_scores, test_scores = pair_scores(emb_train, train_pairs), pair_scores(emb_test, test_pairs)
    threshold = best_threshold(train_scores, train_same)
    metrics = {
        "test_accuracy": float(np.mean(np.argmax(np.asarray(logits_test), axis=-1) == test_labels)),
        "verification_accuracy": verification_accuracy(test_scores, test_same, threshold),
        "verification_threshold": threshold,
        "verification_accuracy_10fold": kfold_verification_accuracy(test_scores, test_same, ec.folds, rng),
        "verification_auc": roc_auc(test_scores, test_same),
        "mean_feature_norm": float(np.mean(np.linalg.norm(emb_test, axis=1))),
        **angular_separation(emb_test, test_labels),
    }
    return metrics, emb_test


TABLE_COLUMNS = [  # verif. acc: threshold from train pairs; verif. 10-fold: LFW protocol; angles in degrees
    ("loss", "loss", None), ("test acc", "test_accuracy", "{:.3f}"), ("verif. acc", "verification_accuracy", "{:.3f}"),
    ("verif. 10-fold", "verification_accuracy_10fold", "{:.3f}"), ("AUC", "verification_auc", "{:.4f}"),
    ("intra-class", "intra_class_angle_deg", "{:.1f}°"), ("min inter-class", "inter_class_angle_min_deg", "{:.1f}°"),
    ("mean inter-class", "inter_class_angle_mean_deg", "{:.1f}°"), ("final loss", "final_loss", "{:.3f}"),
]


def markdown_table(per_loss: dict) -> str:
    lines = ["| " + " | ".join(c[0] for c in TABLE_COLUMNS) + " |",
             "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"]
    for name, m in per_loss.items():
        cells = [name] + [fmt.format(m[key]) if m.get(key) is not None else "-" for _, key, fmt in TABLE_COLUMNS[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_embedding_figure(path: str, panels: dict, labels: np.ndarray, weights: dict, *, title: str) -> str:
    """One panel per loss; returns what is plotted ("raw 2-D" or "PCA-2 of the normalised embeddings")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    two_d = all(e.shape[1] == 2 for e in panels.values())
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, (name, emb) in zip(axes[0], panels.items()):
        if two_d:
            pts = emb
        else:
            e = normalize(emb)
            e = e - e.mean(axis=0)
            _, _, vt = np.linalg.svd(e, full_matrices=False)
            pts = e @ vt[:2].T
        for c in range(NUM_DIGIT_CLASSES):
            sel = labels == c
            ax.scatter(pts[sel, 0], pts[sel, 1], s=4, color=cmap(c), label=str(c), alpha=0.7, linewidths=0)
        if two_d and name != "softmax":
            r = np.percentile(np.linalg.norm(pts, axis=1), 95)
            w = normalize(weights[name]) * r
            for c in range(NUM_DIGIT_CLASSES):
                ax.plot([0, w[c, 0]], [0, w[c, 1]], color=cmap(c), lw=0.8)
        ax.set_title(name, fontsize=10)
        ax.set_aspect("equal", adjustable="datalim")
        ax.tick_params(labelsize=6)
    axes[0, -1].legend(fontsize=6, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return "raw 2-D embeddings" if two_d else "PCA-2 of the L2-normalised embeddings"


# ---------------------------------------------------------------------------- the run


def run(cfg) -> dict:
    """Trains (resuming) every loss of ``margin.losses`` and evaluates its embeddings; returns the metrics."""
    t_start = time.perf_counter()
    run_dir = resolve_run_dir(cfg.run_dir, cfg.name)
    log = setup_text_log(run_dir, cfg.name)
    try:
        return _run(cfg, run_dir, log, t_start)
    finally:
        close_text_log(log)


def _run(cfg, run_dir, log, t_start) -> dict:
    from research.runs.config import save_config

    tc, dc = cfg.train, cfg.data
    log.info(f"run_dir={run_dir} devices={jax.devices()} losses={list(cfg.margin.losses)}")
    train_images, train_labels = load_digits("train", seed=dc.split_seed, test_fraction=dc.test_fraction)
    test_images, test_labels = load_digits("test", seed=dc.split_seed, test_fraction=dc.test_fraction)
    arrays = {"image": train_images, "label": train_labels}

    per_loss, panels, weights, stopped = {}, {}, {}, None
    for loss in cfg.margin.losses:
        loss_dir = os.path.join(run_dir, loss)
        os.makedirs(loss_dir, exist_ok=True)
        # the same keys for every loss (fresh arrays: the step donates the state, its key included)
        k_init, k_state, k_data = jax.random.split(jax.random.key(cfg.seed), 3)
        built = build(cfg, loss, k_init, k_state)
        others = tuple(f"margin.{o}" for o in ("normface", "cosface", "arcface", "sphereface") if o != loss)
        ckpt, state = open_run(loss_dir, cfg, log, built["state"], save_every=tc.checkpoint_every,
                               keep=tc.keep_checkpoints, resume=cfg.resume, ignore_keys=OPEN_RUN_IGNORE + others)
        state, start_step, train_time, final_loss = train_resumable(
            loss_dir, log, state, built["step"], arrays, k_data, ckpt, num_steps=tc.stop_at_step or tc.num_steps,
            batch_size=tc.batch_size, log_every=tc.log_every, progress=tc.progress, tensorboard=tc.tensorboard,
            num_classes=NUM_DIGIT_CLASSES)
        log.info(f"{loss}: trained steps {start_step} -> {int(state.step)} in {train_time:.1f}s; final loss "
                 f"{final_loss}")
        if int(state.step) < tc.num_steps:
            stopped = int(state.step)
            continue
        t_eval = time.perf_counter()
        metrics, emb_test = evaluate(built["embed"], state.params, cfg, train_images, train_labels, test_images,
                                     test_labels)
        metrics.update({"loss": loss, "final_loss": final_loss, "steps": int(state.step),
                        "train_time_s": train_time, "eval_time_s": time.perf_counter() - t_eval,
                        "resumed_from_step": start_step, "options": loss_options(cfg, loss)})
        write_json(os.path.join(loss_dir, "metrics.json"), metrics)
        np.savez_compressed(os.path.join(loss_dir, "embeddings.npz"), embeddings=emb_test.astype(np.float32),
                            labels=test_labels)
        per_loss[loss], panels[loss] = metrics, emb_test
        weights[loss] = np.asarray(state.params["head"]["kernel"], np.float64)
        log.info(f"{loss}: test acc {metrics['test_accuracy']:.3f}, verification "
                 f"{metrics['verification_accuracy']:.3f} (10-fold {metrics['verification_accuracy_10fold']:.3f}), "
                 f"intra {metrics['intra_class_angle_deg']:.1f}°, "
                 f"inter min {metrics['inter_class_angle_min_deg']:.1f}°")
    save_config(cfg, run_dir)  # after every loss's checkpoint config check (open_run)
    if stopped is not None:
        log.info(f"stopped at step {stopped} (train.stop_at_step); rerun to resume. No evaluation written.")
        return {"stopped_at_step": stopped}

    plotted = save_embedding_figure(
        os.path.join(run_dir, "embeddings.png"), panels, test_labels, weights,
        title=f"{cfg.name}: test-split embeddings (embed_dim {cfg.model.embed_dim}), {tc.num_steps} steps")
    table = markdown_table(per_loss)
    out = {
        "losses": per_loss,
        "loss_order": list(per_loss),
        "table_markdown": table,
        "embed_dim": cfg.model.embed_dim,
        "figure": f"embeddings.png: {plotted}, test split, coloured by class",
        "verification_protocol": (
            f"{cfg.eval.num_pairs} same-class + {cfg.eval.num_pairs} different-class pairs of test digits, score = "
            "cosine similarity of normalised embeddings; verification_accuracy: threshold maximising accuracy on "
            "pairs of train digits drawn the same way; verification_accuracy_10fold: LFW-style, threshold chosen on "
            f"{cfg.eval.folds - 1} folds of the test pairs, accuracy on the remaining fold, mean over folds"),
        "angles": "degrees, test split, normalised embeddings; class centre = normalised mean of a class",
        "num_test": int(len(test_labels)),
        "num_train": int(len(train_labels)),
        "wall_time_s": time.perf_counter() - t_start,
    }
    write_json(os.path.join(run_dir, "metrics.json"), out)
    log.info("results (test split):\n" + table)
    log.info(f"wall time {out['wall_time_s']:.1f}s")
    return out


def main(argv=None) -> dict:
    return run_cli(run, argv, default_config="experiments/configs/digits_margin.py")


if __name__ == "__main__":
    main()
