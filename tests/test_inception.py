"""The Flax FID InceptionV3 against pytorch-fid's network itself, with random weights (nothing is
downloaded: pytorch-fid's ``load_state_dict_from_url`` is monkeypatched), plus the resize, the
weight files and the ``eval_fid.py`` CLI. One network compile for the module: every JAX call
uses batch 2 through ``inception_apply`` (resize compiled separately)."""
import json
import os
import struct

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402

from research.eval import inception as inc  # noqa: E402
from research.eval import fid as fidlib  # noqa: E402

BATCH = 2


@pytest.fixture(scope="module")
def torch_fid_net(tmp_path_factory):
    """pytorch-fid's InceptionV3 (block 3 = pool3) with random weights and BN running statistics
    calibrated on random images (so activations have realistic scale), the wrapped torchvision
    Inception3 (it holds ``fc``), and its state dict saved as a ``.pth``."""
    torch.manual_seed(0)
    random_sd = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None,
                                                init_weights=False).state_dict()
    captured = []
    orig_build = pytorch_fid_inception.fid_inception_v3
    mp = pytest.MonkeyPatch()
    mp.setattr(pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: random_sd)
    mp.setattr(pytorch_fid_inception, "fid_inception_v3",
               lambda: captured.append(orig_build()) or captured[-1])
    try:
        net = pytorch_fid_inception.InceptionV3([3])
    finally:
        mp.undo()
    inception3 = captured[0]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in inception3.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.2, generator=g)
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration pass
        net.train()
        net(torch.rand(6, 3, 80, 80, generator=g))
        inception3.fc.bias.normal_(0.0, 0.5, generator=g)
    net.eval()
    inception3.eval()
    path = tmp_path_factory.mktemp("w") / "random_fid_inception.pth"
    torch.save(inception3.state_dict(), path)
    return net, inception3, path


@pytest.fixture(scope="module")
def jax_vars(torch_fid_net):
    return inc.load_pytorch_fid_weights(torch_fid_net[2])


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).random((BATCH, 64, 64, 3), dtype=np.float32)


@pytest.fixture(scope="module")
def jax_out(jax_vars, images):
    return {k: np.asarray(v) for k, v in inc.inception_apply(jax_vars, images).items()}


@pytest.mark.parametrize("in_hw", [(64, 64), (28, 28), (512, 400), (299, 299), (17, 1200)])
def test_resize_matches_torch_interpolate(in_hw):
    x = np.random.default_rng(1).random((1, *in_hw, 3), dtype=np.float32)
    ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear",
                        align_corners=False).permute(0, 2, 3, 1).numpy()
    ours = np.asarray(inc.resize_bilinear(x, (299, 299)))
    assert np.abs(ours - ref).max() <= 4e-7  # the two-pass sum order: ~2 ulp of values in [0, 1]
    import jax
    noaa = np.asarray(jax.image.resize(x, (1, 299, 299, 3), "bilinear", antialias=False))
    assert np.abs(noaa - ref).max() <= 4e-7
    if in_hw[0] > 299 or in_hw[1] > 299:  # why not plain jax.image.resize: it antialiases downsizing
        aa = np.asarray(jax.image.resize(x, (1, 299, 299, 3), "bilinear"))
        assert np.abs(aa - ref).max() > 0.05


def test_resize_matrix_is_torch_weights_exactly():
    for n in (28, 64, 512, 1000):  # torch's 1-D weights read off identity inputs
        eye = torch.eye(n).reshape(n, 1, 1, n)
        t = F.interpolate(eye, size=(1, 299), mode="bilinear", align_corners=False).reshape(n, 299).T.numpy()
        np.testing.assert_array_equal(inc.resize_matrix(n, 299), t)


def _torch_outputs(net, inception3, images, dtype):
    with torch.no_grad():
        pool3 = net(torch.from_numpy(images).to(dtype).permute(0, 3, 1, 2))[0].flatten(1)
        return {"pool3": pool3.numpy(), "logits": inception3.fc(pool3).numpy(),
                "logits_unbiased": (pool3 @ inception3.fc.weight.T).numpy()}


def test_matches_pytorch_fid(torch_fid_net, jax_out, images):
    import copy

    net, inception3, _ = torch_fid_net
    ref32 = _torch_outputs(net, inception3, images, torch.float32)
    net64, inc64 = copy.deepcopy((net, inception3))  # (deep-copied together: they share modules)
    ref64 = _torch_outputs(net64.double(), inc64.double(), images, torch.float64)
    for k, r in ref32.items():
        scale = np.abs(r).max()
        assert scale > 0.1 and np.isfinite(jax_out[k]).all(), (k, scale)
        # The tolerance is float32 round-off, measured: this random network amplifies it (torch's
        # own float32 result is ~1.5e-4 * scale from its float64 result). Ours must be as close to
        # the float64 answer as torch's float32 one (measured: a bit closer), and within 1e-4 *
        # scale of torch float32 (measured 3.5e-5). Layout / padding / pooling / BN mistakes give
        # O(1) relative errors.
        torch_err = np.abs(r - ref64[k]).max()
        ours_err = np.abs(jax_out[k] - ref64[k]).max()
        assert ours_err <= 1.5 * torch_err + 1e-6 * scale, (k, ours_err, torch_err, scale)
        assert np.abs(jax_out[k] - r).max() <= 1e-4 * scale, (k, np.abs(jax_out[k] - r).max(), scale)
    assert np.std(ref32["pool3"]) > 0.01  # features not degenerate


def test_output_shapes(jax_out):
    assert jax_out["pool3"].shape == (BATCH, 2048) and jax_out["pool3"].dtype == np.float32
    assert jax_out["logits"].shape == jax_out["logits_unbiased"].shape == (BATCH, 1008)
    assert (jax_out["pool3"] >= 0).all()  # mean of ReLU outputs


def test_npz_round_trip_and_state_dict_inverse(torch_fid_net, jax_vars, tmp_path):
    out = inc.convert_weights(torch_fid_net[2], tmp_path / "w.npz")
    back = inc.load_weights(out)
    same = [np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(_leaves(jax_vars), _leaves(back), strict=True)]
    assert all(same) and len(same) > 300
    sd = torch.load(torch_fid_net[2], weights_only=True)
    mine = inc.variables_to_state_dict(jax_vars)
    assert set(mine) == {k for k in sd if not k.endswith("num_batches_tracked")}
    assert all(np.array_equal(mine[k], sd[k].numpy()) for k in mine)


def _leaves(tree):
    import jax
    return jax.tree_util.tree_leaves(tree)


def test_weight_file_errors(tmp_path, torch_fid_net):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth.*releases/download/fid_weights"):
        inc.load_pytorch_fid_weights(missing)
    with pytest.raises(inc.InceptionWeightsNotFound):
        inc.load_weights(tmp_path / "nope.npz")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(inc.InceptionWeightsError, match="bad.pth"):
        inc.load_weights(bad)
    sd = torch.load(torch_fid_net[2], weights_only=True)
    del sd["Mixed_6c.branch7x7dbl_3.bn.running_var"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="Mixed_6c.branch7x7dbl_3.bn.running_var"):
        inc.load_weights(tmp_path / "partial.pth")
    sd = {k: v.numpy() for k, v in torch.load(torch_fid_net[2], weights_only=True).items()}
    sd["fc.weight"] = sd["fc.weight"][:10]
    np.savez(tmp_path / "shape.npz", **sd)
    with pytest.raises(ValueError, match="'fc.weight' has shape"):
        inc.load_weights(tmp_path / "shape.npz")


# ------------------------------------------------------------------------------------------------
# the CLI (same network compile: batch 2)
# ------------------------------------------------------------------------------------------------

def _write_mnist(root, images):
    root.mkdir(parents=True, exist_ok=True)
    n = len(images)
    (root / "train-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
    (root / "train-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n) + bytes(n))


def test_cli_stats_fid_convert(tmp_path, torch_fid_net, jax_vars, capsys):
    from experiments import eval_fid

    rng = np.random.default_rng(2)
    data = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)  # batches of 2 + 1 (padded)
    _write_mnist(tmp_path / "mnist", data)
    npz = tmp_path / "w.npz"
    eval_fid.main(["convert", "--pth", str(torch_fid_net[2]), "--out", str(npz)])
    stats = tmp_path / "ref.npz"
    eval_fid.main(["stats", "--dataset", "mnist", "--root", str(tmp_path / "mnist"), "--weights", str(npz),
                   "--out", str(stats), "--batch-size", str(BATCH)])
    mu, sigma = fidlib.load_statistics(stats)
    direct = fidlib.image_statistics(data, jax_vars, batch_size=BATCH)  # grey uint8 -> RGB [0, 1]
    np.testing.assert_allclose(mu, direct.mu, rtol=1e-12, atol=1e-12)
    assert sigma.shape == (2048, 2048)

    from research.eval.fid_sampling import write_shard
    samples = tmp_path / "samples"
    write_shard(samples, 0, np.repeat(data[:1, :, :, None], 3, axis=-1))  # re-batched 1 + 2 -> 2 + 1
    write_shard(samples, 1, np.repeat(data[1:, :, :, None], 3, axis=-1))
    capsys.readouterr()
    eval_fid.main(["fid", "--samples", str(samples), "--ref", str(stats), "--weights", str(npz),
                   "--batch-size", str(BATCH), "--splits", "1"])
    res = json.loads(capsys.readouterr().out)
    # same images as the reference: FID 0 up to the round-off of a rank-2 2048x2048 covariance
    # (sqrt of ~2046 round-off eigenvalues; measured ~2e-6 * trace)
    assert res["num_images"] == 3 and abs(res["fid"]) < 2e-5 * np.trace(sigma)
    assert res["inception_score"] >= 1.0

    with pytest.raises(SystemExit) as e:
        eval_fid.main(["fid", "--samples", str(samples), "--ref", str(stats), "--weights",
                       str(tmp_path / "missing.pth")])
    err = capsys.readouterr().err.strip()
    assert e.value.code != 0 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "missing.pth" in err and "releases/download/fid_weights" in err
    assert os.path.exists(stats)
