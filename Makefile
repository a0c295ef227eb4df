# embedpipe: the front door. `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= configs/demo.toml
DEMO_DIR ?= demo

.PHONY: help install demo test lint format bench compile clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install embedpipe with pinned dependencies

demo: $(STAMP) ## generate the demo dataset, run the preprocess and mine pipelines through kfp.local
	$(BIN)/embedpipe demo-data $(DEMO_DIR)/data
	$(BIN)/embedpipe run preprocess --config $(CONFIG)
	$(BIN)/embedpipe run mine --config $(CONFIG)

test: $(STAMP) ## run the test suite
	$(BIN)/python -m pytest

lint: $(STAMP) ## ruff check and format check
	$(BIN)/ruff check src components pipelines tests benchmarks
	$(BIN)/ruff format --check src components pipelines tests benchmarks

format: $(STAMP) ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix src components pipelines tests benchmarks
	$(BIN)/ruff format src components pipelines tests benchmarks

bench: $(STAMP) ## run the benchmarks (prints figures; not part of the tests)
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/taxonomy.py
	$(BIN)/python benchmarks/embed.py
	$(BIN)/python benchmarks/dedup.py
	$(BIN)/python benchmarks/mine.py

compile: $(STAMP) ## compile every pipeline to IR YAML under build/
	$(BIN)/embedpipe compile --config $(CONFIG)

clean: ## remove build outputs, local runs and the demo data
	rm -rf build runs $(DEMO_DIR) .pytest_cache .ruff_cache
