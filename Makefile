# The two commands of the README: `make demo` and `make test`. Each sets itself up on a fresh
# machine (virtual environment + install) before running.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PATCHCORE := $(VENV)/bin/patchcore
PRODUCT ?= tiles

export PATCHCORE_HOME ?= $(CURDIR)/work
# Quiet, offline-friendly settings for every tool the pipeline drives.
export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90
export MLFLOW_DISABLE_TELEMETRY := true
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION := false
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
# The loopback ports of `make serve` (and the addresses `make demo` prints).
PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000

.PHONY: install demo test test-all bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# The whole pipeline on the embedded default (offline): the demo profile (params.yaml `profile: demo`:
# random backbone weights, flagged everywhere, which may be promoted) -> synthetic product (kept if
# data/$(PRODUCT) exists) -> Prefect flow `train` (validate, extract, coreset, evaluate, calibrate,
# register in MLflow; an unchanged product registers no new version) -> `promote` -> `inspect` ->
# `status`. Run it again any time: it only does what changed. The profile stays on, so `make serve`
# and `dvc repro` work offline afterwards; `patchcore profile production` switches back.
# With real weights: make demo PATCHCORE_WEIGHTS=/path/state_dict.pth [PATCHCORE_BACKBONE=mobilenet_v2]
# (passed as --set flags, recorded on the run). DEMO_SETTINGS adds more `--set key=value` overrides.
DEMO_SIZE ?= 256
DEMO_SETTINGS ?=
DEMO_WEIGHTS := $(if $(PATCHCORE_WEIGHTS),--set model.backbone.weights=$(PATCHCORE_WEIGHTS)) \
    $(if $(PATCHCORE_BACKBONE),--set model.backbone.name=$(PATCHCORE_BACKBONE) --set model.backbone.layers=null)
demo: export PREFECT_HOME ?= $(PATCHCORE_HOME)/prefect
demo: install
	@mkdir -p $(PATCHCORE_HOME)
	$(PATCHCORE) profile demo
	@if [ -d data/$(PRODUCT)/train/good ]; then echo "data/$(PRODUCT): kept as it is (delete it to regenerate)"; \
	    else $(PY) -m patchcore.synthetic --out data --product $(PRODUCT) --size $(DEMO_SIZE); fi
	$(PATCHCORE) train --product $(PRODUCT) --data data/$(PRODUCT) $(DEMO_WEIGHTS) $(DEMO_SETTINGS)
	$(PATCHCORE) promote --product $(PRODUCT) $(DEMO_SETTINGS)
	@printf '%s\n' $(CURDIR)/data/$(PRODUCT)/test/good/000.png $(CURDIR)/data/$(PRODUCT)/test/good/001.png \
	    $(CURDIR)/data/$(PRODUCT)/test/scratch/000.png $(CURDIR)/data/$(PRODUCT)/test/spot/000.png \
	    $(CURDIR)/data/$(PRODUCT)/test/missing/000.png > $(PATCHCORE_HOME)/demo-images.txt
	$(PATCHCORE) inspect --product $(PRODUCT) --images $(PATCHCORE_HOME)/demo-images.txt --out $(PATCHCORE_HOME)/inspect/$(PRODUCT)
	$(PATCHCORE) status --product $(PRODUCT)
	@echo
	@echo "Done. Where to look:"
	@echo "  MLflow runs, models, aliases:  $(VENV)/bin/mlflow ui --port $(MLFLOW_PORT) --backend-store-uri $$($(PATCHCORE) status --json | $(PY) -c 'import json,sys; print(json.load(sys.stdin)["tracking_uri"])')"
	@echo "                                 then open http://127.0.0.1:$(MLFLOW_PORT)/#/experiments?workflowType=machine_learning"
	@echo "  Prefect flow runs, artifacts:  PREFECT_HOME=$(PREFECT_HOME) PREFECT_UI_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(VENV)/bin/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)"
	@echo "                                 then open http://127.0.0.1:$(PREFECT_PORT)"
	@echo "  inspected images:              $(PATCHCORE_HOME)/inspect/$(PRODUCT)/scores.csv and heatmaps/"
	@echo "  the serving model:             mlflow.pyfunc.load_model(\"models:/patchcore-$(PRODUCT)@champion\")"
	@echo "  day-to-day operation:          make serve (README \"Operating it\"); the project is on profile demo"

# Lint and format check (ruff, line length 120), then the suite (slow, real-data and real-weights
# tests included when their inputs exist).
test: install postgres
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -ra --durations=15

bench: install
	$(PY) bench/run_mtd.py

clean:
	rm -rf $(PATCHCORE_HOME) .pytest_cache

# -- operations: `make serve` starts a Prefect server, an MLflow tracking server and the deployments
# (deploy/serve.py), all on 127.0.0.1 and with authentication, in the background (deploy/servers.py);
# `make stop` stops exactly what it started. Credentials: $(PATCHCORE_HOME)/run/credentials.env
# (generated once, mode 0600); logs and pid files: $(PATCHCORE_HOME)/run/. The MLflow server keeps
# the pipeline's SQLite store (the one `make demo` filled), and every client of `make serve` (the
# deployments, `make env` shells, the model server) talks to it over HTTP as its MLflow account.
SERVE_ARGS ?=
RUN_DIR := $(PATCHCORE_HOME)/run
MLFLOW_DB := $(PATCHCORE_HOME)/mlflow/mlflow.db
SERVERS := $(PY) -m deploy.servers --prefect-port $(PREFECT_PORT) --mlflow-port $(MLFLOW_PORT)
.PHONY: serve stop
serve: export PREFECT_HOME ?= $(PATCHCORE_HOME)/prefect
serve: install
	$(SERVERS) up -- $(SERVE_ARGS)

# The environment of `make serve`'s servers for another shell: eval "$(make -s env)" (addresses, and
# the credentials sourced from their 0600 file, never printed).
.PHONY: env
env:
	@$(SERVERS) env

# Stops what `make serve` (and `make serve-model`) started: each recorded process group, by its pid file.
stop:
	@$(SERVERS) down

# Restart the model server so it resolves @champion again (aliases are resolved when it starts).
# deploy/model_server.py: MLflow's scoring app behind a guard (Host, Origin, content type, body size,
# clean errors); MODEL_SERVER_ARGS e.g. "--allowed-host inspect.factory.lan" behind a reverse proxy.
SERVE_MODEL_PORT ?= 5001
MODEL_SERVER_ARGS ?=
.PHONY: serve-model
# With `make serve` (or `make stack`) running it reads the model from that MLflow server as the
# read-only viewer account; an exported MLFLOW_TRACKING_URI (e.g. from `make stack-env`) wins.
STACK_DIR := $(PATCHCORE_HOME)/stack
serve-model: export MLFLOW_TRACKING_URI := $(or $(MLFLOW_TRACKING_URI),$(if $(wildcard $(STACK_DIR)/mlflow.pid),http://127.0.0.1:$(shell $(PY) -c "import json; print(json.load(open('$(STACK_DIR)/stack.json'))['ports']['mlflow'])" 2>/dev/null),$(if $(wildcard $(RUN_DIR)/mlflow.pid),http://127.0.0.1:$(MLFLOW_PORT),sqlite:///$(MLFLOW_DB))))
serve-model: export MLFLOW_REGISTRY_URI = $(MLFLOW_TRACKING_URI)
serve-model: export PATCHCORE_CREDENTIALS := $(or $(PATCHCORE_CREDENTIALS),$(if $(wildcard $(STACK_DIR)/mlflow.pid),$(STACK_DIR)/credentials.env))
serve-model: export PATH := $(abspath $(VENV))/bin:$(PATH)
serve-model:
	@mkdir -p $(RUN_DIR)
	@if [ -f $(RUN_DIR)/model.pid ]; then kill -TERM -- -$$(cat $(RUN_DIR)/model.pid) 2>/dev/null; rm -f $(RUN_DIR)/model.pid; sleep 2; fi
	setsid $(PY) -m deploy.model_server --model "models:/patchcore-$(PRODUCT)@champion" \
	    --host 127.0.0.1 --port $(SERVE_MODEL_PORT) $(MODEL_SERVER_ARGS) > $(RUN_DIR)/model.log 2>&1 & echo $$! > $(RUN_DIR)/model.pid
	@echo "serving patchcore-$(PRODUCT)@champion on http://127.0.0.1:$(SERVE_MODEL_PORT)/invocations (log $(RUN_DIR)/model.log)"

# -- the production stack on one machine (deploy/stack.py; README "Scaling out"): PostgreSQL, an S3
# store (SeaweedFS), Prefect server and MLflow server on PostgreSQL (artifacts in S3), a Dask
# scheduler with 2 workers, a Prefect worker on the work pool `patchcore` (queues cpu, gpu) running
# the deployments, and the new-data watcher; every port on 127.0.0.1. Credentials, logs, pid files:
# $(PATCHCORE_HOME)/stack/. `make stack-down` stops exactly what `make stack` started.
# Ports: STACK_PREFECT_PORT, STACK_MLFLOW_PORT, STACK_POSTGRES_PORT, STACK_S3_PORT, STACK_DASK_PORT.
STACK_ARGS ?=
STACK := $(PY) -m deploy.stack
.PHONY: stack stack-down stack-env postgres
stack: export PREFECT_HOME ?= $(PATCHCORE_HOME)/prefect
stack: install postgres
	$(STACK) up $(STACK_ARGS)

stack-down:
	@$(STACK) down

stack-env:
	@$(STACK) env

# PostgreSQL's server programs (the stack and its tests need them): installed with apt when missing
# and run as root; otherwise the message says what to install.
postgres:
	@$(PY) -c "from deploy.stack import pg_bin; pg_bin('initdb')" 2>/dev/null || { \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	        echo "installing PostgreSQL (apt-get install postgresql)"; \
	        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null; \
	    else $(PY) -c "from deploy.stack import pg_bin; pg_bin('initdb')"; fi; }
