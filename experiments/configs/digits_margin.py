"""Margin-softmax digit embeddings: softmax / NormFace / SphereFace / CosFace / ArcFace on 8x8 digits.

Command (one run trains and evaluates every loss in ``margin.losses``, each in runs/digits_margin/<loss>/):
    python -m experiments.train_digits_margin --config experiments/configs/digits_margin.py
    # overrides: --set margin.losses=arcface,cosface --set model.embed_dim=16 --set train.num_steps=1000

An MLP (64 -> 256 -> 256 -> 2, ReLU) and class weights [10, 2], AdamW 2e-3 (warmup 100, cosine), batch 128,
3000 steps per loss, the same initial weights and batches for every loss. Scales s = 16 (NormFace, CosFace,
ArcFace; for 10 classes the NormFace bound s >= (C-1)/C log((C-1) P / (1-P)) is ~6 at P = 0.99); SphereFace
m = 4 with the feature norm and the original lambda annealing (1000 -> 5 by step ~1650). Margins for 2-D:
ArcFace m = 0.5 rad (the paper's), CosFace m = 0.1 instead of the paper's 0.35: with 10 classes on a circle
(36 degrees apart) cos(theta_y) - 0.35 > cos(36 deg) = 0.81 cannot hold even at a class centre, and a
measured run with m = 0.35 collapsed (test acc 0.786, min inter-class angle 3.3 deg, final loss 3.1).
Verification: 3000 same-class + 3000 different-class pairs of TEST digits, cosine similarity of the
normalised embeddings; "verif. acc" takes the threshold that is best on pairs of TRAIN digits drawn the same
way, "verif. 10-fold" is the LFW protocol on the test pairs, AUC is threshold-free. Angles in degrees on the
normalised test embeddings (intra-class: mean angle to the class centre; inter-class: between centres).

Measured (2026-12-01, 2-core box shared with other jobs, `uptime` load average 4.48 before / 4.59 after):
    python -m experiments.train_digits_margin --config experiments/configs/digits_margin.py --set train.progress=false
0:36.1 wall at 101% of the CPU (user 34.8 s + sys 1.8 s; 4.8-5.6 s of training per loss, ~870-1100 steps/s;
an earlier identical run: 0:39.2 at load 4.6, the same numbers bit for bit).
Expected result (runs/digits_margin/metrics.json, 359 test digits, embed_dim 2):

| loss | test acc | verif. acc | verif. 10-fold | AUC | intra-class | min inter-class | mean inter-class | final loss |
|---|---|---|---|---|---|---|---|---|
| softmax | 0.942 | 0.907 | 0.906 | 0.9611 | 7.4° | 14.7° | 98.2° | 0.000 |
| normface | 0.939 | 0.938 | 0.942 | 0.9774 | 6.1° | 27.4° | 99.2° | 0.100 |
| sphereface | 0.930 | 0.927 | 0.927 | 0.9722 | 6.7° | 23.8° | 98.1° | 0.000 |
| cosface | 0.947 | 0.951 | 0.952 | 0.9839 | 5.4° | 32.2° | 99.7° | 0.383 |
| arcface | 0.936 | 0.948 | 0.950 | 0.9838 | 4.7° | 30.0° | 99.8° | 0.512 |

Every normalised loss gives tighter classes and a larger minimum angle between class centres than the
linear softmax, and better verification (0.927-0.951 vs 0.907); test classification accuracy is about the
same (0.930-0.947 vs 0.942, 2-D bottleneck). Most of the gain already comes from normalising (NormFace, no
margin); CosFace and ArcFace add to it, SphereFace (feature norm kept, lambda floor 5) less so. The mean
inter-class angle is fixed by the geometry (10 directions on a circle). With 6000 steps the picture is the
same (NormFace 0.952 verification, softmax 0.903). With --set model.embed_dim=16 (0:40.4 wall, same load;
figure = PCA-2 of the normalised embeddings): verification (train thr.) softmax 0.938, normface 0.974,
sphereface 0.977, cosface 0.975, arcface 0.981; min inter-class angle 52.3 / 83.8 / 72.6 / 86.2 / 85.0 deg;
but intra-class angles are NOT tighter for NormFace and CosFace there (21.9 softmax, 24.3 normface,
19.2 sphereface, 22.1 cosface, 16.8 arcface deg): every loss reaches ~0 train loss at these small margins.
A rerun with the same run_dir resumes each loss from its latest checkpoint (delete the folder to retrain).
"""
import ml_collections

from research.runs.config import check, check_choice, check_positive, check_range

LOSSES = ("softmax", "normface", "sphereface", "cosface", "arcface")


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "digits_margin"
    c.run_dir = ""  # empty: runs/<name>; each loss trains in <run_dir>/<loss>/
    c.seed = 0
    c.resume = "auto"  # "auto" | "force" | "never" (see experiments.common.open_run)

    c.data = ml_collections.ConfigDict()
    c.data.split_seed = 0  # the same train/test split as the other digits experiments
    c.data.test_fraction = 0.2

    c.model = ml_collections.ConfigDict()
    c.model.hidden = (256, 256)  # MLP on the 64 pixels (ReLU), then a linear map to embed_dim
    c.model.embed_dim = 2  # 2-D embeddings are plotted as they are (SphereFace's MNIST figure); > 2: PCA-2

    c.margin = ml_collections.ConfigDict()
    c.margin.losses = LOSSES  # every one trains with the same initial weights and batches
    c.margin.normface = ml_collections.ConfigDict({"scale": 16.0})
    c.margin.cosface = ml_collections.ConfigDict({"scale": 16.0, "margin": 0.1})
    c.margin.arcface = ml_collections.ConfigDict({"scale": 16.0, "margin": 0.5, "easy_margin": False})
    # scale 0: the feature norm (the original A-Softmax); lambda = max(lambda_min, base (1 + gamma step)^-power)
    c.margin.sphereface = ml_collections.ConfigDict({
        "margin": 4, "scale": 0.0, "lambda_base": 1000.0, "lambda_gamma": 0.12, "lambda_power": 1.0,
        "lambda_min": 5.0})

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 3000
    c.train.stop_at_step = 0  # >0: stop every loss after this step (simulated pre-emption); rerun to resume
    c.train.batch_size = 128
    c.train.learning_rate = 2e-3  # AdamW peak, linear warmup then cosine to 0
    c.train.warmup_steps = 100
    c.train.weight_decay = 5e-4
    c.train.clip_norm = 0.0  # 0: no clipping
    c.train.log_every = 250
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 2
    c.train.progress = True
    c.train.tensorboard = False

    c.eval = ml_collections.ConfigDict()
    c.eval.num_pairs = 3000  # same-class pairs = different-class pairs = num_pairs, per split
    c.eval.pair_seed = 0
    c.eval.folds = 10  # LFW-style: threshold chosen on 9 folds of the test pairs, accuracy on the 10th
    return c


def _check_int(c, *keys):
    for key in keys:
        node = c
        for part in key.split("."):
            node = node[part]
        check(isinstance(node, int) and not isinstance(node, bool), f"{key} must be an int, got {node!r}")


def validate(c: ml_collections.ConfigDict) -> None:
    check_choice(c, "resume", ["auto", "force", "never"])
    losses = c.margin.losses
    check(isinstance(losses, (tuple, list)) and len(losses) > 0,
          f"margin.losses must be a non-empty tuple of loss names, got {losses!r}")
    for name in losses:
        check(name in LOSSES, f"margin.losses: unknown loss {name!r}; choose from {list(LOSSES)}")
    check(len(set(losses)) == len(losses), f"margin.losses has duplicates: {list(losses)}")
    widths = c.model.hidden
    check(isinstance(widths, (tuple, list)) and len(widths) > 0
          and all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths),
          f"model.hidden must be a non-empty tuple of positive ints, got {widths!r}")
    check_positive(c, "model.embed_dim", "margin.normface.scale", "margin.cosface.scale", "margin.arcface.scale",
                   "margin.sphereface.lambda_base", "train.num_steps", "train.batch_size", "train.learning_rate",
                   "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "eval.num_pairs")
    check_positive(c, "margin.cosface.margin", "margin.arcface.margin", "margin.sphereface.scale",
                   "margin.sphereface.lambda_gamma", "margin.sphereface.lambda_power", "margin.sphereface.lambda_min",
                   "train.stop_at_step", "train.warmup_steps", "train.weight_decay", "train.clip_norm",
                   allow_zero=True)
    _check_int(c, "model.embed_dim", "margin.sphereface.margin", "train.num_steps", "train.stop_at_step",
               "train.batch_size", "train.warmup_steps", "eval.num_pairs", "eval.folds")
    check(c.margin.sphereface.margin >= 1, f"margin.sphereface.margin must be an integer >= 1, got "
          f"{c.margin.sphereface.margin!r}")
    check_range(c, "margin.arcface.margin", 0.0, 3.14159)
    check_range(c, "margin.cosface.margin", 0.0, 2.0)
    check_range(c, "data.test_fraction", 0.01, 0.99)
    check_range(c, "eval.folds", 2, 100)
    check(c.model.embed_dim >= 2, f"model.embed_dim must be >= 2 (angles and the 2-D figure), got {c.model.embed_dim}")
    check(c.train.stop_at_step <= c.train.num_steps,
          f"train.stop_at_step ({c.train.stop_at_step}) must be <= train.num_steps ({c.train.num_steps})")
    check(c.train.warmup_steps <= c.train.num_steps,
          f"train.warmup_steps ({c.train.warmup_steps}) must be <= train.num_steps ({c.train.num_steps})")
