"""The README's code blocks marked `<!-- readme-test -->` run as written (real model and data: slow), from a folder
outside the repository with only installed packages importable, as a user of the wheel runs them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"<!-- readme-test -->\n```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_tested_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path):
    from benchmarks.tasks import DATA_ENV, data_dir

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the repository is not importable there
    env.update(HF_HUB_OFFLINE="1", **{DATA_ENV: str(data_dir())})
    result = subprocess.run([sys.executable, "-c", BLOCKS[index]], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
