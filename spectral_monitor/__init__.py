"""spectral_monitor: watch the singular spectrum of a model's weight updates while it trains.

Public API only; importing this package imports no training framework or logger
(transformers, lightning, wandb, tensorboard are imported by the adapters and sinks that need them).
"""

from spectral_monitor.alerts import (
    AlphaOutOfBand,
    EffectiveRankDrop,
    IntruderDimensions,
    KnowledgeLoss,
    MetricThreshold,
    NonFiniteWeights,
    Rank1Collapse,
    Rule,
    UpdateNormBlowup,
    default_rules,
    spectral_rules,
)
from spectral_monitor.config import MonitorConfig
from spectral_monitor.engine import SpectralMonitor
from spectral_monitor.errors import (
    BaseMismatchError,
    ConfigError,
    MissingDependencyError,
    NonFiniteError,
    SpectralMonitorError,
)
from spectral_monitor.probes import Probe, ProbeResult
from spectral_monitor.records import Alert, StepReport
from spectral_monitor.run import Decision, MonitorRun
from spectral_monitor.sinks import ConsoleSink, JsonlSink, MemorySink, TensorBoardSink, WandbSink, read_jsonl
from spectral_monitor.substitution import (
    PeriodicSubstitution,
    SubstitutionOptions,
    rank_k_probe,
    substitute_,
    substituted,
)

__version__ = "0.1.0"

__all__ = [
    "Alert",
    "AlphaOutOfBand",
    "BaseMismatchError",
    "ConfigError",
    "ConsoleSink",
    "Decision",
    "EffectiveRankDrop",
    "IntruderDimensions",
    "JsonlSink",
    "KnowledgeLoss",
    "MemorySink",
    "MetricThreshold",
    "MissingDependencyError",
    "MonitorConfig",
    "MonitorRun",
    "NonFiniteError",
    "NonFiniteWeights",
    "PeriodicSubstitution",
    "Probe",
    "ProbeResult",
    "Rank1Collapse",
    "Rule",
    "SpectralMonitor",
    "SpectralMonitorError",
    "StepReport",
    "SubstitutionOptions",
    "TensorBoardSink",
    "UpdateNormBlowup",
    "WandbSink",
    "__version__",
    "default_rules",
    "rank_k_probe",
    "read_jsonl",
    "spectral_rules",
    "substitute_",
    "substituted",
]
