"""How a patch is declared, checked against upstream and installed, and what happens when it cannot be.

A [`Patch`] names its target by import path (`"peft.peft_model:PeftModel.get_prompt"`), so that a renamed or moved
target is found missing at install time instead of breaking `import peft_prompt_transfer`. Patches that only work
together form a [`PatchGroup`], installed whole or not at all. A group whose target is missing or whose signature
lost a parameter the wrapper passes on is disabled:

- a **convenience** group (error wording, model cards, the Trainer's `task_ids` column) warns, naming the target and
  what stops working, and peft's code runs as it is;
- a **correctness** group (prompt set-up and forward, generation, persistence) never lets peft's code run unpatched
  on our adapters, since that gives wrong results without an error: its feature is recorded as disabled
  (`_compat.disable_feature`) and its public entry points are wrapped by a guard that raises, for our adapters only,
  the reason and the fix. A correctness group disables the groups that depend on it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from .._compat import (
    INSTALLED_VERSIONS,
    PACKAGE_NAME,
    clear_disabled_features,
    disable_feature,
    is_ours,
    supported_install_command,
)

PATCH_MARKER = "_peft_prompt_transfer_original"
GUARD_MARKER = "_peft_prompt_transfer_guarded"


def resolve(target: str) -> tuple[Any, str]:
    """The owner object and attribute name of `target` (`"module:Owner.attribute"`), or raise `AttributeError`.

    The attribute must be defined on the owner (or a base class): a missing one raises, as does a missing module or
    owner. Any failure to import is reported as missing, since a patch cannot act on what it cannot reach.
    """
    module_name, _, qualname = target.partition(":")
    *owner_path, name = qualname.split(".")
    try:
        owner = importlib.import_module(module_name)
        for part in owner_path:
            owner = getattr(owner, part)
    except (ImportError, AttributeError) as err:
        raise AttributeError(f"{target} cannot be reached: {err}") from err
    if not hasattr(owner, name):
        raise AttributeError(f"{target} does not exist")
    return owner, name


def _original(owner: Any, name: str) -> Callable:
    attribute = inspect.getattr_static(owner, name)
    return attribute.__func__ if isinstance(attribute, (classmethod, staticmethod)) else getattr(owner, name)


def _set(owner: Any, name: str, function: Callable) -> None:
    is_classmethod = isinstance(inspect.getattr_static(owner, name), classmethod)
    setattr(owner, name, classmethod(function) if is_classmethod else function)


@dataclass(frozen=True)
class Patch:
    """One hook into an upstream callable.

    Args:
        target: `"module:Owner.attribute"` of the callable to wrap (a module-level function: `"module:function"`).
        make_wrapper: Builds the wrapper from the original; the wrapper must call the original for anything that is
            not one of our adapters.
        parameters: The parameter names of the original that the wrapper passes on by name; if upstream drops one,
            the patch counts as missing.
        mirrors: For a wrapper that re-implements a piece of upstream for our adapters, the release it mirrors.
        aliases: Modules that imported the target function by name before it was patched; they get the wrapper too.
    """

    target: str
    make_wrapper: Callable[[Callable], Callable]
    parameters: tuple[str, ...] = ()
    mirrors: Optional[str] = None
    aliases: tuple[str, ...] = ()

    def problem(self) -> Optional[str]:
        """Why this patch cannot be installed today, or None."""
        try:
            owner, name = resolve(self.target)
        except AttributeError as err:
            return str(err)
        try:
            signature = inspect.signature(_original(owner, name))
        except (TypeError, ValueError):
            return None  # a builtin without a signature: nothing to check
        lost = [parameter for parameter in self.parameters if parameter not in signature.parameters]
        if lost:
            return f"{self.target} no longer takes {', '.join(lost)}"
        return None

    def install(self) -> None:
        owner, name = resolve(self.target)
        original = _original(owner, name)
        if getattr(original, PATCH_MARKER, None) is not None:
            return  # already installed (re-import)
        wrapper = functools.wraps(original)(self.make_wrapper(original))
        setattr(wrapper, PATCH_MARKER, original)
        _set(owner, name, wrapper)
        for module_name in self.aliases:
            module = importlib.import_module(module_name)
            if getattr(module, name, None) is original:
                setattr(module, name, wrapper)

    def original(self) -> Optional[Callable]:
        """The upstream callable this patch wraps, if installed."""
        try:
            owner, name = resolve(self.target)
        except AttributeError:
            return None
        return getattr(_original(owner, name), PATCH_MARKER, None)


@dataclass(frozen=True)
class PatchGroup:
    """Patches that only work together, and what their absence costs.

    Args:
        name: What the group makes work, as a user would name it (e.g. "cached generation on causal LMs").
        kind: `"correctness"`: without it our adapters would give wrong results silently, so its feature raises.
            `"convenience"`: without it something becomes less convenient, so it warns once and steps aside.
        patches: The patches.
        needed: The upstream fact the group depends on: whether peft and transformers, as installed, still need it.
            A group that is not needed is not installed (no warning).
        lost: For a convenience group, what stops working and how to do without it.
        entry_points: For a correctness group, the public callables (`"module:Owner.attribute"`) that raise for our
            adapters while it is disabled. An empty tuple means that our configs refuse to be built.
        requires: Names of the correctness groups this one depends on; it is disabled with them.
        uses: Upstream attributes (`"module:Owner.attribute"`) that the wrappers call without wrapping them; the
            group is disabled if one is missing.
    """

    name: str
    kind: Literal["correctness", "convenience"]
    patches: tuple[Patch, ...]
    needed: Callable[[], bool] = lambda: True
    lost: str = ""
    entry_points: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()
    # filled by `install_groups`: why the group is off (None: installed, or not needed)
    disabled_because: list[str] = field(default_factory=list, compare=False, repr=False)


def _upstream_versions() -> str:
    return ", ".join(f"{library} {version}" for library, version in INSTALLED_VERSIONS.items())


def _guard(entry_point: str, message: str) -> None:
    """Wrap `entry_point` so that it raises `message` for models with one of our adapters."""
    try:
        owner, name = resolve(entry_point)
    except AttributeError:
        return  # nothing to guard: upstream has no such way in
    original = _original(owner, name)
    if getattr(original, GUARD_MARKER, None) is not None:
        return

    def guard(self, *args, **kwargs):
        configs = getattr(self, "peft_config", None)
        if isinstance(configs, dict) and any(is_ours(config) for config in configs.values()):
            raise RuntimeError(message)
        return original(self, *args, **kwargs)

    guard = functools.wraps(original)(guard)
    setattr(guard, GUARD_MARKER, original)
    _set(owner, name, guard)


def _remove_guard(entry_point: str) -> None:
    try:
        owner, name = resolve(entry_point)
    except AttributeError:
        return
    guarded = getattr(_original(owner, name), GUARD_MARKER, None)
    if guarded is not None:
        _set(owner, name, guarded)


def install_groups(groups: Sequence[PatchGroup]) -> None:
    """Install every needed group that upstream still allows; disable the others as their kind says.

    Groups come in dependency order (a group after those it `requires`). Installing again (a re-import) re-checks
    every group: guards and disabled features of the earlier install are removed first.
    """
    for group in groups:
        for entry_point in group.entry_points:
            _remove_guard(entry_point)
    clear_disabled_features()
    disabled: set[str] = set()
    guards: list[tuple[str, str]] = []
    for group in groups:
        group.disabled_because.clear()
        if not group.needed():
            continue
        problems = [problem for patch in group.patches if (problem := patch.problem()) is not None]
        for target in group.uses:
            try:
                resolve(target)
            except AttributeError as err:
                problems.append(str(err))
        problems += [f"it needs {name}, which is off" for name in group.requires if name in disabled]
        if not problems:
            for patch in group.patches:
                patch.install()
            continue
        group.disabled_because.extend(problems)
        disabled.add(group.name)
        why = "; ".join(problems)
        if group.kind == "convenience":
            message = f"{PACKAGE_NAME}: {group.name} is off ({why}, in {_upstream_versions()}). {group.lost}"
            disable_feature(group.name, message)  # for options that ask for it explicitly
            warnings.warn(message, stacklevel=4)
            continue
        message = (
            f"{PACKAGE_NAME} cannot run {group.name} for its adapters on this installation: {why} "
            f"({_upstream_versions()}). peft's own code would give wrong results without an error, so this is refused. "
            f"Install a supported version: {supported_install_command()}"
        )
        disable_feature(group.name, message)
        warnings.warn(message, stacklevel=4)
        guards += [(entry_point, message) for entry_point in group.entry_points]
    # last, so that a guard wraps whatever patch another group put on the same entry point
    for entry_point, message in guards:
        _guard(entry_point, message)
