# Stoker: build, test and lint the workspace. Every target is non-interactive (CI runs
# `.ci/run`, which runs `make test`, then `make fuzz-smoke`).
#
#   make deps        install the Debian packages tests run against (idempotent)
#   make build       build every crate and target
#   make test        deps + all tests (tests that need root/FUSE/containerd run for real as root)
#   make lint        rustfmt check + clippy with warnings as errors
#   make crds        regenerate manifests/crds/ from the CRD types
#   make bench       benchmarks (BENCHMARKS.md)
#   make demo        end-to-end demo
#   make fuzz-smoke  fixed-length fuzzing run of every cargo-fuzz target (fuzz/README.md)
#   make test-faults the fault-injection suite and its recovery table (docs/RELIABILITY.md)

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
export DEBIAN_FRONTEND := noninteractive
CARGO ?= cargo

# Real components the tests run on loopback (see docs and testkit/).
APT_PACKAGES := docker-registry containerd runc skopeo umoci fuse3 protobuf-compiler iproute2 openssl curl jq debootstrap

.PHONY: all deps build test lint bench demo fuzz-smoke test-faults crds

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

# Regenerates manifests/crds/ from the Rust types (a test fails while it is stale).
crds:
	$(CARGO) run -q -p stoker-crds --bin crdgen

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The fault-injection suite (also part of `make test`): registry-client faults, reads
# through a real FUSE mount with a fault proxy in front of a real registry, the agent
# killed with SIGKILL and restarted, and no credential in the agent's logs or metrics.
# Prints the recovery table (fault cleared → first correct read) the lazyfs tests report
# as `RECOVERY | scenario | ms` lines.
test-faults: deps
	@log="$${TMPDIR:-/tmp}/stoker-test-faults.log"; : >"$$log"; \
	$(CARGO) test -p stoker-registry --test faults 2>&1 | tee -a "$$log"; \
	$(CARGO) test -p stoker-lazyfs --test faults -- --nocapture --test-threads=3 2>&1 | tee -a "$$log"; \
	$(CARGO) test -p stoker-agent --test lazy_e2e --test restart_reads --test prefetch_kill --test start_registry_down --test credentials -- --nocapture 2>&1 | tee -a "$$log"; \
	$(CARGO) test -p stoker-controller --test failover --test leader_mock -- --nocapture 2>&1 | tee -a "$$log"; \
	echo; echo "Recovery after the fault clears (full log: $$log)"; \
	grep -ho 'RECOVERY | [^|]* | [0-9.]*' "$$log" | awk -F' [|] ' '{ printf "  %-75s %8s ms\n", $$2, $$3 }'

# Runs every benchmark section side by side and writes BENCHMARKS.md.
# BENCH_ARGS="--quick" for a short run, "--sections convert" for one section.
bench: deps
	$(CARGO) build --release -p stoker-cli -p stoker-agent -p stoker-bench
	$(CARGO) build --release -p stoker-controller --bin controller-sim
	./target/release/stoker-bench $(BENCH_ARGS)

# The main job on one machine, through containerd: full pull vs Stoker lazy vs warmed from a plan.
demo: deps
	$(CARGO) build --release -p stoker-cli -p stoker-agent -p stoker-bench
	./target/release/stoker-bench --sections demo --quick --out "$${TMPDIR:-/tmp}/stoker-demo.md"

# cargo-fuzz on the stable toolchain: RUSTC_BOOTSTRAP=1 lets rustc take -Zsanitizer=address.
# Each target replays its committed corpus, then runs a fixed number of inputs (10–15 s
# each on one core; FUZZ_RUNS overrides them all) from libFuzzer seed FUZZ_SEED, with its
# own extra flags. New inputs go to fuzz/target/smoke/, so fuzz/corpus stays as committed.
# The index decoder bounds its allocations by its input: 4 KiB inputs must stay under 64 MB.
FUZZ_SMOKE := \
	"index_decode 100000 -max_len=4096 -malloc_limit_mb=64" \
	"plan_decode 20000" \
	"tar_layer 15000" \
	"snapshot_labels 60000"
FUZZ_RUNS ?=
FUZZ_SEED ?= 1

fuzz-smoke:
	@$(CARGO) fuzz --version >/dev/null 2>&1 || $(CARGO) install --locked cargo-fuzz
	cd fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz build
	@for spec in $(FUZZ_SMOKE); do \
		set -- $$spec; target=$$1; runs=$(or $(FUZZ_RUNS),$$2); shift 2; \
		scratch=target/smoke/$$target; log=fuzz/target/smoke/$$target.log; \
		rm -rf "fuzz/$$scratch"; mkdir -p "fuzz/$$scratch"; \
		if (cd fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run "$$target" "$$scratch" "corpus/$$target" -- \
			-runs=$$runs -seed=$(FUZZ_SEED) -timeout=10 -rss_limit_mb=2048 "$$@") >"$$log" 2>&1; then \
			echo "fuzz-smoke: $$target: $$(grep -E '^Done [0-9]+ runs' "$$log")"; \
		else \
			tail -n 80 "$$log"; \
			echo "fuzz-smoke: $$target FAILED (log: $$log, crash input under fuzz/artifacts/$$target/)"; \
			exit 1; \
		fi; \
	done

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

# Two containerd + stoker-agent "nodes", a registry and the controller's plan path over
# mutual TLS, no Kubernetes (e2e/tests/local.rs; also part of `make test`).
e2e-local: deps
	$(CARGO) build -p stoker-agent --bin stoker-agent
	$(CARGO) test -p stoker-e2e --test local

# Renders and checks manifests/ without a cluster (also part of `make test`).
manifests-check:
	$(CARGO) test -p stoker-deploy-check
