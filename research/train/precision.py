"""Mixed-precision policy: parameter, compute and output dtypes.

A :class:`Policy` has three dtypes:

* ``param_dtype``: the master weights kept in the train state and updated by the optimiser
  (float32).
* ``compute_dtype``: what the forward/backward pass runs in (bfloat16 or float16 on
  accelerators, float32 on CPU by default).
* ``output_dtype``: what the model's output is cast to before the loss (float32, so losses and
  their reductions are float32).

The policy is applied to a Flax model *without rewriting it*: :meth:`Policy.wrap_model_fn` casts
the floating parameters and the floating inputs to ``compute_dtype`` and the output to
``output_dtype``. Flax layers with ``dtype=None`` compute in the promoted dtype of their inputs and
parameters, so once both are bfloat16 the whole forward pass is bfloat16; models with a ``dtype``
attribute (the DiT) can equally be built with ``dtype=policy.compute_dtype``. The gradient of
the cast is a cast back, so gradients with respect to the float32 master weights come out float32.

Policies are written as strings, e.g. ``"params=float32,compute=bfloat16,output=float32"``, or
by shorthand: ``"float32"``/``"fp32"``, ``"bfloat16"``/``"bf16"`` (= float32 params, bfloat16
compute, float32 output), ``"float16"``/``"fp16"`` (same with float16; needs loss scaling).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

__all__ = ["Policy", "get_policy", "cast_floating", "needs_loss_scaling"]

_DTYPES = {
    "float32": jnp.float32, "fp32": jnp.float32, "f32": jnp.float32,
    "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
    "float16": jnp.float16, "fp16": jnp.float16, "f16": jnp.float16, "half": jnp.float16,
}


def _dtype(name_or_dtype) -> Any:
    if isinstance(name_or_dtype, str):
        try:
            return _DTYPES[name_or_dtype.strip().lower()]
        except KeyError:
            raise ValueError(f"unknown dtype {name_or_dtype!r}; choose one of "
                             f"{sorted(set(_DTYPES))}") from None
    dt = jnp.dtype(name_or_dtype)
    if dt not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"precision policies use float32, bfloat16 or float16, got {dt}")
    return dt.type


def cast_floating(tree, dtype):
    """Casts every floating-point leaf of ``tree`` to ``dtype``; other leaves unchanged."""
    def cast(x):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
            return x.astype(dtype)
        return x
    return jax.tree_util.tree_map(cast, tree)


@dataclasses.dataclass(frozen=True)
class Policy:
    """Parameter / compute / output dtypes (see module docstring)."""

    param_dtype: Any = jnp.float32
    compute_dtype: Any = jnp.float32
    output_dtype: Any = jnp.float32

    def __post_init__(self):
        for f in ("param_dtype", "compute_dtype", "output_dtype"):
            object.__setattr__(self, f, _dtype(getattr(self, f)))

    def cast_to_param(self, tree):
        return cast_floating(tree, self.param_dtype)

    def cast_to_compute(self, tree):
        return cast_floating(tree, self.compute_dtype)

    def cast_to_output(self, tree):
        return cast_floating(tree, self.output_dtype)

    def wrap_model_fn(self, model_fn: Callable, *, cast_args: int = 1) -> Callable:
        """``model_fn(params, *args, **kw)`` -> same signature under the policy.

        Casts floating ``params`` and the first ``cast_args`` positional inputs (default: the
        data ``x``; timesteps and labels are left alone so ``t * 1000`` keeps float32 accuracy)
        to ``compute_dtype``; casts the output to ``output_dtype``.
        """
        def wrapped(params, *args, **kwargs):
            args = list(args)
            for i in range(min(cast_args, len(args))):
                args[i] = self.cast_to_compute(args[i])
            out = model_fn(self.cast_to_compute(params), *args, **kwargs)
            return self.cast_to_output(out)
        return wrapped

    def __str__(self):
        n = lambda d: jnp.dtype(d).name  # noqa: E731
        return f"params={n(self.param_dtype)},compute={n(self.compute_dtype)},output={n(self.output_dtype)}"


def get_policy(spec: str | Policy) -> Policy:
    """Parses ``"params=float32,compute=bfloat16,output=float32"`` or a shorthand (module doc)."""
    if isinstance(spec, Policy):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"precision policy must be a string or Policy, got {type(spec).__name__}")
    s = spec.strip().lower()
    if "=" not in s:
        return Policy(jnp.float32, _dtype(s), jnp.float32)
    kw = {}
    keys = {"params": "param_dtype", "param": "param_dtype", "compute": "compute_dtype",
            "output": "output_dtype"}
    for part in s.split(","):
        if "=" not in part:
            raise ValueError(f"bad precision policy {spec!r}: expected key=dtype pairs")
        k, v = (p.strip() for p in part.split("=", 1))
        if k not in keys:
            raise ValueError(f"bad precision policy key {k!r} in {spec!r}; use params, compute, output")
        kw[keys[k]] = _dtype(v)
    return Policy(**kw)


def needs_loss_scaling(policy: Policy) -> bool:
    """True when the compute dtype is float16 (bfloat16 has float32's exponent range)."""
    return jnp.dtype(policy.compute_dtype) == jnp.dtype(jnp.float16)
