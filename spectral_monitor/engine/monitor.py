"""``SpectralMonitor(model).measure(step) -> StepReport``: one measurement as a short pipeline.

choose layers (:mod:`.plan`) → produce ΔW or its factors per batch from the base store
(:mod:`.updates`) → decompose (:mod:`spectral_monitor.functional`) → per-layer metrics and
model aggregates (:mod:`.metrics`, pure) → update the per-layer state (:mod:`.state`).

Random test matrices come from the monitor's own generator, seeded by step, so the training
RNG is never touched. An error inside a batch is caught, logged once and reported as skipped
layers unless ``strict=True``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function

from spectral_monitor._threads import measurement_threads
from spectral_monitor.config import MonitorConfig, build_config
from spectral_monitor.engine.metrics import Decomposition, LayerResult, aggregate, layer_values
from spectral_monitor.engine.plan import Batch, Planner
from spectral_monitor.engine.sharded import ShardedMeasurement, world_group
from spectral_monitor.engine.state import (
    RANDOM_LIKE,
    LayerState,
    base_srank_ratio,
    remember,
    sketch_iterations,
    warm_start,
)
from spectral_monitor.engine.updates import DenseUpdate, LoraUpdate, Prefetch, StreamedUpdate, Update, Workspace
from spectral_monitor.errors import BaseMismatchError, ConfigError, NonFiniteError
from spectral_monitor.functional import sketch_left_vectors
from spectral_monitor.layers import LayerSpec, select_layers
from spectral_monitor.records import StepReport
from spectral_monitor.snapshot import BaseStore, DiskStore, make_store

__all__ = ["SpectralMonitor"]

log = logging.getLogger("spectral_monitor")

#: power iterations for W_0's cached top-``base_k`` basis (at most): it serves alignments and the
#: intruder test, which need its leading directions, not σ to a fraction of a percent
BASE_NITER = 3
#: W_t's top left vectors tested for intruders (Shuttleworth et al. 2024 use 10)
INTRUDER_TOP = 10
#: ΔW's top right vectors added to W_0's in the intruder sketch of W_t
INTRUDER_OVERSAMPLE = 5


def _out_of_memory(exc: BaseException) -> bool:
    """A CUDA or host allocation failure (the retry is worth it), not any other error."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate" in text)


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
        self._non_finite: list[str] = []
        self._workspace = Workspace()
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
        return self._workspace.nbytes

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
        self._non_finite: list[str] = []  # layers found non-finite in this measurement
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
                        results.update(self._measure_or_retry(batch, step, full, prefetch, report))
                except Exception as exc:  # never hurt the training run
                    if cfg.strict:
                        raise
                    reason = f"{type(exc).__name__}: {exc}"
                    names = [s.name for s in batch.specs]
                    self._warn_once(reason, f"spectral_monitor: skipped {names} at step {step}: {reason}")
                    for name in names:
                        report.skipped.setdefault(name, reason)
        self._workspace.release()
        new = [name for name in self._non_finite if name not in self._warned_nonfinite]
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

    def _measure_or_retry(
        self, batch: Batch, step: int, full: bool, prefetch: Prefetch | None, report: StepReport
    ) -> dict[str, LayerResult]:
        """:meth:`_measure_batch`, and after running out of memory again with half the batch, down to
        one layer, then that layer on the CPU; what still does not fit raises (and is skipped)."""
        try:
            return self._measure_batch(batch, step, full, prefetch, report)
        except Exception as exc:
            if not _out_of_memory(exc):
                raise
            self._workspace.flat.clear()
            if batch.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(batch.specs) > 1:
                self._warn_once(
                    "oom:split",
                    f"spectral_monitor: out of memory on {len(batch.specs)} layers at once; smaller batches",
                )
                half = len(batch.specs) // 2
                out: dict[str, LayerResult] = {}
                for part in (batch.specs[:half], batch.specs[half:]):
                    out.update(self._measure_or_retry(replace(batch, specs=part), step, full, None, report))
                return out
            if batch.device.type != "cpu":
                self._warn_once("oom:cpu", f"spectral_monitor: out of memory on {batch.device}; this layer on the CPU")
                cpu = torch.device("cpu")
                on_cpu = replace(
                    batch,
                    device=cpu,
                    sketch_dtype=self.planner.sketch_dtype(cpu, full, batch.shape[0] * batch.shape[1]),
                )
                return self._measure_or_retry(on_cpu, step, full, None, report)
            raise

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

    def _measure_batch(
        self, batch: Batch, step: int, full: bool, prefetch: Prefetch | None, report: StepReport
    ) -> dict[str, LayerResult]:
        """The pipeline for one batch: ΔW → SVD → W_0's basis (first time) → intruders → metrics → state."""
        cfg = self.config
        states = [self._state(s) for s in batch.specs]
        names = [s.name for s in batch.specs]
        with record_function("spectral_monitor.fill"):
            update = self._produce(batch, states, full, prefetch)
        if update is None:
            report.skipped[names[0]] = "no active LoRA adapter"
            return {}
        if not all(update.finite):
            bad = [s.name for s, ok in zip(batch.specs, update.finite) if not ok]
            if self.config.strict:
                raise NonFiniteError(f"non-finite values (NaN/Inf) in the weights or update of {bad} at step {step}")
            self._non_finite.extend(bad)
        if not any(update.finite):
            for state in states:
                state.prev_u = state.prev_v = None
            for name in names:
                report.skipped[name] = "non-finite weights (NaN/Inf)"
            return {name: LayerResult({"nonfinite": 1.0}, finite=False) for name in names}
        m, n = batch.shape
        gen = self._generator(batch.device, step)
        init = None if update.exact else warm_start(states, n, gen, batch.device)
        niter, oversample = sketch_iterations(cfg, init)
        if not update.exact and batch.rank > min(m, n):
            self._warn_once(
                f"clamp:{m}x{n}", f"spectral_monitor: rank {batch.rank} clamped to {min(m, n)} for {m}x{n} layers"
            )
        with record_function("spectral_monitor.svd"):
            U, S, V = update.svd(batch.rank, niter=niter, oversample=oversample, init=init, generator=gen)
        with record_function("spectral_monitor.base_basis"):
            # an exact (LoRA) update draws nothing: W_0's basis gets the step-independent seed
            self._cache_base(update, states, self._generator(batch.device, 0) if update.exact else gen)
        Ut = None
        if cfg.intruders:
            with record_function("spectral_monitor.intruders"):
                top = min(INTRUDER_TOP, m, n)
                start = torch.cat(
                    [torch.stack([s.base_v.to(batch.device) for s in states])[..., :top], V[..., :INTRUDER_OVERSAMPLE]],
                    dim=-1,
                )
                Ut = sketch_left_vectors(update.weights(), start, top).to(batch.device)
        with record_function("spectral_monitor.spectrum"):
            spectrum = update.spectrum()
        dec = Decomposition(U, S, V, update.fro, update.sparsity, spectrum, Ut)
        with record_function("spectral_monitor.metrics"):
            results = layer_values(
                dec,
                finite=update.finite,
                base_u=torch.stack([s.base_u.to(batch.device) for s in states]),
                base_fro=[s.base_fro for s in states],
                prev_u=[s.prev_u for s in states],
                shape=(m, n),
                config=cfg,
            )
        remember(states, dec, results, (m, n), cfg, warm=not update.exact, adapt=not update.exact)
        S_cpu = S.float().cpu()
        for i, (name, res) in enumerate(zip(names, results)):
            if res.finite:
                report.spectra[name] = S_cpu[i]
            else:
                report.skipped[name] = "non-finite weights (NaN/Inf)"
        return dict(zip(names, results))

    def _produce(
        self, batch: Batch, states: Sequence[LayerState], full: bool, prefetch: Prefetch | None
    ) -> Update | None:
        """ΔW of the batch, the way its kind needs (None: a LoRA layer without an active adapter)."""
        cfg = self.config
        if batch.kind == "lora":
            factors = batch.specs[0].lora_factors()
            update = None if factors is None else LoraUpdate(batch, factors)
        elif batch.kind == "streamed":
            update = StreamedUpdate(batch, self.store, eta=cfg.sparsity_eta, budget=self.planner.budget)
        else:
            need = [s.base_fro is None for s in states]
            update = DenseUpdate(
                batch,
                self.store,
                self._workspace,
                eta=cfg.sparsity_eta,
                need_base_fro=need,
                full=full,
                prefetch=prefetch,
            )
        if update is not None:
            for state, value in zip(states, update.base_fro.tolist()):
                if state.base_fro is None:
                    state.base_fro = value
        return update

    def _cache_base(self, update: Update, states: Sequence[LayerState], gen: torch.Generator) -> None:
        """W_0's top-``base_k`` singular vectors, taken once per layer (its first measurement)."""
        if all(s.base_u is not None for s in states):
            return
        cfg = self.config
        U0, S0, V0 = update.base_basis(
            cfg.base_k, niter=min(cfg.niter, BASE_NITER), oversample=cfg.oversample, generator=gen
        )
        for state, u0, s0, v0 in zip(states, U0, S0.tolist(), V0):
            state.base_u, state.base_sigma1, state.base_v = u0, s0[0], v0

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

    def _generator(self, device: torch.device, step: int) -> torch.Generator:
        gen = torch.Generator(device=device)
        gen.manual_seed(self.config.seed * 1_000_003 + step)
        return gen

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
