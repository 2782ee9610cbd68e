"""``SpectralMonitor(model).measure(step) -> StepReport``: one measurement as a short pipeline.

choose layers (:mod:`.plan`) → per batch (:mod:`.pipeline`): produce ΔW or its factors from the
base store (:mod:`.updates`), decompose (:mod:`spectral_monitor.functional`), per-layer metrics
(:mod:`.metrics`, pure), update the per-layer state (:mod:`.state`) → model aggregates.

Random test matrices come from the monitor's own generator, seeded by step, so the training
RNG is never touched. An error inside a batch is caught, logged once and reported as skipped
layers unless ``strict=True``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function

from spectral_monitor._threads import measurement_threads
from spectral_monitor.config import MonitorConfig, build_config
from spectral_monitor.engine.metrics import LayerResult, aggregate
from spectral_monitor.engine.pipeline import BatchPipeline
from spectral_monitor.engine.plan import Batch, Planner
from spectral_monitor.engine.sharded import ShardedMeasurement, world_group
from spectral_monitor.engine.state import RANDOM_LIKE, LayerState, base_srank_ratio
from spectral_monitor.engine.updates import Prefetch
from spectral_monitor.errors import BaseMismatchError, ConfigError
from spectral_monitor.layers import LayerSpec, select_layers
from spectral_monitor.records import StepReport
from spectral_monitor.snapshot import BaseStore, DiskStore, make_store

__all__ = ["SpectralMonitor"]

log = logging.getLogger("spectral_monitor")


def _is_sharded(p: torch.Tensor) -> bool:
    """FSDP2/TP DTensor, a DeepSpeed ZeRO-3 partition, or an FSDP1 flat-parameter view."""
    if type(p).__name__ == "DTensor" or hasattr(p, "ds_id"):
        return True
    return p.dim() != 2 or p.numel() == 0


class SpectralMonitor:
    """Measures the spectrum of every monitored layer's update ΔW = W_t − W_0.

    ``model``: any ``nn.Module``; ``config``: a :class:`MonitorConfig` (or pass its fields as
    keyword arguments); ``reference``: a module holding the base weights (e.g. TRL's
    ``ref_model``), used with ``base_store`` ``"auto"``/``"reference"`` instead of a copy.
    Call :meth:`snapshot` when training starts (or :meth:`set_base`), then :meth:`measure`.
    """

    def __init__(
        self,
        model: nn.Module,
        config: MonitorConfig | None = None,
        *,
        reference: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        config = build_config(config, kwargs, owner="SpectralMonitor")
        self.model = model
        self.config = config
        self.reference = reference
        self.specs: list[LayerSpec] = self._select(model, config)
        self.group = world_group()
        self._sharded = None
        if self.group is not None:
            dense = [s for s in self.specs if s.kind != "lora"]
            self._sharded = ShardedMeasurement(dense, config, self.group) if dense else None
        else:
            sharded = [s.name for s in self.specs if _is_sharded(s.parameter())]
            if sharded:
                raise ConfigError(
                    f"{len(sharded)} monitored weights are sharded (e.g. {sharded[0]!r}) but torch.distributed is "
                    "not initialised with more than one rank; build the monitor inside the distributed job"
                )
        self.planner = Planner(config)
        self.store: BaseStore | None = None
        self._has_base = all(s.kind == "lora" for s in self.specs)
        self._layers: dict[str, LayerState] = {}
        self._warned: set[str] = set()
        self._warned_nonfinite: set[str] = set()
        self.pipeline = BatchPipeline(config, self.planner, self._state, self._warn_once)
        self.measurements = 0
        self.last_step: int | None = None

    @staticmethod
    def _select(model: nn.Module, config: MonitorConfig) -> list[LayerSpec]:
        """The configured layers, without frozen ones unless ``include_frozen``; says once why
        layers were left out, and which option left none."""
        chosen = select_layers(model, config.layers, ())
        specs = select_layers(model, config.layers, config.exclude) if config.exclude else chosen
        if chosen and not specs:
            log.warning(
                "spectral_monitor: exclude=%r removes all %d layers chosen by layers=%r; nothing will be measured",
                list(config.exclude),
                len(chosen),
                config.layers,
            )
        elif not chosen:
            log.warning("spectral_monitor: layers=%r selects no linear layer; nothing will be measured", config.layers)
        if config.include_frozen:
            return specs
        frozen = [s.name for s in specs if not s.trainable]
        if frozen:
            log.warning(
                "spectral_monitor: %d of %d selected layers are frozen (requires_grad=False), e.g. %r, and are not "
                "monitored; include_frozen=True monitors them",
                len(frozen),
                len(specs),
                frozen[0],
            )
        return [s for s in specs if s.name not in frozen]

    # ------------------------------------------------------------------ base
    @property
    def has_base(self) -> bool:
        """True once a base is set (always True when every layer is LoRA)."""
        return self._has_base

    def snapshot(self) -> BaseStore | None:
        """Take the base W_0 now, into the store the config asks for. Returns the store."""
        meta = [s.name for s in self.specs if s.parameter().is_meta]
        if meta:
            raise ConfigError(
                f"{len(meta)} monitored weights are on the meta device (e.g. {meta[0]!r}): the model has no values "
                "yet; load or materialize its weights before the monitor takes its base"
            )
        if self._sharded is not None:
            self.set_base(self._sharded.snapshot())
        else:
            store = make_store(
                self.config.base_store, self.specs, base_dir=self.config.base_dir, reference=self.reference
            )
            self.set_base(store)
        return self.store

    def set_base(self, store: BaseStore | None) -> None:
        """Use ``store`` as the base (e.g. a :class:`DiskStore` reopened on resume); checks it matches."""
        if isinstance(store, DiskStore):
            store.check(self.specs)
        if store is None and any(s.kind != "lora" for s in self.specs):
            raise BaseMismatchError("a base store is needed: some monitored layers are not LoRA layers")
        self.store = store
        self._has_base = True
        for state in self._layers.values():  # W_0 changed: cached base facts are stale
            state.base_u, state.base_v, state.base_fro, state.base_sigma1 = None, None, None, None

    @property
    def workspace_bytes(self) -> int:
        """Bytes of the ΔW buffers kept between measurements (CPU; device buffers are released)."""
        return self.pipeline.workspace.nbytes

    def layer_state(self, name: str) -> LayerState | None:
        """What the monitor remembers about layer ``name`` (None before its first measurement)."""
        return self._layers.get(name)

    # --------------------------------------------------------------- measure
    def measure(self, step: int, layers: Sequence[str] | None = None) -> StepReport:
        """Measure the monitored layers (or only those named in ``layers``) now; a report for ``step``."""
        if not self._has_base:
            raise RuntimeError("SpectralMonitor.measure() before snapshot(): call monitor.snapshot() at train start")
        t0 = time.perf_counter()
        report = StepReport(step=step)
        cfg = self.config
        self.pipeline.non_finite = []  # layers found non-finite in this measurement
        full = cfg.full_every > 0 and (self.measurements + 1) % cfg.full_every == 0
        chosen = self.specs if layers is None else [s for s in self.specs if s.name in set(layers)]
        specs = self._attached(chosen, report)
        local = [s for s in specs if self._sharded is None or s.kind == "lora"]
        batches = self.planner.batches(local, lambda s: self._state(s).rank, full)
        prefetch = self._prefetcher()
        results: dict[str, LayerResult] = {}
        on_cpu = any(b.device.type == "cpu" for b in batches) or self._sharded is not None
        with torch.no_grad(), measurement_threads(cfg.threads if on_cpu else None):
            if self._sharded is not None:
                results.update(self._measure_sharded(specs, step, report))
            for i, batch in enumerate(batches):
                if prefetch is not None and i + 1 < len(batches) and batches[i + 1].kind == "dense":
                    prefetch = self._start_prefetch(prefetch, batches[i + 1])
                try:
                    with record_function(f"spectral_monitor.{batch.kind}"):
                        results.update(self.pipeline.measure(batch, self.store, step, full, prefetch, report))
                except Exception as exc:  # never hurt the training run
                    if cfg.strict:
                        raise
                    reason = f"{type(exc).__name__}: {exc}"
                    names = [s.name for s in batch.specs]
                    self._warn_once(reason, f"spectral_monitor: skipped {names} at step {step}: {reason}")
                    for name in names:
                        report.skipped.setdefault(name, reason)
        self.pipeline.workspace.release()
        new = [name for name in self.pipeline.non_finite if name not in self._warned_nonfinite]
        if new:  # one warning per measurement, for the layers that were not non-finite before
            self._warned_nonfinite.update(new)
            log.warning(
                "spectral_monitor: NaN/Inf in %d layer(s) at step %d, e.g. %s; they are reported as non-finite and "
                "not measured",
                len(new),
                step,
                new[:3],
            )
        for spec in self.specs:  # model order
            if spec.name in results:
                report.layers[spec.name] = results[spec.name].values
        types = {s.name: s.layer_type for s in self.specs}
        report.aggregates, report.by_type, report.model = aggregate(report.layers, types, len(report.skipped))
        ratios = [base_srank_ratio(self._layers[s.name], s.shape) for s in self.specs if s.name in report.layers]
        known = [r for r in ratios if r is not None]
        if known:
            report.model["base_random_frac"] = sum(r >= RANDOM_LIKE for r in known) / len(known)
        self.measurements += 1
        self.last_step = step
        report.elapsed_s = time.perf_counter() - t0
        report.model["measure_s"] = report.elapsed_s
        return report

    def _attached(self, specs: Sequence[LayerSpec], report: StepReport) -> list[LayerSpec]:
        """The layers still in the model as they were: one whose module was replaced since the
        monitor was built, or whose weight changed shape, is skipped (its base belongs to the old one)."""
        out = []
        for spec in specs:
            try:
                attached = self.model.get_submodule(spec.name) is spec.module
            except AttributeError:
                attached = False
            if not attached:
                reason = "the module was replaced after the monitor was built; its base belongs to the old one"
            elif (
                spec.kind != "lora"
                and self._sharded is None
                and tuple(spec.canonical(spec.parameter()).shape) != spec.shape
            ):
                shape = tuple(spec.canonical(spec.parameter()).shape)
                reason = f"weight shape {shape} vs base {spec.shape}: the layer changed shape since the base was taken"
                if self.config.strict:
                    raise BaseMismatchError(f"layer {spec.name!r}: {reason}")
            else:
                out.append(spec)
                continue
            report.skipped[spec.name] = reason
            self._warn_once(f"gone:{spec.name}", f"spectral_monitor: layer {spec.name!r} is not measured: {reason}")
        return out

    def _measure_sharded(self, specs: Sequence[LayerSpec], step: int, report: StepReport) -> dict[str, LayerResult]:
        """The dense layers of a distributed run, with every rank (collective; see ``sharded.py``)."""
        names = {s.name for s in specs}
        measured = [s for s in self._sharded.specs if s.name in names]  # the same subset on every rank
        if not measured:
            return {}
        part = ShardedMeasurement(measured, self.config, self.group)
        numel = max(s.shape[0] * s.shape[1] for s in measured)
        device = self.planner.device(measured[0]) if measured[0].parameter().dim() == 2 else torch.device("cpu")
        try:
            with record_function("spectral_monitor.sharded"):
                outcome = part.measure(
                    step, self.store, [self._state(s) for s in measured], self.planner.sketch_dtype(device, numel=numel)
                )
        except Exception as exc:  # raised on every rank alike (distributed_update_svd's contract)
            if self.config.strict:
                raise
            reason = f"{type(exc).__name__}: {exc}"
            self._warn_once(reason, f"spectral_monitor: skipped the sharded layers at step {step}: {reason}")
            for spec in measured:
                report.skipped.setdefault(spec.name, reason)
            return {}
        out = {}
        for spec, (value, spectrum, error) in zip(measured, outcome):
            if error is not None:
                report.skipped[spec.name] = error
                continue
            out[spec.name] = value
            if spectrum is not None:
                report.spectra[spec.name] = spectrum
            else:
                report.skipped[spec.name] = "non-finite weights (NaN/Inf)"
        return out

    def _state(self, spec: LayerSpec) -> LayerState:
        if spec.name not in self._layers:
            self._layers[spec.name] = LayerState(rank=self.config.rank)
        return self._layers[spec.name]

    def _prefetcher(self) -> Prefetch | None:
        """A side-stream uploader when the base sits in (pinned) CPU memory and we compute on CUDA."""
        dense = [s for s in self.specs if s.kind != "lora"]
        if self.store is None or self.store.kind != "cpu" or not dense:
            return None
        device = self.planner.device(dense[0])
        return Prefetch(self.store, device) if device.type == "cuda" else None

    def _start_prefetch(self, prefetch: Prefetch, batch: Batch) -> Prefetch | None:
        """Start the next upload; on any failure fall back to plain per-layer reads for this measurement."""
        try:
            prefetch.start(batch.specs)
            return prefetch
        except Exception as exc:
            if self.config.strict:
                raise
            self._warn_once("prefetch", f"spectral_monitor: base prefetch disabled ({type(exc).__name__}: {exc})")
            return None

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs except the base weights themselves (see ``base``)."""
        return {
            "version": 1,
            "measurements": self.measurements,
            "last_step": self.last_step,
            "layers": {name: st.to_dict() for name, st in self._layers.items()},
            "base": self.store.describe() if self.store is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output. Reopens a disk base when its file still exists."""
        self.measurements = int(state["measurements"])
        self.last_step = state["last_step"]
        self._layers = {name: LayerState(**st) for name, st in state["layers"].items()}
        base = state.get("base") or {}
        if base.get("kind") == "disk" and self.store is None:
            self.set_base(DiskStore(base["path"]))
