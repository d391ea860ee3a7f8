# The ways people use this repository. `make test` and `make demo` set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup test demo bench-attention bench-decode bench-memory sass tiny-model clean

setup: $(VENV)/.installed

# Re-installs when the pins change. torch==2.13.0 is pinned: unpinned, pip pulls a multi-GB CUDA build.
$(VENV)/.installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -q -r requirements-test.txt
	touch $@

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) generate.py --prompt-file prompts/genesis.txt --max-new-tokens 120 --seed 0
	$(PY) generate.py --prompt-file prompts/psalm.txt --max-new-tokens 120 --seed 0

# Benchmarks, on a GPU; results into bench/results/ (bench/RESULTS.md says what each measures).
bench-attention: setup
	$(PY) -m bench.attention

bench-decode: setup
	$(PY) -m bench.decode

bench-memory: setup
	$(PY) -m bench.memory

# No GPU needed: every kernel specialization compiled for sm_80/89/90, SASS costs into bench/results/sass.json.
sass: setup
	$(PY) -m bench.sass

# Retrains the shipped model from the King James Bible (needs apt-get for the corpus).
tiny-model: setup
	@command -v bible >/dev/null || { echo "error: needs the corpus: apt-get install bible-kjv bible-kjv-text" >&2; exit 1; }
	$(PY) -m weights.train_tiny --minutes 40

clean:
	rm -rf $(VENV)
