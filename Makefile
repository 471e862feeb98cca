# Two entry points: `make demo` (the offline end-to-end demo) and `make test` (the test suite).
# Both create or update the virtual environment themselves. It lives outside the checkout so that a
# fresh clone (CI) reuses it; its dependencies are reinstalled only when pyproject.toml changes.
PYTHON ?= python3
VENV ?= $(HOME)/.cache/rag4dmc/venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-$(shell sha256sum pyproject.toml | cut -c1-16)
DEMO_OUT ?= demo_out
# NIQE's parameters (basicsr 1.4.2 sdist, Apache-2.0), installed by `rag4dmc setup` where the package finds
# them (pipeline/setup_data.py). Defined before the rules: make expands a prerequisite list when it reads it.
NIQE_PARAMS := $(VENV)/share/rag4dmc/niqe_pris_params.npz
PYTEST_ARGS ?=

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_ENABLE_UV_RUN_RUNTIME_ENV := 0

.PHONY: env demo test test-quick bench lint clean system-deps

# Site pip configuration may cap torch below the pinned pair (a machine-wide constraints file): the
# project's pins are the ones that hold, so the install reads no pip configuration file.
$(DEPS_STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	PIP_CONFIG_FILE=/dev/null $(PY) -m pip install -q --upgrade pip setuptools wheel
	PIP_CONFIG_FILE=/dev/null $(PY) -m pip install -q --progress-bar off -e '.[dev]'
	@rm -f $(VENV)/.deps-* && touch $@

# Point the shared environment's `rag4dmc` at this checkout (seconds; no dependency changes), with NIQE's
# parameters installed where `complete`, `serve` and `evaluate` find them without flags.
env: $(DEPS_STAMP)
	@$(PY) -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
	@test -f $(NIQE_PARAMS) || $(VENV)/bin/rag4dmc setup

demo: env
	$(VENV)/bin/rag4dmc demo --out $(DEMO_OUT)

test: env system-deps
	$(PY) -m pytest -q --durations=20 $(PYTEST_ARGS)

# The inner loop: every test that starts no Ray and runs no model end to end (-m "not slow"); `make test` is the suite.
test-quick: env
	$(PY) -m pytest -q --durations=10 -m "not slow" $(PYTEST_ARGS)

# Debian packages some tests use: chromium opens the evaluation report (tests/test_report.py), and the real
# emoji corpus (bench/emoji.py: Noto Color Emoji drawn by Pillow, named by unicode-data's emoji-test.txt) is
# the data nobody here generated. Installed when missing and we can (root with apt-get); otherwise those
# tests say how (and fail under CI=true).
SYSTEM_DEPS := chromium:/usr/bin/chromium fonts-noto-color-emoji:/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf \
	unicode-data:/usr/share/unicode/emoji/emoji-test.txt
system-deps:
	@missing=$$(for d in $(SYSTEM_DEPS); do [ -e "$${d#*:}" ] || echo "$${d%%:*}"; done); \
	[ -z "$$missing" ] || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && apt-get install -y -qq $$missing; } || \
		echo "could not install $$missing (needs root, apt-get and a Debian mirror)"

bench: env
	$(PY) bench/run_all.py

lint: env
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(DEMO_OUT) .pytest_cache build *.egg-info
