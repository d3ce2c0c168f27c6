"""On-disk dataset loaders: tiny files written in the exact official formats, read back."""
import gzip
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from research.data.datasets import (
    DATASETS,
    FASHION_MNIST_CLASSES,
    DatasetError,
    decode_image,
    list_image_folder,
    load_cifar10,
    load_cifar100,
    load_dataset,
    load_image_folder,
    load_mnist,
    read_idx,
)


# ------------------------------------------------------------------------------------ IDX

def _idx_bytes(arr: np.ndarray, code: int = 0x08, dims=None) -> bytes:
    dims = arr.shape if dims is None else dims
    head = struct.pack(">BBBB", 0, 0, code, len(dims)) + struct.pack(f">{len(dims)}I", *dims)
    return head + arr.tobytes()


def _write(path, data: bytes, gz: bool):
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def _mnist_arrays(n, seed):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, n, dtype=np.uint8))


def _write_mnist(root, prefix, x, y, gz):
    _write(root / f"{prefix}-images-idx3-ubyte", _idx_bytes(x), gz)
    _write(root / f"{prefix}-labels-idx1-ubyte", _idx_bytes(y), gz)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_roundtrip(tmp_path, gz):
    xtr, ytr = _mnist_arrays(5, 0)
    xte, yte = _mnist_arrays(3, 1)
    _write_mnist(tmp_path, "train", xtr, ytr, gz)
    _write_mnist(tmp_path, "t10k", xte, yte, gz)
    x, y = load_mnist(tmp_path, "train")
    assert x.shape == (5, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int32
    np.testing.assert_array_equal(x, xtr)
    np.testing.assert_array_equal(y, ytr)
    x, y = load_mnist(tmp_path, "test")
    np.testing.assert_array_equal(x, xte)
    np.testing.assert_array_equal(y, yte)
    ds = load_dataset("fashion_mnist", tmp_path, "test")
    np.testing.assert_array_equal(ds.images, xte)
    assert ds.class_names == FASHION_MNIST_CLASSES
    assert load_dataset("mnist", tmp_path, "train").class_names[3] == "3"


def test_read_idx_big_endian_dtypes(tmp_path):
    a = (np.arange(-3, 3).reshape(2, 3) * 70000).astype(">i4")  # big-endian bytes
    p = _write(tmp_path / "a.idx", _idx_bytes(a, code=0x0C), gz=False)
    out = read_idx(p)
    assert out.shape == (2, 3)
    np.testing.assert_array_equal(out, np.arange(-3, 3).reshape(2, 3) * 70000)
    f = np.array([1.5, -2.25], dtype=">f4")
    np.testing.assert_array_equal(read_idx(_write(tmp_path / "f.idx", _idx_bytes(f, 0x0D), True)),
                                  [1.5, -2.25])


def test_mnist_missing_file(tmp_path):
    x, y = _mnist_arrays(2, 0)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(x))
    with pytest.raises(FileNotFoundError, match=r"train-labels-idx1-ubyte\(\.gz\): not found; "
                                                r"expected the MNIST"):
        load_mnist(tmp_path, "train")


def test_mnist_swapped_files_bad_magic(tmp_path):
    x, y = _mnist_arrays(2, 0)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(y))  # a labels file
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(y))
    with pytest.raises(DatasetError, match=r"bad IDX magic 0x00000801, expected 0x00000803 "
                                           r"for images"):
        load_mnist(tmp_path, "train")


def test_idx_garbage_magic(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(DatasetError, match=r"bad IDX magic 0x12340801"):
        read_idx(p)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_size_mismatch(tmp_path, gz):
    x, _ = _mnist_arrays(3, 0)
    data = _idx_bytes(x)[:-5]  # truncated payload
    p = _write(tmp_path / "train-images-idx3-ubyte", data, gz)
    with pytest.raises(DatasetError, match=r"size mismatch: header says 3x28x28 x 1 B = 2352 "
                                           r"payload bytes, file has 2347"):
        read_idx(p)


def test_mnist_count_mismatch(tmp_path):
    x, y = _mnist_arrays(3, 0)
    _write_mnist(tmp_path, "train", x, y[:2], gz=False)
    with pytest.raises(DatasetError, match=r"has 3 images but .* has 2 labels"):
        load_mnist(tmp_path, "train")


def test_corrupt_gzip(tmp_path):
    p = tmp_path / "train-images-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(b"\x00" * 100)[:15])
    with pytest.raises(DatasetError, match=r"corrupt gzip"):
        read_idx(p)


# ---------------------------------------------------------------------------------- CIFAR

def _chw_pattern(n, offset):
    """[N, 3, 32, 32] with value = f(n, c, h, w) distinct along every axis (non-symmetric)."""
    n_, c, h, w = np.meshgrid(np.arange(n), np.arange(3), np.arange(32), np.arange(32),
                              indexing="ij")
    return ((offset + 37 * n_ + 80 * c + 7 * h + w) % 256).astype(np.uint8)


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _write_cifar10(root, n_per=3, num_batches=5):
    d = root / "cifar-10-batches-py"
    d.mkdir()
    _dump(d / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)],
                               b"num_cases_per_batch": n_per, b"num_vis": 3072})
    chws, labels = [], []
    for i in range(1, num_batches + 1):
        chw = _chw_pattern(n_per, 10 * i)
        lab = [(i + j) % 10 for j in range(n_per)]
        _dump(d / f"data_batch_{i}", {b"batch_label": f"training batch {i} of 5".encode(),
                                      b"labels": lab, b"data": chw.reshape(n_per, 3072),
                                      b"filenames": [b"x.png"] * n_per})
        chws.append(chw)
        labels += lab
    test = _chw_pattern(2, 200)
    _dump(d / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": [9, 0],
                             b"data": test.reshape(2, 3072), b"filenames": [b"t.png"] * 2})
    return d, np.concatenate(chws), np.array(labels), test


def test_cifar10_roundtrip_and_hwc_transpose(tmp_path):
    d, chw, labels, test = _write_cifar10(tmp_path)
    x, y, names = load_cifar10(tmp_path, "train")
    assert x.shape == (15, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int32
    np.testing.assert_array_equal(x, chw.transpose(0, 2, 3, 1))
    # Spot-check the layout directly: pixel (h=1, w=2) of channel G of image 0 of batch 1.
    assert x[0, 1, 2, 1] == (10 + 80 + 7 + 2) % 256
    np.testing.assert_array_equal(y, labels)  # batches concatenated in order 1..5
    assert names == tuple(f"c{i}" for i in range(10))
    x, y, _ = load_cifar10(d, "test")  # root may be the batches dir itself
    np.testing.assert_array_equal(x, test.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(y, [9, 0])
    assert load_dataset("cifar10", tmp_path, "test").images.shape == (2, 32, 32, 3)


def test_cifar10_missing_key_and_missing_batch(tmp_path):
    d, *_ = _write_cifar10(tmp_path)
    _dump(d / "data_batch_3", {b"data": np.zeros((1, 3072), np.uint8)})
    with pytest.raises(DatasetError, match=r"data_batch_3: missing key b'labels'"):
        load_cifar10(tmp_path, "train")
    (d / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"data_batch_3: not found; expected a CIFAR"):
        load_cifar10(tmp_path, "train")


def test_cifar10_bad_shapes(tmp_path):
    d, *_ = _write_cifar10(tmp_path)
    _dump(d / "test_batch", {b"labels": [1], b"data": np.zeros((1, 3000), np.uint8)})
    with pytest.raises(DatasetError, match=r"test_batch: b'data' has shape \(1, 3000\), "
                                           r"expected \[N, 3072\]"):
        load_cifar10(tmp_path, "test")
    _dump(d / "test_batch", {b"labels": [1, 2], b"data": np.zeros((1, 3072), np.uint8)})
    with pytest.raises(DatasetError, match=r"b'labels' has shape \(2,\), expected \(1,\)"):
        load_cifar10(tmp_path, "test")
    (d / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match=r"test_batch: not a readable pickle"):
        load_cifar10(tmp_path, "test")


def test_cifar10_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py: not found"):
        load_cifar10(tmp_path, "train")


def _write_cifar100(root):
    d = root / "cifar-100-python"
    d.mkdir()
    _dump(d / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                       b"coarse_label_names": [f"k{i}".encode() for i in range(20)]})
    chw = _chw_pattern(4, 3)
    fine, coarse = [99, 5, 42, 0], [19, 1, 7, 0]
    _dump(d / "train", {b"filenames": [b"a"] * 4, b"batch_label": b"training batch 1 of 1",
                        b"fine_labels": fine, b"coarse_labels": coarse,
                        b"data": chw.reshape(4, 3072)})
    return d, chw, fine, coarse


def test_cifar100_fine_and_coarse(tmp_path):
    _, chw, fine, coarse = _write_cifar100(tmp_path)
    x, y, names = load_cifar100(tmp_path, "train", label="fine")
    np.testing.assert_array_equal(x, chw.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(y, fine)
    assert len(names) == 100 and names[42] == "f42"
    x, y, names = load_cifar100(tmp_path, "train", label="coarse")
    np.testing.assert_array_equal(y, coarse)
    assert len(names) == 20 and names[7] == "k7"
    ds = load_dataset("cifar100", tmp_path, "train", label="coarse")
    np.testing.assert_array_equal(ds.labels, coarse)
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python/test: not found"):
        load_cifar100(tmp_path, "test")


def test_cifar100_label_out_of_range(tmp_path):
    d, chw, _, _ = _write_cifar100(tmp_path)
    _dump(d / "train", {b"fine_labels": [100], b"coarse_labels": [0],
                        b"data": chw[:1].reshape(1, 3072)})
    with pytest.raises(DatasetError, match=r"b'fine_labels' values span 100..100, expected 0..99"):
        load_cifar100(tmp_path, "train")


# --------------------------------------------------------------------------- image folder

def _save(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_image_folder_classes_and_exact_crop(tmp_path):
    # 40 wide x 20 tall: shorter side already 20 -> no resize, crop columns 10..29 exactly.
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[..., 0] = np.arange(40)[None, :] * 5        # R encodes the column
    wide[..., 1] = np.arange(20)[:, None] * 11       # G encodes the row
    wide[..., 2] = 7
    _save(tmp_path / "zebra" / "b.png", wide)
    tall = np.ascontiguousarray(wide.transpose(1, 0, 2))  # 20 wide x 40 tall -> rows 10..29
    _save(tmp_path / "zebra" / "a.png", tall)
    gray = np.full((20, 20), 123, np.uint8)             # L-mode -> RGB
    _save(tmp_path / "apple" / "sub" / "g.PNG", gray)   # nested + upper-case extension
    (tmp_path / "apple" / "notes.txt").write_text("ignored")
    (tmp_path / ".hidden").mkdir()
    x, y, names = load_image_folder(tmp_path, 20)
    assert names == ("apple", "zebra")
    np.testing.assert_array_equal(y, [0, 1, 1])
    assert x.shape == (3, 20, 20, 3) and x.dtype == np.uint8
    np.testing.assert_array_equal(x[0], np.full((20, 20, 3), 123))
    np.testing.assert_array_equal(x[1], tall[10:30])   # a.png sorts before b.png
    np.testing.assert_array_equal(x[2], wide[:, 10:30])


def test_decode_image_resize_shorter_side_then_crop(tmp_path):
    # 40x20 (WxH) with column bands green | red | blue at cols 0-9 | 10-29 | 30-39. Resize the
    # shorter side to 10 -> 20x10 (bands 0-4 | 5-14 | 15-19), centre crop cols 5..14 -> all red
    # (the crop boundary columns may blend a little; the interior is exact). A squash (no crop),
    # a left-aligned crop or a crop along the wrong axis would show green/blue.
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :10] = (0, 255, 0)
    img[:, 10:30] = (255, 0, 0)
    img[:, 30:] = (0, 0, 255)
    _save(tmp_path / "w.png", img)
    out = decode_image(tmp_path / "w.png", 10)
    assert out.shape == (10, 10, 3)
    np.testing.assert_array_equal(out[:, 1:9], np.broadcast_to([255, 0, 0], (10, 8, 3)))
    # Tall 20x40 (WxH) image with the bands along rows: the crop is vertical.
    _save(tmp_path / "t.png", np.ascontiguousarray(img.transpose(1, 0, 2)))
    out = decode_image(tmp_path / "t.png", 10)
    assert out.shape == (10, 10, 3)
    np.testing.assert_array_equal(out[1:9], np.broadcast_to([255, 0, 0], (8, 10, 3)))
    # Upscale: a 6x4 image to 8 -> 12x8 -> crop 8x8 from the centre (constant image).
    _save(tmp_path / "s.jpg", np.full((4, 6, 3), 200, np.uint8))
    out = decode_image(tmp_path / "s.jpg", 8)
    assert out.shape == (8, 8, 3)
    assert np.abs(out.astype(int) - 200).max() <= 3  # JPEG is lossy
    assert decode_image(tmp_path / "w.png", None).shape == (20, 40, 3)


def test_image_folder_lazy_and_registry(tmp_path):
    _save(tmp_path / "train" / "b" / "1.jpg", np.full((8, 8, 3), 50, np.uint8))
    _save(tmp_path / "train" / "a" / "1.jpeg", np.full((8, 8, 3), 90, np.uint8))
    paths, labels, names = list_image_folder(tmp_path / "train")
    assert [p.parent.name for p in paths] == ["a", "b"] and list(labels) == [0, 1]
    ds = load_dataset("image_folder", tmp_path, "train", image_size=4)
    assert ds.images.shape == (2, 4, 4, 3) and ds.class_names == ("a", "b")
    with pytest.raises(FileNotFoundError, match=r"val: not found; expected split directory"):
        load_dataset("image_folder", tmp_path, "val", image_size=4)
    with pytest.raises(DatasetError, match=r"class directory a contains no images with "
                                           r"extensions \.jpg"):  # only b has a .jpg
        load_image_folder(tmp_path / "train", 4, extensions=["jpg"])


def test_image_folder_errors(tmp_path):
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "x.txt").write_text("hi")
    with pytest.raises(DatasetError, match=r"no images with extensions \.png, \.jpg, \.jpeg "
                                           r"under .*"):
        load_image_folder(tmp_path, 8)
    (tmp_path / "cls" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"bad\.png: cannot decode image"):
        load_image_folder(tmp_path, 8)
    with pytest.raises(FileNotFoundError, match=r"nope: not found; expected an image-folder"):
        load_image_folder(tmp_path / "nope", 8)


def test_registry_unknown_name():
    assert set(DATASETS) == {"mnist", "fashion_mnist", "cifar10", "cifar100", "image_folder"}
    with pytest.raises(ValueError, match=r"unknown dataset 'svhn'"):
        load_dataset("svhn", "/nonexistent", "train")
