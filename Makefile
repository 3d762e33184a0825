# Two set-up commands (README.md): `make demo` and `make test`. Both create .venv if missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-fast clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) setup.cfg setup.py
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The shipped model was trained by `id2face demo` itself, its judge by `id2face train-oracle` (README:
# "Reproducing the demo model"); a judge trained here instead would vary with the processor.
DEMO_CHECKPOINT ?= checkpoints/demo-tiny.pt
DEMO_ORACLE ?= checkpoints/demo-oracle.pt

demo: $(STAMP)
	$(VENV)/bin/id2face demo --checkpoint $(DEMO_CHECKPOINT) --oracle $(DEMO_ORACLE)

# The SLURM sweep test needs a cluster: bring up a one-node one here (skips with a reason if it cannot).
test: $(STAMP)
	-@scripts/slurm_local.sh start
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
