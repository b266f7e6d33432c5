# Everything a fresh Debian machine needs: `make demo`, `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv deps demo test test-c bench clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.c csrc/*.h csrc/*.py)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q setuptools wheel 'cffi>=1.16' 'pytest>=7' 'hypothesis>=6' 'qemu.qmp'
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

# Debian's qemu-utils (qemu-img, qemu-io) are the oracle of the tests.
deps:
	@if ! command -v qemu-img >/dev/null || ! command -v qemu-io >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-utils >/dev/null; \
	  else echo "qemu-img is missing: install Debian's qemu-utils (as root: apt-get install qemu-utils)" >&2; exit 1; fi; \
	fi
	@if ! command -v valgrind >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null; fi

demo: venv deps
	$(VENV)/bin/blkjobs demo

test: venv deps test-c
	$(PY) -m pytest -q -rs tests

# The C core's own tests, built with AddressSanitizer + UBSan.
test-c: deps
	$(MAKE) -C tests/c run valgrind

bench: venv deps
	$(PY) benchmarks/convert_raw.py

clean:
	rm -rf $(VENV) build src/blkjobs/_core*.so src/blkjobs/_core.c *.egg-info src/*.egg-info
	$(MAKE) -C tests/c clean
