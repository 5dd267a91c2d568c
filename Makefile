# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test demo bench clean

$(STAMP): requirements.txt setup.py pyproject.toml $(wildcard wrapper/bilateralfilter/*.cpp wrapper/bilateralfilter/*.h wrapper/bilateralfilter/*.i)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install -e .
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

demo: $(STAMP)
	$(PY) -m tool.demo

bench: $(STAMP)
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info wrapper/bilateralfilter/bilateralfilter.py wrapper/bilateralfilter/bilateralfilter_wrap.cpp wrapper/bilateralfilter/*.so
