"""Rematerialisation (gradient checkpointing) policies by name.

Names: "none" (no remat), "full" (save nothing, recompute the block), "dots_saveable",
"dots_with_no_batch_dims_saveable", "save_names:<a>,<b>" (save only values tagged with
``jax.ad_checkpoint.checkpoint_name``). The DiT block tags "qkv", "attn_out", "mlp_hidden".
"""
from __future__ import annotations

import jax

CHECKPOINT_NAMES = ("qkv", "attn_out", "mlp_hidden")

_FIXED = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

POLICY_NAMES = ("none", *_FIXED, "save_names:<name>,...")


def remat_policy(name: str, *, known_names=CHECKPOINT_NAMES):
    """Returns the jax checkpoint policy for ``name``, or None for "none" (no remat at all).

    ``known_names`` lists the tags a "save_names:" policy may use (a misspelt tag would
    silently save nothing, so it is rejected).
    """
    if not isinstance(name, str):
        raise TypeError(f"remat policy name must be a str, got {type(name).__name__}")
    if name == "none":
        return None
    if name in _FIXED:
        return _FIXED[name]
    if name.startswith("save_names:"):
        names = [n.strip() for n in name[len("save_names:"):].split(",") if n.strip()]
        if not names:
            raise ValueError("remat policy 'save_names:' needs at least one name")
        unknown = [n for n in names if n not in known_names]
        if unknown:
            raise ValueError(f"unknown checkpoint names {unknown} in {name!r}; known: {list(known_names)}")
        return jax.checkpoint_policies.save_only_these_names(*names)
    raise ValueError(f"unknown remat policy {name!r}; expected one of {POLICY_NAMES}")
