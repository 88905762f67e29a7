"""A library of source prompts for one base model: built from trained adapters, ranked for a new task, and used to
start any method's prompt (`PromptLibrary`)."""

from .library import CURRENT_PROMPT, LibraryEntry, PromptLibrary

__all__ = ["CURRENT_PROMPT", "LibraryEntry", "PromptLibrary"]
