"""Entry smoke test: the margin-softmax digits script on tiny sizes for every loss: artefacts, metrics in
range, an interrupted run resuming bit-identically, and one-line errors for bad configs."""
import json
import os

import jax
import numpy as np
import pytest

from experiments import train_digits_margin as exp
from research.runs.config import load_config

pytestmark = pytest.mark.entry

CONFIG = "experiments/configs/digits_margin.py"
LOSSES = ("softmax", "normface", "sphereface", "cosface", "arcface")
STEPS = 6
TINY = [
    "model.hidden=(16,)", "train.batch_size=16", "train.warmup_steps=2", "train.log_every=2",
    "train.checkpoint_every=100", "train.progress=false", "eval.num_pairs=60", "eval.folds=5",
    f"train.num_steps={STEPS}",
]


def _args(run_dir, *extra):
    args = ["--config", CONFIG, "--set", f"run_dir={run_dir}"]
    for o in TINY + list(extra):
        args += ["--set", o]
    return args


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("margin_full")
    return run_dir, exp.main(_args(run_dir))


def test_artefacts_and_metrics(full_run):
    run_dir, out = full_run
    for name in ["metrics.json", "config.json", "train.log", "embeddings.png"]:
        assert os.path.isfile(run_dir / name), name
    with open(run_dir / "metrics.json") as f:
        m = json.load(f)
    assert m["loss_order"] == list(LOSSES) and sorted(m["losses"]) == sorted(LOSSES)
    assert m["losses"] == json.loads(json.dumps(out["losses"]))
    assert m["embed_dim"] == 2 and "raw 2-D" in m["figure"]
    assert m["table_markdown"].count("\n") == len(LOSSES) + 1
    for loss in LOSSES:
        d = run_dir / loss
        for name in ["metrics.json", "config.json", "metrics.jsonl", "curves.png", "embeddings.npz"]:
            assert os.path.isfile(d / name), (loss, name)
        assert os.listdir(d / "checkpoints")
        r = m["losses"][loss]
        assert r["loss"] == loss and r["steps"] == STEPS and r["resumed_from_step"] == 0
        for key in ["test_accuracy", "verification_accuracy", "verification_accuracy_10fold", "verification_auc"]:
            assert 0.0 <= r[key] <= 1.0, (loss, key)
        assert 0.0 <= r["intra_class_angle_deg"] <= 180.0
        assert 0.0 <= r["inter_class_angle_min_deg"] <= r["inter_class_angle_mean_deg"] <= 180.0
        assert -1.0 - 1e-6 <= r["verification_threshold"] <= 1.0 + 1e-6
        assert np.isfinite(r["final_loss"]) and r["final_loss"] > 0
        with np.load(d / "embeddings.npz") as z:
            emb, labels = z["embeddings"], z["labels"]
        assert emb.shape == (len(labels), 2) and np.all(np.isfinite(emb)) and m["num_test"] == len(labels)
        with open(d / "metrics.jsonl") as f:
            records = [json.loads(line) for line in f if line.strip()]
        assert records[-1]["step"] == STEPS and "accuracy" in records[-1]
        assert ("lambda" in records[-1]) == (loss == "sphereface")
    # SphereFace's annealed lambda is logged: base 1000 / (1 + 0.12 * step) at the last step's (0-based) index
    with open(run_dir / "sphereface" / "metrics.jsonl") as f:
        last = [json.loads(line) for line in f if line.strip()][-1]
    np.testing.assert_allclose(last["lambda"], 1000.0 / (1 + 0.12 * (STEPS - 1)), rtol=1e-5)


def test_eval_helpers():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 5)
    pairs, same = exp.make_pairs(labels, 40, rng)
    assert pairs.shape == (80, 2) and same.sum() == 40
    assert np.all((labels[pairs[:, 0]] == labels[pairs[:, 1]]) == same) and np.all(pairs[:, 0] != pairs[:, 1])
    scores = np.where(same, 0.9, 0.1) + rng.normal(size=80) * 0.01
    t = exp.best_threshold(scores, same)
    assert 0.1 < t < 0.9 and exp.verification_accuracy(scores, same, t) == 1.0
    assert exp.roc_auc(scores, same) == 1.0 and exp.roc_auc(-scores, same) == 0.0
    assert exp.kfold_verification_accuracy(scores, same, 5, rng) == 1.0
    # two classes at 0° and 90°, every point on its centre: intra 0, inter 90
    emb = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, 1.0]])
    a = exp.angular_separation(emb, np.array([0, 0, 1, 1]))
    np.testing.assert_allclose([a["intra_class_angle_deg"], a["inter_class_angle_min_deg"]], [0.0, 90.0], atol=1e-6)


def _final_state(run_dir, loss):
    from research.train.checkpoint import Checkpointer

    cfg = load_config(CONFIG, [f"run_dir={run_dir}", *TINY])
    template = exp.build(cfg, loss, jax.random.key(123), jax.random.key(7))["state"]
    ck = Checkpointer(os.path.join(run_dir, loss, "checkpoints"), save_every=cfg.train.checkpoint_every)
    try:
        return ck.restore_latest(template)
    finally:
        ck.close()


def test_interrupted_run_resumes_bit_identically(full_run, tmp_path):
    full_dir, _ = full_run
    split_dir = tmp_path / "split"
    out = exp.main(_args(split_dir, "train.stop_at_step=3"))
    assert out == {"stopped_at_step": 3}
    assert not os.path.exists(split_dir / "metrics.json")
    assert not os.path.exists(split_dir / "arcface" / "embeddings.npz")
    resumed = exp.main(_args(split_dir))
    for loss in LOSSES:
        a, b = _final_state(full_dir, loss), _final_state(split_dir, loss)
        assert int(a.step) == int(b.step) == STEPS
        leaves_a, leaves_b = jax.tree.leaves(a.params), jax.tree.leaves(b.params)
        assert len(leaves_a) == len(leaves_b) > 0
        for x, y in zip(leaves_a + jax.tree.leaves(a.opt_state), leaves_b + jax.tree.leaves(b.opt_state)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # same program, same inputs: bitwise
        with np.load(full_dir / loss / "embeddings.npz") as za, np.load(split_dir / loss / "embeddings.npz") as zb:
            np.testing.assert_array_equal(za["embeddings"], zb["embeddings"])
        assert resumed["losses"][loss]["resumed_from_step"] == 3
        with open(full_dir / "metrics.json") as f:
            full = json.load(f)["losses"][loss]
        for key in ["verification_accuracy", "verification_auc", "intra_class_angle_deg", "final_loss"]:
            assert resumed["losses"][loss][key] == full[key], (loss, key)


@pytest.mark.parametrize("override, needle", [
    ("margin.losses=softmax,cosfce", "margin.losses: unknown loss 'cosfce'"),
    ("margin.sphereface.margin=0", "margin.sphereface.margin"),
    ("margin.arcface.scale=0.0", "margin.arcface.scale"),
    ("model.embed_dim=1", "model.embed_dim"),
    ("train.stop_at_step=99", "train.stop_at_step"),
    ("margin.cosface.margn=0.2", "margin.cosface.margin"),
])
def test_bad_config_one_line_error(tmp_path, capsys, override, needle):
    with pytest.raises(SystemExit) as e:
        exp.main(_args(tmp_path, override))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("error: ") and err.strip().count("\n") == 0
    assert not os.path.exists(tmp_path / "config.json")
