VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= openbmb/MiniCPM-V-4.6
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test install clean

# The runtime (serve) and the test environment share one venv; each target installs what it needs once.
$(VENV)/.runtime: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.runtime
	$(PY) -m pip install -q -e '.[test]'
	PYTHON=$(PY) bash scripts/install_test_deps.sh
	touch $@

install: $(VENV)/.runtime

# The main job: serve MODEL (cached or downloadable), else a loudly-labelled random-weight demo checkpoint.
serve: $(VENV)/.runtime
	$(PY) -m minicpmv.cli serve $(MODEL) --host $(HOST) --port $(PORT) --demo-fallback .demo-checkpoint

test: $(VENV)/.test
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .demo-checkpoint
