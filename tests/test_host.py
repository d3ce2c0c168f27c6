"""research.runs.host and run_cli's allocator setting: only command-line runs change the process's malloc."""
import sys

import pytest

import research.runs.host as host
from experiments import common


def _run(cfg):
    return "ran"


@pytest.mark.parametrize("env, argv, expect_call", [
    ({}, None, True),                                   # command line: keep freed memory
    ({"RESEARCH_MALLOC": "default"}, None, False),      # opted out
    ({}, ["--config", "experiments/configs/digits_rf.py"], False),   # in-process call (tests, notebooks)
])
def test_run_cli_sets_malloc_only_from_the_command_line(monkeypatch, env, argv, expect_call):
    calls = []
    monkeypatch.setattr(host, "malloc_keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.delenv("RESEARCH_MALLOC", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(sys, "argv", ["prog", "--config", "experiments/configs/digits_rf.py"])
    assert common.run_cli(_run, argv, default_config="experiments/configs/digits_rf.py") == "ran"
    assert bool(calls) == expect_call


def test_pin_cpu_cores_rejects_out_of_range():
    with pytest.raises(ValueError, match="--cpu-cores must be between 1"):
        host.pin_cpu_cores(0)
