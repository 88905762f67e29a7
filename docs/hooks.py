"""mkdocs hooks (registered in mkdocs.yml): config reference tables and the benchmark figures.

- `<!-- config-reference: ResidualPromptConfig -->` in a page becomes a table of the fields that this package
  declares on that config (its own and those of `TransferPromptLearningConfig`, not peft's inherited ones), with
  each field's default and its `metadata["help"]`, so the reference cannot drift from the code.
- `<!-- readme-quick-start -->` becomes the README's quick start (its first `<!-- readme-test -->` block), so
  the site shows it and the README's test runs it, once.
- The figures in `benchmarks/figures/` are added to the site as `figures/<name>.png`, so pages show them without
  a copy in `docs/`.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "benchmarks" / "figures"
MARKER = re.compile(r"<!-- config-reference: (\w+) -->")
QUICK_START = "<!-- readme-quick-start -->"


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = getattr(field.default, "value", field.default)  # enums show their value
        return f"`{value!r}`"
    if field.default_factory is not dataclasses.MISSING:
        return "filled in"
    return "required"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def config_reference(name: str) -> str:
    """A Markdown table of the fields the package declares on config class `name`: the method's, then the shared ones."""
    import peft_prompt_transfer
    from peft_prompt_transfer.base import TransferPromptLearningConfig

    cls = getattr(peft_prompt_transfer, name)
    ours = [c for c in cls.__mro__ if issubclass(c, TransferPromptLearningConfig)]  # the method first, then the base
    declared = {}  # field name -> the class that declares it, in declaration order
    for c in ours:
        for field_name in c.__dict__.get("__annotations__", {}):
            declared.setdefault(field_name, c)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    rows = ["| field | default | meaning |", "|---|---|---|"]
    for field_name in declared:
        field = fields.get(field_name)
        if field is None or not field.init:
            continue
        rows.append(f"| `{field_name}` | {_cell(_default(field))} | {_cell(field.metadata.get('help', ''))} |")
    return "\n".join(rows)


def readme_quick_start() -> str:
    blocks = re.findall(r"<!-- readme-test -->\n(```python\n.*?```)", (ROOT / "README.md").read_text(), flags=re.S)
    return blocks[0]


def on_page_markdown(markdown, page, config, files):
    if QUICK_START in markdown:
        markdown = markdown.replace(QUICK_START, readme_quick_start())
    return MARKER.sub(lambda match: config_reference(match.group(1)), markdown)


def on_files(files, config):
    for path in sorted(FIGURES.glob("*.png")):
        files.append(
            File(f"figures/{path.name}", str(FIGURES.parent), config["site_dir"], config["use_directory_urls"])
        )
    return files
