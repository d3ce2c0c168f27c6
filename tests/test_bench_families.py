"""experiments/bench_families.py: the one-table plumbing on tiny configs (the numbers are not the point here).

Runs two families' real scripts with the ``--quick`` sizes, checks the JSON records (the keys the issue
names, the bits/dim kind of each family, the samples file), the markdown table, that a second call reads
the finished runs back instead of retraining, that a changed config is not mistaken for a finished run,
and the error paths."""
import json
import os

import numpy as np
import pytest

from experiments import bench_families as bench

pytestmark = pytest.mark.entry

KEYS = {"family", "classifier_accuracy", "frechet_distance", "frechet_floor", "bits_per_dim", "bpd_kind", "nfe",
        "params", "train_s", "sample_s", "samples"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("families")
    path = out / "families.jsonl"
    records = bench.main(["--quick", "--families", "rf_dit,vp", "--out", str(out), "--json", str(path),
                          "--grids", str(out / "grids"), "--markdown", str(out / "table.md")])
    return out, path, records


def test_records_and_table(quick_run):
    out, path, records = quick_run
    lines = [json.loads(s) for s in path.read_text().splitlines()]
    assert [r["family"] for r in lines] == ["rf_dit", "vp"] == [r["family"] for r in records]
    for r in lines:
        assert KEYS <= set(r), KEYS - set(r)
        assert r["bpd_kind"] == "pf_ode" and 0.0 < r["bits_per_dim"] < 20.0
        assert 0.0 <= r["classifier_accuracy"] <= 1.0 and r["frechet_distance"] > 0 and r["frechet_floor"] > 0
        assert r["nfe"] > 0 and r["params"] > 0 and r["train_s"] > 0 and not r["reused_run"]
        with np.load(r["samples"]) as z:
            assert z["images"].shape == (200, 8, 8) and z["labels"].shape == (200,)
        assert os.path.isfile(out / "grids" / f"{r['family']}.png")
    table = (out / "table.md").read_text().splitlines()
    assert len(table) == 4 and table[2].startswith("| rf_dit |") and "(pf_ode)" in table[3]


def test_second_call_reads_finished_runs_back(quick_run):
    out, _, records = quick_run
    again = bench.main(["--quick", "--families", "rf_dit,vp", "--out", str(out)])
    for a, b in zip(records, again):
        assert b["reused_run"]
        for k in ("classifier_accuracy", "frechet_distance", "bits_per_dim", "train_s", "samples"):
            assert a[k] == b[k], k


def test_changed_config_is_not_a_finished_run(quick_run):
    out, _, _ = quick_run
    fam = bench.FAMILIES["rf_dit"]
    cfg = bench._config_for(fam, str(out), quick=True)
    assert bench._finished(cfg.run_dir, cfg)
    cfg.sample.guidance = 3.0
    assert not bench._finished(cfg.run_dir, cfg)
    cfg.sample.guidance, cfg.train.progress = 1.5, True  # bookkeeping keys do not count
    assert bench._finished(cfg.run_dir, cfg)


def test_record_checks_the_likelihood_kind():
    base = {"classifier_accuracy": 1.0, "frechet_distance": 1.0, "frechet_floor_train_vs_test": 1.0, "nfe": 1,
            "num_params": 1, "train_time_s": 1.0, "sample_time_s": 1.0, "_reused": False, "_run_dir": "x",
            "_measured": "now"}
    with pytest.raises(ValueError, match="no bits_per_dim"):
        bench.record("vp", base)
    with pytest.raises(ValueError, match="bpd_kind"):
        bench.record("vp", {**base, "bpd_kind": "likelihood"})
    with pytest.raises(ValueError, match="lacks"):
        bench.record("rf_dit", {**base, "bpd_kind": "none", "nfe": None})
    assert bench.record("rf_dit", {**base, "bpd_kind": "none", "bits_per_dim": 3.0})["bits_per_dim"] is None


def test_unknown_family_is_one_error_line(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--families", "pixelcnn"])
    assert e.value.code == 2 and "unknown families ['pixelcnn']" in capsys.readouterr().err
