# `make demo` and `make test` work on a fresh machine that has only Python 3.10+.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Without a GPU, torch comes as a CPU build: from a local wheel directory when pip has one
# (PIP_FIND_LINKS), else from PyTorch's CPU index. With a GPU, PyPI's CUDA build.
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

DEMO_ARGS := --model demo/model --data demo/train.jsonl --budget 4GB \
	--space search_spaces/demo.yaml --trials 8 --probe-steps 6 --seq-len 128 --study demo

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: torch with CUDA comes from PyPI"; \
	else \
		echo "no GPU: installing the CPU build of torch $(TORCH_VERSION)"; \
		$(BIN)/pip install --no-index --no-deps "torch==$(TORCH_VERSION)" 2>/dev/null \
		|| $(BIN)/pip install --no-deps "torch==$(TORCH_VERSION)" --index-url $(TORCH_CPU_INDEX); \
	fi
	$(BIN)/pip install -e '.[dev]'
	touch $@

demo/model/model.safetensors: demo/config.json demo/tokenizer/tokenizer.json | setup
	$(BIN)/python -m autotune.random_model demo/config.json demo/model --tokenizer demo/tokenizer

demo: setup demo/model/model.safetensors
	$(BIN)/autotune run $(DEMO_ARGS)

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check autotune tests bench

clean:
	rm -rf demo/model trials/*.db trials/*/ reports/*.html reports/*.yaml
