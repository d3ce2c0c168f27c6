# Two user-facing commands: `make demo` and `make test`. Both create the virtual
# environment (.venv, Python 3.12) from requirements.txt when it is missing or stale.
PYTHON ?= $(shell command -v python3.12 2>/dev/null || echo python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv demo test test-fast bench clean

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip -q
	$(PY) -m pip install -q -r requirements.txt
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.train_digits_rf --config experiments/configs/digits_rf.py

test: $(STAMP)
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
