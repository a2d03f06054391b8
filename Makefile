# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN_ARGS ?=

.PHONY: demo test install install-dev clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "error: jaxformer needs Python 3.11+, found " + sys.version.split()[0] + " (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	@touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# Train the default decoder on 1-3 digit addition, evaluate held-out exact match, print samples.
# A finished demo run is reused (its stored result is printed); `make clean` starts afresh.
DEMO_DIR ?= outputs/demo
demo: install
	$(BIN)/python -m jaxformer.train experiment=quickstart hydra.run.dir=$(DEMO_DIR) $(RUN_ARGS)
	$(BIN)/python -m jaxformer.sample checkpoint=$(DEMO_DIR) prompt=123+456= \
		sampling.temperature=1.0 sampling.num_samples=4

# Three pytest workers (pytest-xdist), a test file each at a time so module fixtures are built
# once: the suite is compile-bound and mostly single-threaded, and a third worker fills the time
# the others wait on their subprocesses (2 cores: 8:32 with two workers, 7:44 with three, 8:26
# with four; docs/performance.md, "The test suite"). PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 3
test: install-dev
	$(BIN)/python -m pytest -q $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile) $(PYTEST_ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
