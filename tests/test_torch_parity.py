"""Parity of the PyTorch twins (experiments/torch_baselines) with the JAX flagship.

Same weights (through the converter) and the same inputs must give: the same DiT outputs (float32
tolerance, scanned and unscanned blocks), exactly the same weights after a converter round trip,
the same loss, the same gradients per parameter, the same AdamW trajectory (schedule, clipping,
decay mask, EMA) and the same Euler/Heun samples with classifier-free guidance.

The random weights are the Flax initialisation plus noise, so that the zero-initialised adaLN
and output layers do not make everything trivially zero.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from experiments.torch_baselines import convert, flow  # noqa: E402
from experiments.torch_baselines import dit as tdit  # noqa: E402
from experiments.torch_baselines import optim as topt  # noqa: E402
from research.generative.losses import rectified_flow_loss  # noqa: E402
from research.generative.guidance import guided  # noqa: E402
from research.generative.sampling import sample_time  # noqa: E402
from research.generative.timesteps import sample_timesteps  # noqa: E402
from research.nn.dit import DiT, init_dit, make_model_fn  # noqa: E402
from research.train.optim import default_decay_mask, make_optimizer, warmup_cosine_schedule  # noqa: E402
from research.train.state import create_train_state  # noqa: E402
from research.train.step import make_train_step  # noqa: E402

CFG = dict(input_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10)
B = 4

torch.manual_seed(0)


def _perturb(params, key, scale=0.1):
    leaves, tdef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        tdef, [l + scale * jax.random.normal(k, l.shape, l.dtype) for l, k in zip(leaves, keys)])


def _torch_model(params, dropout=0.1):
    m = tdit.DiT(**CFG, class_dropout_prob=dropout)
    convert.load_flax_params(m, params)
    return m


def _t(x):
    return torch.from_numpy(np.array(x))


@functools.lru_cache(maxsize=None)
def _init():
    """One Flax init (scanned); returns (raw init, perturbed params)."""
    raw = init_dit(DiT(**CFG), jax.random.key(0))
    return raw, jax.jit(_perturb)(raw, jax.random.key(1))


def _setup(scan: bool, dropout: float = 0.1):
    """(Flax model, perturbed params in its layout); the unscanned layout comes from the converter,
    whose exactness is tested below."""
    model = DiT(**CFG, class_dropout_prob=dropout, scan_blocks=scan)
    params = _init()[1]
    if not scan:
        params = _unscanned()
    return model, params


@functools.lru_cache(maxsize=None)
def _unscanned():
    return jax.tree_util.tree_map(jnp.asarray, convert.torch_to_flax(convert.flax_to_torch(_init()[1]),
                                                                     scan_blocks=False))


@functools.lru_cache(maxsize=None)
def _apply(scan: bool):
    model, _ = _setup(scan)
    return jax.jit(lambda p, x, t, y, drop: model.apply({"params": p}, x, t, y, force_drop_ids=drop))


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, 8, 8, 1)).astype(np.float32)
    t = rng.uniform(0.01, 0.99, B).astype(np.float32)
    y = np.array([0, 3, 9, 10], np.int32)  # 10 = null label
    return x, t, y


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


@pytest.mark.parametrize("scan", [True, False])
def test_dit_forward_parity(scan, inputs):
    model, params = _setup(scan)
    x, t, y = inputs
    no_drop = np.zeros(B, np.int32)
    out_j = np.asarray(_apply(scan)(params, x, t, y, no_drop))
    tm = _torch_model(params)
    with torch.no_grad():
        out_t = tm(_t(x), _t(t), _t(y)).numpy()
    assert out_t.dtype == np.float32 and out_t.shape == x.shape
    assert np.abs(out_j).max() > 0.1  # non-trivial output
    np.testing.assert_allclose(out_t, out_j, rtol=1e-5, atol=2e-5)
    # forced label drop = null label on both sides
    drop = np.array([1, 0, 1, 0], np.int32)
    out_j = np.asarray(_apply(scan)(params, x, t, y, drop))
    with torch.no_grad():
        out_t = tm(_t(x), _t(t), _t(y), force_drop_ids=_t(drop)).numpy()
    np.testing.assert_allclose(out_t, out_j, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("scan", [True, False])
def test_converter_round_trip_exact(scan):
    _, params = _setup(scan)
    sd = convert.flax_to_torch(params)
    back = convert.torch_to_flax(sd, scan_blocks=scan)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(
        jax.tree_util.tree_map(np.asarray, params))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, back)
    # torch -> flax -> torch is exact too, and scanned <-> unscanned is a pure relayout
    sd2 = convert.flax_to_torch(back)
    assert set(sd2) == set(sd) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    other = convert.torch_to_flax(sd, scan_blocks=not scan)
    model_other = DiT(**CFG, scan_blocks=not scan)
    # the relayout has exactly the structure and shapes of the other layout's own init
    expect = jax.eval_shape(lambda k: init_dit(model_other, k), jax.random.key(0))
    assert jax.tree_util.tree_structure(expect) == jax.tree_util.tree_structure(other)
    jax.tree_util.tree_map(lambda e, o: np.testing.assert_equal(e.shape, o.shape), expect, other)


def test_converter_bad_input():
    _, params = _setup(True)
    with pytest.raises(ValueError, match="params"):
        convert.flax_to_torch({"params": params})
    sd = convert.flax_to_torch(params)
    sd["blocks.0.attn.bogus"] = torch.zeros(3)
    with pytest.raises(ValueError, match="bogus"):
        convert.torch_to_flax(sd)
    small = tdit.DiT(**{**CFG, "hidden_size": 16})
    with pytest.raises(ValueError, match="shape mismatch"):
        convert.load_flax_params(small, params)


def test_init_scheme_matches():
    """Same initialisation scheme: identical names/shapes, the same exact zeros and ones, and the
    same spread for every random tensor (std ratio within sampling error)."""
    pj = convert.flax_to_torch(_init()[0])
    pt = tdit.DiT(**CFG).state_dict()
    assert set(pj) == set(pt)
    for name in pj:
        a, b = pj[name].numpy(), pt[name].numpy()
        assert a.shape == b.shape, name
        for const in (0.0, 1.0):
            assert np.all(a == const) == np.all(b == const), name
        if np.all(a == a.flat[0]):
            continue
        ratio = b.std() / a.std()
        assert abs(ratio - 1) < 0.05 + 3.0 / np.sqrt(a.size), (name, ratio)
        assert abs(a.mean()) < 4 * a.std() / np.sqrt(a.size) and abs(b.mean()) < 4 * b.std() / np.sqrt(b.size)


def test_decay_mask_matches():
    _, params = _setup(True)
    mask_j = convert.flax_to_torch(jax.tree_util.tree_map(
        lambda m, p: np.full(p.shape, m, np.float32), default_decay_mask(params), params))
    mask_t = tdit.decay_mask(_torch_model(params))
    assert set(mask_j) == set(mask_t)
    for name, m in mask_t.items():
        assert bool(mask_j[name].flatten()[0]) == m, name
    assert not mask_t["y_embedder.embedding_table.weight"] and mask_t["x_embedder.weight"]


def _jax_loss_explicit(model_fn, params, x0, y, t, eps):
    tb = t[:, None, None, None]
    pred = model_fn(params, (1 - tb) * x0 + tb * eps, t, y, None)
    return jnp.mean(jnp.mean(jnp.square(pred - (eps - x0)).reshape(x0.shape[0], -1), axis=1))


def test_timesteps_logit_normal_distribution():
    g = torch.Generator().manual_seed(0)
    t = flow.sample_timesteps((20000,), generator=g, loc=0.3, scale=0.8).numpy()
    tj = np.asarray(sample_timesteps(jax.random.key(0), (20000,), loc=0.3, scale=0.8))
    logit = np.log(t / (1 - t))
    assert abs(logit.mean() - 0.3) < 0.03 and abs(logit.std() - 0.8) < 0.03
    # same distribution as the JAX sampler (two-sample KS statistic)
    grid = np.linspace(0, 1, 201)
    ks = np.max(np.abs(np.searchsorted(np.sort(t), grid) - np.searchsorted(np.sort(tj), grid))) / 20000
    assert ks < 0.03
    # the same uniform gives the same t (inverse-CDF mapping)
    u = np.array([1e-6, 0.1, 0.5, 0.9], np.float32)
    tt = torch.sigmoid(0.3 + 0.8 * torch.special.ndtri(_t(u))).numpy()
    tj = np.asarray(jax.nn.sigmoid(0.3 + 0.8 * jax.scipy.special.ndtri(u)))
    np.testing.assert_allclose(tt, tj, rtol=1e-5)


def test_loss_parity_with_jax_rectified_flow_loss(inputs):
    """Torch loss with the (t, eps) that ``rectified_flow_loss`` draws from its key equals it."""
    model, params = _setup(True, dropout=0.0)
    x, _, y = inputs
    key = jax.random.key(5)
    loss_j, _ = jax.jit(lambda p, x0, k, c: rectified_flow_loss(make_model_fn(model), p, x0, k, cond=c, loc=0.2,
                                                                 scale=1.1))(params, x, key, y)
    # the draws of research.generative.losses: key -> (eps, rest); rest -> (t, z, model)
    k_eps, k_rest = jax.random.split(key)
    eps = jax.random.normal(k_eps, x.shape, jnp.float32)
    k_t = jax.random.split(k_rest, 3)[0]
    t = sample_timesteps(k_t, (B,), dist="logit_normal", loc=0.2, scale=1.1)
    tm = _torch_model(params, dropout=0.0)
    with torch.no_grad():
        loss_t = flow.rectified_flow_loss(tm, _t(x), _t(y), t=_t(t), eps=_t(eps))
    assert float(loss_j) > 0.1
    np.testing.assert_allclose(float(loss_t), float(loss_j), rtol=2e-6)


@pytest.mark.parametrize("scan", [True, False])
def test_gradient_parity(scan, inputs):
    model, params = _setup(scan)
    x, t, y = inputs
    eps = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    fn = make_model_fn(model)
    loss_j, g_j = jax.jit(jax.value_and_grad(functools.partial(_jax_loss_explicit, fn)))(params, x, y, t, eps)
    tm = _torch_model(params)
    loss_t = flow.rectified_flow_loss(tm, _t(x), _t(y), t=_t(t), eps=_t(eps), train=False)
    loss_t.backward()
    np.testing.assert_allclose(loss_t.item(), float(loss_j), rtol=2e-6)
    g_t = convert.torch_to_flax({n: p.grad for n, p in tm.named_parameters()}, scan_blocks=scan)
    errs = jax.tree_util.tree_map(_rel_err, g_t, jax.tree_util.tree_map(np.asarray, g_j))
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(errs)}
    worst = max(flat, key=flat.get)
    print(f"\nmax relative gradient error (scan={scan}): {flat[worst]:.2e} at {worst}")
    assert flat[worst] < 1e-4, flat


def test_schedule_matches():
    sj = warmup_cosine_schedule(3e-3, warmup_steps=5, total_steps=20, end_lr_frac=0.1)
    st = topt.warmup_cosine(3e-3, warmup_steps=5, total_steps=20, end_lr_frac=0.1)
    steps = np.arange(0, 25)
    np.testing.assert_allclose([st(int(s)) for s in steps], np.asarray(jax.vmap(sj)(steps)), rtol=1e-6, atol=1e-12)
    m = tdit.DiT(**CFG)
    opt, sched = topt.make_optimizer(m, learning_rate=3e-3, warmup_steps=5, total_steps=20, weight_decay=0.1,
                                     end_lr_frac=0.1)
    seen = []
    for _ in range(8):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(seen, np.asarray(jax.vmap(sj)(steps[:8])), rtol=1e-6, atol=1e-12)


def test_optimizer_trajectory_parity(inputs):
    """Three train steps (warmup + cosine, clipping that triggers, masked decay, EMA) agree."""
    model, params = _setup(True, dropout=0.0)
    x, _, y = inputs
    rng = np.random.default_rng(2)
    n_steps, hp = 3, dict(learning_rate=1e-2, warmup_steps=1, total_steps=4, weight_decay=0.1, end_lr_frac=0.1)
    clip, ema_decay = 0.3, 0.8
    batches = [dict(x=x, y=y, t=rng.uniform(0.05, 0.95, B).astype(np.float32),
                    eps=rng.standard_normal(x.shape).astype(np.float32)) for _ in range(n_steps)]
    fn = make_model_fn(model)

    def loss_fn(p, batch, key):
        del key
        loss = _jax_loss_explicit(fn, p, batch["x"], batch["y"], batch["t"], batch["eps"])
        return loss, {}

    opt_j = make_optimizer(clip_norm=clip, **hp)
    step = make_train_step(loss_fn, opt_j, ema_decay=ema_decay, donate=False)
    state = create_train_state(params, opt_j, jax.random.key(0), ema=True)

    tm = _torch_model(params, dropout=0.0)
    ema_t = [p.detach().clone() for p in tm.parameters()]
    opt_t, sched_t = topt.make_optimizer(tm, **hp)
    plist = list(tm.parameters())
    for i, batch in enumerate(batches):
        state, metrics = step(state, batch)
        mt = topt.train_step(
            lambda: flow.rectified_flow_loss(tm, _t(batch["x"]), _t(batch["y"]), t=_t(batch["t"]),
                                             eps=_t(batch["eps"]), train=False),
            plist, opt_t, sched_t, clip_norm=clip, ema_params=ema_t, ema_decay=ema_decay)
        np.testing.assert_allclose(float(mt["loss"]), float(metrics["loss"]), rtol=1e-5)
        np.testing.assert_allclose(float(mt["grad_norm"]), float(metrics["grad_norm"]), rtol=5e-5)
        np.testing.assert_allclose(float(mt["lr"]), float(metrics["lr"]), rtol=1e-6)
        if i == 1:
            assert float(metrics["grad_norm"]) > clip  # clipping is exercised
        got = convert.flax_to_torch(state.params)
        diffs = {n: float((p.detach() - got[n]).abs().max()) for n, p in tm.named_parameters()}
        worst = max(diffs, key=diffs.get)
        # Adam divides by sqrt(v): float32 rounding in tiny gradients shows up as ~1e-5 of lr
        assert diffs[worst] < 2e-3 * hp["learning_rate"], (i, worst, diffs[worst])
    moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                                   state.params, params)
    assert min(jax.tree_util.tree_leaves(moved)) > 1e-4  # every leaf actually moved
    names = [n for n, _ in tm.named_parameters()]
    ema_j = convert.flax_to_torch(state.ema_params)
    for n, e in zip(names, ema_t):
        np.testing.assert_allclose(e.numpy(), ema_j[n].numpy(), rtol=0, atol=2e-3 * hp["learning_rate"], err_msg=n)


@pytest.mark.parametrize("method,guidance", [("euler", 2.5), ("heun", 2.5), ("heun", 1.0)])
def test_sampler_parity_with_cfg(method, guidance):
    model, params = _setup(True)
    rng = np.random.default_rng(3)
    x1 = rng.standard_normal((B, 8, 8, 1)).astype(np.float32)
    y = np.array([1, 2, 3, 4], np.int32)
    gw = 1 if guidance == 1.0 else guidance  # python int 1 takes the single-call path on both sides
    vj = guided(make_model_fn(model), params, jnp.asarray(y), 10, gw)
    xj = np.asarray(jax.jit(lambda x: sample_time("ode", vj, x, num_steps=4, solver=method)[0])(x1))
    tm = _torch_model(params)
    vt = flow.guided(tm, _t(y), 10, gw)
    xt = flow.ode_sample(vt, _t(x1), num_steps=4, method=method).numpy()
    assert np.abs(xj - x1).max() > 0.1  # the sampler moved
    np.testing.assert_allclose(xt, xj, rtol=1e-5, atol=3e-5)


def test_torch_label_dropout_rate():
    m = tdit.DiT(**CFG, class_dropout_prob=0.25)
    g = torch.Generator().manual_seed(0)
    y = torch.zeros(4000, dtype=torch.long)
    table = m.y_embedder.embedding_table.weight
    emb = m.y_embedder(y, train=True, generator=g)
    dropped = torch.all(emb == table[10], dim=1).float().mean().item()
    assert abs(dropped - 0.25) < 0.03
    assert torch.equal(m.y_embedder(y, train=False), table[y])


def test_bad_inputs():
    m = tdit.DiT(**CFG)
    with pytest.raises(ValueError, match="NHWC"):
        m(torch.zeros(2, 1, 8, 8), torch.zeros(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        m(torch.zeros(2, 8, 8, 1), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="method"):
        flow.ode_sample(lambda x, t: x, torch.zeros(2, 3), num_steps=2, method="midpoint")
    with pytest.raises(ValueError, match="dist"):
        flow.sample_timesteps((3,), dist="cauchy")
    with pytest.raises(ValueError, match="decay_mask"):
        topt.make_optimizer(m, learning_rate=1e-3, warmup_steps=0, total_steps=10, weight_decay=0.0,
                            decay_mask="none")


@pytest.mark.entry
def test_torch_train_script_smoke(tmp_path):
    """The torch twin of the flagship runs from the same config file for a few steps, logs JSONL,
    samples, and exports its EMA weights in the JAX DiT's layout, exactly."""
    import json

    from experiments.torch_baselines import train as ttrain
    from research.runs.config import load_config

    cfg = load_config("experiments/configs/digits_rf.py", [
        "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "train.batch_size=16",
        "train.num_steps=3", "train.warmup_steps=1", "train.log_every=1", "sample.per_class=1",
        "sample.num_steps=1", f"run_dir={tmp_path}"])
    ttrain.run(cfg, device="cpu", log=lambda m: None)
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in lines)
    assert lines[0]["lr"] == 0.0 and lines[1]["lr"] > 0  # warmup from 0, as on the JAX side
    samples = np.load(tmp_path / "samples.npz")
    assert samples["images"].shape == (10, 8, 8, 1) and np.all(np.isfinite(samples["images"]))
    flat = np.load(tmp_path / "ema_flax_params.npz")
    params = {}
    for k in flat.files:
        node = params
        *mods, leaf = k.split("/")
        for m in mods:
            node = node.setdefault(m, {})
        node[leaf] = flat[k]
    ckpt = torch.load(tmp_path / "model.pt")
    ema_flax = convert.torch_to_flax(ckpt["ema"], scan_blocks=cfg.model.scan_blocks)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, ema_flax)
    moved = [float((ckpt["params"][n] - ckpt["ema"][n]).abs().max()) for n in ckpt["ema"]]
    assert max(moved) > 0  # params trained; EMA lags behind
    # the exported tree is exactly what the JAX DiT of this config expects
    jm = DiT(input_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=1, num_heads=2,
             num_classes=10, scan_blocks=cfg.model.scan_blocks)
    expect = jax.eval_shape(lambda k: init_dit(jm, k), jax.random.key(0))
    assert jax.tree_util.tree_structure(expect) == jax.tree_util.tree_structure(params)
