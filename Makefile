# Two entry points for a fresh machine: `make demo` and `make test`. Both set everything up.
PY ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip -q --disable-pip-version-check
DEMO_OUT ?= demo_run

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	# The constraints file pins torch to the CPU build; any other spec pulls GBs of CUDA wheels.
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/larcq-ray demo --out $(DEMO_OUT)

# pytest exits 5 when it collects no test: a failure, not a pass.
test: setup
	$(VENV)/bin/python -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi; exit $$rc

.PHONY: setup demo test
