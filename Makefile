# llm-streams: every target sets up what it needs (venv, Kafka from Maven Central, Redis).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup stack-up stack-down demo test unit integration lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)
	scripts/stack.sh setup

stack-up: setup
	scripts/stack.sh up

stack-down:
	scripts/stack.sh down

demo: setup
	scripts/demo.sh

# The whole suite against the real broker and Redis (started here, stopped after if we started them).
test: setup
	scripts/with-stack.sh $(BIN)/pytest -q -p no:cacheprovider tests

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

integration: setup
	scripts/with-stack.sh $(BIN)/pytest -q tests/integration

lint: $(STAMP)
	$(BIN)/ruff check streams tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .stack build *.egg-info
