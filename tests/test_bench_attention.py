"""The attention benchmark script runs end to end at tiny sizes (interpret mode on CPU)."""
import json

import jax
import pytest

from experiments import bench_attention

KEYS = {"impl", "dtype", "B", "T", "H", "D", "causal", "fwd_ms", "fwd_bwd_ms", "fwd_tflops",
        "fwd_bwd_tflops", "peak_bytes", "device"}


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the CPU variant of the script test")
def test_bench_attention_cpu(tmp_path, capsys):
    path = tmp_path / "bench.jsonl"
    bench_attention.main(["--small", "--T", "32", "--D", "16", "--causal", "yes",
                          "--json", str(path)])
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert {r["impl"] for r in recs} == set(bench_attention.IMPLS)
    for r in recs:
        assert KEYS <= set(r)
    by = {r["impl"]: r for r in recs}
    for impl in ("pallas", "xla"):  # these run on CPU
        assert by[impl]["fwd_ms"] > 0 and by[impl]["fwd_bwd_ms"] > 0
        assert by[impl]["fwd_tflops"] > 0 and by[impl]["peak_bytes"] > 0
    for impl in ("triton", "cudnn", "torch_sdpa"):  # reported as skipped, with a reason
        assert by[impl]["fwd_ms"] is None and by[impl]["skipped"]
    out = capsys.readouterr().out
    assert "needs a CUDA GPU" in out


def test_flop_count():
    # FlashAttention papers' count: fwd 4*B*H*T^2*D, bwd 2.5x, halved for causal
    assert bench_attention.attention_flops(2, 8, 3, 4, False, "fwd") == 4 * 2 * 3 * 64 * 4
    assert bench_attention.attention_flops(2, 8, 3, 4, True, "fwd_bwd") == 3.5 * 4 * 2 * 3 * 64 * 4 / 2
