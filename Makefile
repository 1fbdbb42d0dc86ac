# make demo  -> creates .venv if missing, runs the quickstart job end to end (offline)
# make test  -> creates .venv if missing, runs the default test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DATA ?= demo-data
DEMO_OUT ?= demo-output

.PHONY: venv demo test test-slow test-all bench clean

venv: $(STAMP)

# torch==2.13.0 goes in first, alone: any later requirement on torch is then already met, so pip never
# reaches for a CUDA build. Then the project with its test extras, all pinned in pyproject.toml.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m reembed.demo --data $(DEMO_DATA) --output $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q --durations=25

test-slow: $(STAMP)
	$(PY) -m pytest -m slow -q

test-all: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/run_bench.py --model minilm --mix mixed --docs 4000 --naive-docs 1000 --out bench/out/cpu

clean:
	rm -rf $(DEMO_DATA) $(DEMO_OUT) .pytest_cache
