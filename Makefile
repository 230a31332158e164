# llm-streams: every target sets up what it needs (venv, Kafka from Maven Central, Redis).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup stack-up stack-down demo test unit integration faults faults-small quota lint bench bench-smoke bench-compare clean \
	image image-test helm helm-check

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

# The whole suite against the real broker and Redis (started here, stopped after if we started them):
# unit, integration, and the fault-injection suite at its small size (on its own private stack).
test: setup lint
	scripts/with-stack.sh $(BIN)/pytest -q -p no:cacheprovider -rf tests

# The fault suite alone at its small size (about 5 minutes, its own private stack).
faults-small: setup
	$(BIN)/pytest -q -p no:cacheprovider -rf tests/faults

# The rate-limit quota test with "never above" judged exactly (no measurement slack): run it on a
# machine doing nothing else (about 5 minutes).
quota: setup
	QUOTA_STRICT=1 scripts/with-stack.sh $(BIN)/pytest -q -s -p no:cacheprovider tests/integration/test_rate_quota.py

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

integration: setup
	scripts/with-stack.sh $(BIN)/pytest -q tests/integration

# The fault-injection suite (tests/faults) at full size, on its own Kafka and Redis
# (127.0.0.1:29092 and :26379, state in .stack-faults/; started and stopped by the suite), then
# the figures into README.md's reliability table. `make faults-small` runs it at FAULTS_SIZE=small.
faults: setup
	mkdir -p out
	FAULTS_SIZE=full FAULTS_RESULTS=out/faults.json $(BIN)/pytest -q -p no:cacheprovider tests/faults
	$(BIN)/python -m tests.faults.report out/faults.json README.md

# The worker image from docker/Dockerfile with podman, on a stand-in for python:3.11-slim built
# from Debian's packages (cached in .stack/image/), then run against the local stack:
# answers, /metrics, /healthz, /readyz, SIGTERM, `llm-streams batch` (tests/image).
image:
	scripts/image.sh build

image-test: setup
	scripts/image.sh build
	IMAGE_BUILT=1 scripts/with-stack.sh $(BIN)/pytest -q -p no:cacheprovider -rf tests/image

# helm (built from the Go module proxy once, cached in GOPATH/opt/helm-v3.22.0/), then `helm lint` and
# the rendered manifests' checks over deploy/helm/llm-streams (tests/deploy; part of `make test`).
helm:
	scripts/helm.sh

helm-check: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider -rf tests/deploy

lint: $(STAMP)
	$(BIN)/ruff check streams mockllm tests $(wildcard bench)
	$(BIN)/mypy

# Benchmarks against peers (bench/): needs the stack, nginx, the `bench` extra (openai, litellm,
# faststream) and, in .venv-quix, the `bench-quix` extra (Quix Streams).
BENCH_STAMP := $(VENV)/.installed-bench
# The Quix Streams peer's own venv (see pyproject's bench-quix extra).
QUIX_VENV := .venv-quix
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install -q -e '.[dev,bench]'
	test -x $(QUIX_VENV)/bin/python || $(PY) -m venv $(QUIX_VENV)
	$(QUIX_VENV)/bin/pip install -q -e '.[bench-quix]'
	test -x /usr/sbin/nginx || (apt-get update -qq && apt-get install -y -qq nginx-light)
	touch $(BENCH_STAMP)

# First where each path's CPU goes by library against its floor (bench/BREAKDOWN.md, under py-spy),
# then the figures; BENCHMARKS.md carries both.
bench: setup $(BENCH_STAMP)
	scripts/with-stack.sh sh -c '$(BIN)/python -m bench.breakdown --out bench/BREAKDOWN.md && \
		$(BIN)/python -m bench.run --size full --out BENCHMARKS.md --json bench/results.json'

# Tiny sizes, one run each (< 2 minutes): checks the harness, not the figures.
bench-smoke: setup $(BENCH_STAMP)
	scripts/with-stack.sh $(BIN)/python -m bench.run --size smoke --out bench/BENCHMARKS-smoke.md \
		--json bench/results-smoke.json

# Two commits side by side in one run, alternating (miss and hit paths): make bench-compare A=REV B=REV
# A: the last commit before the #15 restructure (c1936ed); B: main.
A ?= 4e67074
B ?= main
bench-compare: setup $(BENCH_STAMP)
	scripts/with-stack.sh $(BIN)/python -m bench.run --compare $(A) $(B) --scenarios miss,hit --size full

clean:
	rm -rf $(VENV) $(QUIX_VENV) .stack .stack-faults build *.egg-info
