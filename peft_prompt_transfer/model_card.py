"""The text that tells a reader of an adapter's model card how to load it, with or without this plugin."""

from __future__ import annotations

from typing import Any, Optional

from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

from ._compat import IMPORT_LINE, PACKAGE_NAME


def loading_snippet(task_type: Optional[str], import_plugin: bool) -> str:
    """Python lines that load an adapter of `task_type` from `ADAPTER_PATH_OR_REPO_ID` with peft's auto classes.

    peft's plain `AutoPeftModel` refuses an adapter with a task type, so the class is the task's
    `AutoPeftModelFor...` (the one peft's own `MODEL_TYPE_TO_PEFT_MODEL_MAPPING` names).
    """
    task_type = getattr(task_type, "value", task_type)
    peft_class = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(task_type)
    auto_class = (
        "AutoPeftModel" + peft_class.__name__[len("PeftModel") :] if peft_class is not None else "AutoPeftModel"
    )
    plugin = f"# pip install {PACKAGE_NAME}\n{IMPORT_LINE}  # registers the method with peft\n" if import_plugin else ""
    return f"{plugin}from peft import {auto_class}\nmodel = {auto_class}.from_pretrained(ADAPTER_PATH_OR_REPO_ID)\n"


def model_card_section(config: Any) -> str:
    """Model-card text telling a reader without the plugin how to load the adapter."""
    peft_type = config.peft_type.value
    return (
        "## Loading this adapter\n\n"
        f"This is a `{peft_type}` adapter from [{PACKAGE_NAME}](https://pypi.org/project/{PACKAGE_NAME}/), "
        "a plugin that adds this method to peft. Install and import it before loading:\n\n"
        f"```python\n{loading_snippet(config.task_type, import_plugin=True)}```\n"
    )
