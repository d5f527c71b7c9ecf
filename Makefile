# triview: `make run` runs the whole DAG on the demo data; `make test` runs the tests.
# Both create .venv and install the pinned dependencies on first use; `make test` also
# creates the serving environment .venv-serve (`make serve-env`: KServe, no torch).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
SERVE_VENV  ?= .venv-serve
SERVE_STAMP := $(SERVE_VENV)/.installed-stamp
DEMO   ?= demo-data
OUT    ?= runs/demo
PYTEST_ARGS ?=

.PHONY: install serve-env run test test-fast docs compile lock wheelhouse base-image images clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# rfc3987-syntax comes only with jsonschema[format-nongpl] (cyclonedx-bom's validation
	# extra) and builds a Lark grammar when imported: 4.5 s in every process that imports
	# kfp's client (kfp -> kubernetes -> the optional kubernetes_validate -> jsonschema):
	# `triview run/compile/submit`, the test process. (DAG tasks set _KFP_RUNTIME and skip
	# the client.) Nothing here checks the "iri" formats it serves (bench/cli_startup.py).
	$(BIN)/python -m pip uninstall --quiet --yes rfc3987-syntax
	touch $(STAMP)

install: $(STAMP)

# The serving environment (triview serve): requirements-serve.txt, then triview without its
# training dependencies. `triview serve` in .venv runs the server with this venv's Python.
$(SERVE_STAMP): requirements-serve.txt pyproject.toml
	test -x $(SERVE_VENV)/bin/python || $(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SERVE_VENV)/bin/python -m pip install --quiet -r requirements-serve.txt
	$(SERVE_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $(SERVE_STAMP)

serve-env: $(SERVE_STAMP)

$(DEMO).stamp: | $(STAMP)
	$(BIN)/triview demo-data $(DEMO)
	touch $@

run: $(STAMP) $(DEMO).stamp
	$(BIN)/triview run --data $(DEMO) --out $(OUT) --preset digits

test: $(STAMP) $(SERVE_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP) $(SERVE_STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

compile: $(STAMP)
	$(BIN)/triview compile -o pipelines/triview.yaml

# The docs site (docs/, mkdocs.yml) into site/: --strict fails on a broken link or anchor
# and on a page left out of the nav; nothing is fetched (tests/test_docs.py runs the same).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir site

# Images, built offline (docs/reference/images.md): a hash-locked wheelhouse from PyPI, a base
# image made locally (no registry is reachable here; the Dockerfiles' own default base is
# the pinned public python:3.11.7-slim-bookworm: `make images BASE_IMAGE=python:3.11.7-slim-bookworm`),
# then both images, their checks and an SBOM next to each in $(IMAGE_OUT).
IMAGE_TAG ?= 0.1.0
REGISTRY   ?= ghcr.io/triview
DOCKER     ?= docker
LOCAL_BASE ?= triview-base:bookworm
BASE_IMAGE ?= $(LOCAL_BASE)
IMAGE_OUT  ?= build/images
# the legacy builder: Debian's docker.io 20.10 has no buildx, and BuildKit's
# `# syntax` frontends would be pulled from a registry
DOCKER_BUILD := DOCKER_BUILDKIT=0 $(DOCKER) build --network none --build-arg BASE_IMAGE=$(BASE_IMAGE) \
	--build-arg TRIVIEW_GIT_COMMIT=$$(git rev-parse HEAD 2>/dev/null)

lock: $(STAMP)
	$(BIN)/python images/lock.py

wheelhouse.stamp: images/requirements.lock images/requirements-serve.lock images/build-requirements.lock | $(STAMP)
	$(BIN)/python -m pip download --quiet --no-deps --require-hashes --dest wheelhouse \
		-r images/requirements.lock -r images/build-requirements.lock
	$(BIN)/python -m pip download --quiet --no-deps --require-hashes --dest wheelhouse \
		-r images/requirements-serve.lock
	touch $@

wheelhouse: wheelhouse.stamp

base-image:
	DOCKER=$(DOCKER) images/make-base $(LOCAL_BASE) $(IMAGE_OUT)

images: wheelhouse.stamp $(STAMP) $(if $(filter $(LOCAL_BASE),$(BASE_IMAGE)),base-image)
	$(DOCKER_BUILD) --label io.triview.source-digest=$$($(BIN)/python -m images.inspect_image source-digest) \
		-f images/Dockerfile.cpu -t $(REGISTRY)/triview-cpu:$(IMAGE_TAG) .
	$(DOCKER_BUILD) --label io.triview.source-digest=$$($(BIN)/python -m images.inspect_image source-digest) \
		-f Dockerfile.gpu -t $(REGISTRY)/triview-gpu:$(IMAGE_TAG) .
	$(BIN)/python -m images.inspect_image check --out $(IMAGE_OUT) \
		$(REGISTRY)/triview-cpu:$(IMAGE_TAG) $(REGISTRY)/triview-gpu:$(IMAGE_TAG)
	$(DOCKER_BUILD) --label io.triview.source-digest=$$($(BIN)/python -m images.inspect_image source-digest) \
		-f images/Dockerfile.serve -t $(REGISTRY)/triview-serve:$(IMAGE_TAG) .
	$(BIN)/python -m images.inspect_image check --out $(IMAGE_OUT) --lock images/requirements-serve.lock \
		$(REGISTRY)/triview-serve:$(IMAGE_TAG)

clean:
	rm -rf runs $(DEMO) $(DEMO).stamp .pytest_cache wheelhouse wheelhouse.stamp build site
