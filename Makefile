# Every user-facing target depends on `setup`, so any of them works on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
INSTALL_LOG := $(VENV)/install.log

.PHONY: setup test bench sweep train eval slurm submit ui report clean

TASK ?= gen_digits

setup: $(STAMP)

# Re-install only when the dependency list changes. pip's output goes to a log that is
# shown only when the install fails.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing lzn-platform and its dependencies into $(VENV) (a few minutes the first time)..."
	@{ $(PY) -m pip install --upgrade pip && $(PY) -m pip install -e '.[test]'; } > $(INSTALL_LOG) 2>&1 \
		|| { tail -n 40 $(INSTALL_LOG); echo "install failed: full log in $(INSTALL_LOG)"; exit 1; }
	@touch $(STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) -m benchmarks $(BENCH_ARGS)

# The task's stage DAG: prepare -> train -> evaluate -> report (done stages are skipped).
train: setup
	$(PY) -m pipelines.run task=$(TASK) $(ARGS)

# The evaluation stage alone, on any checkpoint: a file, a run folder or an MLflow run id.
eval: setup
	@test -n "$(CHECKPOINT)" || { echo "usage: make eval TASK=<task> CHECKPOINT=<checkpoint file, run folder or MLflow run id> [ARGS='metrics=[fid] backend=ray trainer.num_workers=4']" >&2; exit 2; }
	$(PY) -m pipelines.evaluate task=$(TASK) checkpoint=$(CHECKPOINT) $(ARGS)

# The main job: a Ray Tune sweep of TASK (default: a digits task, minutes on a laptop).
sweep: setup
	$(PY) -m pipelines.sweep task=$(TASK) $(ARGS)

# The pipeline as a Slurm job (submitit): the stage DAG as `make train` runs it (done stages are
# skipped), or the sweep with SWEEP=1; where and how from the `slurm` config
# (pipelines/conf/slurm/; local: the cluster of infra/slurm/up.sh, one node or --nodes N).
slurm: setup
	$(PY) -m pipelines.slurm task=$(TASK) $(if $(filter 1 true yes,$(SWEEP)),mode=sweep) $(ARGS)

# The task as a Ray job on $$RAY_ADDRESS (a cluster from infra/ray/, or `ray start --head` here).
submit: setup
	$(PY) -m pipelines.submit task=$(TASK) $(ARGS)

# The MLflow UI on the project's tracking store ($$MLFLOW_TRACKING_URI, else the local server
# under $(OUTPUT_DIR)/mlflow, started if needed): prints its URL and each experiment's page.
OUTPUT_DIR ?= outputs
ui: setup
	$(PY) -m dashboards.ui --output-dir $(OUTPUT_DIR)

# A self-contained HTML report of a sweep (default: the latest sweep's experiment).
report: setup
	$(PY) -m dashboards.report --output-dir $(OUTPUT_DIR) $(if $(EXPERIMENT),--experiment $(EXPERIMENT)) $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info bench-results
