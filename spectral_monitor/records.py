"""What one measurement produces: :class:`StepReport` and :class:`Alert`, plus the key schema.

Key schema (all values are Python floats):

* ``spectral/<metric>/<layer>``  one layer's metric, e.g. ``spectral/rho1/transformer.h.0.attn.c_attn``
* ``spectral/model/<metric>_<agg>``  aggregate over layers, ``agg`` in mean/median/min/max,
  e.g. ``spectral/model/rho1_mean``; per layer type ``spectral/model/<metric>_mean/<type>``
* ``spectral/alert/<rule>``  1.0 on the step the rule fired
* ``spectral/model/<name>``  also bookkeeping: measure_s, layers, skipped, nonfinite, update_norm_total
* ``spectral/context/<name>``  the trainer's latest scalars (reward, kl, loss) recorded beside the spectra
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["Alert", "StepReport", "alert_key", "layer_key", "model_key", "split_layer_key"]

PREFIX = "spectral"


def layer_key(metric: str, layer: str) -> str:
    """``spectral/<metric>/<layer>``."""
    return f"{PREFIX}/{metric}/{layer}"


def model_key(name: str) -> str:
    """``spectral/model/<name>``."""
    return f"{PREFIX}/model/{name}"


def alert_key(rule: str) -> str:
    """``spectral/alert/<rule>``."""
    return f"{PREFIX}/alert/{rule}"


#: second key components that are not per-layer metrics
NOT_LAYER = ("model", "alert", "monitor", "context")


def split_layer_key(key: str) -> tuple[str, str] | None:
    """Inverse of :func:`layer_key`: ``(metric, layer)``, or None for model/alert/monitor/context keys."""
    parts = key.split("/", 2)
    if len(parts) != 3 or parts[0] != PREFIX or parts[1] in NOT_LAYER:
        return None
    return parts[1], parts[2]


@dataclass(frozen=True)
class Alert:
    """One fired alert rule.

    ``reason`` is a short, stable, machine-friendly string (what crossed which threshold);
    ``message`` is the sentence a person reads. ``stop`` is True when the rule asks to stop.
    """

    rule: str
    step: int
    reason: str
    message: str
    layers: tuple[str, ...] = ()
    stop: bool = False

    def as_dict(self) -> dict:
        return {
            "rule": self.rule,
            "step": self.step,
            "reason": self.reason,
            "message": self.message,
            "layers": list(self.layers),
            "stop": self.stop,
        }


@dataclass
class StepReport:
    """The result of ``SpectralMonitor.measure(step)``.

    ``metrics``: flat ``dict[str, float]`` in the key schema above.
    ``spectra``: layer -> top-k singular values of ΔW, shape ``(k,)``, float32 on CPU.
    ``skipped``: layer -> why it was not measured (non-finite, error, ...).
    ``elapsed_s``: wall time of the measurement in seconds.
    """

    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    spectra: dict[str, torch.Tensor] = field(default_factory=dict)
    alerts: list[Alert] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def layer_values(self, metric: str) -> dict[str, float]:
        """``{layer: value}`` of one per-layer metric."""
        if metric in NOT_LAYER:
            return {}
        prefix = f"{PREFIX}/{metric}/"
        return {key[len(prefix) :]: value for key, value in self.metrics.items() if key.startswith(prefix)}

    @property
    def layers(self) -> list[str]:
        """Layers measured in this report (sorted)."""
        return sorted(self.layer_values("update_norm"))

    def to_record(self) -> dict:
        """JSON-serialisable record (spectra as lists)."""
        return {
            "step": self.step,
            "metrics": self.metrics,
            "spectra": {k: [round(float(x), 7) for x in v.tolist()] for k, v in self.spectra.items()},
            "alerts": [a.as_dict() for a in self.alerts],
            "skipped": self.skipped,
            "elapsed_s": self.elapsed_s,
        }

    @classmethod
    def from_record(cls, rec: dict) -> StepReport:
        return cls(
            step=int(rec["step"]),
            metrics={k: float(v) for k, v in rec.get("metrics", {}).items()},
            spectra={k: torch.tensor(v, dtype=torch.float32) for k, v in rec.get("spectra", {}).items()},
            alerts=[Alert(**{**a, "layers": tuple(a.get("layers", ()))}) for a in rec.get("alerts", [])],
            skipped=dict(rec.get("skipped", {})),
            elapsed_s=float(rec.get("elapsed_s", 0.0)),
        )
