"""The train-step benchmark script: FLOP counter, records, table, and error reporting."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from experiments import bench_train_step as bench  # noqa: E402
from research.nn.dit import DiT, init_dit  # noqa: E402


def test_count_flops_matches_xla_cost_analysis():
    """The analytic matmul count agrees with XLA's count of the forward pass (XLA also counts the
    elementwise work, a few per cent here, so it may be slightly larger, never smaller)."""
    kw = dict(input_size=8, in_channels=4, patch_size=2, hidden_size=128, depth=2, num_heads=4)
    batch = 4
    model = DiT(**kw, scan_blocks=False)  # XLA counts a scanned (while-loop) body only once
    params = init_dit(model, jax.random.key(0))
    x = jnp.zeros((batch, 8, 8, 4))
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, x, jnp.zeros(batch), jnp.zeros(batch, jnp.int32)))
    cost = fwd.lower(params, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    ours = bench.count_flops(kw, batch)
    assert ours["train_step"] == 3 * ours["forward"]
    ratio = float(cost["flops"]) / ours["forward"]
    assert 1.0 <= ratio < 1.15, ratio
    # doubling the batch doubles the count; tokens enter attention quadratically
    assert bench.count_flops(kw, 2 * batch)["forward"] == pytest.approx(2 * ours["forward"])


def test_bench_runs_records_and_reports_compile_errors(tmp_path, monkeypatch, capsys):
    """One tiny CPU run: JAX and eager produce records; a failing torch.compile is reported as an
    error row (not dropped)."""
    def broken_compile(*a, **k):
        raise RuntimeError("no C++ compiler (simulated)")

    monkeypatch.setattr(torch, "compile", broken_compile)
    out = tmp_path / "r.json"
    records = bench.main(["--cpu", "--configs", "tiny", "--repeats", "2", "--target-seconds", "0.2",
                          "--json", str(out), "--profile", str(tmp_path / "prof"), "--profile-steps", "1"])
    text = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert [r["impl"] for r in saved] == ["jax", "torch_eager", "torch_compile"]
    n_params = sum(p.size for p in jax.tree_util.tree_leaves(
        jax.eval_shape(lambda k: init_dit(DiT(**bench.PRESETS["tiny"][0]), k), jax.random.key(0))))
    for r in saved[:2]:
        assert set(r) >= {"impl", "device", "config", "steps_per_s", "peak_bytes"}
        assert r["config"]["name"] == "tiny" and r["device"].startswith("CPU")
        assert r["steps_per_s"] > 0 and len(r["steps_per_s_repeats"]) == 2
        assert r["steps_per_s"] == pytest.approx(float(np.median(r["steps_per_s_repeats"])))
        # params, EMA and the two Adam moments are live throughout the step (float32)
        assert r["peak_bytes"] >= 4 * 4 * n_params
        # per-step process CPU time and context switches, per round; the roofline from the same-run GEMM
        assert r["cpu_s_per_step"] > 0 and len(r["cpu_s_per_step_repeats"]) == 2
        assert r["nvcsw_per_step"] >= 0 and r["nivcsw_per_step"] >= 0
        assert 0 <= r["sys_s_per_step"] <= r["cpu_s_per_step"] and r["minflt_per_step"] >= 0
        assert r["config"]["malloc"] == "reuse"
        assert r["x_roofline"] > 0 and r["x_roofline_cpu"] > 0 and r["roofline_s"] > 0
        g = r["config"]["gemm"]
        assert g["shape"] == list(bench.gemm_shape(*bench.PRESETS["tiny"])) and g["jax_gflops"] > 0
        assert g["torch_gflops"] > 0 and len(r["config"]["load_average_1_5_15"]) == 3
    prof = saved[0]["profile"]  # jax only: XLA thunk time split by kind and by model part
    assert prof["thunk_ms_per_step"] > 0 and "profile" not in saved[1]
    assert any(k.startswith("matmul") for k in prof["by_kind_ms"])
    assert sum(prof["by_kind_ms"].values()) == pytest.approx(prof["thunk_ms_per_step"], rel=1e-6)
    assert "other" not in prof["by_kind_ms"], prof["by_kind_ms"]  # every traced thunk found in the HLO
    assert any("[bwd]" in k for k in prof["by_scope_ms"]) and "Profile of tiny jax" in text
    assert "load average" in text and "x roofline" in text and "CPU ms/step" in text and "malloc: reuse" in text
    err = saved[2]
    assert err["steps_per_s"] is None and "no C++ compiler" in err["error"]
    assert "error: RuntimeError: no C++ compiler (simulated)" in text
    assert "jax / torch_eager" in text and records[0]["impl"] == "jax"


def test_bad_arguments():
    with pytest.raises(SystemExit):
        bench.parse_args(["--impls", "jax,tensorflow"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--configs", "huge"])


def test_cpu_cores_argument_and_pinning():
    import os
    import subprocess
    import sys

    n = len(os.sched_getaffinity(0))
    with pytest.raises(SystemExit):
        bench.parse_args(["--cpu-cores", "0"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--cpu-cores", str(n + 1)])
    # in a child process (pinning this one would slow the rest of the session): every thread,
    # including the ones JAX started before the call, ends up on the one core
    code = ("import os, jax, jax.numpy as jnp; jnp.ones(3).block_until_ready();"
            "from experiments.bench_train_step import pin_cpu_cores; cores = pin_cpu_cores(1);"
            "masks = {tuple(sorted(os.sched_getaffinity(int(t)))) for t in os.listdir('/proc/self/task')};"
            "print(cores, masks)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]),
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout.strip()
    cores, masks = out.split(" ", 1)[0], out.split(" ", 1)[1]
    first = min(os.sched_getaffinity(0))
    assert cores == f"[{first}]" and masks == f"{{({first},)}}", out


# ---------------------------------------------------------------- the CPU fix: Dense's matmul VJP
@pytest.mark.parametrize("shape,features", [((6, 5), 3), ((6, 3), 5), ((2, 4, 5), 7), ((2, 4, 9), 4)])
def test_dense_dot_general_matches_float64_gradients(shape, features):
    """Both weight-gradient branches (transposing x when in_features <= out_features, else g) and
    2-D/3-D inputs: values and gradients of Dense(dot_general=dense_dot_general) equal float64
    autodiff of the plain Dense with the same parameters."""
    import flax.linen as nn

    from research.nn.layers import dense_dot_general

    x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    ours = nn.Dense(features, dot_general=dense_dot_general)
    plain = nn.Dense(features)
    p = ours.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, p) == jax.tree.map(jnp.shape, plain.init(jax.random.key(1), x))

    def loss(model, p, x):
        return jnp.sum(jnp.sin(model.apply(p, x)) * jnp.arange(features, dtype=x.dtype))

    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
        x64 = np.asarray(x, np.float64)
        ref = jax.grad(lambda p, x: loss(nn.Dense(features, dtype=jnp.float64, param_dtype=jnp.float64), p, x),
                       argnums=(0, 1))(p64, x64)
    got = jax.jit(jax.grad(lambda p, x: loss(ours, p, x), argnums=(0, 1)))(p, x)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        assert g.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(r), rtol=2e-5, atol=2e-6)


def test_dense_dot_general_avoids_transposed_lhs_dots_on_cpu():
    """The mechanism of the fix: in the compiled gradient the weight gradient is no longer a dot
    whose lhs contracts its first axis (XLA:CPU sends those to Eigen, slower than YNNPACK);
    plain nn.Dense produces one (if a future XLA stops doing so, the workaround may be unneeded)."""
    import re

    import flax.linen as nn

    from research.nn.layers import dense_dot_general

    x = jnp.ones((4, 32, 64), jnp.float32)
    pattern = re.compile(r"dot\([^)]*\), lhs_contracting_dims=\{0\}")

    def hlo(model):
        p = model.init(jax.random.key(0), x)
        g = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, x) ** 2)))
        return g.lower(p).compile().as_text()

    assert pattern.search(hlo(nn.Dense(128)))
    assert not pattern.search(hlo(nn.Dense(128, dot_general=dense_dot_general)))
    assert not pattern.search(hlo(nn.Dense(16, dot_general=dense_dot_general)))  # the g-transposed branch


def test_dense_dot_general_other_contractions_fall_through():
    from research.nn.layers import dense_dot_general

    a = jax.random.normal(jax.random.key(0), (3, 4, 5))
    b = jax.random.normal(jax.random.key(1), (3, 5, 2))
    dims = (((2,), (1,)), ((0,), (0,)))  # a batched contraction: not Dense's pattern
    np.testing.assert_array_equal(dense_dot_general(a, b, dims), jax.lax.dot_general(a, b, dims))
    ga = jax.grad(lambda a: jnp.sum(dense_dot_general(a, b, dims) ** 2))(a)
    gr = jax.grad(lambda a: jnp.sum(jax.lax.dot_general(a, b, dims) ** 2))(a)
    np.testing.assert_array_equal(ga, gr)


def test_train_step_same_with_and_without_dense_dot_general():
    """Three full train steps (loss, grads, clip, AdamW, EMA) of the tiny DiT, scanned and unrolled:
    the custom Dense matmul VJP and Flax's plain dot_general give the same params and metrics
    (float32 summation-order tolerance)."""
    from research.generative.losses import rectified_flow_loss
    from research.nn.dit import make_model_fn
    from research.train.optim import make_optimizer
    from research.train.state import create_train_state
    from research.train.step import make_train_step

    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.standard_normal((8, 8, 8, 1)), jnp.float32),
             "y": jnp.asarray(rng.integers(0, 10, 8), jnp.int32)}
    for scan in (True, False):
        models = {c: DiT(**bench.PRESETS["tiny"][0], scan_blocks=scan, custom_matmul_vjp=c)
                  for c in (True, False)}
        params = init_dit(models[True], jax.random.key(0))
        params = jax.tree.map(lambda p: p + 0.05 * jnp.ones_like(p), params)  # zero-init layers live
        opt = make_optimizer(**bench.HPARAMS)

        def run(plain):
            model_fn = make_model_fn(models[not plain])

            def loss_fn(p, b, key):
                return rectified_flow_loss(model_fn, p, b["x"], key, cond=b["y"])

            step = make_train_step(loss_fn, opt, ema_decay=0.9, donate=False)
            state = create_train_state(params, opt, jax.random.key(1), ema=True)
            compiled = step.lower(state, batch).compile()
            metrics = []
            for _ in range(3):
                state, m = compiled(state, batch)
                metrics.append(m)
            return state, metrics

        (s_new, m_new), (s_old, m_old) = run(False), run(True)
        for a, b in zip(m_new, m_old):
            np.testing.assert_allclose(float(a["loss"]), float(b["loss"]), rtol=1e-5)
            np.testing.assert_allclose(float(a["grad_norm"]), float(b["grad_norm"]), rtol=1e-4)
        for a, b in zip(jax.tree.leaves(s_new.params), jax.tree.leaves(s_old.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_gpu_path_jax_side_builds_on_cpu():
    """What --gpu changes on the JAX side (bf16 DiT with float32 params) compiles and steps on CPU with
    the xla attention (cudnn needs a GPU), so a GPU session does not find a crash there first."""
    model_kw, batch = bench.PRESETS["tiny"]
    r = bench.build_jax(model_kw, batch, gpu=True, attn_impl="xla", seed=0)
    r.run(2)
    assert r.info["dtype"] == "bfloat16" and r.peak_bytes()["peak_bytes"] > 0
    with pytest.raises(SystemExit, match="no CUDA device"):
        if not torch.cuda.is_available():
            bench.main(["--gpu", "--configs", "tiny"])
        else:
            raise SystemExit("no CUDA device (skipped: a GPU is present)")


@pytest.mark.parametrize("policy", ["dots_saveable", "dots_with_no_batch_dims_saveable", "full"])
def test_remat_policies_keep_their_meaning_with_dense_dot_general(policy):
    """The custom VJP hides the Dense dot from the dots_* policies; the DiT then uses the plain matmul
    in its blocks, so every policy keeps the activation memory it had with Flax's Dense (up to the
    few bytes of the transposed copies of the Denses outside the blocks; with the custom VJP inside
    the blocks the dots_* policies lose ~10 % here, as they then save no Dense output)."""
    models = {c: DiT(**bench.PRESETS["tiny"][0], remat_policy=policy, custom_matmul_vjp=c)
              for c in (True, False)}
    params = init_dit(models[True], jax.random.key(0))
    x, t, y = jnp.ones((4, 8, 8, 1)), jnp.ones(4), jnp.zeros(4, jnp.int32)

    def temp(plain):
        model = models[not plain]
        g = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x, t, y) ** 2)))
        return g.lower(params).compile().memory_analysis().temp_size_in_bytes

    ours, plain = temp(False), temp(True)
    assert abs(ours - plain) <= 0.01 * plain, (ours, plain)


def test_custom_matmul_vjp_is_opt_in_and_forward_mode_needs_it_off():
    """The DiT's default keeps forward-mode autodiff (jax.jvp, used by the PF-ODE likelihood); the
    custom-VJP Dense (opt-in) has none, and JAX says so."""
    model_kw = bench.PRESETS["tiny"][0]
    x, t, y = jnp.ones((2, 8, 8, 1)), jnp.full(2, 0.5), jnp.zeros(2, jnp.int32)
    assert DiT(**model_kw).custom_matmul_vjp is False
    for custom in (False, True):
        model = DiT(**model_kw, custom_matmul_vjp=custom)
        params = jax.tree.map(lambda p: p + 0.05, init_dit(model, jax.random.key(0)))
        f = lambda x: model.apply({"params": params}, x, t, y)  # noqa: E731
        if custom:
            with pytest.raises(TypeError, match="custom_vjp"):
                jax.jvp(f, (x,), (jnp.ones_like(x),))
        else:
            _, tangent = jax.jvp(f, (x,), (jnp.ones_like(x),))
            assert np.all(np.isfinite(np.asarray(tangent)))


def test_hlo_op_classification():
    text = """HloModule m

%fused_computation.1 (param_0: f32[4,8], param_1: f32[8,2]) -> f32[4,2] {
  %param_0 = f32[4,8]{1,0} parameter(0)
  %param_1 = f32[8,2]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,2]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_transpose (param_0.2: f32[4,8]) -> f32[8,4] {
  %param_0.2 = f32[4,8]{1,0} parameter(0)
  ROOT %transpose.3 = f32[8,4]{1,0} transpose(%param_0.2), dimensions={1,0}
}

%fused_mul (param_0.3: f32[4,8]) -> f32[4,8] {
  %param_0.3 = f32[4,8]{1,0} parameter(0)
  ROOT %multiply.4 = f32[4,8]{1,0} multiply(%param_0.3, %param_0.3)
}

ENTRY %main (p0: f32[4,8], p1: f32[8,2]) -> (f32[4,2], /*index=1*/f32[8,4]) {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,2]{1,0} parameter(1)
  %ynn_fusion.1 = f32[4,2]{1,0} fusion(%p0, %p1), kind=kCustom, calls=%fused_computation.1, metadata={op_name="jit(step)/transpose(jvp(DiT))/while/body/blocks/mlp/fc1/dot_general"}
  %transpose_fusion = f32[8,4]{1,0} fusion(%p0), kind=kLoop, calls=%fused_transpose
  %mul_fusion = f32[4,8]{1,0} fusion(%p0), kind=kLoop, calls=%fused_mul, metadata={op_name="jit(step)/jvp(DiT)/blocks/norm1/mul"}
  %while.2 = (s32[], /*index=1*/f32[4,8]{1,0}) while(%t), condition=%c, body=%b
  ROOT %tuple = (f32[4,2]{1,0}, /*index=1*/f32[8,4]{1,0}) tuple(%ynn_fusion.1, %transpose_fusion)
}
"""
    instrs, comps = bench._parse_hlo(text)
    assert bench.classify_hlo_op("ynn_fusion.1", instrs, comps) == "matmul (YNNPACK fusion)"
    assert bench.classify_hlo_op("transpose_fusion", instrs, comps) == "copy/transpose"
    assert bench.classify_hlo_op("mul_fusion", instrs, comps) == "elementwise loop fusion"
    assert bench.classify_hlo_op("while.2", instrs, comps) == "control flow"
    assert bench.scope_of(instrs["ynn_fusion.1"]["op_name"]) == "MLP (fc1, GELU, fc2) [bwd]"
    assert bench.scope_of(instrs["mul_fusion"]["op_name"]) == "LayerNorm [fwd]"
    assert bench.scope_of("jit(step)/mul").startswith("optimizer")


def test_jax_variants_same_results():
    """The opt-in JAX variants the bench A/Bs change speed only: nn.scan(unroll=2 / depth) and the
    flattened clip+Adam give the same params and metrics as the default step (3 steps, tiny DiT)."""
    from research.generative.losses import rectified_flow_loss
    from research.nn.dit import make_model_fn
    from research.train.optim import current_learning_rate, make_optimizer
    from research.train.state import create_train_state
    from research.train.step import make_train_step

    kw = dict(bench.PRESETS["tiny"][0], depth=3)
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.standard_normal((8, 8, 8, 1)), jnp.float32),
             "y": jnp.asarray(rng.integers(0, 10, 8), jnp.int32)}
    base = DiT(**kw)
    params = jax.tree.map(lambda p: p + 0.05, init_dit(base, jax.random.key(0)))

    def run(model, opt):
        loss_fn = lambda p, b, k: rectified_flow_loss(make_model_fn(model), p, b["x"], k, cond=b["y"])  # noqa: E731
        step = jax.jit(make_train_step(loss_fn, opt, ema_decay=0.9, donate=False, jit=False))
        state = create_train_state(params, opt, jax.random.key(1), ema=True)
        ms = []
        for _ in range(3):
            state, m = step(state, batch)
            ms.append(m)
        return state, ms

    ref_state, ref_m = run(base, make_optimizer(**bench.HPARAMS))
    for model, opt in [(DiT(**kw, scan_unroll=2), make_optimizer(**bench.HPARAMS)),
                       (DiT(**kw, scan_unroll=3), make_optimizer(**bench.HPARAMS)),
                       (base, bench.make_flat_adam_optimizer(**bench.HPARAMS))]:
        state, ms = run(model, opt)
        assert jax.tree.structure(state.params) == jax.tree.structure(ref_state.params)
        for a, b in zip(ms, ref_m):
            np.testing.assert_allclose(float(a["loss"]), float(b["loss"]), rtol=1e-5)
            np.testing.assert_allclose(float(a["lr"]), float(b["lr"]), rtol=1e-6)
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        assert current_learning_rate(state.opt_state) is not None


@pytest.mark.parametrize("mode", ["default", "reuse"])
def test_malloc_keep_freed_memory_stops_page_faults(mode):
    """A 64 MiB malloc'd buffer written, freed and allocated again on a worker thread (as XLA:CPU does
    with a step's temporaries): glibc's default mmaps it each time (~16k page faults for the second);
    after malloc_keep_freed_memory the second allocation reuses the heap (almost no faults)."""
    import os
    import subprocess
    import sys

    code = ("import ctypes, resource, threading\n"
            "libc = ctypes.CDLL('libc.so.6'); libc.malloc.restype = ctypes.c_void_p\n"
            "libc.free.argtypes = [ctypes.c_void_p]\n"
            "from research.runs.host import malloc_keep_freed_memory\n"
            f"ok = malloc_keep_freed_memory() if {mode == 'reuse'!r} else True\n"
            "out = []\n"
            "def work():\n"
            "    for _ in range(2):\n"
            "        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "        p = libc.malloc(2**26); ctypes.memset(p, 1, 2**26); libc.free(p)\n"
            "        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)\n"
            "t = threading.Thread(target=work); t.start(); t.join(); print(ok, out[1])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]),
                         env={**os.environ, "GLIBC_TUNABLES": ""}).stdout.split()
    assert res[0] == "True"
    faults = int(res[1])
    if mode == "reuse":
        assert faults < 1000, faults
    else:
        assert faults > 4000, faults  # 16384 4-KiB pages
