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

# Main job on the embedded default: synthetic product -> fit -> evaluate -> predict with heatmaps.
# Random backbone weights unless PATCHCORE_WEIGHTS points at a real weights file.
demo: install
	@mkdir -p $(PATCHCORE_HOME)
	$(PATCHCORE) demo-data --out data --product $(PRODUCT)
	$(PATCHCORE) fit --images data/$(PRODUCT) --out $(PATCHCORE_HOME)/models/$(PRODUCT) \
	    $(if $(PATCHCORE_WEIGHTS),,--weights random)
	$(PATCHCORE) evaluate --model $(PATCHCORE_HOME)/models/$(PRODUCT) --data data/$(PRODUCT) \
	    --out $(PATCHCORE_HOME)/reports/$(PRODUCT)-metrics.json --quiet
	$(PATCHCORE) predict --model $(PATCHCORE_HOME)/models/$(PRODUCT) --images data/$(PRODUCT)/test \
	    --out $(PATCHCORE_HOME)/reports/$(PRODUCT)-scores.json --maps $(PATCHCORE_HOME)/reports/$(PRODUCT)-heatmaps --quiet
	@echo
	@echo "Done. Look at:"
	@echo "  model:    $(PATCHCORE_HOME)/models/$(PRODUCT)/model.json"
	@echo "  metrics:  $(PATCHCORE_HOME)/reports/$(PRODUCT)-metrics.json"
	@echo "  scores:   $(PATCHCORE_HOME)/reports/$(PRODUCT)-scores.json"
	@echo "  heatmaps: $(PATCHCORE_HOME)/reports/$(PRODUCT)-heatmaps/"

# Fast suite (slow, real-data and real-weights tests included when their inputs exist).
test: install
	$(PY) -m pytest -q -ra

bench: install
	$(PY) bench/run_mtd.py

clean:
	rm -rf $(PATCHCORE_HOME) .pytest_cache
