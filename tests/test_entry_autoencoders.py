"""Entry smoke tests: experiments/train_digits_vae.py (CVAE family row and the unconditional ldm
preset) and experiments/train_digits_vq.py on tiny sizes: artefacts, metrics keys, the
load_*_run handles (shapes, ranges, round trip, bad input), and that an interrupted run resumes
to a bit-identical train state (every checkpointed array, the VQ codebook's EMA state included)."""
import json
import os

import numpy as np
import pytest

from experiments import train_digits_vae as vae_exp
from experiments import train_digits_vq as vq_exp
from research.data.digits import load_digits

pytestmark = pytest.mark.entry

VAE_CONFIG = "experiments/configs/digits_vae.py"
VQ_CONFIG = "experiments/configs/digits_vq.py"
COMMON = ["train.batch_size=16", "train.warmup_steps=1", "train.log_every=2", "train.checkpoint_every=2",
          "train.progress=false", "sample.per_class=3", "sample.grid_columns=3", "train.num_steps=4"]
VAE_TINY = COMMON + ["model.features=(8, 8, 8)", "model.latent_channels=2", "train.ema_half_life_images=100.0",
                     "eval.bound_samples=2"]
VQ_TINY = COMMON + ["model.features=(8, 8)", "model.code_dim=4", "model.num_codes=16"]
FAMILY_KEYS = ["classifier_accuracy", "frechet_distance", "frechet_floor_train_vs_test", "bits_per_dim", "bpd_kind",
               "nfe", "num_params", "train_time_s", "sample_time_s", "steps", "final_loss"]


def _args(config, run_dir, tiny, *extra):
    args = ["--config", config, "--set", f"run_dir={run_dir}"]
    for o in tiny + list(extra):
        args += ["--set", o]
    return args


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.json")) as f:
        return json.load(f)


def _digest(run_dir, step):
    with open(os.path.join(run_dir, "checkpoints", str(step), "digest.json")) as f:
        return json.load(f)["arrays"]


def _check_resume(main, config, tiny, full_dir, split_dir):
    """A run stopped after step 2 and resumed ends with every checkpointed array bitwise equal to
    the uninterrupted run's at step 4."""
    assert main(_args(config, split_dir, tiny, "train.stop_at_step=2")) == {"stopped_at_step": 2}
    assert not os.path.exists(split_dir / "metrics.json")
    main(_args(config, split_dir, tiny))
    full, split = _digest(full_dir, 4), _digest(split_dir, 4)
    assert full == split and len(full) > 10
    assert full != _digest(split_dir, 2)  # training moved the state (the comparison is not vacuous)
    assert _metrics(split_dir)["resumed_from_step"] == 2
    with open(full_dir / "final_params.msgpack", "rb") as a, open(split_dir / "final_params.msgpack", "rb") as b:
        assert a.read() == b.read()
    return full


@pytest.fixture(scope="module")
def test_images():
    x, y = load_digits("test")
    return x[:20], y[:20]


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("digits_vae_smoke")
    return run_dir, vae_exp.main(_args(VAE_CONFIG, run_dir, VAE_TINY))


def test_vae_smoke_artefacts_and_metrics(vae_run):
    run_dir, metrics = vae_run
    for name in ["samples.png", "samples.npz", "reconstructions.png", "metrics.json", "config.json", "metrics.jsonl",
                 "curves.png", "train.log", "final_params.msgpack", "autoencoder.json"]:
        assert os.path.isfile(run_dir / name), name
    m = _metrics(run_dir)
    for key in FAMILY_KEYS + ["bits_per_dim_iwae", "bits_per_dim_elbo_given_label", "recon_classifier_accuracy"]:
        assert key in m, key
    assert m["bpd_kind"] == "elbo" and m["nfe"] == 1 and m["steps"] == 4 and m["conditional"] is True
    assert 0 < m["bits_per_dim_iwae"] and np.isfinite(m["bits_per_dim"]) and 0 <= m["classifier_accuracy"] <= 1
    assert m["num_params"] < m["num_params_total"] and m["classifier_accuracy"] == metrics["classifier_accuracy"]
    with np.load(run_dir / "samples.npz") as z:
        assert z["images"].shape == (30, 8, 8) and np.all((z["images"] >= 0) & (z["images"] <= 16))
        np.testing.assert_array_equal(np.bincount(z["labels"], minlength=10), np.full(10, 3))


def test_vae_handle_round_trip(vae_run, test_images):
    run_dir, metrics = vae_run
    x, y = test_images
    h = vae_exp.load_vae_run(str(run_dir))
    assert h.latent_shape == (2, 2, 2) and h.conditional and h.num_params == metrics["num_params_total"]
    assert h.num_decoder_params == metrics["num_params"] and len(h.latent_std) == 2
    z = h.encode(x, y)
    assert z.shape == (20, 2, 2, 2) and z.dtype == np.float32
    out = np.asarray(h.decode(z, y))
    assert out.shape == (20, 8, 8, 1) and out.min() >= -1 and out.max() <= 1
    with pytest.raises(ValueError, match="class-conditional"):
        h.encode(x)
    with pytest.raises(ValueError, match=r"outside \[0, 9\]"):
        h.decode(z, np.full(20, 10))
    with pytest.raises(ValueError, match=r"\[N, 2, 2, 2\]"):
        h.decode(np.zeros((3, 4, 4, 2), np.float32), y[:3])
    with pytest.raises(ValueError, match=r"\[N, 8, 8, 1\]"):
        h.encode(x[..., 0], y)
    with pytest.raises(FileNotFoundError):
        vae_exp.load_vae_run(str(run_dir / "nope"))


def test_vae_resume_is_bit_identical(vae_run, tmp_path):
    _check_resume(vae_exp.main, VAE_CONFIG, VAE_TINY, vae_run[0], tmp_path / "split")


def test_vae_ldm_preset_unconditional(tmp_path, test_images):
    run_dir = tmp_path / "ldm"
    args = _args(VAE_CONFIG + ":ldm", run_dir, VAE_TINY, "train.num_steps=2")
    m = vae_exp.main(args)
    assert m["conditional"] is False and m["classifier_accuracy"] is None and m["bpd_kind"] == "elbo"
    assert "bits_per_dim_elbo_given_label" not in m and sum(m["predicted_class_histogram"]) == 30
    h = vae_exp.load_vae_run(str(run_dir))
    x, _ = test_images
    z = h.encode(x)
    assert z.shape == (20, *h.latent_shape) == (20, 2, 2, 2)
    assert np.asarray(h.decode(z)).shape == (20, 8, 8, 1)
    with pytest.raises(ValueError, match="unconditional"):
        h.decode(z, np.zeros(20, np.int32))
    with pytest.raises(ValueError, match="holds a 'vae'"):
        vq_exp.load_vq_run(str(run_dir))


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("digits_vq_smoke")
    return run_dir, vq_exp.main(_args(VQ_CONFIG, run_dir, VQ_TINY))


def test_vq_smoke_and_handle(vq_run, test_images):
    run_dir, metrics = vq_run
    for name in ["reconstructions.png", "metrics.json", "final_params.msgpack", "autoencoder.json", "curves.png"]:
        assert os.path.isfile(run_dir / name), name
    m = _metrics(run_dir)
    for key in ["recon_mse", "recon_classifier_accuracy", "recon_frechet_distance", "train_perplexity",
                "test_perplexity", "train_utilisation", "test_utilisation", "num_params", "final_loss", "steps"]:
        assert key in m, key
    assert 1 <= m["test_perplexity"] <= 16 and 0 < m["train_utilisation"] <= 1 and m["bpd_kind"] == "none"
    assert sum(m["train_code_counts"]) == len(load_digits("train")[1]) * 16
    h = vq_exp.load_vq_run(str(run_dir))
    assert h.num_codes == 16 and h.code_shape == (4, 4) and h.num_params == m["num_params"]
    x, _ = test_images
    codes = h.encode(x)
    assert codes.shape == (20, 4, 4) and codes.dtype == np.int32
    out = np.asarray(h.decode(codes))
    assert out.shape == (20, 8, 8, 1) and out.min() >= -1 and out.max() <= 1
    np.testing.assert_array_equal(np.asarray(h.encode(h.decode(codes))).shape, codes.shape)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        h.decode(np.full((2, 4, 4), 16))
    with pytest.raises(TypeError, match="integers"):
        h.decode(np.zeros((2, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"\[N, 4, 4\]"):
        h.decode(np.zeros((2, 2, 2), np.int32))


def test_vq_resume_is_bit_identical(vq_run, tmp_path):
    arrays = _check_resume(vq_exp.main, VQ_CONFIG, VQ_TINY, vq_run[0], tmp_path / "split")
    assert any("model_state" in k and "codebook" in k for k in arrays)  # the EMA codebook is checkpointed


def test_bad_overrides_rejected_before_training(tmp_path, capsys):
    for config, bad, word in [(VAE_CONFIG, "model.features=(8, 8, 8, 8, 8)", "features"),
                              (VAE_CONFIG, "sample.decode=mode", "sample.decode"),
                              (VQ_CONFIG, "train.ema_half_life_images=10.0", "ema_half_life_images"),
                              (VQ_CONFIG, "model.num_codes=1", "num_codes")]:
        with pytest.raises(SystemExit):
            (vae_exp if config == VAE_CONFIG else vq_exp).main(_args(config, tmp_path, [bad]))
        assert word in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "config.json")
