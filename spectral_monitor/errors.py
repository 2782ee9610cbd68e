"""Exceptions raised by spectral_monitor (all subclass builtins, so plain ``except`` works)."""

from __future__ import annotations

__all__ = [
    "BaseMismatchError",
    "CheckpointError",
    "ConfigError",
    "MissingDependencyError",
    "NonFiniteError",
    "SpectralMonitorError",
]


class SpectralMonitorError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(SpectralMonitorError, ValueError):
    """A configuration value is invalid; the message shows the bad value."""


class BaseMismatchError(SpectralMonitorError, ValueError):
    """The base snapshot / reference model does not match the monitored model."""


class NonFiniteError(SpectralMonitorError, FloatingPointError):
    """A monitored weight holds NaN or Inf (raised only in strict mode)."""


class MissingDependencyError(SpectralMonitorError, ImportError):
    """An optional package is missing; the message names the extra to install."""


class CheckpointError(SpectralMonitorError, ValueError):
    """A checkpoint or adapter on disk cannot be read or compared; the message names the file and tensor."""
