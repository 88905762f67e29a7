#!/usr/bin/env bash
# Build the sdist and wheel as a package index would receive them, check their metadata (twine check --strict),
# install the wheel into a clean virtual environment (the versions of constraints/newest.txt) and run
# scripts/package_smoke.py from outside the repository. Needs .venv (scripts/test.sh makes it).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
out=.package-check
rm -rf "$out" && mkdir -p "$out"
.venv/bin/python -m build --outdir "$out/dist" . > "$out/build.log" 2>&1 || { cat "$out/build.log"; exit 1; }
.venv/bin/python -m twine check --strict "$out"/dist/*
# the sdist carries every test with its helpers
tar tzf "$out"/dist/*.tar.gz > "$out/sdist-files.txt"
grep -q "/tests/conftest.py$" "$out/sdist-files.txt" || { echo "the sdist has no tests/conftest.py"; exit 1; }
"$PYTHON" -m venv "$out/venv"
"$out/venv/bin/pip" install -q -c constraints/newest.txt torch==2.13.0 "$out"/dist/*.whl
python="$PWD/$out/venv/bin/python" smoke="$PWD/scripts/package_smoke.py"  # (realpath would resolve the venv away)
(cd "$(mktemp -d)" && "$python" "$smoke")
