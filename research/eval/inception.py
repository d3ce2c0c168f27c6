"""The FID InceptionV3 (pytorch-fid's ``InceptionV3(use_fid_inception=True)``) in Flax, NHWC.

Architecture: torchvision's ``inception_v3`` with 1008 classes and no aux head, with pytorch-fid's
TF-compatible patches: ``Mixed_5b..5d`` (A), ``Mixed_6b..6e`` (C) and ``Mixed_7b`` (E_1) average-pool
without counting the padding, ``Mixed_7c`` (E_2) max-pools in its pool branch. Every conv is
conv (no bias) -> BatchNorm (eval mode, eps 1e-3) -> ReLU. Input: float images in [0, 1], resized
to 299x299 with PyTorch's ``F.interpolate(mode='bilinear', align_corners=False)`` (reproduced
exactly by :func:`resize_bilinear`; no antialiasing) and mapped to [-1, 1].

Outputs of :class:`FIDInceptionV3`: ``pool3`` [N, 2048] (the FID features), ``logits`` [N, 1008]
(``fc``, with bias) and ``logits_unbiased`` [N, 1008] (``pool3 @ W`` without the bias: what the
original TF Inception Score code uses, ``softmax/logits/MatMul``).

Weights: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (a state dict in torchvision
naming) or an ``.npz`` with the same keys and layouts (:func:`convert_weights`), so the JAX path
needs torch only to read a ``.pth``. Nothing is downloaded here.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

__all__ = [
    "FID_WEIGHTS_URL", "INCEPTION_SIZE", "FIDInceptionV3", "InceptionWeightsError",
    "InceptionWeightsNotFound", "convert_weights", "inception_apply", "init_variables",
    "load_pytorch_fid_weights", "load_weights", "resize_bilinear", "resize_matrix",
    "state_dict_to_variables", "variables_to_state_dict",
]

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
INCEPTION_SIZE = 299
NUM_CLASSES = 1008
BN_EPS = 1e-3


class InceptionWeightsNotFound(FileNotFoundError):
    """The Inception weights file does not exist."""


class InceptionWeightsError(ValueError):
    """The Inception weights file is unreadable or lacks / misshapes a parameter."""


# ------------------------------------------------------------------------------------------------
# resize (exact PyTorch bilinear, align_corners=False)
# ------------------------------------------------------------------------------------------------

def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] float32 matrix of ``F.interpolate(mode='bilinear', align_corners=False)``
    along one axis, reproducing PyTorch's CPU weights bit for bit: float32 ``scale = in/out``,
    source ``s = scale * (o + 0.5) - 0.5`` rounded once to float32 (torch's compiled kernel fuses
    the multiply-add), clamped at 0; weights ``1 - l`` and ``l = s - floor(s)`` on ``floor(s)`` and
    ``min(floor(s) + 1, in - 1)``. (Rounding ``s`` twice, or keeping it in float64, moves outputs
    by up to a few float32 ulps of ``s``: ~1e-6 for 64-pixel inputs, ~2e-5 for 512.)"""
    f32 = np.float32
    scale = np.float64(f32(f32(in_size) / f32(out_size)))
    src = f32(scale * (np.arange(out_size) + 0.5) - 0.5)
    src = np.where(src < 0, f32(0), src).astype(f32)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = np.clip(src - i0.astype(f32), f32(0), f32(1)).astype(f32)
    m = np.zeros((out_size, in_size), f32)
    np.add.at(m, (np.arange(out_size), i0), f32(1) - lam)
    np.add.at(m, (np.arange(out_size), i1), lam)
    return m


def resize_bilinear(x, size: tuple[int, int], precision=jax.lax.Precision.HIGHEST):
    """NHWC bilinear resize matching PyTorch ``align_corners=False`` (separable matrix products).

    ``jax.image.resize(..., 'bilinear')`` agrees when upsampling but antialiases when downsampling
    (PyTorch does not); with ``antialias=False`` it agrees to ~1 ulp as well.
    """
    h, w = x.shape[1], x.shape[2]
    if (h, w) != tuple(size):
        mh = jnp.asarray(resize_matrix(h, size[0]), x.dtype)
        mw = jnp.asarray(resize_matrix(w, size[1]), x.dtype)
        x = jnp.einsum("oh,nhwc->nowc", mh, x, precision=precision)
        x = jnp.einsum("pw,nowc->nopc", mw, x, precision=precision)
    return x


# ------------------------------------------------------------------------------------------------
# network
# ------------------------------------------------------------------------------------------------

def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv(nn.Module):
    """conv (no bias) -> BatchNorm (running stats, eps 1e-3) -> ReLU. ``padding`` as in torch."""
    features: int
    kernel: Any
    stride: int = 1
    padding: Any = 0
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        ph, pw = _pair(self.padding)
        x = nn.Conv(self.features, _pair(self.kernel), strides=_pair(self.stride),
                    padding=((ph, ph), (pw, pw)), use_bias=False, precision=self.precision,
                    name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
        return nn.relu(x)


def _avg3(x):  # TF-style: padding not counted
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max3_s2(x):
    return nn.max_pool(x, (3, 3), (2, 2), "VALID")


class InceptionA(nn.Module):
    pool_features: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        c = lambda f, k, p=0, name=None: BasicConv(f, k, 1, p, self.precision, name=name)  # noqa: E731
        b1 = c(64, 1, name="branch1x1")(x)
        b5 = c(64, 5, 2, name="branch5x5_2")(c(48, 1, name="branch5x5_1")(x))
        b3 = c(64, 1, name="branch3x3dbl_1")(x)
        b3 = c(96, 3, 1, name="branch3x3dbl_3")(c(96, 3, 1, name="branch3x3dbl_2")(b3))
        bp = c(self.pool_features, 1, name="branch_pool")(_avg3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        p = self.precision
        b3 = BasicConv(384, 3, 2, 0, p, name="branch3x3")(x)
        bd = BasicConv(64, 1, 1, 0, p, name="branch3x3dbl_1")(x)
        bd = BasicConv(96, 3, 1, 1, p, name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, 3, 2, 0, p, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        c7, p = self.channels_7x7, self.precision
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding)
        b1 = BasicConv(192, 1, 1, 0, p, name="branch1x1")(x)
        b7 = BasicConv(c7, 1, 1, 0, p, name="branch7x7_1")(x)
        b7 = BasicConv(c7, row[0], 1, row[1], p, name="branch7x7_2")(b7)
        b7 = BasicConv(192, col[0], 1, col[1], p, name="branch7x7_3")(b7)
        bd = BasicConv(c7, 1, 1, 0, p, name="branch7x7dbl_1")(x)
        for i, (f, (k, pad)) in enumerate([(c7, col), (c7, row), (c7, col), (192, row)], start=2):
            bd = BasicConv(f, k, 1, pad, p, name=f"branch7x7dbl_{i}")(bd)
        bp = BasicConv(192, 1, 1, 0, p, name="branch_pool")(_avg3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        p = self.precision
        b3 = BasicConv(192, 1, 1, 0, p, name="branch3x3_1")(x)
        b3 = BasicConv(320, 3, 2, 0, p, name="branch3x3_2")(b3)
        b7 = BasicConv(192, 1, 1, 0, p, name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), 1, (0, 3), p, name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), 1, (3, 0), p, name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, 3, 2, 0, p, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """``pool="avg"``: FIDInceptionE_1 (avg-pool, padding not counted); ``"max"``: FIDInceptionE_2."""
    pool: str = "avg"
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        p = self.precision
        b1 = BasicConv(320, 1, 1, 0, p, name="branch1x1")(x)
        b3 = BasicConv(384, 1, 1, 0, p, name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv(384, (1, 3), 1, (0, 1), p, name="branch3x3_2a")(b3),
                              BasicConv(384, (3, 1), 1, (1, 0), p, name="branch3x3_2b")(b3)], -1)
        bd = BasicConv(448, 1, 1, 0, p, name="branch3x3dbl_1")(x)
        bd = BasicConv(384, 3, 1, 1, p, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv(384, (1, 3), 1, (0, 1), p, name="branch3x3dbl_3a")(bd),
                              BasicConv(384, (3, 1), 1, (1, 0), p, name="branch3x3dbl_3b")(bd)], -1)
        if self.pool == "avg":
            pooled = _avg3(x)
        elif self.pool == "max":
            pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))  # pads with -inf, as torch
        else:
            raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")
        bp = BasicConv(192, 1, 1, 0, p, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FC(nn.Module):
    """``fc`` (2048 -> 1008): returns ``(x @ W + b, x @ W)``."""
    features: int = NUM_CLASSES
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        unbiased = jnp.dot(x, kernel, precision=self.precision)
        return unbiased + bias, unbiased


class FIDInceptionV3(nn.Module):
    """pytorch-fid's FID InceptionV3. ``images``: [N, H, W, 3] float in [0, 1] (any H, W; resized
    to 299 unless ``resize_input=False``). Returns ``{"pool3", "logits", "logits_unbiased"}``.

    ``precision`` is used by every conv / matmul: HIGHEST (the default) keeps float32 products on
    GPU/TPU (no TF32 / bf16 passes), which FID numbers are sensitive to.
    """
    resize_input: bool = True
    normalize_input: bool = True
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, images):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images [N, H, W, 3], got shape {images.shape}")
        x = images.astype(jnp.float32)
        if self.resize_input:
            x = resize_bilinear(x, (INCEPTION_SIZE, INCEPTION_SIZE), self.precision)
        if self.normalize_input:
            x = 2.0 * x - 1.0
        p = self.precision
        x = BasicConv(32, 3, 2, 0, p, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, 3, 1, 0, p, name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, 3, 1, 1, p, name="Conv2d_2b_3x3")(x)
        x = _max3_s2(x)
        x = BasicConv(80, 1, 1, 0, p, name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, 3, 1, 0, p, name="Conv2d_4a_3x3")(x)
        x = _max3_s2(x)
        for name, pf in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = InceptionA(pf, p, name=name)(x)
        x = InceptionB(p, name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(c7, p, name=name)(x)
        x = InceptionD(p, name="Mixed_7a")(x)
        x = InceptionE("avg", p, name="Mixed_7b")(x)
        x = InceptionE("max", p, name="Mixed_7c")(x)
        pool3 = jnp.mean(x, axis=(1, 2))
        logits, unbiased = FC(NUM_CLASSES, p, name="fc")(pool3)
        return {"pool3": pool3, "logits": logits, "logits_unbiased": unbiased}


def init_variables(key) -> dict:
    """Random variables ``{"params", "batch_stats"}`` (Flax init; BN stats mean 0, var 1). For tests
    and shape checks only: it compiles the whole network (about a minute on a small CPU)."""
    init = jax.jit(lambda k: FIDInceptionV3(resize_input=False).init(k, jnp.zeros((1, 75, 75, 3))))
    return dict(init(key))


@jax.jit
def _prepare(images):
    return resize_bilinear(images.astype(jnp.float32), (INCEPTION_SIZE, INCEPTION_SIZE))


@functools.partial(jax.jit, static_argnames=("precision",))
def _network(variables, x299, precision):
    return FIDInceptionV3(resize_input=False, precision=precision).apply(variables, x299)


def inception_apply(variables, images, *, precision=jax.lax.Precision.HIGHEST) -> dict:
    """Jitted ``FIDInceptionV3().apply``: ``images`` [N, H, W, 3] float in [0, 1] -> ``{"pool3",
    "logits", "logits_unbiased"}``. The resize is compiled separately from the 299x299 network,
    so every input size and dataset shares one (expensive) network compile per batch size."""
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images [N, H, W, 3], got shape {images.shape}")
    return _network(variables, _prepare(images), precision)


# ------------------------------------------------------------------------------------------------
# weights: torchvision state dict <-> Flax variables
# ------------------------------------------------------------------------------------------------

# (Flax collection, leaf name) -> (torch leaf name, numpy transform torch -> flax)
_LEAVES = {
    ("params", "kernel", 4): ("weight", lambda a: a.transpose(2, 3, 1, 0)),  # OIHW -> HWIO
    ("params", "kernel", 2): ("weight", lambda a: a.T),                      # [out, in] -> [in, out]
    ("params", "scale", 1): ("weight", lambda a: a),
    ("params", "bias", 1): ("bias", lambda a: a),
    ("batch_stats", "mean", 1): ("running_mean", lambda a: a),
    ("batch_stats", "var", 1): ("running_var", lambda a: a),
}
_TO_TORCH = {"kernel4": lambda a: a.transpose(3, 2, 0, 1), "kernel2": lambda a: a.T}


def _template():
    return jax.eval_shape(lambda: FIDInceptionV3().init(jax.random.key(0), jnp.zeros((1, 75, 75, 3))))


def _torch_key(collection, path, ndim):
    names = [p.key for p in path]
    rule = _LEAVES.get((collection, names[-1], ndim))
    if rule is None:
        raise AssertionError(f"no torch name for {collection}/{'/'.join(names)}")
    return ".".join(names[:-1] + [rule[0]]), rule[1]


def state_dict_to_variables(state: Mapping[str, Any], *, source: str = "state dict") -> dict:
    """torchvision-named arrays (``Mixed_5b.branch1x1.conv.weight``, ``...bn.running_var``,
    ``fc.weight``, ...) -> Flax ``{"params", "batch_stats"}`` (float32). Extra keys (e.g.
    ``num_batches_tracked``) are ignored; a missing or misshapen key raises
    :class:`InceptionWeightsError` naming it."""
    out = {}
    for collection, tree in _template().items():
        def convert(path, leaf, collection=collection):
            key, fn = _torch_key(collection, path, leaf.ndim)
            if key not in state:
                raise InceptionWeightsError(f"{source}: missing key {key!r} (not a pytorch-fid "
                                            f"InceptionV3 state dict?)")
            try:
                arr = fn(np.asarray(state[key], dtype=np.float32))
            except Exception as e:  # noqa: BLE001 - any unreadable value is the same user error
                raise InceptionWeightsError(f"{source}: key {key!r} unreadable: {e}") from None
            if arr.shape != leaf.shape:
                raise InceptionWeightsError(f"{source}: key {key!r} has shape {np.shape(state[key])}, "
                                            f"expected the torch layout of {leaf.shape}")
            return jnp.asarray(arr)
        out[collection] = jax.tree_util.tree_map_with_path(convert, tree)
    return out


def variables_to_state_dict(variables) -> dict[str, np.ndarray]:
    """Inverse of :func:`state_dict_to_variables`: torchvision-named float32 NumPy arrays."""
    out = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(variables[collection])[0]:
            leaf = np.asarray(leaf, np.float32)
            key, _ = _torch_key(collection, path, leaf.ndim)
            kind = f"kernel{leaf.ndim}" if path[-1].key == "kernel" else None
            out[key] = _TO_TORCH[kind](leaf) if kind else leaf
    return out


def _missing(path) -> InceptionWeightsNotFound:
    return InceptionWeightsNotFound(
        f"Inception weights not found at {os.fspath(path)!r}. Download pytorch-fid's weights "
        f"yourself (nothing here downloads): {FID_WEIGHTS_URL} and pass that .pth, or an .npz made "
        f"from it with `python -m experiments.eval_fid convert --pth FILE.pth --out FILE.npz`.")


def _read_pth(path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise InceptionWeightsError(f"{path}: reading a .pth needs torch; convert it to .npz on a "
                                    f"machine with torch (eval_fid.py convert)") from None
    try:
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise InceptionWeightsError(f"{path}: not a readable torch state dict ({type(e).__name__}: "
                                    f"{' '.join(str(e).split())[:300]})") from None
    if not isinstance(state, Mapping):
        raise InceptionWeightsError(f"{path}: expected a state dict, got {type(state).__name__}")
    return {k: v.detach().cpu().numpy() for k, v in state.items() if hasattr(v, "detach")}


def _read_npz(path) -> dict[str, np.ndarray]:
    try:
        with np.load(os.fspath(path), allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as e:  # noqa: BLE001
        raise InceptionWeightsError(f"{path}: not a readable .npz ({type(e).__name__}: "
                                    f"{' '.join(str(e).split())[:300]})") from None


def _read_any(path) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise _missing(path)
    return _read_npz(path) if os.fspath(path).endswith(".npz") else _read_pth(path)


def load_pytorch_fid_weights(path) -> dict:
    """pytorch-fid ``.pth`` (needs torch) -> Flax variables ``{"params", "batch_stats"}``."""
    if not os.path.isfile(path):
        raise _missing(path)
    return state_dict_to_variables(_read_pth(path), source=os.fspath(path))


def load_weights(path) -> dict:
    """``.npz`` (no torch needed) or ``.pth`` (pytorch-fid state dict) -> Flax variables."""
    return state_dict_to_variables(_read_any(path), source=os.fspath(path))


def convert_weights(pth, out_npz) -> str:
    """Writes the ``.pth`` (or an ``.npz``) as a validated ``.npz`` of torch-named arrays; returns
    the output path. The file is written atomically (tmp + rename)."""
    state = _read_any(pth)
    variables = state_dict_to_variables(state, source=os.fspath(pth))  # validates
    out_npz = os.fspath(out_npz)
    tmp = f"{out_npz}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, **variables_to_state_dict(variables))
    os.replace(tmp, out_npz)
    return out_npz
