"""Lazy checks for optional dependencies, with install hints that name the extra."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from spectral_monitor.errors import MissingDependencyError

__all__ = ["is_available", "require"]

# package import name -> extra that installs it
_EXTRAS = {
    "transformers": "hf",
    "accelerate": "hf",
    "trl": "trl",
    "peft": "trl",
    "lightning": "lightning",
    "wandb": "wandb",
    "tensorboard": "tensorboard",
    "matplotlib": "report",
    "powerlaw": "dev",
    "weightwatcher": "dev",
    "deepspeed": "deepspeed",
    "wandb_workspaces": "dashboards",
    "playwright": "dev",
}


def is_available(name: str) -> bool:
    """True when ``name`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def require(name: str, feature: str) -> ModuleType:
    """Import ``name`` or raise :class:`MissingDependencyError` naming the extra to install."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        extra = _EXTRAS.get(name.split(".")[0], "all")
        raise MissingDependencyError(
            f"{feature} needs the optional package {name!r}, which is not installed. "
            f"Install it with: pip install 'spectral-monitor[{extra}]'"
        ) from exc
