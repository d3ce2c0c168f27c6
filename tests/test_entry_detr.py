"""Entry smoke test: the digits DETR script on tiny sizes: artefacts, metrics in range, the on-device canvases,
an interrupted run resuming bit-identically, and one-line errors for bad configs."""
import json
import os

import jax
import numpy as np
import pytest

from experiments import train_digits_detr as exp
from research.runs.config import load_config

pytestmark = pytest.mark.entry

CONFIG = "experiments/configs/digits_detr.py"
STEPS = 6
TINY = [
    "model.channels=(8,8)", "model.strides=(2,2)", "model.dim=16", "model.num_heads=2", "model.mlp_dim=16",
    "model.decoder_layers=2", "model.num_queries=5", "train.batch_size=4", "train.warmup_steps=2",
    "train.log_every=2", "train.checkpoint_every=100", "train.progress=false", "eval.num_canvases=12",
    "eval.figure_canvases=4", f"train.num_steps={STEPS}",
]


def _args(run_dir, *extra):
    args = ["--config", CONFIG, "--set", f"run_dir={run_dir}"]
    for o in TINY + list(extra):
        args += ["--set", o]
    return args


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("detr_full")
    return run_dir, exp.main(_args(run_dir))


def test_artefacts_and_metrics(full_run):
    run_dir, out = full_run
    for name in ["metrics.json", "config.json", "metrics.jsonl", "curves.png", "predictions.png", "train.log"]:
        assert os.path.isfile(run_dir / name), name
    assert os.listdir(run_dir / "checkpoints")
    with open(run_dir / "metrics.json") as f:
        m = json.load(f)
    assert m["map_50"] == out["map_50"] and m["steps"] == STEPS and m["resumed_from_step"] == 0
    for key in ["map_50", "map_50_11point", "set_accuracy", "detection_set_accuracy", "count_accuracy"]:
        assert 0.0 <= m[key] <= 1.0, key
    assert m["detection_set_accuracy"] <= m["set_accuracy"]
    assert len(m["ap_50_per_class"]) == 10 and len(m["num_gt_per_class"]) == 10
    assert m["num_eval_canvases"] == 12 and sum(m["num_gt_per_class"]) == m["num_eval_objects"]
    assert 12 <= m["num_eval_objects"] <= 48  # 1-4 digits per canvas
    assert np.isfinite(m["final_loss"]) and m["final_loss"] > 0 and np.isfinite(m["final/loss_ce"])
    assert m["num_params"] > 0 and m["figure"] == "predictions.png"
    with open(run_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f if line.strip()]
    assert records[-1]["step"] == STEPS and "final/loss_giou" in records[-1] and "lr" in records[-1]


def test_canvases_hold_the_digits_in_their_boxes():
    from research.data.digits import load_digits

    images, labels = load_digits("test")
    out = exp.make_canvases_jit(jax.random.key(3), images[:64], labels[:64], canvas_size=32, min_digits=1,
                                max_digits=4)
    img, xyxy, mask = np.asarray(out["image"]), np.asarray(out["boxes_xyxy"]).astype(int), np.asarray(out["mask"])
    assert img.shape == (16, 32, 32, 1) and mask.shape == (16, 4)
    counts = mask.sum(1)
    assert counts.min() >= 1 and counts.max() <= 4 and len(np.unique(counts)) > 1
    np.testing.assert_array_equal(np.asarray(out["labels"])[mask], labels[:64].reshape(16, 4)[mask])
    digits = images[:64, ..., 0].reshape(16, 4, 8, 8)
    for b in range(16):
        ink = np.full((32, 32), -1.0, np.float32)
        for j in np.flatnonzero(mask[b]):
            x0, y0, x1, y1 = xyxy[b, j]
            assert 0 <= x0 and x1 <= 32 and 0 <= y0 and y1 <= 32 and x1 - x0 == 8 and y1 - y0 == 8
            assert np.all(ink[y0:y1, x0:x1] == -1.0)  # no overlap with an earlier digit
            np.testing.assert_array_equal(img[b, y0:y1, x0:x1, 0], digits[b, j])
            ink[y0:y1, x0:x1] = digits[b, j]
        np.testing.assert_array_equal(img[b, ..., 0], ink)  # nothing outside the boxes
    cx = np.asarray(out["boxes"])[..., 0] * 32
    np.testing.assert_allclose(cx[mask], (xyxy[..., 0] + 4)[mask])


def _final_state(run_dir):
    """Restores the latest checkpoint into a template built from other keys."""
    from research.train.checkpoint import Checkpointer

    cfg = load_config(CONFIG, [f"run_dir={run_dir}", *TINY])
    template = exp.build(cfg, jax.random.key(123), jax.random.key(7))["state"]
    ck = Checkpointer(os.path.join(run_dir, "checkpoints"), save_every=cfg.train.checkpoint_every)
    try:
        return ck.restore_latest(template)
    finally:
        ck.close()


def test_interrupted_run_resumes_bit_identically(full_run, tmp_path):
    full_dir, full = full_run
    split_dir = tmp_path / "split"
    out = exp.main(_args(split_dir, "train.stop_at_step=3"))
    assert out == {"stopped_at_step": 3}
    assert not os.path.exists(split_dir / "metrics.json")
    resumed = exp.main(_args(split_dir))
    assert resumed["resumed_from_step"] == 3
    a, b = _final_state(full_dir), _final_state(split_dir)
    assert int(a.step) == int(b.step) == STEPS
    leaves_a, leaves_b = jax.tree.leaves((a.params, a.opt_state)), jax.tree.leaves((b.params, b.opt_state))
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):  # same program on the same inputs: bitwise
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    np.testing.assert_array_equal(jax.random.key_data(a.key), jax.random.key_data(b.key))
    for key in ["map_50", "map_50_11point", "set_accuracy", "ap_50_per_class", "final/loss"]:
        assert resumed[key] == full[key], key


@pytest.mark.parametrize("override, needle", [
    ("model.num_queries=3", "model.num_queries"),
    ("data.max_digits=5", "data.max_digits"),
    ("model.dim=18", "model.dim"),
    ("model.strides=(2,)", "model.strides"),
    ("loss.eos_coef=0.0", "loss.eos_coef"),
    ("train.num_stpes=3", "num_steps"),
    ("train.batch_size=400", "train.batch_size"),  # 1600 digits per step > the 1437 train digits (run time)
])
def test_bad_config_gives_one_error_line(tmp_path, capsys, override, needle):
    with pytest.raises(SystemExit) as e:
        exp.main(_args(tmp_path, override))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / "config.json")
