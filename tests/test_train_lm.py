"""experiments/train_lm.py end to end on tiny shapes: metrics, samples, bit-identical resume, bad config."""
import json
import os

import numpy as np
import pytest

from experiments import train_lm
from research.runs.config import load_config

CONFIG = "experiments/configs/lm.py:smoke"


@pytest.mark.entry
def test_train_lm_smoke_and_bit_identical_resume(tmp_path):
    straight = str(tmp_path / "straight")
    m = train_lm.run(load_config(CONFIG, [f"run_dir={straight}"]))
    assert m["steps"] == 4 and 0 < m["val_bits_per_byte"] < 9.0
    assert [c["step"] for c in m["curve"]] == [2, 4]
    # sklearn has one validation document, so one prompt
    assert len(m["samples"]) == 1 and all(isinstance(s["continuation"], str) for s in m["samples"])
    assert os.path.exists(os.path.join(straight, "samples.txt"))
    assert json.load(open(os.path.join(straight, "metrics.json")))["val_bits_per_byte"] == m["val_bits_per_byte"]

    resumed = str(tmp_path / "resumed")
    assert train_lm.run(load_config(CONFIG, [f"run_dir={resumed}", "train.stop_at_step=2"])) == {"stopped_at_step": 2}
    m2 = train_lm.run(load_config(CONFIG, [f"run_dir={resumed}"]))
    # the same compiled step on the same machine: the resumed run must match bit for bit
    assert m2["val_bits_per_byte"] == m["val_bits_per_byte"]
    assert m2["final_train_loss"] == m["final_train_loss"]
    assert m2["samples"] == m["samples"]


@pytest.mark.parametrize("override, match", [
    ("model.attention=linear", "needs data.rows='single'"),
    ("data.tokenizer=words", "data.tokenizer"),
    ("data.row_length=2", "row_length"),
    ("sample.top_p=0", "top_p"),
])
def test_train_lm_rejects_bad_config(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(CONFIG, [override])


def test_train_lm_cli_one_line_error(capsys):
    with pytest.raises(SystemExit) as e:
        train_lm.main(["--config", CONFIG, "--set", "model.num_kv_heads=3", "--set", "run_dir=/tmp/x_lm_bad"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "num_kv_heads" in err[0], err
