# Everything a fresh Debian machine needs: `make demo`, `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv deps demo test test-py test-c lint bench dist man clean iotests

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.c csrc/*.h csrc/*.py csrc/nbd/*.[ch])
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q 'setuptools>=77' wheel build 'cffi>=1.16' 'pytest>=7.3' 'pytest-xdist>=3.2' 'hypothesis>=6' 'qemu.qmp' zstandard 'ruff>=0.4' 'mypy>=1.8' 'argparse-manpage>=4' 'numpy>=1.24' 'psutil>=5.9' 'cryptography>=41'
	$(PY) -m pip install -q --no-build-isolation -e .
	$(PY) -m compileall -q src    # start-up time counts in every copy a user times
	touch $(STAMP)

venv: $(STAMP)

# Debian packages the tests use: qemu-utils (qemu-img, qemu-io: the oracle),
# qemu-system-common (qemu-storage-daemon: the reference daemon), fio and
# libnbd-bin (nbdcopy, nbdinfo), nbdkit and libnbd-dev for NBD (peers and
# the client binding), valgrind for the C tests, libisal-dev (ISA-L's
# igzip: the fast deflate of convert -c and compressed backup; without it
# the build falls back on zlib) and pkg-config, which finds it.
DEB_TOOLS := qemu-utils:qemu-img qemu-utils:qemu-io qemu-system-common:qemu-storage-daemon \
             fio:fio libnbd-bin:nbdcopy libnbd-bin:nbdinfo nbdkit:nbdkit \
             libnbd-dev:/usr/include/libnbd.h valgrind:valgrind time:/usr/bin/time \
             libisal-dev:/usr/include/isa-l/igzip_lib.h pkg-config:pkg-config
deps:
	@need=""; for pt in $(DEB_TOOLS); do \
	  p="$${pt#*:}"; case "$$p" in /*) test -e "$$p";; *) command -v "$$p" >/dev/null;; esac \
	    || need="$$need $${pt%%:*}"; done; \
	if [ -n "$$need" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$need"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$need >/dev/null; \
	  else echo "missing Debian packages:$$need (as root: apt-get install$$need)" >&2; exit 1; fi; \
	fi

demo: deps venv
	$(VENV)/bin/blkjobs demo

# The suite runs on every core, at most four (tests wait on qemu-img, the
# reference daemons and the page cache as much as on the CPU): TEST_JOBS=1
# runs it in one process.
TEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)
PYTEST_ALL = $(PY) -m pytest -q -rs --durations=15 -n $(TEST_JOBS) --dist worksteal tests
test: deps venv test-c lint
	$(PYTEST_ALL)

# The suite alone: .ci/run runs it beside test-c, lint and .ci/dist (which
# need neither it nor each other), not after them.
test-py: deps venv
	$(PYTEST_ALL)

# The man page, the shell completion script and the table of the command
# lines read without argparse (the end of src/blkjobs/cli/quickparse.py), generated
# from the parser (tests/test_cli_docs.py, tests/test_quickparse.py fail when
# the committed ones are stale).
man: venv
	$(VENV)/bin/argparse-manpage --module blkjobs.cli.main --function build_parser \
	  --project-name blkjobs --prog blkjobs --version "$$($(PY) -c 'import blkjobs; print(blkjobs.__version__)')" \
	  --description "block jobs (backup, mirror, stream, commit) and qemu-img-style image tools" \
	  --manual-title "blkjobs manual" --output docs/man/blkjobs.1
	$(VENV)/bin/register-python-argcomplete blkjobs > docs/completion/blkjobs
	$(PY) -m blkjobs.cli.quickparse_gen

# sdist -> wheel (cp311-abi3) -> clean venv per Python 3.11+ -> blkjobs demo
dist: venv
	.ci/dist

# QEMU's own qemu-iotests (those needing no VM), -raw and -qcow2, with the real
# qemu-img and with blkjobs as qemu-img: per-test outcomes and pass counts.
# `make iotests IOTESTS_ARGS=--only-passing-set`: blkjobs on tests/iotests/passing.txt.
iotests: venv deps
	$(PY) scripts/iotests $(IOTESTS_ARGS)

# Lint and type checks of the Python code (config: pyproject.toml [tool.ruff],
# [tool.mypy]: strict for the public API's modules)
lint: venv
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

# The C core's own tests: the strict warning set (with -fanalyzer), then the
# tests built with AddressSanitizer + UBSan, under valgrind, and under
# ThreadSanitizer (data races between the copy engine's threads). The three
# flavours run side by side (valgrind is one thread), each one's output
# printed whole when it ends; every test makes its own temporary files.
test-c: deps
	$(MAKE) -C tests/c -j$(TEST_JOBS) warnings binaries
	$(MAKE) -C tests/c -j$(TEST_JOBS) --output-sync=target run valgrind tsan

# Every raw -> raw comparison in one run (dense and VM-shaped images, page
# cache and durable, quiet and with every core busy), qcow2 and chains
# against qemu-img, convert -c, backup/mirror against our convert, the rate
# limit's end-to-end measure, then the C hot paths' micro-benchmarks against the
# stored baseline (benchmarks/README.md).
bench: venv deps
	$(PY) benchmarks/convert_raw.py
	$(PY) benchmarks/convert_qcow2.py --size 2G --rounds 7 --load quiet,busy
	$(PY) benchmarks/convert_compress.py --size 512M --rounds 7
	$(PY) benchmarks/jobs_vs_convert.py --size 1G --rounds 7
	$(PY) benchmarks/ratelimit.py
	$(PY) -m pip install -q pytest-benchmark numpy
	$(PY) -m pytest -q -p no:cacheprovider benchmarks/test_micro.py \
	  --benchmark-storage=benchmarks/.benchmarks --benchmark-compare=0001

clean:
	rm -rf $(VENV) build src/blkjobs/_core*.so src/blkjobs/_core.c src/blkjobs/_nbd*.so src/blkjobs/_nbd.c *.egg-info src/*.egg-info
	$(MAKE) -C tests/c clean
