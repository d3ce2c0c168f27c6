"""research.lm.hf: conversion to and from transformers.LlamaForCausalLM.

* logits parity, both directions (JAX-initialised -> HF; HF-initialised -> from_transformers ->
  JAX), MHA / GQA / MQA, tied / untied, scanned / unrolled blocks, odd lengths (7, 13);
* round trips copy the numbers (bitwise) and the state dict has LlamaForCausalLM's exact keys;
* float64: JAX float64 vs HF ``model.double()`` to 1e-10 (see below for what that needs);
* greedy ``research.lm.decode.generate`` equals ``LlamaForCausalLM.generate(do_sample=False)``;
* ``from_transformers`` rejects configs the LM cannot represent.

Float32 tolerance. Both sides evaluate the same float32 ops in different orders (XLA vs torch
matmul blocking; their own exp / rsqrt / cos). Each side is then off from the exact result by a
few float32 ulps of the largest activation on the path; through two blocks (residual stream ~3x
the logits here) that is ~10 ulps of the logits' scale for each side, ~20 for their difference:
``20 * 2**-23 ~ 2.4e-6`` relative. Measured over the twelve JAX -> HF variants: at most
``8.9e-7 * max|logits|`` (7.5 ulps; logits of size 2.2-3.4). ``F32_TOL = 1e-5 * max(1, max|logits|)``
(84 ulps) leaves a 10x margin for other machines' matmul kernels.

Float64. The same argument with 2**-52 gives ~1e-15 (measured 4.6e-15 on logits of size 3.5); we
use ``F64_TOL = 1e-10``. HF's float64 model is not float64 everywhere: ``LlamaRotaryEmbedding``
computes cos/sin in float32, ``LlamaRMSNorm`` normalises in float32 and the eager softmax runs in
float32. The float64 reference (``hf_float64``) therefore uses ``attn_implementation="sdpa"``,
a float64 rotary embedding and float64 norms (``research.nn.layers.RMSNorm`` normalises in
float64 for float64 inputs; before that fix this test failed at 6.4e-7).
"""
import types
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from research.lm import LMConfig, apply_logits, init_params  # noqa: E402
from research.lm.decode import generate  # noqa: E402
from research.lm.hf import from_transformers, to_torch_model, to_transformers  # noqa: E402

F32_TOL = 1e-5
F64_TOL = 1e-10
KV = {"mha": 4, "gqa": 2, "mqa": 1}


def small_cfg(**kw):
    base = dict(vocab_size=64, dim=32, depth=2, num_heads=4, num_kv_heads=2, mlp_hidden=48, max_len=40,
                rope_theta=500.0, norm_eps=1e-5, init_std=0.15)
    base.update(kw)
    return LMConfig(**base)


def jax_params(cfg, seed=0):
    """Random params in ``init_params``' tree (shapes from ``jax.eval_shape``, values from numpy: no
    compile): normal(0, init_std) matrices and RMSNorm scales 1 + 0.3 * normal (all-ones scales,
    the real init, would hide a swapped norm)."""
    shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    rng = np.random.default_rng(seed)
    dt = np.dtype(cfg.param_dtype)

    def fill(path, s):
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return jnp.asarray(1 + 0.3 * rng.standard_normal(s.shape), dt)
        return jnp.asarray(cfg.init_std * rng.standard_normal(s.shape), dt)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def hf_model(seed=0, kv=2, tied=False, std=0.15, **kw):
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv, head_dim=8, max_position_embeddings=40,
                         rope_parameters={"rope_theta": 500.0, "rope_type": "default"}, rms_norm_eps=1e-5,
                         tie_word_embeddings=tied, initializer_range=std, attn_implementation="eager", **kw)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.mul_(1 + 0.3 * torch.randn_like(p))
    return model


def tokens(seed, b, t, vocab=64):
    return np.random.default_rng(seed).integers(0, vocab, (b, t)).astype(np.int64)


def hf_logits(model, toks):
    with torch.no_grad():
        return model(torch.from_numpy(toks)).logits.double().numpy()


def unstack(params, depth):
    """scan_layers=True params -> the scan_layers=False layout."""
    out = {k: v for k, v in params.items() if k != "blocks"}
    for i in range(depth):
        out[f"blocks_{i}"] = jax.tree.map(lambda a, i=i: a[i], params["blocks"])
    return out


def assert_close_f32(got, want):
    want = np.asarray(want, np.float64)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0,
                               atol=F32_TOL * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("attn", list(KV))
def test_jax_to_hf_logits(attn, tied, scan):
    cfg = small_cfg(num_kv_heads=KV[attn], tie_embeddings=tied, scan_layers=scan)
    params = jax_params(cfg)
    model = to_torch_model(params, cfg)
    assert model.config._attn_implementation == "eager" and not model.training
    toks = tokens(1, 2, 7 if scan else 13)  # every variant sees both odd lengths across the two layouts
    want = hf_logits(model, toks)
    assert 0.3 < np.abs(want).max() < 10  # logits of order 1
    assert_close_f32(apply_logits(params, cfg, jnp.asarray(toks)), want)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("attn", list(KV))
def test_hf_to_jax_logits(attn, tied):
    model = hf_model(seed=1, kv=KV[attn], tied=tied)
    params, cfg = from_transformers(model)
    assert cfg.scan_layers and cfg.tie_embeddings == tied and cfg.num_kv_heads == KV[attn]
    assert ("lm_head" in params) == (not tied)
    assert (cfg.rope_theta, cfg.norm_eps, cfg.max_len, cfg.dtype) == (500.0, 1e-5, 40, "float32")
    toks = tokens(2, 2, 13)
    want = hf_logits(model, toks)
    assert_close_f32(apply_logits(params, cfg, jnp.asarray(toks)), want)
    toks = tokens(3, 2, 7)  # and in the unrolled layout
    assert_close_f32(apply_logits(unstack(params, cfg.depth), cfg.replace(scan_layers=False), jnp.asarray(toks)),
                     hf_logits(model, toks))


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_round_trip_is_exact(tied, scan):
    cfg = small_cfg(tie_embeddings=tied, scan_layers=scan)
    params = jax_params(cfg)
    config, sd = to_transformers(params, cfg)
    assert list(sd) == list(LlamaForCausalLM(config).state_dict())
    assert all(v.dtype == torch.float32 for v in sd.values())
    if tied:
        assert sd["lm_head.weight"] is sd["model.embed_tokens.weight"]
    assert config.rope_parameters == {"rope_theta": 500.0, "rope_type": "default"}
    assert (config.head_dim, config.num_key_value_heads, config.tie_word_embeddings) == (8, 2, tied)
    assert config.eos_token_id is None and not config.attention_bias and not config.mlp_bias
    back, cfg2 = from_transformers(to_torch_model(params, cfg))
    assert cfg2 == cfg.replace(scan_layers=True)
    want = params if scan else {**{k: v for k, v in params.items() if not k.startswith("blocks_")},
                                "blocks": jax.tree.map(lambda *a: jnp.stack(a),
                                                       *[params[f"blocks_{i}"] for i in range(cfg.depth)])}
    assert jax.tree.structure(back) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(want)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # and the other way: HF weights -> params -> HF weights
    model = hf_model(seed=2, tied=tied)
    _, sd2 = to_transformers(*from_transformers(model))
    ref = model.state_dict()
    assert list(sd2) == list(ref)
    for k in ref:
        assert torch.equal(sd2[k], ref[k]), k


class Rope64(torch.nn.Module):
    """LlamaRotaryEmbedding with cos/sin computed in float64 (HF's forward casts to float32)."""

    def __init__(self, theta, head_dim):
        super().__init__()
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))

    def forward(self, x, position_ids):
        freqs = position_ids[..., None].to(torch.float64) * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _hf_norm64(self, h):
    """LlamaRMSNorm.forward without its cast to float32."""
    return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def hf_float64(params, cfg):
    """The HF model in float64 throughout: sdpa (eager's softmax is float32), float64 RoPE and norms."""
    model = to_torch_model(params, cfg, attn_implementation="sdpa")
    assert model.dtype == torch.float64
    model.model.rotary_emb = Rope64(cfg.rope_theta, cfg.head_dim)
    for m in model.modules():
        if type(m).__name__ == "LlamaRMSNorm":
            m.forward = types.MethodType(_hf_norm64, m)
    return model


def _float64_case():
    cfg = small_cfg(dtype="float64", param_dtype="float64", tie_embeddings=True, num_kv_heads=1)
    params = jax_params(cfg)
    toks = tokens(4, 2, 13)
    return cfg, params, toks, hf_logits(hf_float64(params, cfg), toks)


def test_float64_parity():
    with jax.enable_x64(True):
        cfg, params, toks, want = _float64_case()
        got = np.asarray(apply_logits(params, cfg, jnp.asarray(toks)))
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=0, atol=F64_TOL * max(1.0, np.abs(want).max()))
        back, cfg2 = from_transformers(to_torch_model(params, cfg))
        assert cfg2.param_dtype == "float64"
        for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
            assert x.dtype == jnp.float64
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_float64_model_needs_x64():
    with pytest.raises(ValueError, match="x64"):
        from_transformers(hf_model().double())


def _hf_generate(model, prompts, n):
    with torch.no_grad():
        out = model.generate(torch.from_numpy(prompts), attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                             do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                             pad_token_id=0)
    return out.numpy()


def _min_greedy_margin(model, seqs, p):
    """Smallest top-1 minus top-2 logit over the greedy decisions behind seqs[:, p:]. Logits agree
    to ~1e-5, so a margin far above that means the two argmaxes cannot differ on any machine."""
    top2 = np.sort(hf_logits(model, seqs)[:, p - 1:-1], axis=-1)[..., -2:]
    return float((top2[..., 1] - top2[..., 0]).min())


@pytest.fixture(scope="module")
def gen_model():
    """Untied GQA model, init_std 0.4 so the greedy continuation is not a constant token."""
    cfg = small_cfg(init_std=0.4)
    params = jax_params(cfg, seed=5)
    return params, cfg, to_torch_model(params, cfg)


N_NEW = 12


def test_greedy_generate_matches_hf_batch1(gen_model):
    params, cfg, model = gen_model
    for i, p in enumerate((3, 8, 5)):
        prompt = tokens(20 + i, 1, p)
        want = _hf_generate(model, prompt, N_NEW)
        assert want.shape == (1, p + N_NEW)
        got = np.asarray(generate(params, cfg, jnp.asarray(prompt, jnp.int32), jnp.asarray([p]),
                                  max_new_tokens=N_NEW, key=jax.random.key(0)))
        np.testing.assert_array_equal(got, want)
        assert len(set(want[0, p:].tolist())) >= 3, want  # a non-trivial continuation
        assert _min_greedy_margin(model, want, p) > 1e-3


def test_greedy_generate_matches_hf_batch(gen_model):
    params, cfg, model = gen_model
    prompts = tokens(30, 4, 6)
    want = _hf_generate(model, prompts, N_NEW)
    got = np.asarray(generate(params, cfg, jnp.asarray(prompts, jnp.int32), jnp.full((4,), 6),
                              max_new_tokens=N_NEW, key=jax.random.key(0)))
    np.testing.assert_array_equal(got, want)
    assert len({tuple(r) for r in want[:, 6:].tolist()}) == 4
    assert _min_greedy_margin(model, want, 6) > 1e-3
    # ragged right-padded prompts in one JAX batch equal HF row by row
    lengths = [6, 2, 4, 5]
    ragged = np.where(np.arange(6)[None] < np.asarray(lengths)[:, None], prompts, 0)
    got = np.asarray(generate(params, cfg, jnp.asarray(ragged, jnp.int32), jnp.asarray(lengths),
                              max_new_tokens=N_NEW, key=jax.random.key(0)))
    for r, n in enumerate(lengths):
        np.testing.assert_array_equal(got[r, :n + N_NEW], _hf_generate(model, prompts[r:r + 1, :n], N_NEW)[0])


@pytest.mark.parametrize("change, match", [
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_parameters={"rope_theta": 500.0, "rope_type": "linear", "factor": 2.0}), "rope"),
    (dict(rope_parameters={"rope_theta": 500.0, "rope_type": "dynamic", "factor": 2.0}), "rope"),
    (dict(head_dim=16), "head_dim"),
])
def test_from_transformers_rejects_unsupported(change, match):
    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, rope_parameters={"rope_theta": 500.0, "rope_type": "default"})
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        from_transformers(LlamaForCausalLM(LlamaConfig(**kw)))


def test_to_transformers_rejects_linear_attention():
    cfg = small_cfg(attention="linear")
    with pytest.raises(ValueError, match="softmax"):
        to_transformers(jax_params(cfg), cfg)
