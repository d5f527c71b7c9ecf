# triview: `make run` runs the whole DAG on the demo data; `make test` runs the tests.
# Both create .venv and install the pinned dependencies on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= demo-data
OUT    ?= runs/demo
PYTEST_ARGS ?=

.PHONY: install run test test-fast compile images clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

$(DEMO).stamp: | $(STAMP)
	$(BIN)/triview demo-data $(DEMO)
	touch $@

run: $(STAMP) $(DEMO).stamp
	$(BIN)/triview run --data $(DEMO) --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

compile: $(STAMP)
	$(BIN)/triview compile -o pipelines/triview.yaml

# Where a Docker engine exists: build both images (tags as in components/images.py),
# then compile with `triview compile --image ... --gpu-image ...` if you retag them.
IMAGE_TAG ?= 0.1.0
REGISTRY  ?= ghcr.io/triview
images:
	docker build -f images/Dockerfile.cpu -t $(REGISTRY)/triview-cpu:$(IMAGE_TAG) .
	docker build -f Dockerfile.gpu -t $(REGISTRY)/triview-gpu:$(IMAGE_TAG) .

clean:
	rm -rf runs $(DEMO) $(DEMO).stamp .pytest_cache
