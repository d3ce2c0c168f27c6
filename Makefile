# Two user-facing commands: `make demo` and `make test`. Both create the virtual
# environment (.venv, Python 3.12) from requirements.txt when it is missing or stale.
PYTHON ?= $(shell command -v python3.12 2>/dev/null || echo python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# pytest-xdist workers; --dist loadfile keeps a file's tests (and its compiled module fixtures) on one worker
TEST_WORKERS ?= 2
# Numerics-sensitive tests, run again by `make test-isa` with XLA:CPU capped at AVX: XLA:CPU's code
# differs by ISA (AVX / AVX2 / AVX-512), so a bitwise comparison of two different compiled programs
# can pass on one machine and fail on another. Running these under two ISAs catches that here.
ISA_TESTS ?= tests/test_loss_scale.py tests/test_optim.py tests/test_train_step.py tests/test_checkpoint.py \
	tests/test_checkpoint_verify.py tests/test_model_state.py tests/test_multi_step.py tests/test_sharding.py \
	tests/test_torch_parity.py tests/test_samplers.py tests/test_sampling_sigma.py tests/test_methods.py \
	tests/test_lm.py tests/test_train_lm.py tests/test_medusa.py tests/test_vq.py tests/test_gan.py \
	tests/test_contrastive.py tests/test_margin.py tests/test_set_prediction.py tests/test_fid.py \
	tests/test_fid_sampling.py tests/test_tpu_attention.py
ISA ?= AVX

.PHONY: venv demo test test-isa ci clean

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip -q
	$(PY) -m pip install -q -r requirements.txt
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.train_digits_rf --config experiments/configs/digits_rf.py

test: $(STAMP)
	$(PY) -m pytest tests -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-isa: $(STAMP)
	XLA_FLAGS="$$XLA_FLAGS --xla_cpu_max_isa=$(ISA)" $(PY) -m pytest $(ISA_TESTS) -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# what CI runs: the whole suite on this machine's ISA, then the numerics-sensitive tests capped at AVX
ci: test test-isa

clean:
	rm -rf $(VENV) runs
