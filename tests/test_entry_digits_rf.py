"""Entry smoke test: the real flagship script on tiny sizes, artefacts and resume equivalence."""
import json
import os

import jax
import numpy as np
import pytest

from experiments import train_digits_rf as exp
from experiments.common import build_digits_dit
from research.runs.config import load_config

pytestmark = pytest.mark.entry

CONFIG = "experiments/configs/digits_rf.py"
TINY = [
    "model.hidden_size=16", "model.depth=1", "model.num_heads=2", "model.mlp_ratio=2.0",
    "train.batch_size=16", "train.warmup_steps=1", "train.log_every=2", "train.checkpoint_every=2",
    "train.progress=false", "train.ema_half_life_images=100.0",
    "sample.per_class=50", "sample.num_steps=2", "sample.solver=heun", "sample.grid_columns=4",
    "eval.bpd_images=4", "eval.bpd_rtol=0.01",
]


def _args(run_dir, *extra):
    args = ["--config", CONFIG, "--set", f"run_dir={run_dir}"]
    for o in TINY + list(extra):
        args += ["--set", o]
    return args


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("digits_rf_smoke")
    metrics = exp.main(_args(run_dir, "train.num_steps=4"))
    return run_dir, metrics


def test_smoke_artefacts(smoke_run):
    run_dir, metrics = smoke_run
    for name in ["samples.png", "samples.npz", "metrics.json", "config.json", "metrics.jsonl", "curves.png", "train.log"]:
        assert os.path.isfile(os.path.join(run_dir, name)), name
    assert os.listdir(os.path.join(run_dir, "checkpoints"))
    with np.load(os.path.join(run_dir, "samples.npz")) as z:
        images, labels = z["images"], z["labels"]
    assert images.shape == (500, 8, 8) and labels.shape == (500,)
    assert np.all((images >= 0) & (images <= 16)) and np.all(np.isfinite(images))
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 50))
    with open(os.path.join(run_dir, "metrics.json")) as f:
        m = json.load(f)
    for key in ["classifier_accuracy", "frechet_distance", "frechet_floor_train_vs_test", "final_loss",
                "steps", "wall_time_s", "nfe"]:
        assert key in m, key
    assert m["steps"] == 4 and m["nfe"] == 4 and np.isfinite(m["final_loss"])
    assert m["bpd_kind"] == "pf_ode" and m["bpd_images"] == 4 and 0.0 < m["bits_per_dim"] < 20.0
    assert 0.0 <= m["classifier_accuracy"] <= 1.0 and m["frechet_distance"] > 0
    assert m["classifier_accuracy"] == metrics["classifier_accuracy"]
    with open(os.path.join(run_dir, "config.json")) as f:
        assert json.load(f)["train"]["num_steps"] == 4
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f if line.strip()]
    assert 4 in steps


def _final_params(run_dir, extra):
    """Restores the latest checkpoint of a run into a freshly built template."""
    from research.train.checkpoint import Checkpointer
    from research.train.optim import make_optimizer
    from research.train.state import create_train_state
    from research.nn.dit import init_dit

    cfg = load_config(CONFIG, [f"run_dir={run_dir}", *TINY, *extra])
    model = build_digits_dit(**cfg.model.to_dict())
    params = init_dit(model, jax.random.key(123))
    tc = cfg.train
    opt = make_optimizer(learning_rate=tc.learning_rate, warmup_steps=tc.warmup_steps, total_steps=tc.num_steps,
                         weight_decay=tc.weight_decay, clip_norm=tc.clip_norm)
    template = create_train_state(params, opt, jax.random.key(0), ema=True)
    ck = Checkpointer(os.path.join(run_dir, "checkpoints"), save_every=tc.checkpoint_every)
    try:
        return ck.restore_latest(template)
    finally:
        ck.close()


def test_resume_gives_identical_params(smoke_run, tmp_path):
    full_dir, _ = smoke_run  # 4 steps in one go
    split_dir = tmp_path / "split"
    n = ["train.num_steps=4"]
    # first half: the run stops after step 2 (as if killed), same schedule (num_steps=4)
    out = exp.main(_args(split_dir, *n, "train.stop_at_step=2"))
    assert out == {"stopped_at_step": 2}
    assert not os.path.exists(split_dir / "samples.npz")
    exp.main(_args(split_dir, *n))  # restarts from the checkpoint at step 2
    a, b = _final_params(full_dir, n), _final_params(split_dir, n)
    assert int(a.step) == int(b.step) == 4
    leaves_a = jax.tree.leaves((a.params, a.ema_params, a.opt_state))
    leaves_b = jax.tree.leaves((b.params, b.ema_params, b.opt_state))
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # the params moved away from the initialisation (the comparison is not vacuous)
    assert float(np.abs(np.asarray(a.params["final_layer"]["linear"]["kernel"])).max()) > 0
    with open(split_dir / "metrics.json") as f:
        assert json.load(f)["resumed_from_step"] == 2
    with np.load(full_dir / "samples.npz") as za, np.load(split_dir / "samples.npz") as zb:
        np.testing.assert_array_equal(za["images"], zb["images"])


def test_bad_override_rejected_before_compiling(tmp_path, capsys):
    with pytest.raises(SystemExit):
        exp.main(_args(tmp_path, "train.num_stpes=3"))
    assert "num_steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        exp.main(_args(tmp_path, "sample.solver=midpoint"))
    with pytest.raises(SystemExit):
        exp.main(_args(tmp_path, "sample.sampler=euler_maruyama"))  # needs a score SDE: rejected before training
    with pytest.raises(SystemExit):
        exp.main(_args(tmp_path, "model.hidden_size=18"))
    assert not os.path.exists(tmp_path / "config.json")
