"""DiT weight converter, Flax (``research.nn.dit.DiT`` params) <-> PyTorch (``torch_baselines.dit.DiT``).

Name mapping (the torch modules carry the Flax names):

=====================================================  =============================================
Flax path                                              torch ``state_dict`` key
=====================================================  =============================================
``.../<dense>/kernel`` ``[in, out]``                   ``....<dense>.weight`` ``[out, in]`` (transposed)
``.../<dense>/bias``                                   ``....<dense>.bias``
``.../q_norm/scale`` (RMSNorm)                         ``....q_norm.scale``
``y_embedder/embedding_table/embedding``               ``y_embedder.embedding_table.weight``
``blocks/...`` (``scan_blocks=True``: leading axis =   ``blocks.<i>....`` for i in range(depth)
depth) or ``blocks_<i>/...`` (``scan_blocks=False``)
=====================================================  =============================================

Both directions copy the values exactly (only transposes and stacking), so
``flax_to_torch -> torch_to_flax`` reproduces the Flax tree bit for bit.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
import torch

_BLOCK_RE = re.compile(r"^blocks_(\d+)$")
_TORCH_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _flatten(tree: Mapping, prefix=()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (str(k),)))
        else:
            out[prefix + (str(k),)] = v
    return out


def _leaf_to_torch(path: tuple[str, ...], value: np.ndarray) -> tuple[str, np.ndarray]:
    *mods, leaf = path
    if leaf == "kernel":
        if value.ndim != 2:
            raise ValueError(f"expected a 2-D Dense kernel at {'/'.join(path)}, got shape {value.shape}")
        return ".".join(mods + ["weight"]), value.T
    if leaf == "embedding":
        return ".".join(mods + ["weight"]), value
    if leaf in ("bias", "scale"):
        return ".".join(mods + [leaf]), value
    raise ValueError(f"unknown DiT parameter leaf {leaf!r} at {'/'.join(path)}")


def flax_to_torch(params: Mapping) -> dict[str, torch.Tensor]:
    """Flax DiT params (scanned or unscanned blocks) -> torch ``state_dict`` (float32 CPU tensors).

    Args:
      params: the ``params`` collection of ``research.nn.dit.DiT`` (nested dict of arrays).
    Returns:
      dict name -> tensor, loadable with ``DiT.load_state_dict(..., strict=True)``.
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a nested mapping of arrays, got {type(params).__name__}")
    if "params" in params and len(params) == 1:
        raise ValueError("pass the inner 'params' collection, not {'params': ...}")
    out: dict[str, torch.Tensor] = {}
    for path, value in _flatten(params).items():
        value = np.asarray(value)
        head = path[0]
        if head == "blocks":  # nn.scan: leading axis = depth
            if value.ndim < 1:
                raise ValueError(f"scanned block param {'/'.join(path)} has no depth axis")
            for i in range(value.shape[0]):
                name, arr = _leaf_to_torch(path[1:], value[i])
                out[f"blocks.{i}.{name}"] = torch.from_numpy(np.ascontiguousarray(arr).copy())
            continue
        m = _BLOCK_RE.match(head)
        if m:
            name, arr = _leaf_to_torch(path[1:], value)
            out[f"blocks.{int(m.group(1))}.{name}"] = torch.from_numpy(np.ascontiguousarray(arr).copy())
            continue
        name, arr = _leaf_to_torch(path, value)
        out[name] = torch.from_numpy(np.ascontiguousarray(arr).copy())
    return out


def _leaf_to_flax(name: str, value: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
    parts = name.split(".")
    *mods, leaf = parts
    if leaf == "weight":
        if mods and mods[-1] == "embedding_table":
            return tuple(mods + ["embedding"]), value
        if value.ndim != 2:
            raise ValueError(f"expected a 2-D Linear weight at {name}, got shape {value.shape}")
        return tuple(mods + ["kernel"]), value.T
    if leaf in ("bias", "scale"):
        return tuple(mods + [leaf]), value
    raise ValueError(f"unknown DiT parameter {name!r}")


def _set(tree: dict, path: tuple[str, ...], value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    if path[-1] in tree:
        raise ValueError(f"duplicate parameter {'/'.join(path)}")
    tree[path[-1]] = value


def torch_to_flax(state_dict: Mapping[str, torch.Tensor], *, scan_blocks: bool = True) -> dict:
    """torch DiT ``state_dict`` -> Flax params (nested dict of float numpy arrays).

    Args:
      state_dict: ``DiT.state_dict()`` of the torch twin (buffers such as ``pos_embed`` are not
        persistent and therefore absent).
      scan_blocks: stack the blocks under ``blocks`` with a leading depth axis (as
        ``DiT(scan_blocks=True)`` expects) or write ``blocks_<i>``.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping name -> tensor, got {type(state_dict).__name__}")
    params: dict = {}
    blocks: dict[int, dict[tuple[str, ...], np.ndarray]] = {}
    for name, tensor in state_dict.items():
        value = tensor.detach().cpu().numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor)
        m = _TORCH_BLOCK_RE.match(name)
        if m:
            path, arr = _leaf_to_flax(m.group(2), value)
            blocks.setdefault(int(m.group(1)), {})[path] = np.ascontiguousarray(arr).copy()
        else:
            path, arr = _leaf_to_flax(name, value)
            _set(params, path, np.ascontiguousarray(arr).copy())
    if blocks:
        depth = len(blocks)
        if sorted(blocks) != list(range(depth)):
            raise ValueError(f"block indices must be 0..{depth - 1}, got {sorted(blocks)}")
        keys = set(blocks[0])
        for i, b in blocks.items():
            if set(b) != keys:
                raise ValueError(f"block {i} has parameters {sorted(set(b) ^ keys)} that block 0 lacks or has")
        if scan_blocks:
            for path in sorted(keys):
                _set(params, ("blocks",) + path, np.stack([blocks[i][path] for i in range(depth)]))
        else:
            for i in range(depth):
                for path, arr in blocks[i].items():
                    _set(params, (f"blocks_{i}",) + path, arr)
    return params


def load_flax_params(model: torch.nn.Module, params: Mapping) -> torch.nn.Module:
    """Copies Flax DiT params into the torch twin in place (strict: every name must match)."""
    sd = flax_to_torch(params)
    ref = model.state_dict()
    for k, v in sd.items():
        if k in ref and tuple(ref[k].shape) != tuple(v.shape):
            raise ValueError(f"shape mismatch for {k}: flax gives {tuple(v.shape)}, torch has {tuple(ref[k].shape)}")
    model.load_state_dict(sd, strict=True)
    return model
