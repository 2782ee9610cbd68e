"""One batch of same-shape layers through the pipeline: ΔW → SVD → W₀'s basis (first time) →
intruders → metrics → state. :class:`BatchPipeline` owns the reused ΔW workspace and the
out-of-memory retry; :class:`~spectral_monitor.engine.monitor.SpectralMonitor` chooses the batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch.profiler import record_function

from spectral_monitor.config import MonitorConfig
from spectral_monitor.engine.metrics import Decomposition, LayerResult, layer_values
from spectral_monitor.engine.plan import Batch, Planner
from spectral_monitor.engine.state import LayerState, remember, sketch_iterations, warm_start
from spectral_monitor.engine.updates import DenseUpdate, LoraUpdate, Prefetch, StreamedUpdate, Update, Workspace
from spectral_monitor.errors import NonFiniteError
from spectral_monitor.functional import sketch_left_vectors
from spectral_monitor.layers import LayerSpec
from spectral_monitor.records import StepReport
from spectral_monitor.snapshot import BaseStore

__all__ = ["BatchPipeline", "generator"]

#: power iterations for W_0's cached top-``base_k`` basis (at most): it serves alignments and the
#: intruder test, which need its leading directions, not σ to a fraction of a percent
BASE_NITER = 3
#: W_t's top left vectors tested for intruders (Shuttleworth et al. 2024 use 10)
INTRUDER_TOP = 10
#: ΔW's top right vectors added to W_0's in the intruder sketch of W_t
INTRUDER_OVERSAMPLE = 5


def out_of_memory(exc: BaseException) -> bool:
    """A CUDA or host allocation failure (the retry is worth it), not any other error."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate" in text)


def generator(seed: int, device: torch.device, step: int) -> torch.Generator:
    """The monitor's own random stream for ``step`` (the training RNG is never touched)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed * 1_000_003 + step)
    return gen


class BatchPipeline:
    """Measures one :class:`Batch` at a time against ``store``.

    ``state(spec)`` returns the layer's :class:`LayerState` (created on first use); ``warn(key,
    message)`` logs once per key. Layers found non-finite are collected in :attr:`non_finite`
    (the monitor warns once per measurement).
    """

    def __init__(
        self,
        config: MonitorConfig,
        planner: Planner,
        state: Callable[[LayerSpec], LayerState],
        warn: Callable[[str, str], None],
    ) -> None:
        self.config = config
        self.planner = planner
        self.state = state
        self.warn = warn
        self.workspace = Workspace()
        self.non_finite: list[str] = []

    def measure(
        self,
        batch: Batch,
        store: BaseStore | None,
        step: int,
        full: bool,
        prefetch: Prefetch | None,
        report: StepReport,
    ) -> dict[str, LayerResult]:
        """The batch's per-layer results; after running out of memory, again with half the batch,
        down to one layer, then that layer on the CPU; what still does not fit raises."""
        try:
            return self._measure(batch, store, step, full, prefetch, report)
        except Exception as exc:
            if not out_of_memory(exc):
                raise
            self.workspace.flat.clear()
            if batch.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(batch.specs) > 1:
                self.warn(
                    "oom:split",
                    f"spectral_monitor: out of memory on {len(batch.specs)} layers at once; smaller batches",
                )
                half = len(batch.specs) // 2
                out: dict[str, LayerResult] = {}
                for part in (batch.specs[:half], batch.specs[half:]):
                    out.update(self.measure(replace(batch, specs=part), store, step, full, None, report))
                return out
            if batch.device.type != "cpu":
                self.warn("oom:cpu", f"spectral_monitor: out of memory on {batch.device}; this layer on the CPU")
                cpu = torch.device("cpu")
                dtype = self.planner.sketch_dtype(cpu, full, batch.shape[0] * batch.shape[1])
                return self.measure(replace(batch, device=cpu, sketch_dtype=dtype), store, step, full, None, report)
            raise

    def _measure(
        self,
        batch: Batch,
        store: BaseStore | None,
        step: int,
        full: bool,
        prefetch: Prefetch | None,
        report: StepReport,
    ) -> dict[str, LayerResult]:
        cfg = self.config
        states = [self.state(s) for s in batch.specs]
        names = [s.name for s in batch.specs]
        with record_function("spectral_monitor.fill"):
            update = self._produce(batch, store, states, full, prefetch)
        if update is None:
            report.skipped[names[0]] = "no active LoRA adapter"
            return {}
        if not all(update.finite):
            bad = [s.name for s, ok in zip(batch.specs, update.finite) if not ok]
            if cfg.strict:
                raise NonFiniteError(f"non-finite values (NaN/Inf) in the weights or update of {bad} at step {step}")
            self.non_finite.extend(bad)
        if not any(update.finite):
            for state in states:
                state.prev_u = state.prev_v = None
            for name in names:
                report.skipped[name] = "non-finite weights (NaN/Inf)"
            return {name: LayerResult({"nonfinite": 1.0}, finite=False) for name in names}
        m, n = batch.shape
        gen = generator(cfg.seed, batch.device, step)
        init = None if update.exact else warm_start(states, n, gen, batch.device)
        niter, oversample = sketch_iterations(cfg, init)
        if not update.exact and batch.rank > min(m, n):
            self.warn(
                f"clamp:{m}x{n}", f"spectral_monitor: rank {batch.rank} clamped to {min(m, n)} for {m}x{n} layers"
            )
        with record_function("spectral_monitor.svd"):
            U, S, V = update.svd(batch.rank, niter=niter, oversample=oversample, init=init, generator=gen)
        with record_function("spectral_monitor.base_basis"):
            # an exact (LoRA) update draws nothing: W_0's basis gets the step-independent seed
            self._cache_base(update, states, generator(cfg.seed, batch.device, 0) if update.exact else gen)
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
        self,
        batch: Batch,
        store: BaseStore | None,
        states: Sequence[LayerState],
        full: bool,
        prefetch: Prefetch | None,
    ) -> Update | None:
        """ΔW of the batch, the way its kind needs (None: a LoRA layer without an active adapter)."""
        cfg = self.config
        if batch.kind == "lora":
            factors = batch.specs[0].lora_factors()
            update = None if factors is None else LoraUpdate(batch, factors)
        elif batch.kind == "streamed":
            update = StreamedUpdate(batch, store, eta=cfg.sparsity_eta, budget=self.planner.budget)
        else:
            update = DenseUpdate(
                batch,
                store,
                self.workspace,
                eta=cfg.sparsity_eta,
                need_base_fro=[s.base_fro is None for s in states],
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
