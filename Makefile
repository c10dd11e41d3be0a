# The two commands a new user needs: `make demo` and `make test`. Both create the venv first.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast lint bench audit clean

venv: $(STAMP)

# Rebuilt when the lock file or the project metadata changes; reused otherwise.
$(STAMP): requirements.lock pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY) (Python 3.11)"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

demo: venv
	$(BIN)/cxr-study demo --dir demo_run

# Two pytest workers (pytest-xdist), each test file on one of them so a file's shared study is
# made once: the end-to-end tests mostly wait on Ray and MLflow processes, so a second worker
# fills two cores. TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

# pytest exits 5 when it collected nothing: that must fail, not pass.
test: venv
	$(PYTEST); status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$status

test-fast: venv
	$(PYTEST) -m "not slow"

lint: venv
	$(BIN)/ruff check contract methods study trainables search_spaces analysis tests benchmarks

bench: venv
	@for script in benchmarks/*.py; do echo "== $$script"; $(BIN)/python $$script --quick || exit 1; done

# Known vulnerabilities in the locked set (pip-audit in its own small venv; needs a reachable
# vulnerability source: PyPI's JSON API or OSV). --strict: a package it could not check fails.
audit:
	test -x .venv-audit/bin/pip-audit || { $(PY) -m venv .venv-audit && \
		.venv-audit/bin/pip install -q pip-audit; }
	grep -v '^-e ' requirements.lock > .venv-audit/requirements.txt
	.venv-audit/bin/pip-audit -r .venv-audit/requirements.txt --no-deps --disable-pip --strict \
		$(AUDIT_ARGS)

# The analysis notebooks in JupyterLab, served on 127.0.0.1 only, reading one study:
# `make notebooks STUDY=runs/methods` (the study folder's mlflow.db; the experiment is the
# folder's name unless EXPERIMENT= names it), or TRACKING_URI=... EXPERIMENT=...; with neither,
# the demo's study. REFERENCE_ARM= picks the arm compare_methods compares with; NOTEBOOK_PORT
# (8888) and NOTEBOOK_ARGS (e.g. --no-browser) go to JupyterLab. JupyterLab lives in its own
# venv (requirements-notebooks.lock, constrained by requirements.lock); the notebooks' kernel is
# the project venv's Python.
.PHONY: notebooks
NB := .venv-notebooks
TRACKING_URI ?= $(if $(STUDY),sqlite:///$(abspath $(STUDY))/mlflow.db)
EXPERIMENT ?= $(if $(STUDY),$(notdir $(abspath $(STUDY))))
NOTEBOOK_PORT ?= 8888
NOTEBOOK_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)# Jupyter refuses root without it
$(NB)/.installed: requirements-notebooks.lock requirements.lock $(STAMP)
	test -x $(NB)/bin/python || $(PY) -m venv $(NB)
	$(NB)/bin/pip install -q -r requirements-notebooks.lock -c requirements.lock
	$(BIN)/python -m ipykernel install --prefix $(NB) --name python3 \
		--display-name "cxr-lora-study (.venv)" >/dev/null
	touch $@
notebooks: venv $(NB)/.installed
	@test -z "$(STUDY)" || test -f "$(STUDY)/mlflow.db" || \
		{ echo "no MLflow store at $(STUDY)/mlflow.db: give STUDY=<a study's storage folder>"; exit 1; }
	CXR_TRACKING_URI='$(TRACKING_URI)' CXR_EXPERIMENT='$(EXPERIMENT)' \
		CXR_REFERENCE_ARM='$(REFERENCE_ARM)' $(NB)/bin/jupyter lab --ip=127.0.0.1 \
		--port=$(NOTEBOOK_PORT) --ServerApp.root_dir=analysis/notebooks $(NOTEBOOK_ROOT) \
		--KernelSpecManager.ensure_native_kernel=False $(NOTEBOOK_ARGS)

clean:
	rm -rf demo_run .pytest_cache
