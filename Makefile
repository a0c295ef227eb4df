# embedpipe: the front door. `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= configs/demo.toml
DEMO_DIR ?= demo
LINT_PATHS := src components pipelines tests benchmarks images

# Cluster side: `make deploy ENV=local|gpu-cloud [KFP_HOST=...] [DRY_RUN=1] [CREDENTIALS=FILE]`
ENV ?= local
DEPLOY_CONFIG ?= configs/cluster.toml
OVERLAY := manifests/overlays/$(ENV)
CHECKOV_VENV ?= .venv-checkov
# checkov pins boto3/packaging below ours: it gets a venv of its own
CHECKOV_VERSION := 3.3.30
CHECKOV := CKV_SKIP_PACKAGE_UPDATE_CHECK=TRUE $(CHECKOV_VENV)/bin/checkov --skip-download --quiet --compact
CONTAINER ?= $(shell command -v podman >/dev/null 2>&1 && echo podman || echo docker)
VERSION = $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
REVISION = $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
IMAGE_REFS = $(shell $(BIN)/embedpipe image-refs --config $(DEPLOY_CONFIG) --overlay $(OVERLAY))
DATA_IMAGE = $(patsubst data=%,%,$(filter data=%,$(IMAGE_REFS)))
GPU_IMAGE = $(patsubst gpu=%,%,$(filter gpu=%,$(IMAGE_REFS)))
BUILD_ARGS = --build-arg VERSION=$(VERSION) --build-arg REVISION=$(REVISION)
# image-test: podman with its own settings and storage under build/, a local Debian base
PODMAN_ROOT := $(CURDIR)/build/podman
PODMAN_ENV := CONTAINERS_CONF=$(CURDIR)/images/podman/containers.conf \
	CONTAINERS_STORAGE_CONF=$(PODMAN_ROOT)/storage.conf
TEST_BASE := localhost/embedpipe-base:bookworm
TEST_IMAGE := localhost/embedpipe-data:test
HOST_CA ?= /etc/ssl/certs/ca-certificates.crt
# Trust the host's CA bundle inside builds (needed behind a TLS-inspecting proxy); only
# podman/buildah can mount a file into a build, so docker builds go without.
CA_MOUNT = $(if $(and $(wildcard $(HOST_CA)),$(filter podman,$(notdir $(CONTAINER)))),\
	-v $(HOST_CA):/run/host-ca.crt:ro --build-arg PIP_CERT=/run/host-ca.crt)

.PHONY: help install demo demo-signals test lint lint-cluster format bench compile docs constraints images \
	image-data image-gpu push image-test deploy submit clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-13s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml images/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --constraint images/constraints.txt -e '.[dev]'
	touch $(STAMP)

$(CHECKOV_VENV)/.installed:
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet checkov==$(CHECKOV_VERSION)
	touch $@

install: $(STAMP) ## create .venv and install embedpipe with pinned dependencies

demo: $(STAMP) ## generate the demo dataset and run the end-to-end pipeline through kfp.local
	$(BIN)/embedpipe demo-data $(DEMO_DIR)/data
	$(BIN)/embedpipe run end_to_end --config $(CONFIG)

demo-signals: $(STAMP) ## images paired with spectra: generate them and run the same pipeline on them
	$(BIN)/embedpipe demo-data --kind signals $(DEMO_DIR)/signals
	$(BIN)/embedpipe run end_to_end --config configs/signals.toml

test: $(STAMP) ## run the test suite
	$(BIN)/python -m pytest

lint: $(STAMP) lint-cluster ## ruff, constraints vs pyproject, and lint-cluster
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/python images/lock.py --check

lint-cluster: $(STAMP) $(CHECKOV_VENV)/.installed ## render overlays; kubernetes-validate, hadolint, checkov
	rm -rf build/manifests && mkdir -p build/manifests
	for env in $$(ls manifests/overlays); do \
		$(BIN)/embedpipe render $$env --example-credentials > build/manifests/$$env.yaml || exit 1; \
	done
	$(BIN)/kubernetes-validate --strict --quiet build/manifests/*.yaml
	$(BIN)/hadolint images/*/Dockerfile
	$(CHECKOV) --framework kubernetes -d build/manifests
	$(CHECKOV) --framework dockerfile -f images/data/Dockerfile -f images/gpu/Dockerfile

format: $(STAMP) ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix $(LINT_PATHS)
	$(BIN)/ruff format $(LINT_PATHS)

bench: $(STAMP) ## run the benchmarks (prints figures; not part of the tests)
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/signals.py
	$(BIN)/python benchmarks/hf_arrays.py
	$(BIN)/python benchmarks/taxonomy.py
	$(BIN)/python benchmarks/embed.py
	$(BIN)/python benchmarks/dedup.py
	$(BIN)/python benchmarks/mine.py

compile: $(STAMP) ## compile every pipeline to IR YAML under build/ (for ENV's cluster)
	$(BIN)/embedpipe compile --config $(DEPLOY_CONFIG) --overlay $(OVERLAY)

docs: $(STAMP) ## regenerate the settings reference in README.md from the settings models
	$(BIN)/python -m embedpipe.config.reference README.md

constraints: $(STAMP) ## regenerate images/constraints.txt after changing a pin in pyproject.toml
	$(BIN)/python images/lock.py

images: image-data image-gpu ## build both images, tagged as [images] of DEPLOY_CONFIG + ENV names them

image-data: $(STAMP) ## build the data (CPU) image
	$(CONTAINER) build -f images/data/Dockerfile $(BUILD_ARGS) $(CA_MOUNT) -t $(DATA_IMAGE) .

image-gpu: $(STAMP) ## build the GPU image (CUDA torch, faiss-gpu; several GB)
	$(CONTAINER) build -f images/gpu/Dockerfile $(BUILD_ARGS) $(CA_MOUNT) -t $(GPU_IMAGE) .

push: $(STAMP) ## push both images to the registry [images] names
	$(CONTAINER) push $(DATA_IMAGE)
	$(CONTAINER) push $(GPU_IMAGE)

$(PODMAN_ROOT)/storage.conf: images/podman/storage.conf.in
	mkdir -p $(PODMAN_ROOT)
	sed 's|@ROOT@|$(PODMAN_ROOT)|' $< > $@

image-test: $(STAMP) $(PODMAN_ROOT)/storage.conf ## build the data image on a local Debian base; run a stage in it
	$(PODMAN_ENV) podman image exists $(TEST_BASE) || $(PODMAN_ENV) images/local-base.sh $(TEST_BASE)
	start=$$(date +%s); \
	$(PODMAN_ENV) podman build -f images/data/Dockerfile $(BUILD_ARGS) $(CA_MOUNT) \
		--build-arg BASE_IMAGE=$(TEST_BASE) -t $(TEST_IMAGE) . \
	&& echo "data image built in $$(( $$(date +%s) - start )) s"
	$(PODMAN_ENV) podman images --filter reference='localhost/embedpipe-*'
	$(PODMAN_ENV) EMBEDPIPE_TEST_IMAGE=$(TEST_IMAGE) $(BIN)/python -m pytest -m image -rA -s \
		tests/test_images.py

deploy: $(STAMP) ## apply manifests/overlays/ENV and upload the pipelines (KFP_HOST; DRY_RUN=1 to preview)
	$(BIN)/embedpipe deploy $(ENV) --config $(DEPLOY_CONFIG) $(if $(DRY_RUN),--dry-run) \
		$(if $(KFP_HOST),--host $(KFP_HOST)) $(if $(CREDENTIALS),--credentials $(CREDENTIALS))

submit: $(STAMP) ## start a run: make submit PIPELINE=preprocess PARAMS='sources=["s3://b/raw"]'
	$(BIN)/embedpipe submit $(PIPELINE) $(foreach p,$(PARAMS),--param '$(p)') \
		$(if $(KFP_HOST),--host $(KFP_HOST))

clean: ## remove build outputs, local runs and the demo data
	if [ -d $(PODMAN_ROOT) ]; then $(PODMAN_ENV) podman system reset --force >/dev/null 2>&1 || true; fi
	rm -rf build runs $(DEMO_DIR) .pytest_cache .ruff_cache
