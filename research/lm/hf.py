"""Conversion between :mod:`research.lm` (Flax params + :class:`LMConfig`) and Hugging Face
``transformers.LlamaForCausalLM``.

Name mapping (``L`` = layer index; Flax ``Dense`` kernels are ``[in, out]``, torch ``Linear``
weights ``[out, in]``, so every matrix is transposed; nothing else changes)::

    embed/embedding [V, dim]                  model.embed_tokens.weight [V, dim]
    <blk>/attn/{q,k,v,o}_proj/kernel          model.layers.L.self_attn.{q,k,v,o}_proj.weight (.T)
    <blk>/mlp/{gate,up,down}_proj/kernel      model.layers.L.mlp.{gate,up,down}_proj.weight (.T)
    <blk>/attn_norm/scale                     model.layers.L.input_layernorm.weight
    <blk>/mlp_norm/scale                      model.layers.L.post_attention_layernorm.weight
    norm/scale                                model.norm.weight
    lm_head/kernel [dim, V]                   lm_head.weight [V, dim] (.T)

``<blk>`` is ``blocks`` with a leading depth axis (``scan_layers=True``) or ``blocks_L``
(``scan_layers=False``). With ``tie_embeddings`` there is no Flax ``lm_head``; the state dict
still carries ``lm_head.weight`` (the very tensor of ``model.embed_tokens.weight``), because
``LlamaForCausalLM(config).state_dict()`` lists it and a strict ``load_state_dict`` needs it.

Both directions copy the numbers (transposes and stacking only), so
``from_transformers(to_torch_model(params, cfg))`` gives back ``params`` bit for bit (in the
``scan_layers=True`` layout).

Special tokens: a converted config has ``bos/eos/pad_token_id = None`` (the LM knows no
tokenizer), so ``model.generate`` never stops early unless told to.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from research.lm.config import LMConfig

__all__ = ["to_transformers", "from_transformers", "to_torch_model"]

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_DTYPE_NAMES = {"float32": "float32", "float64": "float64", "bfloat16": "bfloat16", "float16": "float16"}


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def _to_torch(x, dtype_name: str):
    """A jax/numpy array -> a contiguous torch tensor of ``dtype_name`` (an exact copy)."""
    import torch

    a = np.asarray(jax.device_get(x))
    if dtype_name == "bfloat16":  # numpy has no bfloat16 torch understands: go through float32 (exact)
        return torch.from_numpy(np.ascontiguousarray(a.astype(np.float32))).to(torch.bfloat16)
    return torch.from_numpy(np.array(a, dtype=np.dtype(dtype_name), copy=True, order="C"))


def _from_torch(t, dtype_name: str):
    """A torch tensor -> a jax array of ``dtype_name`` (an exact copy)."""
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return jnp.asarray(t.float().numpy()).astype(jnp.bfloat16)
    return jnp.asarray(t.numpy().copy(), dtype=jnp.dtype(dtype_name))


def _block_params(params, cfg: LMConfig, i: int):
    if cfg.scan_layers:
        return jax.tree.map(lambda a: a[i], params["blocks"])
    return params[f"blocks_{i}"]


def llama_config(cfg: LMConfig, **overrides):
    """The ``transformers.LlamaConfig`` of ``cfg`` (``overrides`` are passed through)."""
    from transformers import LlamaConfig

    if cfg.attention != "softmax":
        raise ValueError(f"only attention='softmax' is a Llama model; got attention={cfg.attention!r}")
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.mlp_hidden,
              num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
              num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
              max_position_embeddings=cfg.max_len,
              rope_parameters={"rope_theta": float(cfg.rope_theta), "rope_type": "default"},
              rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, attention_bias=False,
              mlp_bias=False, hidden_act="silu", attention_dropout=0.0, initializer_range=cfg.init_std,
              bos_token_id=None, eos_token_id=None, pad_token_id=None, dtype=cfg.param_dtype)
    kw.update(overrides)
    return LlamaConfig(**kw)


def to_transformers(params, cfg: LMConfig) -> tuple[Any, dict]:
    """``(transformers.LlamaConfig, state_dict)`` of ``params``; the state dict has exactly the keys of
    ``LlamaForCausalLM(config).state_dict()`` and tensors of the params' dtype (``cfg.param_dtype``)."""
    config = llama_config(cfg)
    dt = _DTYPE_NAMES[cfg.param_dtype]
    sd = {"model.embed_tokens.weight": _to_torch(params["embed"]["embedding"], dt)}
    for i in range(cfg.depth):
        blk = _block_params(params, cfg, i)
        pre = f"model.layers.{i}."
        for name in _ATTN:
            sd[pre + f"self_attn.{name}.weight"] = _to_torch(blk["attn"][name]["kernel"].T, dt)
        for name in _MLP:
            sd[pre + f"mlp.{name}.weight"] = _to_torch(blk["mlp"][name]["kernel"].T, dt)
        sd[pre + "input_layernorm.weight"] = _to_torch(blk["attn_norm"]["scale"], dt)
        sd[pre + "post_attention_layernorm.weight"] = _to_torch(blk["mlp_norm"]["scale"], dt)
    sd["model.norm.weight"] = _to_torch(params["norm"]["scale"], dt)
    if cfg.tie_embeddings:
        if "lm_head" in params:
            raise ValueError("cfg.tie_embeddings is True but params hold an lm_head")
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    else:
        sd["lm_head.weight"] = _to_torch(params["lm_head"]["kernel"].T, dt)
    return config, sd


def to_torch_model(params, cfg: LMConfig, *, attn_implementation: str = "eager"):
    """A ``LlamaForCausalLM`` in eval mode holding ``params`` (in ``cfg.param_dtype``).

    ``attn_implementation="eager"`` (default) is the plain matmul-softmax-matmul path, the one
    the float32 parity tests compare logits with (no SDPA kernel choices in between); "sdpa" is
    the faster choice for benchmarks. A float64 model is not float64 everywhere in HF: the eager
    softmax, the RoPE cos/sin and ``LlamaRMSNorm`` run in float32 whatever the dtype, so an exact
    float64 comparison needs "sdpa" and float64 RoPE / norms (see tests/test_lm_hf.py).
    """
    import torch
    from transformers import LlamaForCausalLM

    config, sd = to_transformers(params, cfg)
    config._attn_implementation = attn_implementation
    model = LlamaForCausalLM(config).to(_torch_dtype(_DTYPE_NAMES[cfg.param_dtype]))
    with torch.no_grad():
        model.load_state_dict(sd, strict=True)
    return model.eval()


def _check_supported(c):
    """Raises ValueError for Llama configs this LM cannot represent."""
    problems = []
    if getattr(c, "attention_bias", False):
        problems.append("attention_bias=True (the LM has no biases)")
    if getattr(c, "mlp_bias", False):
        problems.append("mlp_bias=True (the LM has no biases)")
    if getattr(c, "hidden_act", "silu") not in ("silu", "swish"):  # the same function in ACT2FN
        problems.append(f"hidden_act={c.hidden_act!r} (the LM's SwiGLU uses silu)")
    rp = getattr(c, "rope_parameters", None) or {}
    if not isinstance(rp, dict) or rp.get("rope_type", "default") != "default" or "rope_theta" not in rp:
        problems.append(f"rope_parameters={rp!r} (only rope_type='default' without scaling)")
    elif set(rp) - {"rope_theta", "rope_type"}:
        problems.append(f"rope_parameters has scaling entries {sorted(set(rp) - {'rope_theta', 'rope_type'})}")
    hd = getattr(c, "head_dim", None)
    if hd is not None and hd * c.num_attention_heads != c.hidden_size:
        problems.append(f"head_dim={hd} != hidden_size / num_attention_heads = "
                        f"{c.hidden_size / c.num_attention_heads:g}")
    if getattr(c, "pretraining_tp", 1) not in (None, 1):
        problems.append(f"pretraining_tp={c.pretraining_tp}")
    if problems:
        raise ValueError("unsupported LlamaConfig for research.lm: " + "; ".join(problems))


def from_transformers(model) -> tuple[Any, LMConfig]:
    """``(params, cfg)`` of a ``LlamaForCausalLM``: params in the ``scan_layers=True`` layout (block
    parameters stacked on a leading depth axis), dtype the model's (float64 needs x64 enabled)."""
    import torch

    c = model.config
    if getattr(c, "model_type", "llama") != "llama":
        raise ValueError(f"expected a Llama model, got model_type={c.model_type!r}")
    _check_supported(c)
    sd = model.state_dict()
    wdt = sd["model.embed_tokens.weight"].dtype
    names = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16",
             torch.float16: "float16"}
    if wdt not in names:
        raise ValueError(f"unsupported parameter dtype {wdt}")
    dt = names[wdt]
    if dt == "float64" and not jax.config.jax_enable_x64:
        raise ValueError("a float64 model needs jax x64 enabled (jax.enable_x64(True)); otherwise the "
                         "weights would be silently rounded to float32")
    tied = bool(getattr(c, "tie_word_embeddings", False))
    cfg = LMConfig(vocab_size=c.vocab_size, dim=c.hidden_size, depth=c.num_hidden_layers,
                   num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
                   mlp_hidden=c.intermediate_size, rope_theta=float(c.rope_parameters["rope_theta"]),
                   max_len=c.max_position_embeddings, tie_embeddings=tied, norm_eps=float(c.rms_norm_eps),
                   scan_layers=True, dtype=dt, param_dtype=dt,
                   init_std=float(getattr(c, "initializer_range", 0.02) or 0.02))
    get = lambda k: _from_torch(sd[k], dt)  # noqa: E731
    getT = lambda k: _from_torch(sd[k].T, dt)  # noqa: E731
    layers = []
    for i in range(cfg.depth):
        pre = f"model.layers.{i}."
        layers.append({
            "attn": {n: {"kernel": getT(pre + f"self_attn.{n}.weight")} for n in _ATTN},
            "mlp": {n: {"kernel": getT(pre + f"mlp.{n}.weight")} for n in _MLP},
            "attn_norm": {"scale": get(pre + "input_layernorm.weight")},
            "mlp_norm": {"scale": get(pre + "post_attention_layernorm.weight")},
        })
    params = {"blocks": jax.tree.map(lambda *a: jnp.stack(a), *layers),
              "embed": {"embedding": get("model.embed_tokens.weight")},
              "norm": {"scale": get("model.norm.weight")}}
    if not tied:
        params["lm_head"] = {"kernel": getT("lm_head.weight")}
    return params, cfg
