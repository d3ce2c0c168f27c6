"""Trains the decoder-only LM (``research.lm``) on an embedded corpus; reports validation bits/byte.

    python -m experiments.train_lm --config experiments/configs/lm.py[:linear|:bpe] [--set k=v ...]

Steps: split the corpus by document (train / validation), build the tokenizer (bytes, or BPE
trained on the train split and saved to ``tokenizer.json``), cut the documents into BOS-led
chunks and pack them into rows (``research.lm.data``), train with the shared jitted step
(AdamW, warmup + cosine, clipping) and loop (checkpoints with verified digests every
``train.checkpoint_every`` steps, resume from the newest intact one, JSONL metrics, progress
bar), evaluating validation bits per byte every ``train.eval_every`` steps. Then continues
held-out prompts (the start of validation documents) with the jitted KV-cache decoder.

Writes to ``runs/<name>/``: metrics.json (final bits/byte, the eval curve, throughput),
samples.txt, metrics.jsonl, curves.png, config.json, train.log, checkpoints/ (and tokenizer.json), and
the final weights for reuse (``final_params.msgpack`` + ``lm_config.json``; :func:`load_trained_lm`
reads them back, e.g. for ``experiments/bench_decoding.py``). ``data.tokenizer_path`` reuses another
run's tokenizer.json (a draft model must share its target's vocabulary).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from experiments.common import (close_text_log, make_state, open_run, resolve_run_dir, run_cli, setup_text_log,
                                train_resumable, write_json)
from research.data.corpus import load_corpus
from research.lm import LMConfig, default_mlp_hidden, init_params, lm_loss, num_params
from research.lm.data import evaluate_bits_per_byte, make_rows, tokenize_chunks
from research.lm.decode import generate_with_lengths
from research.lm.tokenizer import BPETokenizer, get_tokenizer
from research.runs.metrics import read_metrics
from research.train.step import make_train_step


def build_tokenizer(dc, train_texts, run_dir):
    """Byte tokenizer, or the BPE tokenizer trained on the train split (reloaded when resuming),
    or the one at ``dc.tokenizer_path``."""
    if dc.tokenizer != "bpe":
        return get_tokenizer(dc.tokenizer)
    path = os.path.join(run_dir, "tokenizer.json")
    if dc.get("tokenizer_path"):
        if not os.path.exists(dc.tokenizer_path):
            raise FileNotFoundError(f"data.tokenizer_path {dc.tokenizer_path!r} does not exist")
        tok = BPETokenizer.load(dc.tokenizer_path)
        tok.save(path)
        return tok
    if os.path.exists(path):
        return BPETokenizer.load(path)
    tok = get_tokenizer("bpe", train_texts=train_texts, vocab_size=dc.bpe_vocab)
    tok.save(path)
    return tok


def lm_config(mc, vocab_size: int, max_len: int) -> LMConfig:
    return LMConfig(vocab_size=vocab_size, dim=mc.dim, depth=mc.depth, num_heads=mc.num_heads,
                    num_kv_heads=mc.num_kv_heads, mlp_hidden=mc.mlp_hidden or default_mlp_hidden(mc.dim),
                    rope_theta=float(mc.rope_theta), max_len=max_len, tie_embeddings=mc.tie_embeddings,
                    attn_impl=mc.attn_impl, attention=mc.attention, remat_policy=mc.remat_policy,
                    scan_layers=mc.scan_layers, custom_matmul_vjp=mc.custom_matmul_vjp)


def continue_prompts(params, lm_cfg, tok, texts, sc, key) -> list[dict]:
    """Continuations of the first ``sc.prompt_chars`` characters of each of ``texts``."""
    prompts = [t[:sc.prompt_chars] for t in texts[:sc.num_prompts]]
    if not prompts:
        return []
    ids = [tok.encode(p, bos=True) for p in prompts]
    width = max(len(i) for i in ids)
    if width + sc.max_new_tokens > lm_cfg.max_len:
        raise ValueError(f"sample.prompt_chars + sample.max_new_tokens ({width} + {sc.max_new_tokens} tokens) "
                         f"exceed the model's max_len={lm_cfg.max_len}")
    batch = np.zeros((len(ids), width), np.int32)
    for r, i in enumerate(ids):
        batch[r, :len(i)] = i
    lengths = np.array([len(i) for i in ids], np.int32)
    out, count = generate_with_lengths(params, lm_cfg, batch, lengths, max_new_tokens=sc.max_new_tokens, key=key,
                                       temperature=sc.temperature, top_k=sc.top_k or None,
                                       top_p=sc.top_p if sc.top_p < 1 else None, stop_tokens=(tok.eos_id,))
    out, count = np.asarray(out), np.asarray(count)
    return [{"prompt": p, "continuation": tok.decode(out[r, lengths[r]:lengths[r] + count[r]])}
            for r, p in enumerate(prompts)]


def run(cfg) -> dict:
    run_dir = resolve_run_dir(cfg.run_dir, cfg.name)
    log = setup_text_log(run_dir, cfg.name)
    try:
        return _run(cfg, run_dir, log)
    finally:
        close_text_log(log)


def _run(cfg, run_dir, log) -> dict:
    dc, mc, tc, sc = cfg.data, cfg.model, cfg.train, cfg.sample
    split = dict(val_fraction=dc.val_fraction, seed=dc.split_seed)
    train_texts = load_corpus(dc.corpus, split="train", **split)
    val_texts = load_corpus(dc.corpus, split="val", **split)
    tok = build_tokenizer(dc, train_texts, run_dir)
    rows = make_rows(tokenize_chunks(tok, train_texts, dc.row_length), dc.row_length, dc.rows)
    real = float(np.mean(rows["segment_ids"] != 0))
    log.info(f"run_dir={run_dir} devices={jax.devices()}; corpus {dc.corpus}: {len(train_texts)} train / "
             f"{len(val_texts)} val documents; tokenizer {tok!r}; {rows['tokens'].shape[0]} rows of "
             f"{dc.row_length} ({real:.3f} real tokens)")

    lm_cfg = lm_config(mc, tok.vocab_size, dc.row_length)
    k_init, k_state, k_data, k_sample = jax.random.split(jax.random.key(cfg.seed), 4)
    params = init_params(lm_cfg, k_init)
    log.info(f"LM params: {num_params(params):,} ({lm_cfg})")
    optimizer, _, state = make_state(params, k_state, learning_rate=tc.learning_rate, warmup_steps=tc.warmup_steps,
                                     total_steps=tc.num_steps, weight_decay=tc.weight_decay, clip_norm=tc.clip_norm,
                                     ema_half_life_images=0.0, batch_size=tc.batch_size)
    ckpt, state = open_run(run_dir, cfg, log, state, save_every=tc.checkpoint_every, keep=tc.keep_checkpoints,
                           resume=cfg.resume)
    step_fn = make_train_step(lambda p, batch, key: lm_loss(p, lm_cfg, batch), optimizer)

    def eval_fn(st, step):
        r = evaluate_bits_per_byte(st.params, lm_cfg, tok, val_texts, row_length=dc.row_length)
        log.info(f"step {step}: validation {r['bits_per_byte']:.4f} bits/byte")
        return {"bits_per_byte": r["bits_per_byte"], "nll_per_token": r["nll_per_token"]}

    state, start_step, train_time, final_loss = train_resumable(
        run_dir, log, state, step_fn, rows, k_data, ckpt, num_steps=tc.stop_at_step or tc.num_steps,
        batch_size=tc.batch_size, log_every=tc.log_every, progress=tc.progress, eval_fn=eval_fn,
        eval_every=tc.eval_every)
    steps_done = int(state.step) - start_step
    log.info(f"trained steps {start_step} -> {int(state.step)} in {train_time:.1f}s; final loss {final_loss}")
    if int(state.step) < tc.num_steps:
        log.info(f"stopped at step {int(state.step)} (train.stop_at_step); rerun to resume.")
        return {"stopped_at_step": int(state.step)}

    val = evaluate_bits_per_byte(state.params, lm_cfg, tok, val_texts, row_length=dc.row_length)
    t0 = time.perf_counter()
    samples = continue_prompts(state.params, lm_cfg, tok, val_texts, sc, k_sample)
    sample_s = time.perf_counter() - t0
    with open(os.path.join(run_dir, "samples.txt"), "w", encoding="utf-8") as f:
        for s in samples:
            f.write(f"--- prompt: {s['prompt']!r}\n{s['prompt']}{s['continuation']}\n\n")
    curve = [{"step": r["step"], "bits_per_byte": r["eval/bits_per_byte"]}
             for r in read_metrics(run_dir) if "eval/bits_per_byte" in r]
    metrics = {"val_bits_per_byte": val["bits_per_byte"], "val_nll_per_token": val["nll_per_token"],
               "val_tokens": val["tokens"], "val_bytes": val["bytes"], "final_train_loss": final_loss,
               "curve": curve, "steps": int(state.step), "train_time_s": train_time,
               "train_tokens_per_s": (steps_done * tc.batch_size * dc.row_length / train_time
                                      if steps_done and train_time > 0 else None),
               "real_token_fraction": real, "params": num_params(params), "sample_time_s": sample_s,
               "samples": samples}
    write_json(os.path.join(run_dir, "metrics.json"), metrics)
    save_trained_lm(run_dir, state.params, lm_cfg)
    log.info(f"validation bits/byte {val['bits_per_byte']:.4f}; samples in {run_dir}/samples.txt")
    return metrics


def save_trained_lm(run_dir: str, params, lm_cfg: LMConfig) -> None:
    """The final weights (``final_params.msgpack``) and the LMConfig (``lm_config.json``)."""
    blob = serialization.msgpack_serialize(jax.tree.map(np.asarray, serialization.to_state_dict(params)))
    tmp = os.path.join(run_dir, "final_params.msgpack.tmp")
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, os.path.join(run_dir, "final_params.msgpack"))
    write_json(os.path.join(run_dir, "lm_config.json"), dataclasses.asdict(lm_cfg))


def load_trained_lm(run_dir: str):
    """``(params, LMConfig, tokenizer)`` of a finished ``train_lm`` run; a clear error if the
    run is missing or unfinished."""
    path = os.path.join(run_dir, "final_params.msgpack")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir} has no final_params.msgpack: train it first "
                                f"(python -m experiments.train_lm --set run_dir={run_dir})")
    with open(os.path.join(run_dir, "lm_config.json")) as f:
        lm_cfg = LMConfig(**json.load(f))
    with open(path, "rb") as f:
        raw = serialization.msgpack_restore(f.read())
    params = serialization.from_state_dict(init_params(lm_cfg, jax.random.key(0)), raw)
    tok_path = os.path.join(run_dir, "tokenizer.json")
    tok = BPETokenizer.load(tok_path) if os.path.exists(tok_path) else get_tokenizer("byte")
    return jax.tree.map(jnp.asarray, params), lm_cfg, tok


def main(argv=None):
    return run_cli(run, argv, default_config="experiments/configs/lm.py")


if __name__ == "__main__":
    main()
