"""Entry smoke test: experiments/train_digits_ar.py on tiny sizes: pixels (artefacts, metrics keys,
bit-identical resume, bad input) and the VQ-prior source (VQGAN's two-stage recipe) on a tiny VQ-VAE
trained through experiments/train_digits_vq.py's run() in a module fixture."""
import json
import os

import jax
import numpy as np
import pytest

from experiments import train_digits_ar as exp
from experiments.common import make_state
from research.ar import TokenGrid
from research.lm import init_params
from research.runs.config import load_config

pytestmark = pytest.mark.entry

CONFIG = "experiments/configs/digits_ar.py"
TINY = [
    "model.dim=16", "model.depth=1", "model.num_heads=2", "model.num_kv_heads=2",
    "train.batch_size=16", "train.warmup_steps=1", "train.log_every=2", "train.checkpoint_every=2",
    "train.progress=false", "train.ema_half_life_images=100.0",
    "sample.per_class=5", "sample.grid_columns=4", "sample.extra_temperatures=()",
]
KEYS = ["classifier_accuracy", "frechet_distance", "frechet_floor_train_vs_test", "bits_per_dim", "bpd_kind", "nfe",
        "num_params", "train_time_s", "sample_time_s", "steps", "final_loss"]


def _args(run_dir, *extra, config=CONFIG):
    args = ["--config", config, "--set", f"run_dir={run_dir}"]
    for o in TINY + list(extra):
        args += ["--set", o]
    return args


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("digits_ar_smoke")
    return run_dir, exp.main(_args(run_dir, "train.num_steps=4", "sample.extra_temperatures=(0.5,)"))


def _read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.json")) as f:
        return json.load(f)


def check_samples(run_dir, per_class):
    """The artefacts of a finished digits run and its samples.npz images (shared with test_entry_ldm.py)."""
    for name in ["samples.png", "samples.npz", "metrics.json", "config.json", "metrics.jsonl", "curves.png",
                 "train.log"]:
        assert os.path.isfile(os.path.join(run_dir, name)), name
    assert os.listdir(os.path.join(run_dir, "checkpoints"))
    with np.load(os.path.join(run_dir, "samples.npz")) as z:
        images, labels = z["images"], z["labels"]
    assert images.shape == (10 * per_class, 8, 8) and labels.shape == (10 * per_class,)
    assert np.all((images >= 0) & (images <= 16)) and np.all(np.isfinite(images))
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, per_class))
    return images


def test_smoke_artefacts_and_metrics(smoke_run):
    run_dir, metrics = smoke_run
    images = check_samples(run_dir, 5)
    np.testing.assert_array_equal(images, np.rint(images))  # pixel tokens: exactly the 17 levels
    m = _read_metrics(run_dir)
    for key in KEYS:
        assert key in m, key
    assert m["steps"] == 4 and m["nfe"] == 64 and m["bpd_kind"] == "exact" and np.isfinite(m["final_loss"])
    # an almost untrained model: near the uniform 17-level model's log2(17) = 4.09 bits/dim, and a true NLL >= 0
    assert 2.0 < m["bits_per_dim"] < 5.0 and m["prior_nll_bits_per_code"] is None
    assert m["num_params"] == m["prior_num_params"] > 0
    assert 0.0 <= m["classifier_accuracy"] <= 1.0 and m["frechet_distance"] > 0
    assert set(m["by_temperature"]) == {"1.0", "0.5"} and 0.0 <= m["train_copy_fraction"] <= 1.0
    assert m["by_temperature"]["1.0"]["classifier_accuracy"] == m["classifier_accuracy"]
    assert m["classifier_accuracy"] == metrics["classifier_accuracy"]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        assert 4 in [json.loads(line)["step"] for line in f if line.strip()]


def restore_latest(run_dir, params, tc):
    """The latest checkpoint of a run, restored into a template built from ``params`` and the train block ``tc``
    (shared with test_entry_ldm.py)."""
    from research.train.checkpoint import Checkpointer

    _, _, template = make_state(params, jax.random.key(0), learning_rate=tc.learning_rate,
                                warmup_steps=tc.warmup_steps, total_steps=tc.num_steps, weight_decay=tc.weight_decay,
                                clip_norm=tc.clip_norm, ema_half_life_images=tc.ema_half_life_images,
                                batch_size=tc.batch_size)
    ck = Checkpointer(os.path.join(run_dir, "checkpoints"), save_every=tc.checkpoint_every)
    try:
        return ck.restore_latest(template)
    finally:
        ck.close()


def assert_same_state(a, b):
    """Bitwise-equal step, params, EMA params and optimiser state (shared with test_entry_ldm.py)."""
    assert int(a.step) == int(b.step)
    leaves_a = jax.tree.leaves((a.params, a.ema_params, a.opt_state))
    leaves_b = jax.tree.leaves((b.params, b.ema_params, b.opt_state))
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _restore(run_dir, extra, config=CONFIG, grid=TokenGrid(8, 8, 17, 10)):
    cfg = load_config(config, [f"run_dir={run_dir}", *TINY, *extra])
    return restore_latest(run_dir, init_params(exp.build_lm_config(grid, cfg.model), jax.random.key(123)), cfg.train)


def test_resume_gives_identical_params(smoke_run, tmp_path):
    full_dir, _ = smoke_run
    split_dir = tmp_path / "split"
    n = ["train.num_steps=4"]
    assert exp.main(_args(split_dir, *n, "train.stop_at_step=2")) == {"stopped_at_step": 2}
    assert not os.path.exists(split_dir / "samples.npz")
    exp.main(_args(split_dir, *n))  # restarts from the checkpoint at step 2
    a, b = _restore(full_dir, n), _restore(split_dir, n)
    assert int(a.step) == 4
    assert_same_state(a, b)
    # the params moved (the EMA, started at the init, lags behind them): the comparison is not vacuous
    assert any(np.any(np.asarray(p) != np.asarray(e)) for p, e in zip(jax.tree.leaves(a.params),
                                                                       jax.tree.leaves(a.ema_params)))
    assert _read_metrics(split_dir)["resumed_from_step"] == 2
    with np.load(full_dir / "samples.npz") as za, np.load(split_dir / "samples.npz") as zb:
        np.testing.assert_array_equal(za["images"], zb["images"])


def test_token_conversion_roundtrip_and_rejects_off_grid():
    from research.data.digits import load_digits

    x, _ = load_digits("test")
    t = exp.images_to_tokens(x)
    assert t.dtype == np.int32 and t.min() >= 0 and t.max() <= 16
    np.testing.assert_array_equal(exp.tokens_to_images(t), x)
    with pytest.raises(ValueError, match="17-level grid"):
        exp.images_to_tokens(x + 0.03)
    with pytest.raises(ValueError, match=r"\[N, 8, 8, 1\]"):
        exp.images_to_tokens(x[..., 0])
    # memorisation check: rows 0 and 2 are training grids, row 1 differs from every one in one token
    train = t[:5]
    drawn = train[[3, 0, 1]].copy()
    drawn[1, 7, 7] = (drawn[1, 7, 7] + 1) % 17
    assert exp.copy_fraction(drawn, train) == pytest.approx(2 / 3)


def test_bad_config_rejected_before_training(tmp_path, capsys):
    for bad, word in [("train.num_stpes=3", "num_steps"), ("data.source=codes", "data.source"),
                      ("model.num_heads=3", "model.dim"), ("sample.temperature=-1.0", "sample.temperature"),
                      ("sample.extra_temperatures=(-0.5,)", "extra_temperatures")]:
        with pytest.raises(SystemExit):
            exp.main(_args(tmp_path, bad))
        assert word in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a VQ prior without a VQ run: one clear line, nothing trained
        exp.main(_args(tmp_path, "data.source=vq", f"data.vq_run={tmp_path / 'missing'}"))
    assert "data.vq_run" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "config.json")


VQ_TINY = ["model.features=(8, 8)", "model.code_dim=4", "model.num_codes=8", "train.num_steps=2",
           "train.batch_size=16", "train.warmup_steps=1", "train.checkpoint_every=2", "train.log_every=1",
           "train.progress=false", "sample.per_class=2"]
VQ_CONFIG = CONFIG + ":vq"


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory):
    from experiments import train_digits_vq

    run_dir = tmp_path_factory.mktemp("vq_tiny")
    train_digits_vq.run(load_config("experiments/configs/digits_vq.py", [f"run_dir={run_dir}", *VQ_TINY]))
    return run_dir


def test_vq_prior_smoke_and_resume(vq_run, tmp_path):
    from experiments.train_digits_vq import load_vq_run

    h = load_vq_run(str(vq_run))
    assert tuple(h.code_shape) == (4, 4) and h.num_codes == 8
    n = ["train.num_steps=4", f"data.vq_run={vq_run}"]
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    metrics = exp.main(_args(full_dir, *n, config=VQ_CONFIG))
    assert load_config(VQ_CONFIG).name == "digits_vq_ar"
    check_samples(full_dir, 5)
    m = _read_metrics(full_dir)
    for key in KEYS + ["prior_nll_bits_per_code"]:
        assert key in m, key
    assert m["source"] == "vq" and m["bits_per_dim"] is None and m["bpd_kind"] == "none"
    assert m["nfe"] == 4 * 4 + 1  # 16 cached AR steps + 1 decoder call
    assert 0.0 < m["prior_nll_bits_per_code"] < 2 * np.log2(8)  # near the uniform prior's log2(8) = 3 bits
    assert m["num_params"] == m["prior_num_params"] + h.num_decoder_params
    assert m["classifier_accuracy"] == metrics["classifier_accuracy"] and m["code_shape"] == [4, 4]
    # the decoded samples are the VQ decoder's images of codes (not pixel levels): off the 17-level grid
    with np.load(full_dir / "samples.npz") as z:
        assert np.any(z["images"] != np.rint(z["images"]))
    # interrupted at step 2 and resumed: bit-identical to the uninterrupted run
    assert exp.main(_args(split_dir, *n, "train.stop_at_step=2", config=VQ_CONFIG)) == {"stopped_at_step": 2}
    exp.main(_args(split_dir, *n, config=VQ_CONFIG))
    grid = TokenGrid(4, 4, 8, 10)
    assert_same_state(_restore(full_dir, n, VQ_CONFIG, grid), _restore(split_dir, n, VQ_CONFIG, grid))
    with np.load(full_dir / "samples.npz") as za, np.load(split_dir / "samples.npz") as zb:
        np.testing.assert_array_equal(za["images"], zb["images"])
