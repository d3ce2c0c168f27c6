"""Decoding acceleration measured the way Spec-Bench measures it: one target, every method.

Target and draft: the finished ``experiments.train_lm`` runs (``runs/lm``, ``runs/lm_draft`` =
``--config experiments/configs/lm.py:draft``, which shares the target's BPE tokenizer). The heads
are trained here on the target's training rows, frozen target (cached under ``--cache``):
Medusa-1 (4 heads), an EAGLE-style head, 3 DeepSeek MTP modules (frozen main model, so every
method accelerates the same target; joint MTP training is ``research.lm.speculative.mtp.
train_mtp(joint=True)``). ``--quick`` instead trains a tiny byte-level target and draft inline
(seconds; the smoke test).

Methods (all in one jitted loop each; compile time excluded): ``plain``
(``research.lm.decode.generate``), ``draft_g<gamma>`` (speculative sampling with the draft model,
chain of gamma), ``medusa`` (top-k tree, exact rule), ``medusa_typical`` (Medusa's typical
acceptance: lossy, temperature > 0 only), ``eagle`` (tree, multi-draft rule), ``mtp`` (chain of
3), and at batch 1 ``hf_plain`` / ``hf_assisted`` (``transformers``' greedy ``generate`` and its
assisted generation with the same draft model, on the same weights through
``research.lm.hf.to_torch_model``).

Per method, batch size (1, 8), temperature (0, 1) and seed (3): held-out prompts (``--prompt``
tokens cut from the validation documents at seed-chosen offsets), ``--new`` new tokens. Columns:
``alpha_k`` (acceptance of draft depth k given all earlier ones accepted), ``tau`` (mean tokens
per target forward, bonus token included), target forwards per generated token, tokens/s
(median of ``--repeats`` interleaved round-robin runs, so every method sees the same machine
load), speedup over ``plain`` in the same run, Leviathan et al.'s predicted speedup for the chain
methods ``(1 - a^(g+1)) / ((1 - a)(g c + 1))`` (``a``: measured mean acceptance, ``c``: measured
draft / target step-time ratio from plain decoding), greedy equality with ``plain`` (rows
identical), and at temperature 1 the target's NLL of the generated tokens. Mean +- std over seeds.
A separate quality row for typical acceptance: plug-in KL of the empirical law of the first two
generated tokens (``--kl-rows`` samples from one prompt) to the target's exact two-token law, next
to the same estimate for exact methods (their KL is the estimator's finite-sample floor). And
the cost of verification: the target's forward time over ``T`` new tokens relative to ``T = 1``
(a tree of ``T - 1`` drafts costs that much per round; speculative decoding pays off where it
stays near 1, i.e. where decoding is memory-bound).

Usage:
  python -m experiments.train_lm && python -m experiments.train_lm --config experiments/configs/lm.py:draft
  python experiments/bench_decoding.py            # ~10 min on 2 CPU cores (+ ~4 min of head training once)
  python experiments/bench_decoding.py --quick --json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python experiments/bench_decoding.py` from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

METHODS = ("plain", "draft_g2", "draft_g4", "medusa", "medusa_typical", "eagle", "mtp", "hf_plain", "hf_assisted")
EAGLE_CHOICES = ((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (2, 0), (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0),
                 (0, 0, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1), (0, 0, 0, 0, 0))
MTP_MODULES, MEDUSA_HEADS = 3, 5


def _load():
    return [round(x, 2) for x in os.getloadavg()]


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ models

def _train_tiny(cfg, rows, steps, key):
    import optax

    from research.lm import init_params, lm_loss
    params = init_params(cfg, key)
    opt = optax.adamw(3e-3, weight_decay=0.0)
    state = opt.init(params)

    @jax.jit
    def step(params, state, batch):
        g = jax.grad(lambda p: lm_loss(p, cfg, batch)[0])(params)
        u, state = opt.update(g, state, params)
        return optax.apply_updates(params, u), state

    for i in range(steps):
        idx = np.asarray(jax.random.randint(jax.random.fold_in(key, i), (16,), 0, rows["tokens"].shape[0]))
        params, state = step(params, state, {k: jnp.asarray(v[idx]) for k, v in rows.items()})
    return params


def _rows(tok, texts, row_length):
    from research.lm.data import make_rows, tokenize_chunks
    return make_rows(tokenize_chunks(tok, texts, row_length), row_length, "packed")


def load_models(args):
    """target / draft (params, cfg), tokenizer, train rows and validation token streams."""
    from research.data.corpus import load_corpus
    from research.lm import LMConfig
    from research.lm.tokenizer import get_tokenizer
    if args.quick:
        train, val = (load_corpus("sklearn", split=s, val_fraction=0.1, seed=0) for s in ("train", "val"))
        tok = get_tokenizer("byte")
        rows = _rows(tok, train, 64)
        tcfg = LMConfig(vocab_size=tok.vocab_size, dim=48, depth=2, num_heads=4, num_kv_heads=2, max_len=128,
                        tie_embeddings=True)
        dcfg = tcfg.replace(dim=16, depth=1, num_heads=2, num_kv_heads=1)
        target = (_train_tiny(tcfg, rows, 40, jax.random.key(0)), tcfg)
        draft = (_train_tiny(dcfg, rows, 40, jax.random.key(1)), dcfg)
    else:
        from experiments.train_lm import load_trained_lm
        tp, tcfg, tok = load_trained_lm(args.target)
        dp, dcfg, dtok = load_trained_lm(args.draft)
        probe = "def speculative(x):\n    return x ** 2  # the same ids?"
        if dcfg.vocab_size != tcfg.vocab_size or not np.array_equal(dtok.encode(probe), tok.encode(probe)):
            raise ValueError(f"{args.draft} does not share {args.target}'s tokenizer: train it with "
                             f"--config experiments/configs/lm.py:draft")
        train, val = (load_corpus("pydoc", split=s, val_fraction=0.1, seed=0) for s in ("train", "val"))
        rows = _rows(tok, train, min(tcfg.max_len, 256))
        target, draft = (tp, tcfg), (dp, dcfg)
    val_ids = [np.asarray(tok.encode(t, bos=True), np.int32) for t in val]
    return target, draft, tok, rows, val_ids


def _cached(path, template, build):
    if path and os.path.exists(path):
        with open(path, "rb") as f:
            return jax.tree.map(jnp.asarray, serialization.from_state_dict(template, serialization.msgpack_restore(f.read())))
    tree = build()
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "wb") as f:
            f.write(serialization.msgpack_serialize(jax.tree.map(np.asarray, serialization.to_state_dict(tree))))
        os.replace(path + ".tmp", path)
    return tree


def train_heads(args, target, rows):
    from research.lm.speculative.eagle import init_eagle, train_eagle
    from research.lm.speculative.medusa import init_medusa, train_medusa
    from research.lm.speculative.mtp import init_mtp, train_mtp
    tp, cfg = target
    steps = args.head_steps
    tag = hashlib.sha1(np.asarray(jax.tree.leaves(tp)[0]).tobytes()).hexdigest()[:10]
    base = None if args.quick else os.path.join(args.cache, f"{tag}_s{steps}")
    key = jax.random.key(args.head_seed)
    out, times = {}, {}
    wanted = {m.split("_")[0] for m in args.methods}
    for name, template, build in (
            ("medusa", init_medusa(tp, cfg, MEDUSA_HEADS), lambda: train_medusa(
                tp, cfg, rows, num_heads=MEDUSA_HEADS, steps=steps, lr=1e-3, batch_size=16, key=key)[0]),
            ("eagle", init_eagle(cfg, key), lambda: train_eagle(
                tp, cfg, rows, steps=steps, lr=1e-3, batch_size=16, key=key)[0]),
            ("mtp", init_mtp(cfg, MTP_MODULES, key), lambda: train_mtp(
                tp, cfg, rows, num_modules=MTP_MODULES, steps=steps, lr=1e-3, batch_size=16, key=key,
                joint=False)[0])):
        if name not in wanted:
            continue
        t0 = time.perf_counter()
        out[name] = _cached(None if base is None else f"{base}_{name}.msgpack", template, build)
        times[name] = time.perf_counter() - t0
        _log(f"  heads {name}: ready in {times[name]:.1f}s")
    return out


# ------------------------------------------------------------------------------------------ methods

def make_runner(method, target, draft, heads, temperature, max_new):
    """``run(prompts, lengths, key) -> (tokens [B, P + new] np, stats dict | None)`` or None if the
    method does not apply (typical at temperature 0)."""
    from research.lm.decode import generate
    from research.lm.speculative import speculative_generate
    from research.lm.speculative.eagle import EagleDrafter
    from research.lm.speculative.medusa import MedusaDrafter
    from research.lm.speculative.mtp import MTPDrafter
    from research.lm.speculative.tree import MEDUSA_CHOICES_SMALL, Tree
    from research.lm.speculative.tree_decode import tree_generate
    tp, tcfg = target
    dp, dcfg = draft
    kw = dict(max_new_tokens=max_new, temperature=temperature)
    if method == "plain":
        return lambda x, n, k: (generate(tp, tcfg, x, n, key=k, **kw), None)
    if method.startswith("draft_g"):
        g = int(method[len("draft_g"):])
        return lambda x, n, k: speculative_generate(tp, tcfg, dp, dcfg, x, n, gamma=g, key=k, **kw)
    tree_kw = {"medusa": (MedusaDrafter(MEDUSA_HEADS), heads.get("medusa"), Tree.from_choices(MEDUSA_CHOICES_SMALL)),
               "medusa_typical": (MedusaDrafter(MEDUSA_HEADS), heads.get("medusa"), Tree.from_choices(MEDUSA_CHOICES_SMALL)),
               "eagle": (EagleDrafter(), heads.get("eagle"), Tree.from_choices(EAGLE_CHOICES)),
               "mtp": (MTPDrafter(MTP_MODULES), heads.get("mtp"), Tree.chain(MTP_MODULES))}
    if method in tree_kw:
        if method == "medusa_typical" and temperature == 0:
            return None
        drafter, params, tree = tree_kw[method]
        acc = "typical" if method == "medusa_typical" else "exact"
        return lambda x, n, k: tree_generate(tp, tcfg, drafter, params, x, n, tree=tree, key=k, acceptance=acc, **kw)
    raise ValueError(method)


def make_hf_runner(method, target, draft, temperature, max_new, counter):
    import torch

    from research.lm.hf import to_torch_model
    tm = to_torch_model(*target, attn_implementation="sdpa")
    dm = to_torch_model(*draft, attn_implementation="sdpa") if method == "hf_assisted" else None
    tm.register_forward_hook(lambda *a: counter.__setitem__(0, counter[0] + 1))

    def run(x, n, key):
        xt = torch.from_numpy(np.asarray(x, np.int64))
        kw = dict(attention_mask=torch.ones_like(xt), max_new_tokens=max_new, min_new_tokens=max_new, pad_token_id=0,
                  do_sample=temperature > 0)
        if temperature > 0:
            kw.update(temperature=float(temperature), top_k=0, top_p=1.0)
            torch.manual_seed(int(jax.random.randint(key, (), 0, 2 ** 30)))
        if dm is not None:
            kw.update(assistant_model=dm)
            dm.generation_config.num_assistant_tokens = 4
            dm.generation_config.num_assistant_tokens_schedule = "constant"
        counter[0] = 0
        with torch.no_grad():
            out = tm.generate(xt, **kw).numpy()
        return out, {"hf_target_forwards": counter[0]}
    return run


def _nll(target, tokens, p):
    from research.lm import apply_logits
    tp, cfg = target
    logits = apply_logits(tp, cfg, jnp.asarray(tokens))
    logp = jax.nn.log_softmax(logits[:, p - 1:-1].astype(jnp.float32))
    tgt = jnp.asarray(tokens)[:, p:]
    return float(-jnp.mean(jnp.take_along_axis(logp, tgt[..., None], -1)))


def _prompts(val_ids, batch, plen, seed):
    rng = np.random.default_rng(seed)
    docs = [d for d in val_ids if len(d) > plen]
    rows = []
    for _ in range(batch):
        d = docs[rng.integers(len(docs))]
        s = rng.integers(0, len(d) - plen)
        rows.append(d[s:s + plen])
    return np.stack(rows).astype(np.int32), np.full((batch,), plen, np.int32)


def _timed(fn, target_s):
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= target_s:
            return dt / n


def bench_setting(args, target, draft, heads, val_ids, batch, temperature):
    """Records for one (batch, temperature): per method, per seed, interleaved timing."""
    from research.lm.speculative import summarize_stats
    methods = [m for m in args.methods if not (m.startswith("hf_") and batch != 1)]
    recs = []
    for seed in range(args.seeds):
        x, n = _prompts(val_ids, batch, args.prompt, seed)
        key = jax.random.key(seed)
        runners, outs, stats = {}, {}, {}
        for m in methods:
            counter = [0]
            t0 = time.perf_counter()
            run = (make_hf_runner(m, target, draft, temperature, args.new, counter) if m.startswith("hf_")
                   else make_runner(m, target, draft, heads, temperature, args.new))
            if run is None:
                continue
            xa, na = (x, n) if m.startswith("hf_") else (jnp.asarray(x), jnp.asarray(n))
            out, st = run(xa, na, key)
            out = np.asarray(jax.block_until_ready(out))
            outs[m], stats[m] = out, st
            runners[m] = (lambda run=run, xa=xa, na=na: jax.block_until_ready(run(xa, na, key)))
            _log(f"  [b{batch} t{temperature} s{seed}] {m}: built + warmed up in {time.perf_counter() - t0:.1f}s")
        load0 = _load()
        times = {m: [] for m in runners}
        for _ in range(args.repeats):
            for m, fn in runners.items():
                times[m].append(_timed(fn, args.target_seconds))
        load1 = _load()
        for m in runners:
            sec = statistics.median(times[m])
            rec = dict(method=m, batch=batch, temperature=temperature, seed=seed, prompt=args.prompt,
                       new=args.new, seconds=sec, tokens_per_s=batch * args.new / sec,
                       loadavg_before=load0, loadavg_after=load1)
            st = stats[m]
            if st is not None and "target_forwards" in st:
                s = summarize_stats(st)
                rec.update(tau=s["tau"], alpha=s["alpha"], acceptance=s["acceptance"],
                           target_forwards_per_token=s["target_forwards"] / args.new)
            elif st is not None:
                fw = st["hf_target_forwards"]
                rec.update(target_forwards_per_token=fw / args.new, tau=args.new / max(fw, 1))
            if "plain" in outs:
                rec["greedy_equal_rows"] = (int(np.sum(np.all(outs[m][:, :args.prompt + args.new] == outs["plain"],
                                                              axis=1))) if temperature == 0 else None)
            if temperature > 0:
                rec["target_nll"] = _nll(target, outs[m][:, :args.prompt + args.new], args.prompt)
            recs.append(rec)
        base = next((r for r in recs if r["seed"] == seed and r["method"] == "plain"), None)
        for r in recs:
            if r["seed"] == seed and base is not None:
                r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
    return recs


def step_cost_ratio(args, target, draft, batch):
    """c = draft step time / target step time, from plain greedy decoding of each model."""
    from research.lm.decode import generate
    x, n = (jnp.asarray(a) for a in _prompts([np.arange(args.prompt + 2) % 7], batch, args.prompt, 0))
    t = {}
    for name, (p, cfg) in (("target", target), ("draft", draft)):
        fn = lambda p=p, cfg=cfg: jax.block_until_ready(generate(p, cfg, x, n, max_new_tokens=args.new,  # noqa: E731
                                                                 key=jax.random.key(0)))
        fn()
        t[name] = min(_timed(fn, args.target_seconds) for _ in range(3))
    return t["draft"] / t["target"]


def verify_cost(args, target, batch, sizes=(1, 2, 4, 8, 16, 27)):
    """Target forward time for T new tokens over a cached prompt (the verification of a T-node
    tree) relative to T = 1: speculative decoding pays only where this stays near 1."""
    from research.lm.cache import forward_cached, init_cache
    from research.lm.model import head
    tp, cfg = target
    prompt = jnp.zeros((batch, args.prompt), jnp.int32)
    cache = init_cache(cfg, batch, args.prompt + max(sizes))
    _, cache = forward_cached(tp, cfg, prompt, cache)
    fwd = jax.jit(lambda c, x, m: head(tp, cfg, forward_cached(tp, cfg, x, c, tree_mask=m)[0]))
    out = []
    for t in sizes:
        x = jnp.zeros((batch, t), jnp.int32)
        m = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (batch, t, t))
        fn = lambda x=x, m=m: jax.block_until_ready(fwd(cache, x, m))  # noqa: E731
        fn()
        sec = min(_timed(fn, args.target_seconds) for _ in range(args.repeats))
        out.append(dict(kind="verify_cost", batch=batch, tokens=t, ms=sec * 1e3))
    for r in out:
        r["ratio"] = r["ms"] / out[0]["ms"]
    return out


def kl_quality(args, target, heads, val_ids):
    """Plug-in KL(empirical law of the first two tokens || target's exact law), one prompt."""
    from research.lm import apply_logits
    tp, cfg = target
    x, _ = _prompts(val_ids, 1, args.prompt, 99)
    rows = args.kl_rows
    xs, ns = jnp.asarray(np.repeat(x, rows, 0)), jnp.full((rows,), args.prompt, jnp.int32)
    p0 = np.asarray(jax.nn.softmax(apply_logits(tp, cfg, jnp.asarray(x))[0, -1]), np.float64)
    out = []
    for m in ("plain", "medusa", "medusa_typical"):
        run = make_runner(m, target, (None, None), heads, 1.0, 2)
        toks = np.asarray(run(xs, ns, jax.random.key(7))[0])[:, args.prompt:args.prompt + 2]
        firsts = np.unique(toks[:, 0])
        ext = jnp.asarray(np.concatenate([np.repeat(x, len(firsts), 0), firsts[:, None]], 1))
        p1 = np.asarray(jax.nn.softmax(apply_logits(tp, cfg, ext)[:, -1]), np.float64)
        pairs, counts = np.unique(toks, axis=0, return_counts=True)
        emp = counts / rows
        law = np.asarray([p0[a] * p1[np.searchsorted(firsts, a), b] for a, b in pairs])
        out.append(dict(method=m, kind="kl", kl_rows=rows, kl_two_token=float(np.sum(emp * np.log(emp / law)))))
    return out


def run(args) -> list[dict]:
    t0 = time.perf_counter()
    target, draft, tok, rows, val_ids = load_models(args)
    _log(f"models loaded in {time.perf_counter() - t0:.1f}s; target {target[1]}")
    heads = train_heads(args, target, rows)
    records = []
    for batch in args.batches:
        records += verify_cost(args, target, batch)
        c = step_cost_ratio(args, target, draft, batch)
        for temp in args.temperatures:
            recs = bench_setting(args, target, draft, heads, val_ids, batch, temp)
            for r in recs:
                r["draft_cost_ratio"] = c
            records += recs
    if "medusa_typical" in args.methods and args.kl_rows:
        records += kl_quality(args, target, heads, val_ids)
    meta = dict(jax=jax.__version__, cores=len(os.sched_getaffinity(0)), quick=args.quick)
    for r in records:
        r.update(meta)
    return records


def _ms(vals, fmt="{:.2f}"):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return fmt.format(vals[0])
    return f"{fmt.format(statistics.mean(vals))} ± {fmt.format(statistics.stdev(vals))}"


def leviathan(alpha, gamma, c):
    if alpha is None:
        return None
    alpha = min(alpha, 1 - 1e-9)
    return (1 - alpha ** (gamma + 1)) / ((1 - alpha) * (gamma * c + 1))


def format_table(records) -> str:
    lines = ["| method | batch | temp | tau | alpha_1 / alpha_2 / alpha_3 | target fwd / token | tokens/s | speedup "
             "| Leviathan predicted | greedy = plain | target NLL |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    keys = []
    for r in records:
        k = (r.get("method"), r.get("batch"), r.get("temperature"))
        if r.get("kind") not in ("kl", "verify_cost") and k not in keys:
            keys.append(k)
    for m, b, t in keys:
        rs = [r for r in records if (r.get("method"), r.get("batch"), r.get("temperature")) == (m, b, t)]
        alphas = [r["alpha"] for r in rs if r.get("alpha")]
        a = " / ".join(_ms([al[i] for al in alphas if i < len(al) and al[i] == al[i]]) for i in range(3)) \
            if alphas else "-"
        pred = "-"
        if m.startswith("draft_g") or m == "mtp":
            g = int(m[len("draft_g"):]) if m.startswith("draft_g") else MTP_MODULES
            c = rs[0]["draft_cost_ratio"] if m.startswith("draft_g") else None
            if c is not None:
                pred = _ms([leviathan(r.get("acceptance"), g, c) for r in rs])
        eq = "-" if t > 0 else (f"{sum(r['greedy_equal_rows'] for r in rs)}/{b * len(rs)}"
                                if rs[0].get("greedy_equal_rows") is not None else "-")
        lines.append(f"| {m} | {b} | {t:g} | {_ms([r.get('tau') for r in rs])} | {a} | "
                     f"{_ms([r.get('target_forwards_per_token') for r in rs], '{:.3f}')} | "
                     f"{_ms([r['tokens_per_s'] for r in rs], '{:.0f}')} | {_ms([r.get('speedup') for r in rs])} | "
                     f"{pred} | {eq} | {_ms([r.get('target_nll') for r in rs], '{:.3f}')} |")
    kl = [r for r in records if r.get("kind") == "kl"]
    if kl:
        lines.append("\n| quality (temperature 1, one prompt) | plug-in KL of the 2-token law to the target |")
        lines.append("|---|---:|")
        for r in kl:
            lines.append(f"| {r['method']} ({r['kl_rows']} samples) | {r['kl_two_token']:.4f} |")
    vc = [r for r in records if r.get("kind") == "verify_cost"]
    if vc:
        lines.append("\n| target forward over T new tokens (cached prompt) | batch | ms | vs T = 1 |")
        lines.append("|---|---:|---:|---:|")
        for r in vc:
            lines.append(f"| T = {r['tokens']} | {r['batch']} | {r['ms']:.3f} | {r['ratio']:.2f}x |")
    rs = [r for r in records if "loadavg_before" in r]
    if rs:
        lines.append(f"\nload average (1, 5, 15 min): first row before {rs[0]['loadavg_before']}, last row after "
                     f"{rs[-1]['loadavg_after']}; {rs[0]['cores']} cores; jax {rs[0]['jax']}; "
                     f"draft/target step cost c = {rs[0]['draft_cost_ratio']:.3f} (batch {rs[0]['batch']})")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny inline-trained models (smoke test)")
    p.add_argument("--json", action="store_true", help="one JSON record per row on stdout (table on stderr)")
    p.add_argument("--target", default="runs/lm")
    p.add_argument("--draft", default="runs/lm_draft")
    p.add_argument("--cache", default="runs/bench_decoding", help="trained heads are cached here")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--batches", default="1,8")
    p.add_argument("--temperatures", default="0,1")
    p.add_argument("--seeds", type=int, default=None, help="default 3 (--quick 1)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 32; --quick 8)")
    p.add_argument("--new", type=int, default=None, help="new tokens (default 64; --quick 8)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 3; --quick 1)")
    p.add_argument("--target-seconds", type=float, default=None, help="min seconds per timing (default 0.5)")
    p.add_argument("--head-steps", type=int, default=None, help="training steps per head (default 300; --quick 5)")
    p.add_argument("--head-seed", type=int, default=0)
    p.add_argument("--kl-rows", type=int, default=None, help="samples for the KL row (default 4096; --quick 64)")
    a = p.parse_args(argv)
    a.methods = tuple(m for m in a.methods.split(",") if m)
    if not a.methods or set(a.methods) - set(METHODS):
        p.error(f"--methods must be a comma list of {METHODS}, got {','.join(a.methods)!r}")
    try:
        a.batches = tuple(int(b) for b in a.batches.split(","))
        a.temperatures = tuple(float(t) for t in a.temperatures.split(","))
    except ValueError:
        p.error("--batches must be ints and --temperatures numbers, comma separated")
    if min(a.batches) < 1 or min(a.temperatures) < 0:
        p.error("--batches must be >= 1 and --temperatures >= 0")
    q = a.quick
    a.seeds = a.seeds or (1 if q else 3)
    a.prompt = a.prompt or (8 if q else 32)
    a.new = a.new or (8 if q else 64)
    a.repeats = a.repeats or (1 if q else 3)
    a.target_seconds = a.target_seconds or (0.01 if q else 0.5)
    a.head_steps = a.head_steps or (5 if q else 300)
    a.kl_rows = a.kl_rows if a.kl_rows is not None else (64 if q else 4096)
    if min(a.seeds, a.prompt, a.new, a.repeats, a.head_steps) < 1 or a.target_seconds <= 0:
        p.error("--seeds, --prompt, --new, --repeats, --head-steps must be >= 1 and --target-seconds > 0")
    return a


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    try:
        records = run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"bench_decoding: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    if args.json:
        for r in records:
            print(json.dumps(r), flush=True)
        print(format_table(records), file=sys.stderr)
    else:
        print(format_table(records))
    return records


if __name__ == "__main__":
    main()
