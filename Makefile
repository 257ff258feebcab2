# segflow: two commands on a fresh clone.
#   make demo   set up .venv and segment the bundled sample data (aerial, nuclei, CT, nuclei model)
#   make test   set up .venv and run ruff, mypy and the test suite
# The install is redone only when pyproject.toml changes (stamp file in the venv).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.segflow-installed
CONFIGS ?= configs/aerial.yaml configs/nuclei.yaml configs/ct.yaml configs/nuclei-dsb.yaml

.PHONY: demo test lint install clean-outputs

demo: $(STAMP)
	$(BIN)/segflow run $(CONFIGS)

# --durations: the slowest tests in every CI log, where CI time is trimmed from.
test: lint
	$(BIN)/pytest --durations=25

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

install: $(STAMP)

# torch first, pinned: its CPU build satisfies pyproject's range; a looser request can pull
# a multi-GB CUDA build. cellpose last, with --no-deps (see below).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[dev,bench,ml]"
	# cellpose for the flow_dynamics comparison tests and benchmark, without its requirement
	# torchvision (whose PyPI wheels fail against the CPU torch, and may pull a CUDA torch);
	# its other imports are in the dev extra, the tests stand in for torchvision.
	$(BIN)/python -m pip install --quiet --no-deps "cellpose==4.2.1"
	# bioimageio.core (tests/engine/test_bioimageio_core.py: the bioimage.io source against
	# bioimage.io's runtime) without its pin bioimageio.spec==0.5.12, which fails with
	# pydantic 2.14; it runs with the ml extra's spec 0.5.14. Its other imports are installed.
	$(BIN)/python -m pip install --quiet --no-deps "bioimageio.core==0.11.0"
	# nnunetv2 (dev: the nnU-Net source's comparison test) pulls unittest2, which pulls PyPI's
	# argparse 1.4.0: Prefect's temporary server runs uvicorn with site-packages first on its
	# path, where that file hides the standard library's argparse and the server cannot start.
	$(BIN)/python -m pip uninstall --quiet --yes argparse
	touch $@

clean-outputs:
	rm -rf outputs
