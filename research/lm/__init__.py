"""Language models: a decoder-only Transformer (Llama architecture), its KV cache and decoding.

Functional entry points (``cfg`` is a frozen :class:`LMConfig`, ``params`` a pytree)::

    params = init_params(cfg, key)
    logits = apply_logits(params, cfg, tokens)                 # [B, T, vocab]
    hidden = trunk(params, cfg, tokens); logits = head(params, cfg, hidden)
    loss, aux = lm_loss(params, cfg, batch)                    # packed rows, masked padding
    tokens = research.lm.decode.generate(params, cfg, prompts, prompt_lengths, max_new_tokens=..., key=...)

Modules: ``config`` (LMConfig), ``model`` (the Flax modules), ``cache`` (KV cache / linear
state, ``forward_cached``), ``decode`` (sampling, ``generate``), ``speculative`` (exact
speculative sampling with a draft model), ``tokenizer`` (byte, BPE),
``hf`` (conversion to and from ``transformers.LlamaForCausalLM``), ``data`` (rows and bits per
byte), ``byte_lm`` (the small packing-demo model).
"""
from research.lm.byte_lm import ByteLM, byte_lm_loss
from research.lm.config import LMConfig, default_mlp_hidden
from research.lm.model import apply_logits, head, init_params, lm_loss, num_params, trunk

__all__ = ["ByteLM", "byte_lm_loss", "LMConfig", "default_mlp_hidden", "init_params", "apply_logits",
           "trunk", "head", "lm_loss", "num_params"]
