"""Sequence packing: bin assignment, segment ids/positions, and exactness of packed attention."""
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import reference_attention
from research.data.packing import (
    assign_rows,
    masked_mean,
    next_token_targets,
    pack_sequences,
    packing_efficiency,
    packing_report,
)

jax.config.update("jax_enable_x64", False)

ROW = 16
VOCAB = 13


def _docs(seed, n=9, lo=1, hi=ROW):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCAB, size=int(rng.integers(lo, hi + 1))) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# bin assignment against independent, naive re-implementations
# ---------------------------------------------------------------------------------------------
def _naive_first_fit(lengths, cap):
    rows = []  # list of used capacity
    out = []
    for n in lengths:
        for r, used in enumerate(rows):
            if used + n <= cap:
                rows[r] += n
                out.append(r)
                break
        else:
            rows.append(n)
            out.append(len(rows) - 1)
    return out, len(rows)


def _check_best_fit(lengths, order, row_of, cap):
    """Replays placements: each doc went to a fitting row with the least room (or a new row)."""
    used = {}
    for i in order:
        n = lengths[i]
        fitting = {r: cap - u for r, u in used.items() if cap - u >= n}
        r = int(row_of[i])
        if fitting:
            assert r in fitting and fitting[r] == min(fitting.values())
        else:
            assert r not in used and r == len(used)
        used[r] = used.get(r, 0) + n


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sort", [False, True])
def test_first_fit_matches_naive(seed, sort):
    lengths = np.random.default_rng(seed).integers(1, ROW + 1, size=40)
    row_of, rows = assign_rows(lengths, ROW, method="first_fit", sort=sort)
    order = sorted(range(40), key=lambda i: -lengths[i]) if sort else list(range(40))
    ref_rows, ref_n = _naive_first_fit([lengths[i] for i in order], ROW)
    assert rows == ref_n
    np.testing.assert_array_equal(row_of[order], ref_rows)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sort", [False, True])
def test_best_fit_is_best_fit(seed, sort):
    lengths = np.random.default_rng(seed).integers(1, ROW + 1, size=40)
    row_of, rows = assign_rows(lengths, ROW, method="best_fit", sort=sort)
    order = sorted(range(40), key=lambda i: -lengths[i]) if sort else list(range(40))
    _check_best_fit(lengths, order, row_of, ROW)
    assert rows == len(set(row_of.tolist()))
    assert rows >= math.ceil(lengths.sum() / ROW)


@pytest.mark.parametrize("method", ["first_fit", "best_fit"])
@pytest.mark.parametrize("sort", [False, True])
def test_pack_layout(method, sort):
    docs = _docs(3, n=12)
    pb = pack_sequences(docs, ROW, method=method, sort=sort, pad_id=-1)
    R = pb.tokens.shape[0]
    assert pb.tokens.shape == pb.segment_ids.shape == pb.positions.shape == (R, ROW)
    covered = np.zeros((R, ROW), dtype=int)
    for i, d in enumerate(docs):
        r, s = pb.placement[i]
        np.testing.assert_array_equal(pb.tokens[r, s:s + len(d)], d)
        np.testing.assert_array_equal(pb.positions[r, s:s + len(d)], np.arange(len(d)))
        assert len(set(pb.segment_ids[r, s:s + len(d)].tolist())) == 1
        covered[r, s:s + len(d)] += 1
    assert covered.max() == 1  # no overlap
    # padding exactly where nothing was placed, with id 0, position 0 and the pad token
    pad = covered == 0
    assert np.all(pb.segment_ids[pad] == 0) and np.all(pb.positions[pad] == 0)
    assert np.all(pb.tokens[pad] == -1) and np.all(pb.segment_ids[~pad] > 0)
    # ids count 1, 2, ... within each row in order of appearance
    for r in range(R):
        ids = pb.segment_ids[r][pb.segment_ids[r] > 0]
        starts = np.r_[True, ids[1:] != ids[:-1]]
        np.testing.assert_array_equal(ids[starts], np.arange(1, starts.sum() + 1))
    total = sum(len(d) for d in docs)
    assert pb.efficiency == pytest.approx(total / (R * ROW))
    assert packing_efficiency(pb.segment_ids) == pb.efficiency


def test_packing_report_and_min_rows():
    lengths = np.random.default_rng(5).integers(1, ROW + 1, size=50)
    rep = packing_report(lengths, ROW)
    assert rep["no_packing"]["rows"] == 50
    lb = math.ceil(lengths.sum() / ROW)
    for name, r in rep.items():
        assert r["rows"] >= lb
        assert r["efficiency"] == pytest.approx(lengths.sum() / (r["rows"] * ROW))
    assert rep["best_fit_decreasing"]["rows"] < rep["no_packing"]["rows"]
    pb = pack_sequences([[1, 2], [3]], 4, min_rows=3)
    assert pb.tokens.shape == (3, 4) and np.all(pb.segment_ids[1:] == 0)


@pytest.mark.parametrize("bad, match", [
    (dict(sequences=[[1] * 17]), "row_length"),
    (dict(sequences=[[1], []]), "at least one token"),
    (dict(sequences=[[1]], method="worst_fit"), "unknown packing method"),
    (dict(sequences=[[1.5]]), "integer"),
    (dict(sequences=[[1], [2]], min_rows=0), "min_rows"),
])
def test_bad_input(bad, match):
    kwargs = dict(row_length=ROW)
    kwargs.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        pack_sequences(**kwargs)


# ---------------------------------------------------------------------------------------------
# a tiny transformer LM (pure functions) using reference_attention with segment ids
# ---------------------------------------------------------------------------------------------
E, H, D = 16, 2, 8


def _init(key):
    ks = jax.random.split(key, 6)
    n = lambda k, s: jax.random.normal(k, s, jnp.float32) / math.sqrt(s[0])  # noqa: E731
    return {"tok": jax.random.normal(ks[0], (VOCAB, E)), "pos": jax.random.normal(ks[1], (ROW, E)),
            "qkv": n(ks[2], (E, 3 * H * D)), "o": n(ks[3], (H * D, E)),
            "mlp": n(ks[4], (E, 2 * E)), "out": n(ks[5], (E, VOCAB))}


def _rms(x):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)


def _forward_emb(p, x, positions, segment_ids, causal):
    """x: [B, T, E] token embeddings -> logits [B, T, VOCAB]."""
    B, T, _ = x.shape
    h = x + p["pos"][positions]
    qkv = (_rms(h) @ p["qkv"]).reshape(B, T, 3, H, D)
    a = reference_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=causal,
                            segment_ids=segment_ids)
    h = h + a.reshape(B, T, H * D) @ p["o"]
    h = h + jax.nn.gelu(_rms(h) @ p["mlp"]) @ p["mlp"].T
    return _rms(h) @ p["out"]


@partial(jax.jit, static_argnames="causal")
def _forward(p, tokens, positions, segment_ids, causal):
    return _forward_emb(p, p["tok"][tokens], positions, segment_ids, causal)


def _ce(logits, targets):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]


@pytest.fixture(scope="module")
def params():
    return _init(jax.random.PRNGKey(0))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("method", ["first_fit", "best_fit"])
def test_packed_rows_equal_docs_alone(params, causal, method):
    docs = _docs(11, n=7)
    pb = pack_sequences(docs, ROW, method=method, sort=True)
    out = _forward(params, jnp.asarray(pb.tokens), jnp.asarray(pb.positions),
                   jnp.asarray(pb.segment_ids), causal)
    for i, d in enumerate(docs):
        r, s = pb.placement[i]
        t = jnp.asarray(d, jnp.int32)[None]
        alone = _forward(params, t, jnp.arange(len(d))[None], jnp.ones_like(t), causal)
        np.testing.assert_allclose(out[r, s:s + len(d)], alone[0], rtol=2e-5, atol=2e-5)
    # sanity: without segment ids the packed outputs differ (the test can fail)
    leaky = _forward(params, jnp.asarray(pb.tokens), jnp.asarray(pb.positions), None, causal)
    assert not np.allclose(leaky, out, atol=1e-3)


@pytest.mark.parametrize("causal", [True, False])
def test_zero_cross_document_gradient(params, causal):
    docs = _docs(4, n=6, lo=3, hi=7)
    pb = pack_sequences(docs, ROW, method="first_fit")
    emb = params["tok"][jnp.asarray(pb.tokens)]
    seg, pos = jnp.asarray(pb.segment_ids), jnp.asarray(pb.positions)
    row = int(pb.placement[0, 0])
    for doc_id in np.unique(pb.segment_ids[row][pb.segment_ids[row] > 0]):
        sel = (seg == doc_id) & (jnp.arange(seg.shape[0])[:, None] == row)

        def loss(e):
            return jnp.sum(jnp.where(sel[..., None], _forward_emb(params, e, pos, seg, causal), 0.0) ** 2)

        g = jax.grad(loss)(emb)
        other = ~np.asarray(sel)
        assert np.all(np.asarray(g)[other] == 0.0), "gradient leaked across documents"
        assert np.abs(np.asarray(g)[np.asarray(sel)]).max() > 0


def test_packed_loss_is_token_weighted_mean(params):
    docs = _docs(8, n=10, lo=1)
    pb = pack_sequences(docs, ROW, method="best_fit", sort=True)
    tokens, seg = jnp.asarray(pb.tokens), jnp.asarray(pb.segment_ids)
    targets, mask = next_token_targets(tokens, seg)
    logits = _forward(params, tokens, jnp.asarray(pb.positions), seg, True)
    packed = masked_mean(_ce(logits, targets), mask)
    total, count = 0.0, 0
    for d in docs:  # each document alone, no padding at all, float64 accumulation
        if len(d) < 2:
            continue
        t = jnp.asarray(d, jnp.int32)[None]
        lg = _forward(params, t, jnp.arange(len(d))[None], jnp.ones_like(t), True)
        total += float(np.sum(np.asarray(_ce(lg[:, :-1], t[:, 1:]), np.float64)))
        count += len(d) - 1
    assert float(mask.sum()) == count
    np.testing.assert_allclose(float(packed), total / count, rtol=1e-5)
    # numpy path of the helpers agrees
    t_np, m_np = next_token_targets(pb.tokens, pb.segment_ids)
    np.testing.assert_array_equal(t_np, np.asarray(targets))
    np.testing.assert_array_equal(m_np, np.asarray(mask))


@pytest.mark.entry
@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_train_packed_lm_smoke(mode, tmp_path):
    """The packed-LM experiment (config file -> validate -> run -> shared loop) on tiny sizes."""
    import os

    from experiments import train_packed_lm

    out = train_packed_lm.main(["--set", f"mode={mode}", "--set", "steps=4", "--set", "log_every=2",
                                "--set", "model.width=16", "--set", "model.depth=1", "--set", "rows_per_step=2",
                                "--set", "row_length=64", "--set", f"run_dir={tmp_path}"])
    assert np.isfinite(out["final_loss"])
    assert (out["efficiency"] > 0.9) if mode == "packed" else (out["efficiency"] < 0.9)
    for f in ("summary.json", "metrics.jsonl", "curves.png", "config.json"):
        assert os.path.exists(tmp_path / f)
