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

.PHONY: install demo test test-all bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# The whole pipeline on the embedded default (offline): synthetic product -> Prefect flow `train`
# (validate, extract, coreset, evaluate, calibrate, register in MLflow) -> `promote` -> `inspect` ->
# `status`. Random backbone weights, flagged as such, unless PATCHCORE_WEIGHTS names a weights file;
# a random-weights model is promoted only because the demo passes --allow-random-weights.
# DEMO_SETTINGS adds `--set key=value` overrides (e.g. --set model.backbone.name=resnet18 for speed).
DEMO_SIZE ?= 256
DEMO_SETTINGS ?=
demo: export PREFECT_HOME ?= $(PATCHCORE_HOME)/prefect
demo: install
	@mkdir -p $(PATCHCORE_HOME)
	$(PY) -m patchcore.synthetic --out data --product $(PRODUCT) --size $(DEMO_SIZE)
	$(PATCHCORE) train --product $(PRODUCT) --data data/$(PRODUCT) $(if $(PATCHCORE_WEIGHTS),,--weights random) $(DEMO_SETTINGS)
	$(PATCHCORE) promote --product $(PRODUCT) $(if $(PATCHCORE_WEIGHTS),,--allow-random-weights) $(DEMO_SETTINGS)
	@printf '%s\n' $(CURDIR)/data/$(PRODUCT)/test/good/000.png $(CURDIR)/data/$(PRODUCT)/test/good/001.png \
	    $(CURDIR)/data/$(PRODUCT)/test/scratch/000.png $(CURDIR)/data/$(PRODUCT)/test/spot/000.png \
	    $(CURDIR)/data/$(PRODUCT)/test/missing/000.png > $(PATCHCORE_HOME)/demo-images.txt
	$(PATCHCORE) inspect --product $(PRODUCT) --images $(PATCHCORE_HOME)/demo-images.txt --out $(PATCHCORE_HOME)/inspect/$(PRODUCT)
	$(PATCHCORE) status --product $(PRODUCT)
	@echo
	@echo "Done. Where to look:"
	@echo "  MLflow runs, models, aliases:  $(VENV)/bin/mlflow ui --backend-store-uri $$($(PATCHCORE) status --json | $(PY) -c 'import json,sys; print(json.load(sys.stdin)["tracking_uri"])')"
	@echo "                                 then open http://127.0.0.1:5000"
	@echo "  Prefect flow runs, artifacts:  PREFECT_HOME=$(PREFECT_HOME) $(VENV)/bin/prefect server start"
	@echo "                                 then open http://127.0.0.1:4200"
	@echo "  inspected images:              $(PATCHCORE_HOME)/inspect/$(PRODUCT)/scores.csv and heatmaps/"
	@echo "  the serving model:             mlflow.pyfunc.load_model(\"models:/patchcore-$(PRODUCT)@champion\")"

# Fast suite (slow, real-data and real-weights tests included when their inputs exist).
test: install
	$(PY) -m pytest -q -ra

bench: install
	$(PY) bench/run_mtd.py

clean:
	rm -rf $(PATCHCORE_HOME) .pytest_cache
