# Two commands do all the set-up on a fresh machine:
#   make test   creates .venv when missing, then runs the test suite
#   make demo   creates .venv when missing, then runs the main job (LASA handwriting)
#   make docs   builds the documentation site into site/ (strict)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO   ?= runs/demo

.PHONY: test demo docs env bench clean

env: $(VENV)/.installed

# torch is pinned first so that pip takes the CPU build on disk instead of a CUDA one.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q

demo: $(VENV)/.installed
	$(VENV)/bin/vrnn demo --out $(DEMO)

docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

bench: $(VENV)/.installed
	$(PY) benchmarks/speed.py

clean:
	rm -rf $(VENV) runs site
