"""experiments/bench_lm.py: records, table, and error rows (``--quick --json``)."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from experiments import bench_lm as bench  # noqa: E402

FIELDS = {"kind", "impl", "batch", "tokens_per_s", "tokens_per_s_repeats", "error", "loadavg_before",
          "loadavg_after", "cores", "torch_threads", "model"}


def _records(capsys, argv):
    records = bench.main(argv)
    out = capsys.readouterr()
    lines = [json.loads(line) for line in out.out.splitlines() if line.strip()]
    assert lines == json.loads(json.dumps(records))  # stdout: exactly one JSON record per row
    assert "| kind | impl |" in out.err  # the table goes to stderr with --json
    return lines


def _check_ok(r, repeats):
    assert set(r) >= FIELDS, FIELDS - set(r)
    assert r["error"] is None, r["error"]
    assert r["tokens_per_s"] > 0 and len(r["tokens_per_s_repeats"]) == repeats
    assert all(x > 0 for x in r["tokens_per_s_repeats"])
    assert len(r["loadavg_before"]) == 3 and r["torch_threads"] == r["cores"]


def test_quick_json_records_and_compile_errors_are_rows(capsys, monkeypatch):
    """Every row is present; a failing torch.compile (simulated: it needs a C++ toolchain and a
    minute here) is recorded as the row's error, for training and for HF's static-cache decoding."""
    def broken_compile(*a, **k):
        raise RuntimeError("no C++ compiler (simulated)")

    monkeypatch.setattr(torch, "compile", broken_compile)
    recs = _records(capsys, ["--quick", "--json", "--repeats", "2", "--target-seconds", "0.05"])
    assert [(r["kind"], r["impl"], r["batch"]) for r in recs] == (
        [("train", i, 2) for i in bench.TRAIN_IMPLS]
        + [("decode", i, b) for b in (1, 8) for i in bench.DECODE_IMPLS])
    for r in recs:
        if r["impl"] in ("torch_compile", "hf_static_compile"):
            assert r["tokens_per_s"] is None and "no C++ compiler (simulated)" in r["error"]
        else:
            _check_ok(r, 2)
    train = {r["impl"]: r for r in recs if r["kind"] == "train"}
    # same weights, same batch, same loss: the step-0 losses agree
    assert train["jax"]["loss0"] == pytest.approx(train["torch_eager"]["loss0"], abs=1e-5)
    assert {r["seq"] for r in train.values()} == {16}
    assert {r["new_tokens"] for r in recs if r["kind"] == "decode"} == {8}


def test_bad_arguments():
    with pytest.raises(SystemExit):
        bench.parse_args(["--kinds", "train,sample"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--train-impls", "jax,tf"])
