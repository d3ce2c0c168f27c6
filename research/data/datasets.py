"""Loaders for standard on-disk dataset formats, from LOCAL paths only (nothing downloads).

Pure NumPy (+ Pillow for image folders). Every loader returns uint8 NHWC-ish images exactly as
stored (no normalisation; convert with e.g. ``x / 127.5 - 1`` downstream) and int32 labels.

Formats:

* MNIST / Fashion-MNIST (and any IDX dataset with the same file names, e.g. KMNIST): the four
  IDX files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte``, each optionally gzipped (``.gz``), directly under ``root`` (or
  under ``root/raw``, the torchvision layout). :func:`load_mnist` -> ``(images [N,28,28] uint8,
  labels [N] int32)``; :func:`read_idx` reads any IDX file.
* CIFAR-10 / CIFAR-100 "python version" pickles (``cifar-10-batches-py/data_batch_1..5``,
  ``test_batch``, ``batches.meta``; ``cifar-100-python/train``, ``test``, ``meta``).
  :func:`load_cifar10` / :func:`load_cifar100` -> ``(images [N,32,32,3] uint8, labels [N]
  int32, class_names)``. The stored rows are 3072 bytes = 3 x 32 x 32 channel-major (1024 R,
  then 1024 G, then 1024 B, each row-major), transposed here to HWC.
* An image folder ``root/<class_name>/**/*.png|jpg|jpeg`` (ImageNet-subset style): classes are
  the sub-directories sorted by name -> label 0..C-1. :func:`load_image_folder` decodes
  everything eagerly (RGB, shorter side resized to ``image_size`` then centre-cropped);
  :func:`list_image_folder` + :func:`decode_image` are the lazy pieces.

A missing or malformed file raises one :class:`DatasetError` (a ``ValueError``) or
``FileNotFoundError`` whose message names the path and what was expected.

:data:`DATASETS` maps a config string to a loader; :func:`load_dataset` returns a uniform
:class:`LoadedDataset` ``(images, labels, class_names)``.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
import zlib
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

__all__ = [
    "CIFAR10_DIRNAME", "CIFAR100_DIRNAME", "DATASETS", "DatasetError", "FASHION_MNIST_CLASSES",
    "IMAGE_EXTENSIONS", "LoadedDataset", "MNIST_CLASSES", "decode_image", "list_image_folder",
    "load_cifar10", "load_cifar100", "load_dataset", "load_image_folder", "load_mnist",
    "read_idx",
]


class DatasetError(ValueError):
    """A dataset file is present but malformed (wrong magic, size, keys, ...)."""


class LoadedDataset(NamedTuple):
    images: np.ndarray  # uint8; [N, 28, 28] for MNIST, [N, H, W, 3] otherwise
    labels: np.ndarray  # int32 [N]
    class_names: tuple[str, ...]


# --------------------------------------------------------------------------------------------
# IDX (MNIST / Fashion-MNIST)
# --------------------------------------------------------------------------------------------

# IDX type code (third magic byte) -> big-endian NumPy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}
IDX_IMAGES_MAGIC = 0x00000803  # uint8, 3 dims
IDX_LABELS_MAGIC = 0x00000801  # uint8, 1 dim
MNIST_CLASSES = tuple(str(i) for i in range(10))
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_MNIST_PREFIX = {"train": "train", "test": "t10k"}
_MNIST_HINT = ("expected the MNIST/Fashion-MNIST IDX files (train-images-idx3-ubyte, "
               "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, "
               "optionally .gz) from yann.lecun.com / github.com/zalandoresearch/fashion-mnist")


def _read_bytes(path: Path) -> bytes:
    """Whole file, transparently gunzipped when it starts with the gzip magic."""
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DatasetError(f"{path}: corrupt gzip data ({e})") from None
    return data


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzipped or not) into an array of its stored dtype (native order).

    Header: 2 zero bytes, a type code byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), an ndim byte, then ``ndim`` big-endian uint32 dims; the
    payload is ``prod(dims)`` big-endian items. The payload size must match exactly.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; expected an IDX file")
    data = _read_bytes(path)
    if len(data) < 4:
        raise DatasetError(f"{path}: {len(data)} bytes, too short for an IDX header (4+ bytes)")
    zero, code, ndim = data[0:2], data[2], data[3]
    magic = struct.unpack(">I", data[:4])[0]
    if zero != b"\x00\x00" or code not in _IDX_DTYPES:
        raise DatasetError(f"{path}: bad IDX magic 0x{magic:08X}, expected 0x0000TTDD with type "
                           f"code TT in {{08,09,0B,0C,0D,0E}} and DD = ndim")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DatasetError(f"{path}: truncated IDX header: ndim={ndim} needs {header_len} bytes, "
                           f"file has {len(data)}")
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(data) - header_len
    if got != expected:
        shape = "x".join(str(d) for d in dims) or "scalar"
        raise DatasetError(f"{path}: size mismatch: header says {shape} x {dtype.itemsize} B = "
                           f"{expected} payload bytes, file has {got}")
    arr = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))


def _find_idx(root: Path, name: str) -> Path:
    for d in (root, root / "raw"):
        for cand in (d / name, d / f"{name}.gz"):
            if cand.is_file():
                return cand
    raise FileNotFoundError(f"{root / name}(.gz): not found; {_MNIST_HINT}")


def _read_idx_checked(path: Path, magic: int, what: str) -> np.ndarray:
    arr = read_idx(path)
    got = (0x08 if arr.dtype == np.uint8 else -1, arr.ndim)
    if got != (magic >> 8 & 0xFF, magic & 0xFF):
        raw = _read_bytes(path)[:4]
        raise DatasetError(f"{path}: bad IDX magic 0x{struct.unpack('>I', raw)[0]:08X}, "
                           f"expected 0x{magic:08X} for {what}")
    return arr


def load_mnist(root: str | os.PathLike, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """MNIST-format IDX pair under ``root`` -> ``(uint8 [N, 28, 28], int32 [N])``.

    Serves MNIST, Fashion-MNIST, KMNIST (same file names). ``split``: ``"train"`` or ``"test"``
    (``t10k-*``). Files may be gzipped; ``root/raw`` (torchvision layout) is also searched.
    """
    if split not in _MNIST_PREFIX:
        raise ValueError(f"split must be one of {sorted(_MNIST_PREFIX)}, got {split!r}")
    root = Path(root)
    prefix = _MNIST_PREFIX[split]
    img_path = _find_idx(root, f"{prefix}-images-idx3-ubyte")
    lab_path = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
    images = _read_idx_checked(img_path, IDX_IMAGES_MAGIC, "images")
    labels = _read_idx_checked(lab_path, IDX_LABELS_MAGIC, "labels")
    if images.shape[1:] != (28, 28):
        raise DatasetError(f"{img_path}: images are {images.shape[1]}x{images.shape[2]}, "
                           f"expected 28x28")
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(f"{img_path} has {images.shape[0]} images but {lab_path} has "
                           f"{labels.shape[0]} labels; expected equal counts")
    return images, labels.astype(np.int32)


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (python pickles)
# --------------------------------------------------------------------------------------------

CIFAR10_DIRNAME = "cifar-10-batches-py"
CIFAR100_DIRNAME = "cifar-100-python"
_CIFAR_HINT = "from https://www.cs.toronto.edu/~kriz/cifar.html (python version)"


def _cifar_dir(root: Path, dirname: str, probe: str) -> Path:
    """``root/dirname`` if it exists, else ``root`` itself if it holds ``probe``."""
    if (root / dirname).is_dir():
        return root / dirname
    if (root / probe).is_file():
        return root
    raise FileNotFoundError(f"{root / dirname}: not found; expected the extracted {dirname} "
                            f"directory (containing {probe}) {_CIFAR_HINT}")


def _load_pickle(path: Path, keys: Sequence[bytes]) -> dict:
    """Unpickle a CIFAR file (``encoding="bytes"``; keys stay ``bytes``) and check ``keys``.

    SECURITY: unpickling runs code chosen by the file's author; load only trusted local files.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; expected a CIFAR python pickle {_CIFAR_HINT}")
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a malformed file
        raise DatasetError(f"{path}: not a readable pickle ({type(e).__name__}: {e}); "
                           f"expected a CIFAR python batch") from None
    if not isinstance(d, dict):
        raise DatasetError(f"{path}: pickle holds a {type(d).__name__}, expected a dict")
    for k in keys:
        if k not in d:
            have = sorted(map(repr, d))
            raise DatasetError(f"{path}: missing key {k!r} (has {', '.join(have)})")
    return d


def _cifar_images(path: Path, data) -> np.ndarray:
    arr = np.asarray(data)
    if arr.ndim != 2 or arr.shape[1] != 3072:
        raise DatasetError(f"{path}: b'data' has shape {arr.shape}, expected [N, 3072] "
                           f"(3x32x32 channel-major rows)")
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise DatasetError(f"{path}: b'data' has values outside 0..255 (dtype {arr.dtype})")
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _cifar_labels(path: Path, labels, key: bytes, n: int, num_classes: int) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.shape != (n,):
        raise DatasetError(f"{path}: {key!r} has shape {lab.shape}, expected ({n},) to match "
                           f"b'data'")
    if n and (lab.min() < 0 or lab.max() >= num_classes):
        raise DatasetError(f"{path}: {key!r} values span {lab.min()}..{lab.max()}, expected "
                           f"0..{num_classes - 1}")
    return lab.astype(np.int32)


def _names(path: Path, meta: dict, key: bytes, num: int) -> tuple[str, ...]:
    names = tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in meta[key])
    if len(names) != num:
        raise DatasetError(f"{path}: {key!r} has {len(names)} names, expected {num}")
    return names


def load_cifar10(root: str | os.PathLike, split: str = "train"
                 ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """CIFAR-10 python batches -> ``(uint8 [N, 32, 32, 3], int32 [N], 10 class names)``.

    ``root`` is the directory containing ``cifar-10-batches-py/`` (or that directory itself).
    ``split="train"`` concatenates ``data_batch_1..5`` in order; ``"test"`` is ``test_batch``.
    Files are read with ``pickle.load(f, encoding="bytes")`` as the official format requires.
    SECURITY: unpickling executes code from the file; only load trusted local files.
    """
    files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    if split not in files:
        raise ValueError(f"split must be one of {sorted(files)}, got {split!r}")
    d = _cifar_dir(Path(root), CIFAR10_DIRNAME, "batches.meta")
    meta_path = d / "batches.meta"
    names = _names(meta_path, _load_pickle(meta_path, [b"label_names"]), b"label_names", 10)
    xs, ys = [], []
    for name in files[split]:
        p = d / name
        b = _load_pickle(p, [b"data", b"labels"])
        x = _cifar_images(p, b[b"data"])
        xs.append(x)
        ys.append(_cifar_labels(p, b[b"labels"], b"labels", len(x), 10))
    return np.concatenate(xs), np.concatenate(ys), names


def load_cifar100(root: str | os.PathLike, split: str = "train", label: str = "fine"
                  ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """CIFAR-100 python files -> ``(uint8 [N, 32, 32, 3], int32 [N], class names)``.

    ``root`` contains ``cifar-100-python/`` (or is it). ``split``: ``"train"``/``"test"``;
    ``label``: ``"fine"`` (100 classes, ``fine_labels``) or ``"coarse"`` (20 superclasses,
    ``coarse_labels``). Names come from ``meta`` (``fine_label_names``/``coarse_label_names``).
    SECURITY: unpickling executes code from the file; only load trusted local files.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be one of ['test', 'train'], got {split!r}")
    if label not in ("fine", "coarse"):
        raise ValueError(f"label must be 'fine' or 'coarse', got {label!r}")
    num = 100 if label == "fine" else 20
    lkey, nkey = f"{label}_labels".encode(), f"{label}_label_names".encode()
    d = _cifar_dir(Path(root), CIFAR100_DIRNAME, "meta")
    meta_path = d / "meta"
    names = _names(meta_path, _load_pickle(meta_path, [nkey]), nkey, num)
    p = d / split
    b = _load_pickle(p, [b"data", lkey])
    x = _cifar_images(p, b[b"data"])
    return x, _cifar_labels(p, b[lkey], lkey, len(x), num), names


# --------------------------------------------------------------------------------------------
# Image folder (root/class_name/*.png|jpg|jpeg)
# --------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def list_image_folder(root: str | os.PathLike, *, extensions: Sequence[str] = IMAGE_EXTENSIONS
                      ) -> tuple[list[Path], np.ndarray, tuple[str, ...]]:
    """Lazy index of ``root/<class>/**/<file>``: ``(paths, int32 labels, class_names)``.

    Classes are the non-hidden sub-directories of ``root`` sorted by name (label = position);
    files are matched by extension case-insensitively (searched recursively within each class,
    hidden entries skipped) and sorted by relative path. Decode with :func:`decode_image`.
    """
    root = Path(root)
    exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not found; expected an image-folder root "
                                f"(root/<class_name>/*{'|*'.join(exts)})")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(f"{root}: no class sub-directories; expected root/<class_name>/"
                           f"*{'|*'.join(exts)}")
    paths: list[Path] = []
    labels: list[int] = []
    empty = []
    for idx, c in enumerate(classes):
        files = sorted(
            p for p in (root / c).rglob("*")
            if p.suffix.lower() in exts and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(root).parts))
        if not files:
            empty.append(c)
        paths += files
        labels += [idx] * len(files)
    if not paths:
        raise DatasetError(f"no images with extensions {', '.join(exts)} under {root}")
    if empty:
        one = len(empty) == 1
        raise DatasetError(f"{root}: class director{'y' if one else 'ies'} {', '.join(empty)} "
                           f"contain{'s' if one else ''} no images with extensions "
                           f"{', '.join(exts)}")
    return paths, np.asarray(labels, np.int32), tuple(classes)


def decode_image(path: str | os.PathLike, image_size: int | None) -> np.ndarray:
    """Decode one image to RGB uint8 ``[S, S, 3]``: resize the shorter side to ``image_size``
    (bilinear, antialiased; aspect ratio kept, longer side rounded) then centre-crop
    ``image_size x image_size`` (offset ``(long - S) // 2``). ``image_size=None`` keeps the
    original size ``[H, W, 3]``.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if image_size is not None:
                s = int(image_size)
                if s <= 0:
                    raise ValueError(f"image_size must be positive, got {image_size}")
                w, h = im.size
                if min(w, h) != s:
                    if w <= h:
                        nw, nh = s, max(s, int(round(h * s / w)))
                    else:
                        nw, nh = max(s, int(round(w * s / h))), s
                    im = im.resize((nw, nh), Image.BILINEAR)
                w, h = im.size
                left, top = (w - s) // 2, (h - s) // 2
                im = im.crop((left, top, left + s, top + s))
            return np.asarray(im, np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        if isinstance(e, FileNotFoundError):
            raise FileNotFoundError(f"{path}: not found; expected an image file") from None
        raise DatasetError(f"{path}: cannot decode image ({type(e).__name__}: {e}); expected a "
                           f"PNG/JPEG readable by Pillow") from None


def load_image_folder(root: str | os.PathLike, image_size: int, *,
                      extensions: Sequence[str] = IMAGE_EXTENSIONS
                      ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Eagerly decode an image folder -> ``(uint8 [N, S, S, 3], int32 [N], class_names)``.

    See :func:`list_image_folder` for the layout/ordering and :func:`decode_image` for the
    resize + centre-crop.
    """
    paths, labels, classes = list_image_folder(root, extensions=extensions)
    images = np.stack([decode_image(p, image_size) for p in paths])
    return images, labels, classes


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

def _mnist_entry(class_names: tuple[str, ...]) -> Callable[..., LoadedDataset]:
    def load(root, split="train"):
        x, y = load_mnist(root, split)
        return LoadedDataset(x, y, class_names)
    return load


def _image_folder_entry(root, split=None, *, image_size, extensions=IMAGE_EXTENSIONS):
    """``split=None`` reads ``root`` itself; otherwise ``root/split`` (e.g. train/, val/)."""
    root = Path(root)
    if split is not None:
        if not (root / split).is_dir():
            raise FileNotFoundError(f"{root / split}: not found; expected split directory "
                                    f"root/{split}/<class_name>/... (or pass split=None)")
        root = root / split
    return LoadedDataset(*load_image_folder(root, image_size, extensions=extensions))


DATASETS: dict[str, Callable[..., LoadedDataset]] = {
    "mnist": _mnist_entry(MNIST_CLASSES),
    "fashion_mnist": _mnist_entry(FASHION_MNIST_CLASSES),
    "cifar10": lambda root, split="train": LoadedDataset(*load_cifar10(root, split)),
    "cifar100": lambda root, split="train", label="fine": LoadedDataset(
        *load_cifar100(root, split, label)),
    "image_folder": _image_folder_entry,
}


def load_dataset(name: str, root: str | os.PathLike, split: str | None = "train", **kw
                 ) -> LoadedDataset:
    """Load registered dataset ``name`` from local ``root`` -> ``LoadedDataset``.

    ``kw`` goes to the loader (``label=`` for cifar100; ``image_size=``, ``extensions=`` for
    image_folder, where ``split=None`` means ``root`` itself).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[name](root, split, **kw)
