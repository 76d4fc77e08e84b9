# Developer entry points. `make run` and `make test` work on a fresh machine with Python 3.11+.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

# Container images: ztcqrs-<service>:<tag>, built on BASE_IMAGE (any Python 3.11+ image). The PEM
# files under EXTRA_CA_DIR are trusted while the build downloads packages, and not shipped.
DOCKER ?= docker
SERVICES := auth router monolith cqrs
IMAGE_PREFIX ?= ztcqrs-
IMAGE_TAG ?= latest
BASE_IMAGE ?= python:3.11-slim
EXTRA_CA_DIR ?= /usr/local/share/ca-certificates

# Kubernetes: a kind cluster, and the chart installed into a namespace of the current context.
KIND_CLUSTER ?= ztcqrs
K8S_NAMESPACE ?= ztcqrs
KUBECTL ?= kubectl
HELM ?= helm

.PHONY: install run test lint clean lock images compose-up compose-e2e compose-down compose-check e2e \
	kind-up helm-install k8s chaos bench browser

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is required; set PYTHON=python3.11 (or newer).")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

install: $(VENV)/.installed

## run: start every process locally (embedded Redis unless REDIS_URL is set) until Ctrl-C
run: install
	$(BIN)/ztcqrs up

## test: every test, against real Redis, SQLite and uvicorn processes the tests start themselves
test: install browser
	$(BIN)/pytest $(PYTEST_ARGS)

## browser: Debian's Chromium, which the status-page test drives headless; installed with apt-get
## when missing and this runs as root, since Playwright's own browser downloads are not used
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
		else \
			echo "The status-page test needs Chromium: install it (Debian: apt-get install chromium) and run make test again." >&2; \
			exit 1; \
		fi; \
	}

## lint: ruff and mypy (strict) over the services and tests
lint: install
	$(BIN)/ruff check services tests
	$(BIN)/mypy

## e2e: the end-to-end suite; against a running stack when E2E_BASE_URL and E2E_AUTH_URL are set,
## otherwise against local processes it starts (see tests/e2e/conftest.py for the other variables)
e2e: install
	$(BIN)/pytest -p no:cacheprovider tests/e2e $(PYTEST_ARGS)

## lock: pin the images' runtime dependencies to the versions installed in the venv
lock: install
	$(BIN)/python deploy/docker/freeze_runtime.py > deploy/docker/requirements.lock.new
	mv deploy/docker/requirements.lock.new deploy/docker/requirements.lock

## images: build the four service images
images:
	@set -e; for service in $(SERVICES); do \
		echo "building $(IMAGE_PREFIX)$$service:$(IMAGE_TAG) on $(BASE_IMAGE)"; \
		$(DOCKER) build --file Dockerfile.$$service --tag $(IMAGE_PREFIX)$$service:$(IMAGE_TAG) \
			--build-arg BASE_IMAGE=$(BASE_IMAGE) \
			--build-arg EXTRA_CA_CERTS="$$(find $(EXTRA_CA_DIR) -name '*.crt' -exec cat {} + 2>/dev/null)" \
			.; \
	done

## compose-up: build the images, start the compose stack and wait until it is healthy
compose-up: images
	ZTCQRS_IMAGE_PREFIX=$(IMAGE_PREFIX) ZTCQRS_IMAGE_TAG=$(IMAGE_TAG) $(PYTHON) scripts/compose.py up

## compose-e2e: run the e2e suite against the running compose stack
compose-e2e: install
	$(BIN)/python scripts/compose.py e2e $(PYTEST_ARGS)

## compose-down: remove the compose stack's containers and network (add COMPOSE_ARGS=--volumes)
compose-down:
	$(PYTHON) scripts/compose.py down $(COMPOSE_ARGS)

## compose-check: what CI runs: from no Docker engine to images, stack, e2e suite and teardown
compose-check: install
	$(BIN)/python scripts/compose.py check

## kind-up: build the images, create the kind cluster (kind >= 0.24 enforces NetworkPolicies) and load the images
kind-up: images
	kind get clusters | grep -qx '$(KIND_CLUSTER)' || kind create cluster --name $(KIND_CLUSTER)
	@set -e; for service in $(SERVICES); do \
		kind load docker-image --name $(KIND_CLUSTER) $(IMAGE_PREFIX)$$service:$(IMAGE_TAG); \
	done

## helm-install: install or upgrade the chart on the current cluster in development mode, for the e2e suite
helm-install:
	$(KUBECTL) create namespace $(K8S_NAMESPACE) --dry-run=client -o yaml | $(KUBECTL) apply -f -
	$(KUBECTL) -n $(K8S_NAMESPACE) create secret generic ztcqrs-dev-client-secrets \
		--from-literal=reverse-sync-client-secret=dev-reverse-sync-secret \
		--from-literal=admin-client-secret=dev-admin-secret --dry-run=client -o yaml | $(KUBECTL) apply -f -
	$(HELM) upgrade --install ztcqrs helm/ztcqrs --namespace $(K8S_NAMESPACE) \
		--values helm/ztcqrs/ci/kind-values.yaml --set image.tag=$(IMAGE_TAG) --wait --timeout 5m

## k8s: render the plain manifests in k8s/ from the chart
k8s: install
	$(BIN)/python -m tests.chart.render k8s

## chaos: the chaos test at full size (3,000 acknowledged writes, every process killed 5 times)
chaos: install
	CHAOS_WRITES=$${CHAOS_WRITES:-3000} CHAOS_KILL_ROUNDS=$${CHAOS_KILL_ROUNDS:-5} \
		$(BIN)/pytest -s -p no:cacheprovider tests/chaos/test_chaos.py $(PYTEST_ARGS)

## bench: router throughput against nginx, sync lag and memory; prints the table and writes
## docs/benchmarks.md (about 10 minutes). BENCH_QUICK=1 takes about 3 minutes and only prints.
## Installs nginx and wrk with apt-get when missing and run as root.
bench: install
	$(BIN)/python -m scripts.bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
