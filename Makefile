# The two commands of the README: `make bench` (the main job) and `make test`.
# Each creates .venv and installs the project with the right extras; re-running
# is cheap because pip sees the pinned packages already present.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: venv bench test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[disk,s3,hf,metrics,test]' $(TORCH)
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

bench: venv
	$(BIN)/kvbm bench $(ARGS)

test: venv
	$(BIN)/python -m pytest -q $(ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV)
