# `make demo` and `make test` work on a fresh machine that has only Python 3.10+.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Without a GPU, torch comes as a CPU build: from a local wheel directory when pip has one
# (PIP_FIND_LINKS), else from PyTorch's CPU index. With a GPU, PyPI's CUDA build.
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# Exact versions of every package the tests passed with; `make lock` refreshes it.
LOCK := constraints.txt
LOCK_VENV := .lock-venv

DEMO_ARGS := --model demo/model --data demo/train.jsonl --budget 4GB \
	--space autotune/search_spaces/demo.yaml --trials 8 --probe-steps 6 --seq-len 128 --study demo

.PHONY: setup demo test lint lock clean gpu-wheels

setup: $(VENV)/.installed

# torch first: the CPU build where there is no GPU (from pip's local wheels or PyTorch's CPU
# index), so that resolving the rest does not pull PyPI's CUDA build.
define install_torch
	@if nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: torch with CUDA comes from PyPI"; \
	else \
		echo "no GPU: installing the CPU build of torch $(TORCH_VERSION)"; \
		$(1)/pip install --no-index --no-deps "torch==$(TORCH_VERSION)" 2>/dev/null \
		|| $(1)/pip install --no-deps "torch==$(TORCH_VERSION)" --index-url $(TORCH_CPU_INDEX); \
	fi
endef

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(call install_torch,$(BIN))
	$(BIN)/pip install -c $(LOCK) -e '.[dev]'
	touch $@

# Resolve pyproject's ranges afresh in a new environment and pin what that gives. torch is
# pinned without its local label (+cpu), so the same file serves CUDA builds.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(call install_torch,$(LOCK_VENV)/bin)
	$(LOCK_VENV)/bin/pip install '.[dev]'
	{ echo "# Exact versions for make setup and CI: pip install -c $(LOCK) -e '.[dev]'."; \
	  echo "# Made by \`make lock\` on $$(date -u +%Y-%m-%d) with Python $$($(LOCK_VENV)/bin/python -c 'import platform; print(platform.python_version())')."; \
	  $(LOCK_VENV)/bin/pip freeze --exclude-editable | grep -iv '^autotune[ =@]' | sed 's/+cpu$$//'; \
	} > $(LOCK)
	rm -rf $(LOCK_VENV)

demo/model/model.safetensors: demo/config.json demo/tokenizer/tokenizer.json | setup
	$(BIN)/python -m autotune.random_model demo/config.json demo/model --tokenizer demo/tokenizer

demo: setup demo/model/model.safetensors
	$(BIN)/autotune run $(DEMO_ARGS)

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check autotune tests bench scripts
	$(BIN)/mypy

# What a lent CUDA machine (Python 3.12, x86-64, no network) lacks, as wheels for the device
# tool to carry: the versions of the lock, and bitsandbytes with its CUDA 13 kernels.
# The machine's own transformers (5.17 when last seen) is used: its wheel would not fit the carry.
GPU_WHEELS := bitsandbytes optuna alembic colorlog mako sqlalchemy plotly torchao
GPU_EXTRA_WHEELS := liger-kernel==0.8.5
gpu-wheels:
	rm -rf .wheels && mkdir -p .wheels
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
		--platform manylinux2014_x86_64 -d .wheels \
		$$(for p in $(GPU_WHEELS); do grep -i "^$$p==" $(LOCK); done) $(GPU_EXTRA_WHEELS)

clean:
	rm -rf $(LOCK_VENV) demo/model trials/*.db trials/*/ reports/*.html reports/*.yaml
