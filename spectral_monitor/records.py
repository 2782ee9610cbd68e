"""What one measurement produces — :class:`StepReport` and :class:`Alert` — and the key schema.

A report is structured: per-layer values, model-level aggregates, bookkeeping, the trainer's
context, probe results and alerts are separate fields. Sinks that want flat keys call
:meth:`StepReport.flat`; this module is the only place that builds keys or reads them back
(:meth:`StepReport.from_record`, for JSONL logs).

Key schema (all values are Python floats):

* ``spectral/<metric>/<layer>``  one layer's metric, e.g. ``spectral/rho1/transformer.h.0.attn.c_attn``
* ``spectral/model/<metric>_<stat>``  aggregate over layers, ``stat`` in mean/median/min/max,
  e.g. ``spectral/model/rho1_mean``; per layer type ``spectral/model/<metric>_mean/<type>``
* ``spectral/model/<name>``  bookkeeping: measure_s, layers, skipped, nonfinite, update_norm_total, ...
* ``spectral/alert/<rule>``  1.0 on the step the rule fired
* ``spectral/context/<name>``  the trainer's latest scalars (reward, kl, loss) recorded beside the spectra
* ``spectral/probe/<name>``  held-out probe results (KL to the base, held-out loss, ...)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "LAYER_SCALARS",
    "OVERVIEW_MODEL",
    "OVERVIEW_STATS",
    "STATS",
    "Alert",
    "StepReport",
    "display_names",
    "layer_sort_key",
]

PREFIX = "spectral"
#: statistics of a per-layer metric over the layers
STATS = ("mean", "median", "min", "max")
#: the compact model-level view (trainer logs, dashboards' overview): every aggregated metric's
#: mean, these other statistics, these bookkeeping values, the alert flags and the probes
OVERVIEW_STATS = (("rho1", "max"), ("alpha", "min"), ("alpha", "max"), ("update_rel", "max"), ("intruders", "max"))
OVERVIEW_MODEL = ("update_norm_total", "alpha_reliable_frac", "measure_s", "overhead", "coverage")
#: per-layer metrics a dashboard plots over steps when asked (``log_layers=True``); the others
#: (rank, alpha_ks, nonfinite, ...) are bookkeeping that stays in the JSONL log
LAYER_SCALARS = (
    "rho1",
    "erank",
    "stable_rank",
    "alpha",
    "update_rel",
    "align_prev",
    "align_base",
    "intruders",
    "sparsity",
    "gap",
)
_AGGREGATE = re.compile(r"^(?P<metric>.+)_(?P<stat>mean|median|min|max)$")
_BY_TYPE = re.compile(r"^(?P<metric>.+)_mean/(?P<type>[^/]+)$")


def layer_sort_key(name: str) -> tuple:
    """Model order for layer names: numbers compare as numbers (``h.2`` before ``h.10``)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part)


def display_names(layers: Sequence[str]) -> list[str]:
    """Layer names without the dotted prefix they all share (``transformer.h.0.attn.c_attn`` ->
    ``0.attn.c_attn``); the full names when stripping would leave one empty or make two equal."""
    if len(layers) < 2:
        return list(layers)
    parts = [name.split(".") for name in layers]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    short = [".".join(p[common:]) for p in parts]
    return short if len(set(short)) == len(short) else list(layers)


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

    def line(self) -> str:
        """The one line a log shows: ``[spectral_monitor] step 50: <rule>: <message>``."""
        return f"[spectral_monitor] step {self.step}: {self.rule}: {self.message}"

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
    """The result of one measurement at optimizer step ``step``.

    ``layers``: layer -> metric -> value, layers in model order (``docs/metrics.md`` lists the metrics).
    ``aggregates``: metric -> statistic (mean/median/min/max) -> value over the measured layers.
    ``by_type``: metric -> layer type (q/k/v/o/qkv/up/down/gate/other) -> mean.
    ``model``: model-level bookkeeping (``update_norm_total``, ``alpha_reliable_frac``, ``layers``,
    ``skipped``, ``nonfinite``, ``measure_s``).
    ``context``: the trainer's latest scalars; ``probes``: held-out probe results.
    ``spectra``: layer -> top-k singular values of ΔW, shape ``(k,)``, float32 on CPU.
    ``skipped``: layer -> why it was not measured; ``elapsed_s``: wall time of the measurement.
    """

    step: int
    layers: dict[str, dict[str, float]] = field(default_factory=dict)
    aggregates: dict[str, dict[str, float]] = field(default_factory=dict)
    by_type: dict[str, dict[str, float]] = field(default_factory=dict)
    model: dict[str, float] = field(default_factory=dict)
    context: dict[str, float] = field(default_factory=dict)
    probes: dict[str, float] = field(default_factory=dict)
    alerts: list[Alert] = field(default_factory=list)
    spectra: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    elapsed_s: float = 0.0

    # ------------------------------------------------------------- reading
    def layer_values(self, metric: str) -> dict[str, float]:
        """``{layer: value}`` of one per-layer metric (layers that have it, model order)."""
        return {layer: values[metric] for layer, values in self.layers.items() if metric in values}

    def aggregate(self, metric: str, stat: str = "mean") -> float | None:
        """One aggregate, e.g. ``aggregate("rho1", "max")``; None when not measured."""
        return self.aggregates.get(metric, {}).get(stat)

    @property
    def layer_names(self) -> list[str]:
        """Layers measured in this report, model order."""
        return list(self.layers)

    # ------------------------------------------------------------- key schema
    def flat(self, *, layers: bool = True, model: bool = True) -> dict[str, float]:
        """The flat key mapping of the schema above: per-layer keys (``layers``) and the
        model-level ones (``model``: aggregates, bookkeeping, alerts, context, probes)."""
        out: dict[str, float] = {}
        if layers:
            for layer, values in self.layers.items():
                for metric, value in values.items():
                    out[f"{PREFIX}/{metric}/{layer}"] = value
        if model:
            out.update(self.model_level())
        return out

    def model_level(self) -> dict[str, float]:
        """Flat keys of the model-level fields: aggregates, bookkeeping, alerts, context, probes."""
        out: dict[str, float] = {}
        for metric, stats in self.aggregates.items():
            for stat, value in stats.items():
                out[f"{PREFIX}/model/{metric}_{stat}"] = value
        for metric, types in self.by_type.items():
            for typ, value in types.items():
                out[f"{PREFIX}/model/{metric}_mean/{typ}"] = value
        out.update({f"{PREFIX}/model/{name}": value for name, value in self.model.items()})
        out.update({f"{PREFIX}/alert/{alert.rule}": 1.0 for alert in self.alerts})
        out.update({f"{PREFIX}/context/{name}": value for name, value in self.context.items()})
        out.update({f"{PREFIX}/probe/{name}": value for name, value in self.probes.items()})
        return out

    def overview(self) -> dict[str, float]:
        """The compact model-level keys: each aggregate's mean, :data:`OVERVIEW_STATS`,
        :data:`OVERVIEW_MODEL`, alert flags and probe results."""
        out = {
            f"{PREFIX}/model/{metric}_mean": stats["mean"]
            for metric, stats in self.aggregates.items()
            if "mean" in stats
        }
        for metric, stat in OVERVIEW_STATS:
            value = self.aggregate(metric, stat)
            if value is not None:
                out[f"{PREFIX}/model/{metric}_{stat}"] = value
        out.update({f"{PREFIX}/model/{name}": self.model[name] for name in OVERVIEW_MODEL if name in self.model})
        out.update({f"{PREFIX}/alert/{alert.rule}": 1.0 for alert in self.alerts})
        out.update({f"{PREFIX}/probe/{name}": value for name, value in self.probes.items()})
        return out

    def layer_scalars(self) -> dict[str, float]:
        """Flat keys of the per-layer metrics in :data:`LAYER_SCALARS` (for dashboards)."""
        return {
            f"{PREFIX}/{metric}/{layer}": values[metric]
            for layer, values in self.layers.items()
            for metric in LAYER_SCALARS
            if metric in values
        }

    @property
    def metrics(self) -> dict[str, float]:
        """Every value under its flat key (:meth:`flat`); a new dict on each access."""
        return self.flat()

    # ------------------------------------------------------------- records
    def to_record(self) -> dict:
        """JSON-serialisable record: flat ``metrics`` in the key schema, spectra as lists."""
        return {
            "step": self.step,
            "metrics": self.flat(),
            "spectra": {k: [round(float(x), 7) for x in v.tolist()] for k, v in self.spectra.items()},
            "alerts": [a.as_dict() for a in self.alerts],
            "skipped": self.skipped,
            "elapsed_s": self.elapsed_s,
        }

    @classmethod
    def from_record(cls, rec: dict) -> StepReport:
        """Inverse of :meth:`to_record` (the flat keys are read back into the fields)."""
        return cls.from_flat(
            int(rec["step"]),
            rec.get("metrics", {}),
            spectra={k: torch.tensor(v, dtype=torch.float32) for k, v in rec.get("spectra", {}).items()},
            alerts=[Alert(**{**a, "layers": tuple(a.get("layers", ()))}) for a in rec.get("alerts", [])],
            skipped=dict(rec.get("skipped", {})),
            elapsed_s=float(rec.get("elapsed_s", 0.0)),
        )

    @classmethod
    def from_flat(cls, step: int, metrics: Mapping[str, float], **fields) -> StepReport:
        """A report from flat schema keys (``spectral/...``; other keys become context), plus any
        other fields (``alerts``, ``spectra``, ...). Alert flags are not read: ``alerts`` carries them."""
        report = cls(step=step, **fields)
        for key, value in metrics.items():
            report.put(key, float(value))
        return report

    def put(self, key: str, value: float) -> None:
        """Store ``value`` in the field its flat ``key`` names (``spectral/probe/kl`` -> ``probes["kl"]``;
        a key outside the schema is context)."""
        parts = key.split("/", 2)
        if len(parts) != 3 or parts[0] != PREFIX:
            self.context[key] = value
            return
        section, name = parts[1], parts[2]
        if section == "model":
            by_type, agg = _BY_TYPE.match(name), _AGGREGATE.match(name)
            if by_type:
                self.by_type.setdefault(by_type["metric"], {})[by_type["type"]] = value
            elif agg:
                self.aggregates.setdefault(agg["metric"], {})[agg["stat"]] = value
            else:
                self.model[name] = value
        elif section == "context":
            self.context[name] = value
        elif section == "probe":
            self.probes[name] = value
        elif section == "alert":  # alert flags are rebuilt from the alerts list
            return
        elif "/" in name:  # module names have no "/": not a per-layer key of the schema
            self.context[key] = value
        else:
            self.layers.setdefault(name, {})[section] = value
