"""The ``interpret=`` switch shared by the Pallas ops (decode and linear attention)."""
from __future__ import annotations

import jax


def resolve_interpret(interpret, op_name: str) -> bool:
    """``None`` -> interpret mode iff there is no GPU backend; ``False`` without a GPU raises
    ``RuntimeError`` naming ``op_name`` (no silent fallback); anything but None/bool is a TypeError."""
    backend = jax.default_backend()
    if interpret is None:
        return backend != "gpu"
    if not isinstance(interpret, bool):
        raise TypeError(f"interpret must be None, True or False, got {interpret!r}")
    if not interpret and backend != "gpu":
        raise RuntimeError(
            f"{op_name}(interpret=False) needs a GPU backend for the compiled Pallas kernel, but "
            f"jax.default_backend() is {backend!r}; pass interpret=True (or None) to run the kernel "
            "in Pallas interpret mode")
    return interpret
