"""experiments/bench_input.py: the table's rows are real measurements of the loader and the step."""
import pytest

from experiments import bench_input


def test_bench_input_rows(capsys):
    rows = bench_input.main(["--datasets", "digits", "--workers", "0", "--seconds", "0.05", "--repeats", "1",
                             "--batch-size", "16"])
    out = capsys.readouterr().out
    assert "load average" in out and "| digits | 8x8x1 | 16 | none | 0 |" in out
    (r,) = rows
    for k in ("loader_batches_s", "step_steps_s", "fed_steps_s"):
        assert r[k] > 0
    assert r["headroom"] == pytest.approx(r["loader_batches_s"] / r["step_steps_s"])
    assert r["fed_over_step"] == pytest.approx(r["fed_steps_s"] / r["step_steps_s"])
    assert r["records"] > 1000 and r["batch_size"] == 16


def test_bench_input_bad_args():
    with pytest.raises(SystemExit):
        bench_input.main(["--datasets", "imagenet"])
    with pytest.raises(SystemExit):
        bench_input.main(["--workers", "-1"])
