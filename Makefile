# make demo   train the tiny default across Ray stage actors (creates .venv on first use)
# make test   run the test suite
# make test-slow  the suites marked slow, minutes each (the lab's partition and job-submit runs, every README example, a worker node without torch); not in make test
# make bench  run benchmarks/*.py and append results to docs/benchmarks.md
# make lab-up / lab-down  start / remove the multi-host lab (root; docs/lab.md)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP_QUIET := --quiet --disable-pip-version-check

.PHONY: demo test test-slow bench venv clean lab-up lab-down

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_QUIET) torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -m pip install $(PIP_QUIET) -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
	# ByzFL, the peer our aggregators are cross-checked against: --no-deps, its torchvision would replace torch
	$(PY) -m pip install $(PIP_QUIET) --no-deps byzfl==0.0.11 2>&1 | grep -v "^WARNING: Location" || true
	# torchft, the DiLoCo peer benchmarks/torchft_side_by_side.py runs beside ours: --no-deps, it would pull a CUDA
	# torch over our CPU one; its otel module imports the OTLP HTTP exporter, the only deps it needs beyond ours
	$(PY) -m pip install $(PIP_QUIET) --no-deps torchft==0.2.0 opentelemetry-exporter-otlp-proto-http==1.45.2 \
		opentelemetry-exporter-otlp-proto-common==1.45.2 opentelemetry-exporter-otlp-common==0.66b2 \
		opentelemetry-exporter-http-transport==0.66b2 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import torch, ray, neuroray" && touch $@

demo: venv
	$(PY) -m neuroray.train $(ARGS)

test: venv
	$(PY) -m pytest -q tests notebooks --nbmake -m "not slow" --durations=15 $(ARGS)

test-slow: venv
	$(PY) -m pytest -q tests -m slow $(ARGS)

# the DiLoCo table of docs/diloco.md's headline (the script's defaults reproduce the older constant-lr table)
DILOCO_BENCH := steps4=600 outer=tuned lr=cosine
bench: venv
	@for f in benchmarks/[!_]*.py; do echo "== $$f"; $(PY) $$f $$(test $$f = benchmarks/diloco_comm.py && echo "$(DILOCO_BENCH)") || exit 1; done

# the multi-host lab (root): N emulated hosts in network namespaces, e.g. make lab-up ARGS="hosts=4 rate=100mbit"
lab-up: venv
	$(PY) -m neuroray.lab up $(ARGS)

lab-down: venv
	$(PY) -m neuroray.lab down $(ARGS)

clean:
	rm -rf outputs .pytest_cache
