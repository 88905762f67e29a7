#!/usr/bin/env bash
# Write the exact versions installed in a virtual environment as a pip constraints (lock) file.
#   bash scripts/lock.sh VENV OUTPUT
# e.g. after `bash scripts/canary.sh` passed: `bash scripts/lock.sh .venv-canary constraints/newest.txt`.
# The package itself (installed editable) is left out; torch's local label (+cpu) is dropped so that the pin
# matches the CPU wheel here and the same release elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:?usage: bash scripts/lock.sh VENV OUTPUT}
output=${2:?usage: bash scripts/lock.sh VENV OUTPUT}
{
  echo "# pip constraints: the exact versions scripts/test.sh installs (written by scripts/lock.sh from $venv)."
  echo "# Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())'), $(date -u +%Y-%m-%d)."
  "$venv/bin/pip" freeze --exclude-editable --disable-pip-version-check | sed -E 's/^(torch==[^+]+)\+.*$/\1/'
} > "$output"
echo "wrote $output: $(grep -E '^(peft|transformers)==' "$output" | tr '\n' ' ')"
