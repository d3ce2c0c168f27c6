"""Entry smoke test: experiments/train_digits_ldm.py (latent diffusion) on a tiny VAE run trained through
experiments/train_digits_vae.py's run() in a module fixture: artefacts, metrics keys, the latent
normalisation, bit-identical resume, bad input."""
import json
import os

import jax
import numpy as np
import pytest

from experiments import train_digits_ldm as exp
from research.nn.dit import init_dit
from research.runs.config import load_config
from tests.test_entry_ar import assert_same_state, check_samples, restore_latest

pytestmark = pytest.mark.entry

CONFIG = "experiments/configs/digits_ldm.py"
VAE_TINY = ["model.features=(8, 8)", "model.latent_channels=2", "train.num_steps=2", "train.batch_size=16",
            "train.warmup_steps=1", "train.checkpoint_every=2", "train.log_every=1", "train.progress=false",
            "train.ema_half_life_images=100.0", "sample.per_class=2", "sample.grid_columns=2", "eval.bound_samples=2"]
TINY = [
    "model.hidden_size=16", "model.depth=1", "model.num_heads=2", "model.mlp_ratio=2.0",
    "train.batch_size=16", "train.warmup_steps=1", "train.log_every=2", "train.checkpoint_every=2",
    "train.progress=false", "train.ema_half_life_images=100.0",
    "sample.per_class=5", "sample.num_steps=2", "sample.grid_columns=4",
]
KEYS = ["classifier_accuracy", "frechet_distance", "frechet_floor_train_vs_test", "bits_per_dim", "bpd_kind", "nfe",
        "num_params", "train_time_s", "sample_time_s", "steps", "final_loss"]


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    from experiments import train_digits_vae

    run_dir = tmp_path_factory.mktemp("vae_ldm_tiny")
    train_digits_vae.run(load_config("experiments/configs/digits_vae.py:ldm", [f"run_dir={run_dir}", *VAE_TINY]))
    return run_dir


def _args(run_dir, vae_dir, *extra):
    args = ["--config", CONFIG, "--set", f"run_dir={run_dir}", "--set", f"data.vae_run={vae_dir}"]
    for o in TINY + list(extra):
        args += ["--set", o]
    return args


@pytest.fixture(scope="module")
def smoke_run(vae_run, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("digits_ldm_smoke")
    return run_dir, exp.main(_args(run_dir, vae_run, "train.num_steps=4"))


def test_smoke_artefacts_and_metrics(smoke_run, vae_run):
    from experiments.train_digits_vae import load_vae_run

    run_dir, metrics = smoke_run
    check_samples(run_dir, 5)
    assert os.path.isfile(os.path.join(run_dir, "latent_stats.json"))
    with open(os.path.join(run_dir, "metrics.json")) as f:
        m = json.load(f)
    for key in KEYS:
        assert key in m, key
    vae = load_vae_run(str(vae_run))
    assert m["steps"] == 4 and m["bits_per_dim"] is None and m["bpd_kind"] == "none"
    # heun over 2 steps: 4 DiT evaluations (as in test_entry_digits_rf), + 1 decoder call
    assert m["sampler_nfe"] == 4 and m["nfe"] == 5
    assert m["num_params"] == m["dit_num_params"] + vae.num_decoder_params
    assert m["latent_shape"] == [4, 4, 2] == list(vae.latent_shape)
    assert 0.0 <= m["classifier_accuracy"] <= 1.0 and m["classifier_accuracy"] == metrics["classifier_accuracy"]
    # the stored normalisation is the one of the VAE's train-split posterior means
    with open(os.path.join(run_dir, "latent_stats.json")) as f:
        stats = json.load(f)
    from research.data.digits import load_digits

    z = np.asarray(vae.encode(load_digits("train")[0]), np.float64)
    np.testing.assert_allclose(stats["shift"], z.mean(), rtol=1e-5)
    np.testing.assert_allclose(stats["scale"], 1.0 / z.std(), rtol=1e-5)
    assert stats["scale"] == m["latent_scale"]


@pytest.mark.parametrize("shift", [True, False])
def test_latent_normaliser(shift):
    z = np.random.default_rng(0).normal(3.0, 0.2, (50, 4, 4, 2))
    mu, scale = exp.latent_normaliser(z, shift=shift)
    zn = (z - mu) * scale
    np.testing.assert_allclose(np.sqrt(np.mean(zn ** 2)), 1.0, rtol=1e-12)  # unit second moment
    if shift:
        np.testing.assert_allclose(zn.mean(), 0.0, atol=1e-12)
        np.testing.assert_allclose(scale, 1 / z.std(), rtol=1e-12)
    else:
        assert mu == 0.0 and abs(zn.mean()) > 0.9  # scaled only: the mean stays (SD 1.x's scaling factor)
    assert exp.latent_normaliser(z, shift=shift, scale_factor=0.5)[1] == 0.5
    with pytest.raises(ValueError, match="constant"):
        exp.latent_normaliser(np.ones((4, 2)), shift=True)
    with pytest.raises(ValueError, match="finite"):
        exp.latent_normaliser(np.array([0.0, np.nan]), shift=True)


def _restore(run_dir, vae_dir, extra):
    cfg = load_config(CONFIG, [f"run_dir={run_dir}", f"data.vae_run={vae_dir}", *TINY, *extra])
    params = init_dit(exp.build_latent_dit(cfg.model.to_dict(), (4, 4, 2)), jax.random.key(123))
    return restore_latest(run_dir, params, cfg.train)


def test_resume_gives_identical_params(smoke_run, vae_run, tmp_path):
    full_dir, _ = smoke_run
    split_dir = tmp_path / "split"
    n = ["train.num_steps=4"]
    assert exp.main(_args(split_dir, vae_run, *n, "train.stop_at_step=2")) == {"stopped_at_step": 2}
    assert not os.path.exists(split_dir / "samples.npz")
    exp.main(_args(split_dir, vae_run, *n))
    a, b = _restore(full_dir, vae_run, n), _restore(split_dir, vae_run, n)
    assert int(a.step) == 4
    assert_same_state(a, b)
    assert float(np.abs(np.asarray(a.params["final_layer"]["linear"]["kernel"])).max()) > 0  # adaLN-Zero moved
    with np.load(full_dir / "samples.npz") as za, np.load(split_dir / "samples.npz") as zb:
        np.testing.assert_array_equal(za["images"], zb["images"])


def test_bad_input_rejected(tmp_path, capsys, vae_run):
    with pytest.raises(SystemExit):
        exp.main(_args(tmp_path, tmp_path / "missing"))
    assert "data.vae_run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        exp.main(_args(tmp_path, vae_run, "model.patch_size=3"))  # 8 % 3 (config) and 4 % 3 (latent grid)
    with pytest.raises(SystemExit):
        exp.main(_args(tmp_path, vae_run, "latent.scale_factor=-1.0"))
    assert "latent.scale_factor" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "config.json")
    with pytest.raises(ValueError, match="square"):
        exp.build_latent_dit(load_config(CONFIG, TINY).model.to_dict(), (4, 2, 2))
    with pytest.raises(ValueError, match="patch_size=2 must divide"):
        exp.build_latent_dit({**load_config(CONFIG, TINY).model.to_dict(), "patch_size": 2}, (3, 3, 2))
