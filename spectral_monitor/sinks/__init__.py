"""Back-ends for :class:`~spectral_monitor.records.StepReport`: one per file.

``WandbSink`` and ``TensorBoardSink`` import their packages only when constructed.
"""

from spectral_monitor.sinks.base import Sink
from spectral_monitor.sinks.console import ConsoleSink
from spectral_monitor.sinks.jsonl import JsonlSink, read_jsonl
from spectral_monitor.sinks.memory import MemorySink
from spectral_monitor.sinks.tensorboard import TensorBoardSink
from spectral_monitor.sinks.wandb import WandbSink

__all__ = ["ConsoleSink", "JsonlSink", "MemorySink", "Sink", "TensorBoardSink", "WandbSink", "read_jsonl"]
