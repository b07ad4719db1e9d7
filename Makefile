# Two commands on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
KUBE_BIN ?= $(HOME)/.cache/kube-apiserver-1.20.2
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= epp:$(VERSION)
PYTEST_FLAGS ?= -q -rs

.PHONY: venv run test test-unit test-integration test-kube lint bench kube-build kube-up kube-down clean image print-image kind-demo protos

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]' --config-settings editable_mode=compat
	touch $(STAMP)

venv: $(STAMP)

# `make run PD=1:2`: a P/D pool (1 prefill, 2 decode simulators, sidecars on the decode ones).
# `make run PORT=8081`: the gateway on another port (a busy port is reported in one line).
PD ?=
PORT ?= 8080
run: $(STAMP)
	$(BIN)/python -m epp.devstack.demo --port $(PORT) $(if $(PD),--pd $(PD))

test: $(STAMP) kube-build
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest $(PYTEST_FLAGS) -x --durations=15

test-unit: $(STAMP)
	$(BIN)/pytest $(PYTEST_FLAGS) tests/unit

test-integration: $(STAMP)
	$(BIN)/pytest $(PYTEST_FLAGS) tests/integration

test-kube: $(STAMP) kube-build
	$(BIN)/pytest $(PYTEST_FLAGS) tests/kube

# The container image (Containerfile) with the first of docker / podman whose daemon answers
# (CONTAINER_ENGINE="podman docker" to change the order); a clear message when none does.
image:
	@engine=$$(hack/image/engine.sh) || exit 1; \
	echo "$$engine build -f Containerfile -t $(IMAGE) ."; \
	$$engine build -f Containerfile -t $(IMAGE) .

print-image:
	@echo $(IMAGE)

# Quickstart on kind (needs docker or podman, kind, and network access): cluster, image,
# CRDs, the reconciler chart, a simulated ModelPool (its EPP included), an Envoy gateway and
# one request through it. KIND_CLUSTER=epp-demo by default; `kind delete cluster --name ...`.
KIND_CLUSTER ?= epp-demo
kind-demo: $(STAMP)
	IMAGE=$(IMAGE) KIND_CLUSTER=$(KIND_CLUSTER) BIN=$(BIN) bash hack/kind/demo.sh

# The replica state-sync protocol: protos/ -> epp/sync/v1 (committed; tests/unit/test_protos.py
# fails when they drift). grpcio-tools is pinned exactly in pyproject.toml's dev extra.
protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. \
		protos/epp/sync/v1/sync.proto

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check . || true
	$(BIN)/mypy

# Figures go to bench/RESULTS.md by hand (command, machine, date). Needs root for apt (wrk).
bench: $(STAMP)
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(BIN)/pip install -q -e '.[peers]' --config-settings editable_mode=compat
	$(BIN)/python -m bench.pick --json
	$(BIN)/python -m bench.extproc_cpu --json
	$(BIN)/python -m bench.proxy --json
	$(BIN)/python -m bench.run shared_prefix

# Real kube-apiserver + etcd built from Debian's source package (cached in ~/.cache).
kube-build:
	COMPONENTS="kube-apiserver kube-controller-manager kube-scheduler" OUT=$(KUBE_BIN) bash hack/kube/build-kube-apiserver.sh

# A long-lived dev cluster (etcd, apiserver, controllers, fake kubelet) in $(KUBE_DIR).
KUBE_DIR ?= /tmp/epp-kube
kube-up: $(STAMP) kube-build
	KUBE_BIN=$(KUBE_BIN) $(BIN)/python -m hack.kube.cluster up --workdir $(KUBE_DIR)

kube-down: $(STAMP)
	$(BIN)/python -m hack.kube.cluster down --workdir $(KUBE_DIR)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

# inference-perf as an alternative load driver: its own Python >= 3.12 venv (.venv-iperf),
# an offline BPE tokenizer, then a short shared-prefix run per router into bench/results/iperf/.
IPERF_ROUTERS ?= epp,round_robin
.PHONY: bench-iperf
bench-iperf: $(STAMP)
	$(BIN)/python -m bench.iperf.env
	$(BIN)/python -m bench.iperf.run --routers $(IPERF_ROUTERS)

# Soak (a benchmark, not part of `make test`, which runs a 3-minute version): 30 minutes of
# load with pod kills, endpoint churn, KV-event publisher restarts and client cancels; fails
# on leaks (in-flight, RSS, fds, asyncio tasks) or unexplained failed requests.
SOAK_ARGS ?= --duration 1800 --json
.PHONY: soak
soak: $(STAMP)
	$(BIN)/python -m bench.soak $(SOAK_ARGS)
