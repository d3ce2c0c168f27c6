"""Entry smoke test: the digits GAN script on tiny sizes for both losses, its artefacts and metrics,
and an interrupted WGAN-GP run (stopped inside an n_critic cycle) resuming bit-identically."""
import json
import os

import jax
import numpy as np
import pytest

from experiments import train_digits_gan as exp
from research.runs.config import load_config

pytestmark = pytest.mark.entry

CONFIG = "experiments/configs/digits_gan.py"
TINY = [
    "model.g_hidden=(16,)", "model.d_hidden=(16,)", "model.embed_dim=4", "gan.latent_dim=8",
    "train.batch_size=16", "train.log_every=2", "train.checkpoint_every=100", "train.progress=false",
    "train.ema_half_life_images=100.0", "sample.per_class=20", "sample.grid_columns=4",
]
STEPS = {"ns": 4, "wgan_gp": 7}  # wgan_gp: n_critic=5, so 7 steps = 1 generator update + 2 critic steps


def _args(preset, run_dir, *extra):
    args = ["--config", f"{CONFIG}:{preset}", "--set", f"run_dir={run_dir}"]
    for o in TINY + list(extra):
        args += ["--set", o]
    return args


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    out = {}
    for preset, n in STEPS.items():
        run_dir = tmp_path_factory.mktemp(f"gan_{preset}")
        out[preset] = (run_dir, exp.main(_args(preset, run_dir, f"train.num_steps={n}")))
    return out


@pytest.mark.parametrize("preset", sorted(STEPS))
def test_smoke_artefacts_and_metrics(smoke_runs, preset):
    run_dir, metrics = smoke_runs[preset]
    for name in ["samples.png", "samples.npz", "metrics.json", "config.json", "metrics.jsonl", "curves.png",
                 "train.log"]:
        assert os.path.isfile(os.path.join(run_dir, name)), name
    assert os.listdir(os.path.join(run_dir, "checkpoints"))
    with np.load(os.path.join(run_dir, "samples.npz")) as z:
        images, labels = z["images"], z["labels"]
    assert images.shape == (200, 8, 8) and labels.shape == (200,)
    assert np.all((images >= 0) & (images <= 16)) and np.all(np.isfinite(images))
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 20))
    with open(os.path.join(run_dir, "metrics.json")) as f:
        m = json.load(f)
    for key in ["classifier_accuracy", "frechet_distance", "frechet_floor_train_vs_test", "bits_per_dim", "bpd_kind",
                "nfe", "num_params", "critic_num_params", "train_time_s", "sample_time_s", "steps", "final_loss"]:
        assert key in m, key
    assert m["bits_per_dim"] is None and m["bpd_kind"] == "none" and m["nfe"] == 1
    assert m["steps"] == STEPS[preset] and m["gan_loss"] == preset and np.isfinite(m["final_loss"])
    n_critic = 5 if preset == "wgan_gp" else 1
    assert m["n_critic"] == n_critic and m["generator_steps"] == STEPS[preset] // n_critic
    # generator only: latent 8 + embedding 4 -> 16 -> 64, plus the 10 x 4 embedding table
    assert m["num_params"] == 12 * 16 + 16 + 16 * 64 + 64 + 40
    assert m["critic_num_params"] == 64 * 16 + 16 + 16 + 1 + 10 * 16
    assert 0.0 <= m["classifier_accuracy"] <= 1.0 and m["frechet_distance"] > 0
    assert m["classifier_accuracy"] == metrics["classifier_accuracy"]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    d_name = "critic" if preset == "wgan_gp" else "discriminator"
    assert records[-1]["step"] == STEPS[preset] and f"{d_name}/loss" in records[-1]
    assert "generator/loss" in records[-1]


def _final_state(run_dir, n):
    """Restores the latest checkpoint of a wgan_gp run into a template built from other keys."""
    from research.train.checkpoint import Checkpointer

    cfg = load_config(f"{CONFIG}:wgan_gp", [f"run_dir={run_dir}", *TINY, f"train.num_steps={n}"])
    template = exp.build_gan(cfg, jax.random.key(123), jax.random.key(7))["state"]
    ck = Checkpointer(os.path.join(run_dir, "checkpoints"), save_every=cfg.train.checkpoint_every)
    try:
        return ck.restore_latest(template)
    finally:
        ck.close()


def test_interrupted_wgan_gp_run_resumes_bit_identically(smoke_runs, tmp_path):
    full_dir, _ = smoke_runs["wgan_gp"]
    n = STEPS["wgan_gp"]
    split_dir = tmp_path / "split"
    # stopped after step 3, inside the first n_critic cycle (the generator has not been updated yet)
    out = exp.main(_args("wgan_gp", split_dir, f"train.num_steps={n}", "train.stop_at_step=3"))
    assert out == {"stopped_at_step": 3}
    assert not os.path.exists(split_dir / "samples.npz")
    exp.main(_args("wgan_gp", split_dir, f"train.num_steps={n}"))
    a, b = _final_state(full_dir, n), _final_state(split_dir, n)
    assert int(a.step) == int(b.step) == n
    assert int(b.models["generator"].step) == 1 and int(b.models["critic"].step) == n
    leaves_a, leaves_b = jax.tree.leaves(a.models), jax.tree.leaves(b.models)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):  # same program on the same inputs: bitwise
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    np.testing.assert_array_equal(jax.random.key_data(a.key), jax.random.key_data(b.key))
    with open(split_dir / "metrics.json") as f:
        assert json.load(f)["resumed_from_step"] == 3
    with np.load(full_dir / "samples.npz") as za, np.load(split_dir / "samples.npz") as zb:
        np.testing.assert_array_equal(za["images"], zb["images"])


@pytest.mark.parametrize("override, needle", [
    ("gan.loss=hinge", "gan.loss"),
    ("gan.n_critic=0", "gan.n_critic"),
    ("model.g_hidden=(0,)", "model.g_hidden"),
    ("gan.r1_gamma=1.0", "r1_gamma"),  # wgan_gp preset: R1 is for the logit loss
    ("train.b2=1.0", "train.b2"),
    ("train.num_stpes=3", "num_steps"),
])
def test_bad_config_rejected_before_compiling(tmp_path, capsys, override, needle):
    with pytest.raises(SystemExit):
        exp.main(_args("wgan_gp", tmp_path, override))
    assert needle in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "config.json")
