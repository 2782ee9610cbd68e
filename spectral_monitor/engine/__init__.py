"""The monitor engine: :class:`SpectralMonitor` and the stages of one measurement (see ``monitor``)."""

from spectral_monitor.engine.monitor import SpectralMonitor

__all__ = ["SpectralMonitor"]
