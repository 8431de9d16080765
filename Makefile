# The two commands of the README: `make demo` (set up + main job on real data) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Offline mirror of weights and datasets (layout of ../shared); defaults to ../shared when it is there.
export FEATX_MIRROR ?= $(if $(wildcard ../shared/README.md),$(abspath ../shared),)

.PHONY: setup demo test bench clean

# The demo installs only what it runs (featx, with ONNX Runtime, its default CPU runtime); the tests, every extra.
$(VENV)/.demo-installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed: $(VENV)/.demo-installed
	$(BIN)/pip install --quiet -e '.[dev,ray,timm,clip,hf,s3,http]'
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.demo-installed
	$(BIN)/python jobs/hymenoptera.py

test: setup  # in a loopback-only network namespace, where the tests' Ray clusters may run
	tests/isolated.sh $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) features runs heads
