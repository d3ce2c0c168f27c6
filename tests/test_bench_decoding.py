"""experiments/bench_decoding.py: records, table, Leviathan's formula and argument errors (``--quick``)."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from experiments import bench_decoding as bench  # noqa: E402


def test_leviathan_speedup_closed_form():
    # expected tokens per round sum_{i<=g} a^i over the round's cost g c + 1
    for a, g, c in ((0.0, 3, 0.1), (0.6, 4, 0.05), (0.95, 2, 0.5)):
        want = sum(a ** i for i in range(g + 1)) / (g * c + 1)
        assert bench.leviathan(a, g, c) == pytest.approx(want, rel=1e-9)
    assert bench.leviathan(1.0, 3, 0.0) == pytest.approx(4.0, rel=1e-6)


@pytest.fixture(scope="module")
def quick_records():
    import contextlib
    import io
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        recs = bench.main(["--quick", "--json", "--methods", "plain,medusa,medusa_typical,hf_assisted",
                           "--batches", "1", "--kl-rows", "32"])
    return recs, out.getvalue(), err.getvalue()


def test_quick_json_records(quick_records):
    recs, out, err = quick_records
    lines = [json.loads(x) for x in out.splitlines() if x.strip()]
    assert lines == json.loads(json.dumps(recs))                 # stdout: one JSON record per row
    assert "| method | batch | temp | tau |" in err and "plug-in KL" in err
    rows = [r for r in recs if r.get("kind") not in ("kl", "verify_cost")]
    got = {(r["method"], r["temperature"]) for r in rows}
    want = {(m, t) for m in ("plain", "medusa", "hf_assisted") for t in (0.0, 1.0)} | {("medusa_typical", 1.0)}
    assert got == want                                           # typical is not run at temperature 0
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["speedup"] > 0 and len(r["loadavg_before"]) == 3
        if r["method"] != "plain":
            assert 1.0 <= r["tau"] and r["target_forwards_per_token"] <= 1.0 + 1e-9
        if r["temperature"] == 0:                                 # exact methods reproduce plain greedy output
            assert r["greedy_equal_rows"] == r["batch"], r
        else:
            assert np.isfinite(r["target_nll"]) and r["greedy_equal_rows"] is None
    plain = next(r for r in rows if r["method"] == "plain" and r["temperature"] == 0)
    assert plain["speedup"] == 1.0
    kl = {r["method"]: r["kl_two_token"] for r in recs if r.get("kind") == "kl"}
    assert set(kl) == {"plain", "medusa", "medusa_typical"} and all(v >= 0 for v in kl.values())
    vc = [r for r in recs if r.get("kind") == "verify_cost"]
    assert [r["tokens"] for r in vc] == [1, 2, 4, 8, 16, 27] and vc[0]["ratio"] == 1.0
    assert all(r["ms"] > 0 for r in vc) and "vs T = 1" in err


@pytest.mark.parametrize("argv, msg", [(["--methods", "plain,bogus"], "--methods"),
                                       (["--batches", "0"], "--batches"),
                                       (["--temperatures", "x"], "--temperatures")])
def test_bad_arguments_exit_with_one_line(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_missing_runs_are_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--target", str(tmp_path / "nope"), "--methods", "plain", "--batches", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "final_params.msgpack" in err and "Traceback" not in err
