# Two entry points: `make demo` (the offline end-to-end demo) and `make test` (the test suite).
# Both create or update the virtual environment themselves. It lives outside the checkout so that a
# fresh clone (CI) reuses it; its dependencies are reinstalled only when pyproject.toml changes.
PYTHON ?= python3
VENV ?= $(HOME)/.cache/rag4dmc/venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-$(shell sha256sum pyproject.toml | cut -c1-16)
DEMO_OUT ?= demo_out
# NIQE's parameters (basicsr 1.4.2 sdist, Apache-2.0), fetched from PyPI at setup time for the demo. Defined
# before the rules: make expands a prerequisite list when it reads it.
NIQE_PARAMS := $(VENV)/share/niqe_pris_params.npz
PYTEST_ARGS ?=

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_ENABLE_UV_RUN_RUNTIME_ENV := 0

.PHONY: env demo test bench lint clean browser

# Site pip configuration may cap torch below the pinned pair (a machine-wide constraints file): the
# project's pins are the ones that hold, so the install reads no pip configuration file.
$(DEPS_STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	PIP_CONFIG_FILE=/dev/null $(PY) -m pip install -q --upgrade pip setuptools wheel
	PIP_CONFIG_FILE=/dev/null $(PY) -m pip install -q --progress-bar off -e '.[dev]'
	@rm -f $(VENV)/.deps-* && touch $@

# Point the shared environment's `rag4dmc` at this checkout (seconds; no dependency changes).
env: $(DEPS_STAMP)
	@$(PY) -m pip install -q --no-deps --no-build-isolation -e . >/dev/null

demo: env $(NIQE_PARAMS)
	$(VENV)/bin/rag4dmc demo --out $(DEMO_OUT) --niqe-params $(NIQE_PARAMS)

test: env browser
	$(PY) -m pytest -q $(PYTEST_ARGS)

# tests/test_report.py opens the evaluation report in Debian's headless Chromium: install it when it is
# missing and we can (root with apt-get); otherwise that test says how (and fails under CI=true).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && apt-get install -y -qq chromium; } || \
		echo "chromium is missing and could not be installed (needs root, apt-get and a Debian mirror)"

bench: env
	$(PY) bench/run_all.py

lint: env
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(DEMO_OUT) .pytest_cache build *.egg-info

$(NIQE_PARAMS): $(DEPS_STAMP)
	@mkdir -p $(VENV)/share/basicsr
	# --no-build-isolation: pip reads the sdist's metadata with the venv's torch instead of fetching one
	PIP_CONFIG_FILE=/dev/null $(PY) -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
		basicsr==1.4.2 -d $(VENV)/share/basicsr
	tar -xzf $(VENV)/share/basicsr/basicsr-1.4.2.tar.gz -C $(VENV)/share/basicsr --wildcards '*/niqe_pris_params.npz'
	cp $$(find $(VENV)/share/basicsr -name niqe_pris_params.npz | head -1) $@
