# `make demo` and `make test` set everything up themselves: a .venv, torch, then this package at the versions of
# requirements/lock.txt (the tested set). GPU users: create .venv and install their CUDA build of torch into it
# first; it is kept (torch is pinned here, not in the lock, for that reason).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
LOCK := requirements/lock.txt
STAMP := $(VENV)/.installed
# Throwaway venvs of `make lock` and `make test-latest`, rebuilt from scratch on every run.
LOCK_VENV ?= .venv-lock
LATEST_VENV ?= .venv-latest

.PHONY: setup demo demo-photo test test-all test-latest lock bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -c $(LOCK) -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m train demo

demo-photo: $(STAMP)
	$(PY) -m train demo world=photo

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

# $(call fresh_venv,DIR): a new venv in DIR with the pinned torch.
define fresh_venv
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q "torch==$(TORCH_VERSION)"
endef

LOCK_HEADER := \
  "\# The tested set: every package of a venv that passed the test suite, at exact versions. A pip constraints" \
  "\# file (pip install -c requirements/lock.txt -e \".[dev]\"): it pins versions, it installs nothing by itself." \
  "\# torch is not listed on purpose: the Makefile pins it (TORCH_VERSION, the CPU wheel) and GPU users keep the" \
  "\# CUDA build they installed first; a torch line here would make pip replace or refuse their build." \
  "\# Written by make lock: the newest releases within pyproject.toml's ranges, kept only if the suite passes."

# The newest releases within pyproject.toml's ranges; the lock is replaced only if the suite passes on them.
lock:
	$(call fresh_venv,$(LOCK_VENV))
	$(LOCK_VENV)/bin/python -m pip install -q -e ".[dev]"
	$(LOCK_VENV)/bin/python -m pytest -q
	{ printf '%s\n' $(LOCK_HEADER); \
	  $(LOCK_VENV)/bin/python -c "import platform, torch; print(f'# Python {platform.python_version()}, torch {torch.__version__}.')"; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable | grep -v -i -E '^(torch|pip)=='; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf $(LOCK_VENV)

# Not in CI: the newest release of every dependency (torch stays at TORCH_VERSION), above pyproject.toml's `<`
# caps too, so upstream breakage shows here before users meet it and a cap shows when it can go.
test-latest:
	$(call fresh_venv,$(LATEST_VENV))
	$(LATEST_VENV)/bin/python -m pip install -q --no-deps -e ".[dev]"
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade $$($(LATEST_VENV)/bin/python -c \
	  "import re, importlib.metadata as m; print(*sorted({re.match(r'[\w.-]+', r).group() for r in m.requires('dreamsteer')} - {'torch'}))")
	$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable | grep -i -E '^(torch|lightning|diffusers|transformers|peft|accelerate|hydra-core)=='
	$(LATEST_VENV)/bin/python -m pytest -q

clean:
	rm -rf outputs lightning_logs
