# Stoker: build, test and lint the workspace. Every target is non-interactive (CI runs
# `.ci/run`, which runs `make test`).
#
#   make deps        install the Debian packages tests run against (idempotent)
#   make build       build every crate and target
#   make test        deps + all tests (tests that need root/FUSE/containerd run for real as root)
#   make lint        rustfmt check + clippy with warnings as errors
#   make bench       benchmarks (BENCHMARKS.md)
#   make demo        end-to-end demo
#   make fuzz-smoke  short fuzzing run of the index decoder

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
export DEBIAN_FRONTEND := noninteractive
CARGO ?= cargo

# Real components the tests run on loopback (see docs and testkit/).
APT_PACKAGES := docker-registry containerd runc skopeo umoci fuse3 protobuf-compiler iproute2 openssl curl jq

.PHONY: all deps build test lint bench demo fuzz-smoke

all: build

deps:
	@missing=""; \
	for pkg in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' "$$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$pkg"; \
	done; \
	if [ -z "$$missing" ]; then \
		echo "deps: all installed ($(APT_PACKAGES))"; \
	else \
		echo "deps: installing$$missing"; \
		sudo_cmd=""; [ "$$(id -u)" -eq 0 ] || sudo_cmd="sudo"; \
		$$sudo_cmd apt-get update -q; \
		$$sudo_cmd apt-get install -y -q --no-install-recommends $$missing; \
	fi

build:
	$(CARGO) build --workspace --all-targets

test: deps
	$(CARGO) test --workspace

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Runs every benchmark section side by side and writes BENCHMARKS.md.
# BENCH_ARGS="--quick" for a short run, "--sections convert" for one section.
bench: deps
	$(CARGO) run --release -p stoker-bench -- $(BENCH_ARGS)

demo:
	@echo "demo: not ready yet"

fuzz-smoke:
	@echo "fuzz-smoke: no fuzz targets yet"

# --- Kubernetes install (manifests/, images/, kind-config/, e2e/) ---------------
.PHONY: images e2e e2e-local manifests-check
IMAGE_REGISTRY ?= localhost:5001
IMAGE_TAG ?= dev

# Builds the agent, controller and certgen images with Docker (BuildKit).
images:
	@if ! command -v docker >/dev/null 2>&1 || ! docker info >/dev/null 2>&1; then \
		echo "images: SKIPPED: no Docker engine (docker info failed); nothing was built"; \
		exit 0; \
	fi; \
	for image in agent controller certgen; do \
		echo "images: building $(IMAGE_REGISTRY)/stoker-$$image:$(IMAGE_TAG)"; \
		DOCKER_BUILDKIT=1 docker build -f images/$$image.Dockerfile -t $(IMAGE_REGISTRY)/stoker-$$image:$(IMAGE_TAG) .; \
	done

# The kind-based scenario of issue 7 (needs Docker and kind; skips without them).
e2e:
	@bash e2e/run.sh

e2e-local:
	@echo "e2e-local: not written yet (two stoker-agents and the controller's plan path, no Kubernetes)"

# Renders and checks manifests/ without a cluster (also part of `make test`).
manifests-check:
	$(CARGO) test -p stoker-deploy-check
