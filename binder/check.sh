#!/usr/bin/env bash
# Installs nbalign the way Binder does (binder/requirements.txt, then binder/postBuild) into a fresh virtual
# environment, then checks that the kernel side works there: the extension loads, the built-in model is found
# and converted from its GGUF file (into a fresh cache), and it answers a prompt. CI runs this after the tests.
#
# Where the CPU-only PyTorch index named in requirements.txt cannot be reached (only PyPI can be, here), the
# same CPU build is installed first from this machine's package sources, so the rest resolves against it
# instead of pulling a multi-GB CUDA build; every other line of requirements.txt is used as written.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=$(mktemp -d /tmp/nbalign-binder-XXXXXX)
trap 'rm -rf "$VENV"' EXIT
"$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
INDEX=$(sed -n 's/^--extra-index-url[= ]*//p' binder/requirements.txt)
if [ -n "$INDEX" ] && ! "$VENV/bin/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)" "$INDEX" 2>/dev/null; then
    echo "binder check: $INDEX cannot be reached; installing the CPU build of torch the README names instead"
    $PIP install -q "torch==2.13.0"
    grep -v '^--extra-index-url' binder/requirements.txt > "$VENV/requirements.txt"
else
    cp binder/requirements.txt "$VENV/requirements.txt"
fi
$PIP install -q -r "$VENV/requirements.txt"
PATH="$VENV/bin:$PATH" bash binder/postBuild
cd "$VENV"  # not the checkout: nbalign must import from what was installed
NBALIGN_CACHE="$VENV/cache" HF_HUB_OFFLINE=1 "$VENV/bin/python" - <<'PY'
import torch
from IPython.core.interactiveshell import InteractiveShell

ip = InteractiveShell.instance()
ip.run_line_magic("load_ext", "nbalign")
assert "sft" in ip.magics_manager.magics["cell"], "the %%sft magic is not registered"
import nbalign

answer = nbalign.generate("smollm2-135m", "What is the capital of France?", max_new_tokens=12)
print(f"binder check: torch {torch.__version__} (CUDA build: {torch.version.cuda is not None}); "
      f"nbalign {nbalign.__version__}; the built-in model answers: {answer!r}")
assert "Paris" in answer, answer
assert torch.version.cuda is None, "a CUDA build of torch was installed: Binder has no GPU"
PY
echo "binder check: passed"
