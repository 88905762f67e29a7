"""The version of peft-prompt-transfer, in one place: read by the package, its adapter configs and the build."""

__version__ = "0.1.0"
