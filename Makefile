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

$(DEMO)/.complete: | $(STAMP)
	$(BIN)/triview demo-data $(DEMO)
	touch $@

run: $(STAMP) $(DEMO)/.complete
	$(BIN)/triview run --data $(DEMO) --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

compile: $(STAMP)
	$(BIN)/triview compile -o pipelines/triview.yaml

images:
	docker build -f images/Dockerfile.cpu -t ghcr.io/triview/triview-cpu:0.1.0 .
	docker build -f Dockerfile.gpu -t ghcr.io/triview/triview-gpu:0.1.0 .

clean:
	rm -rf runs $(DEMO) .pytest_cache
