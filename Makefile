# One virtualenv in ./.venv; torch is pinned to the CPU wheel these machines carry.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test test-all lint demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

test-all: install
	$(BIN)/python -m pytest -q -m ''

lint: install
	$(BIN)/ruff check tfcli tests

# Train on text every Python installation carries (the standard library's own docs and
# code), then sample and look at attention: works offline, ships no borrowed text. Each demo
# writes a new run directory (runs/demo-<time>): an earlier one is never deleted.
DEMO_TIME ?= 90s
demo: install
	$(BIN)/python data/make_demo_corpus.py data/demo.txt data/demo-val.txt
	run=runs/demo-$$(date +%Y%m%d-%H%M%S) && \
	$(BIN)/tfcli train data/demo.txt --val data/demo-val.txt --time $(DEMO_TIME) --out $$run && \
	$(BIN)/tfcli sample -m $$run --prompt "def " -n 300 --seed 1 && \
	$(BIN)/tfcli inspect-attention -m $$run --prompt "for i in range(10):" && \
	$(BIN)/tfcli eval data/demo-val.txt -m $$run

bench: install
	$(BIN)/tfcli bench

clean:
	rm -rf $(VENV) runs .pytest_cache
