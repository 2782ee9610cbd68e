"""The monitor engine: ``SpectralMonitor(model).measure(step) -> StepReport``.

One measurement walks the monitored layers in groups of the same shape, forms ΔW = W_t − W_0
in float32 for as many layers as the memory budget allows (a layer larger than the budget is
decomposed without forming ΔW), runs one batched randomized SVD per group (warm-started from
the previous measurement's right subspace, seeded by its own generator so the training RNG
is never touched), and turns the result into the per-layer metrics of DESIGN.md §2 plus
model-level aggregates. Errors inside a layer group are caught, logged once and reported as
skipped layers unless ``strict=True``.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from spectral_monitor.config import MonitorConfig
from spectral_monitor.errors import BaseMismatchError, NonFiniteError
from spectral_monitor.functional import (
    abs_cosine,
    base_alignment,
    effective_rank,
    energy_share,
    fit_power_law,
    frobenius_sq,
    full_singular_values,
    intruder_count,
    lora_svd,
    randomized_svd,
    sketch_left_vectors,
    sparsity,
    spectral_gap,
    stable_rank,
    subspace_overlap,
)
from spectral_monitor.layers import LayerSpec, select_layers
from spectral_monitor.records import StepReport, layer_key, model_key
from spectral_monitor.snapshot import BaseStore, DiskStore, make_store

__all__ = ["SpectralMonitor"]

log = logging.getLogger("spectral_monitor")

#: per-layer metrics that get model-level aggregates (mean/median/min/max)
AGGREGATED = (
    "rho1",
    "topk_energy",
    "stable_rank",
    "erank",
    "gap",
    "alpha",
    "update_norm",
    "update_rel",
    "align_prev",
    "overlap_prev",
    "align_base",
    "intruders",
    "sparsity",
)
#: metrics also aggregated per layer type (q/k/v/o/up/down/gate)
BY_TYPE = ("rho1", "alpha", "erank", "update_rel")
#: power iterations for W_0's cached top-``base_k`` basis (at most): it serves alignments and the
#: intruder test, which need its leading directions, not σ to a fraction of a percent
BASE_NITER = 3
#: layers of at most this many weights are batched by shape alone (see _chunks)
SMALL_LAYER = 1 << 20
INTRUDER_TOP = 10
INTRUDER_OVERSAMPLE = 5
#: a cold sketch (no previous subspace: the first measurement, or a layer whose last update was 0
#: or NaN) oversamples this many times ``oversample``: near the cut of a slowly decaying spectrum a
#: wider sketch converges where more power iterations barely do (bench_scan's GPT-2: α within 2 %
#: of the exact top-k fit on 36/36 reliable layers, worst 1.2 %, against 35/36, worst 4.1 %; paid
#: once per run)
COLD_OVERSAMPLE = 2


def _tail_may_continue(covered: bool, n_tail: float, ks: float, max_ks: float) -> bool:
    """Grow the sketch rank? Only when the fitted tail reaches the smallest kept value (not covered)
    *and* the top-k fit is consistent with a power law: D at most ``max_ks`` or the KS test's 5 %
    critical value 1.36/√n_tail (a short tail cannot tell). A spike-plus-bulk or bulk-like edge
    (D of 0.38-0.51 on 32 values in bench_scan) only adds bulk values and cost when doubled."""
    if covered or not n_tail > 0:
        return False
    return ks <= max(max_ks, 1.36 / math.sqrt(n_tail))  # False for a NaN D (no fit)


def _intruder_start(base_v: Tensor, V: Tensor, top: int) -> Tensor:
    """Start of the sketch of W_t = W_0 + ΔW: W_0's top-``top`` right vectors and ΔW's top
    ``INTRUDER_OVERSAMPLE`` (``(*, n, top + 5)``). W_t's leading right subspace lies close to their
    span, so one product W_t Ω gives its top left vectors (:func:`sketch_left_vectors`), and a
    direction ΔW adds outside W_0's column space (an intruder) is in the sketch by construction."""
    return torch.cat([base_v[..., :top], V[..., :INTRUDER_OVERSAMPLE].to(base_v)], dim=-1)


def _sampled_sparsity(
    delta: Tensor, W: Tensor, B0: Tensor, eta: float, samples: int = 1 << 14, run: int = 64
) -> Tensor:
    """:func:`sparsity` on a sample of at most ``samples`` entries (all of a small layer): evenly
    spaced runs of ``run`` contiguous entries (cache-line friendly: single strided entries cost a
    cache miss each), the spacing coprime with the row length so the runs start in every column.
    A share, so 16,384 samples give it to about ±0.8 % (2 standard errors) when entries are
    independent, for well under 1 % of the memory traffic of a full elementwise pass (65,536
    samples, ±0.4 %, cost 7 % of a steady measurement of the bench_overhead model)."""
    total = delta.numel()
    tensors = (delta, W.to(delta.device), B0)
    if total <= samples or not all(t.is_contiguous() for t in tensors):
        stride = max(1, total // samples)
        return sparsity(*(t.reshape(1, -1)[:, ::stride] for t in tensors), eta=eta)
    runs = samples // run
    step = total // runs
    while step > run and math.gcd(step, delta.shape[-1]) != 1:
        step -= 1
    return sparsity(*(t.reshape(-1).as_strided((runs, run), (step, 1)) for t in tensors), eta=eta)


def _fast_bf16(device: torch.device) -> bool:
    """True where bf16 matmuls run on dedicated units: CUDA GPUs with bf16 tensor cores (sm80+),
    CPUs with AMX or AVX512-BF16 (elsewhere bf16 is emulated and slower than float32)."""
    try:
        if device.type == "cuda":
            with torch.cuda.device(device):
                return torch.cuda.is_bf16_supported(including_emulation=False)
        if device.type == "cpu":
            return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except Exception:  # a capability query this torch lacks: stay in float32
        return False
    return False


def _is_sharded(p: Tensor) -> bool:
    """FSDP2/TP DTensor, a DeepSpeed ZeRO-3 partition, or an FSDP1 flat-parameter view."""
    if type(p).__name__ == "DTensor" or hasattr(p, "ds_id"):
        return True
    return p.dim() != 2 or p.numel() == 0


def _check_shapes(spec: LayerSpec, W: Tensor, B0: Tensor) -> None:
    if W.shape != B0.shape or tuple(W.shape) != spec.shape:
        raise BaseMismatchError(
            f"layer {spec.name!r}: weight shape {tuple(W.shape)} vs base {tuple(B0.shape)} "
            f"(monitored as {spec.shape}); the layer changed shape or the base is from another model"
        )


@dataclass
class _Parts:
    """What one decomposition of a chunk of b same-shape layers gives (all on the compute device).

    U ``(b, m, k)``, S ``(b, k)``, V ``(b, n, k)`` of ΔW; fro ``(b,)`` = ‖ΔW‖_F²; sparsity, base_fro
    ``(b,)``; finite: per layer; Ut ``(b, m, top)`` top left vectors of W_t (intruders) or None;
    spectrum ``(b, min(m, n))`` all singular values of ΔW on full-spectrum measurements, else None.
    """

    U: Tensor
    S: Tensor
    V: Tensor
    fro: Tensor
    sparsity: Tensor
    base_fro: Tensor
    finite: list[bool]
    Ut: Tensor | None
    spectrum: Tensor | None


class _Prefetch:
    """Uploads the next chunk's base weights (pinned CPU store) on a side CUDA stream, so the
    host-to-device copy overlaps the current chunk's decomposition."""

    def __init__(self, store: BaseStore, device: torch.device) -> None:
        self.store, self.device = store, device
        self.stream = torch.cuda.Stream(device=device)
        self.pending: dict[str, tuple[Tensor, torch.cuda.Event]] = {}

    def start(self, chunk: list[LayerSpec]) -> None:
        with torch.cuda.stream(self.stream):
            for spec in chunk:
                t = self.store.get(spec, self.device)
                event = torch.cuda.Event()
                event.record(self.stream)
                self.pending[spec.name] = (t, event)

    def get(self, spec: LayerSpec) -> Tensor:
        if spec.name not in self.pending:
            return self.store.get(spec, self.device)
        t, event = self.pending.pop(spec.name)
        torch.cuda.current_stream(self.device).wait_event(event)
        t.record_stream(torch.cuda.current_stream(self.device))
        return t


class _Workspace:
    """The batches' m x n buffers, carved from one flat allocation per device that every batch
    reuses. On CPU it is also kept between measurements: the first touch of freshly allocated
    pages costs about as much as filling them (~1.3 µs per 4 KiB page here). CUDA buffers go back
    to the caching allocator after each measurement."""

    def __init__(self) -> None:
        self.flat: dict[torch.device, Tensor] = {}

    def take(self, device: torch.device, *layouts: tuple[tuple[int, ...], torch.dtype]) -> list[Tensor]:
        sizes = [-(-math.prod(shape) * dtype.itemsize // 64) * 64 for shape, dtype in layouts]  # 64-byte aligned
        flat = self.flat.get(device)
        if flat is None or flat.numel() < sum(sizes):
            self.flat.pop(device, None)
            flat = self.flat[device] = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
        out, offset = [], 0
        for (shape, dtype), size in zip(layouts, sizes):
            nbytes = math.prod(shape) * dtype.itemsize
            out.append(flat[offset : offset + nbytes].view(dtype).view(shape))
            offset += size
        return out

    def release(self) -> None:
        """End of a measurement: keep the CPU buffer, hand device buffers back."""
        self.flat = {d: t for d, t in self.flat.items() if d.type == "cpu"}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() for t in self.flat.values())


@dataclass
class _LayerState:
    """What the engine remembers about one layer between measurements (tensors on CPU or device)."""

    rank: int
    prev_u: Tensor | None = None  # (m, align_k) top left singular vectors of the last ΔW
    prev_v: Tensor | None = None  # (n, rank) right subspace, the next sketch's warm start
    base_u: Tensor | None = None  # (m, base_k) top left singular vectors of W_0
    base_v: Tensor | None = None  # (n, base_k) its right ones: the warm start of the sketch of W_t
    base_fro: float | None = None  # ‖W_0‖_F

    def to_dict(self) -> dict[str, Any]:
        return {k: (v.detach().cpu() if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}


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
        if config is None:
            config = MonitorConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either config=MonitorConfig(...) or keyword arguments, not both")
        self.model = model
        self.config = config
        self.reference = reference
        specs = select_layers(model, config.layers, config.exclude)
        sharded = [s.name for s in specs if _is_sharded(s.parameter())]
        if sharded:
            log.warning(
                "spectral_monitor: %d layers hold sharded parameters (FSDP / DeepSpeed ZeRO-3 / DTensor), e.g. %r; "
                "sharded training is not supported yet, so they are not monitored",
                len(sharded),
                sharded[0],
            )
        self.specs: list[LayerSpec] = [s for s in specs if s.name not in sharded]
        if not self.specs:
            log.warning("spectral_monitor: no layers selected (layers=%r); nothing will be measured", config.layers)
        self.store: BaseStore | None = None
        self._has_base = all(s.kind == "lora" for s in self.specs)
        self._layers: dict[str, _LayerState] = {}
        self._warned: set[str] = set()
        self._fast_bf16: dict[torch.device, bool] = {}
        self._workspace = _Workspace()
        self.measurements = 0
        self.last_step: int | None = None

    # ------------------------------------------------------------------ base
    @property
    def has_base(self) -> bool:
        """True once a base is set (always True when every layer is LoRA)."""
        return self._has_base

    def snapshot(self) -> BaseStore | None:
        """Take the base W_0 now, into the store the config asks for. Returns the store."""
        self.set_base(
            make_store(self.config.base_store, self.specs, base_dir=self.config.base_dir, reference=self.reference)
        )
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
            state.base_u, state.base_v, state.base_fro = None, None, None

    # --------------------------------------------------------------- measure
    def measure(self, step: int) -> StepReport:
        """Measure every monitored layer now and return a :class:`StepReport` for ``step``."""
        if not self._has_base:
            raise RuntimeError("SpectralMonitor.measure() before snapshot(): call monitor.snapshot() at train start")
        t0 = time.perf_counter()
        report = StepReport(step=step)
        full = self.config.full_every > 0 and (self.measurements + 1) % self.config.full_every == 0
        values: dict[str, dict[str, float]] = {}
        chunks = self._chunks(full)
        prefetch = self._prefetcher()
        with torch.no_grad():
            for i, chunk in enumerate(chunks):
                try:
                    if prefetch is not None and i + 1 < len(chunks) and chunks[i + 1][0].kind != "lora":
                        prefetch = self._start_prefetch(prefetch, chunks[i + 1])
                    if chunk[0].kind == "lora":
                        for spec in chunk:
                            values.update(self._measure_lora(spec, report))
                    else:
                        values.update(self._measure_dense(chunk, step, full, report, prefetch))
                except Exception as exc:  # never hurt the training run
                    if self.config.strict:
                        raise
                    reason = f"{type(exc).__name__}: {exc}"
                    self._warn_once(
                        reason, f"spectral_monitor: skipped {[s.name for s in chunk]} at step {step}: {reason}"
                    )
                    for spec in chunk:
                        report.skipped.setdefault(spec.name, reason)
        self._workspace.release()
        for layer, metrics in values.items():
            for metric, value in metrics.items():
                report.metrics[layer_key(metric, layer)] = value
        self._aggregate(report, values)
        self.measurements += 1
        self.last_step = step
        report.elapsed_s = time.perf_counter() - t0
        report.metrics[model_key("measure_s")] = report.elapsed_s
        return report

    def _state(self, spec: LayerSpec) -> _LayerState:
        if spec.name not in self._layers:
            self._layers[spec.name] = _LayerState(rank=self.config.rank)
        return self._layers[spec.name]

    @property
    def _budget(self) -> int:
        return self.config.memory_budget_mb * 2**20

    def _sketch_dtype(self, device: torch.device, full: bool = False, numel: int | None = None) -> torch.dtype:
        """dtype of the ΔW buffers and their products: float32 on full-spectrum measurements
        and, with ``auto``, for layers of at most SMALL_LAYER weights (``numel``), whose products are
        too cheap for bf16 to repay its conversions."""
        choice = self.config.sketch_dtype
        if full or choice == "float32" or (choice == "auto" and numel is not None and numel <= SMALL_LAYER):
            return torch.float32
        if choice == "bfloat16":
            return torch.bfloat16
        if device not in self._fast_bf16:
            self._fast_bf16[device] = _fast_bf16(device)
        return torch.bfloat16 if self._fast_bf16[device] else torch.float32

    def _oversample(self, init: Tensor | None) -> int:
        """Sketch columns beyond the rank: ``oversample``, COLD_OVERSAMPLE times that without a warm start."""
        return self.config.oversample * (COLD_OVERSAMPLE if init is None else 1)

    def _layer_bytes(self, m: int, n: int, dtype: torch.dtype) -> int:
        """Buffer bytes per layer in a batch: its ΔW (W_t is read in place)."""
        return m * n * dtype.itemsize

    def _batch_size(self, m: int, n: int, dtype: torch.dtype) -> int:
        """Layers per batch within the budget (0: one layer is over it); a low-precision batch also
        needs one float32 m x n scratch to form ΔW in."""
        scratch = m * n * 4 if dtype != torch.float32 else 0
        return max(0, (self._budget - scratch) // self._layer_bytes(m, n, dtype))

    def _prefetcher(self) -> _Prefetch | None:
        """A side-stream uploader when the base sits in (pinned) CPU memory and we compute on CUDA."""
        dense = [s for s in self.specs if s.kind != "lora"]
        if self.store is None or self.store.kind != "cpu" or not dense:
            return None
        device = self._device(dense[0])
        return _Prefetch(self.store, device) if device.type == "cuda" else None

    def _start_prefetch(self, prefetch: _Prefetch, chunk: list[LayerSpec]) -> _Prefetch | None:
        """Start the next upload; on any failure fall back to plain per-layer reads for this measurement."""
        try:
            prefetch.start(chunk)
            return prefetch
        except Exception as exc:
            if self.config.strict:
                raise
            self._warn_once("prefetch", f"spectral_monitor: base prefetch disabled ({type(exc).__name__}: {exc})")
            return None

    def _chunks(self, full: bool = False) -> list[list[LayerSpec]]:
        """Groups of same-shape dense layers within the memory budget; LoRA layers one group."""
        groups: dict[tuple, list[LayerSpec]] = defaultdict(list)
        for spec in self.specs:
            if spec.kind == "lora":
                groups[("lora",)].append(spec)
            else:
                # small layers of one shape share a batch whatever their ranks (the larger rank is
                # used): their cost is per-batch overhead, not arithmetic
                rank = 0 if math.prod(spec.shape) <= SMALL_LAYER else self._state(spec).rank
                groups[(spec.shape, spec.transposed, self._device(spec), rank)].append(spec)
        out = []
        for key, specs in groups.items():
            if key[0] == "lora":
                out.append(specs)
                continue
            (m, n), _, device, _ = key
            size = max(1, self._batch_size(m, n, self._sketch_dtype(device, full, m * n)))
            out.extend(specs[i : i + size] for i in range(0, len(specs), size))
        return out

    def _device(self, spec: LayerSpec) -> torch.device:
        return torch.device(self.config.device) if self.config.device else spec.parameter().device

    def _generator(self, device: torch.device, step: int) -> torch.Generator:
        gen = torch.Generator(device=device)
        gen.manual_seed(self.config.seed * 1_000_003 + step)
        return gen

    def _measure_dense(
        self, chunk: list[LayerSpec], step: int, full: bool, report: StepReport, prefetch: _Prefetch | None = None
    ) -> dict[str, dict[str, float]]:
        m, n = chunk[0].shape
        states = [self._state(s) for s in chunk]
        device = self._device(chunk[0])
        rank = max(s.rank for s in states)
        if rank > min(m, n):
            self._warn_once(
                f"clamp:{m}x{n}", f"spectral_monitor: rank {rank} clamped to {min(m, n)} for {m}x{n} layers"
            )
        gen = self._generator(device, step)
        init = None
        if any(s.prev_v is not None for s in states):  # a layer without one (last update 0 or NaN): random
            k0 = min(s.prev_v.shape[-1] for s in states if s.prev_v is not None)
            fill = None
            if not all(s.prev_v is not None for s in states):
                fill = torch.randn(n, k0, generator=gen, device=gen.device).to(device)
            init = torch.stack([fill if s.prev_v is None else s.prev_v[:, :k0].to(device) for s in states])
        # warm-started (after a rank increase the previous subspace fills the first columns; running
        # the cold niter for those layers bought no accuracy on the bench_scan GPT-2 setup, only time)
        warm = init is not None and self.config.warm_niter is not None
        niter = self.config.warm_niter if warm else self.config.niter
        if len(chunk) == 1 and self._batch_size(m, n, self._sketch_dtype(device, full, m * n)) == 0:
            parts = self._decompose_large(chunk[0], device, rank, init, niter, gen)
            full = False  # the full spectrum of an over-budget layer is not taken (erank is estimated)
        else:
            parts = self._decompose_chunk(chunk, device, rank, init, niter, gen, full, prefetch)
        if not all(parts.finite):
            bad = [s.name for s, ok in zip(chunk, parts.finite) if not ok]
            if self.config.strict:
                raise NonFiniteError(f"non-finite values (NaN/Inf) in the weights or update of {bad} at step {step}")
            self._warn_once(
                f"nonfinite:{bad}",
                f"spectral_monitor: NaN/Inf in {bad} at step {step}; "
                "these layers are reported as non-finite and not measured",
            )
        return self._dense_values(chunk, states, parts, full, report)

    def _base_u(self, states: list[_LayerState], W0: Tensor, gen: torch.Generator, **kw: Any) -> None:
        """Cache W_0's top-``base_k`` singular vectors (once per layer)."""
        if any(s.base_u is None for s in states):
            kw.setdefault("sketch_dtype", self._sketch_dtype(W0.device, numel=W0.shape[-2] * W0.shape[-1]))
            U0, _, V0 = randomized_svd(
                W0,
                self.config.base_k,
                niter=min(self.config.niter, BASE_NITER),
                oversample=self.config.oversample,
                generator=gen,
                **kw,
            )
            for s, u0, v0 in zip(states, U0.reshape(-1, *U0.shape[-2:]), V0.reshape(-1, *V0.shape[-2:])):
                s.base_u, s.base_v = u0, v0

    def _decompose_chunk(
        self,
        chunk: list[LayerSpec],
        device: torch.device,
        rank: int,
        init: Tensor | None,
        niter: int,
        gen: torch.Generator,
        full: bool,
        prefetch: _Prefetch | None,
    ) -> _Parts:
        """Batched path: ΔW of every layer of the chunk in one buffer of the sketch dtype (within budget).

        ΔW is formed in float32 (in the buffer itself, or in a float32 scratch that is then rounded
        into a bf16 buffer), where its norm, sparsity and finiteness are taken. The buffer keeps the
        parameters' storage layout (HF Conv1D: ``(in, out)``), so filling it is contiguous; the
        decomposition works on its canonical ``(out, in)`` view. Non-finite weights show up as a
        non-finite ‖ΔW‖_F (no extra pass).
        """
        cfg = self.config
        m, n = chunk[0].shape
        b = len(chunk)
        states = [self._state(s) for s in chunk]
        transposed = chunk[0].transposed
        sketch = self._sketch_dtype(device, full, m * n)
        layout = (n, m) if transposed else (m, n)
        wanted = [((b, *layout), sketch)]
        if sketch != torch.float32:
            wanted.append((layout, torch.float32))
        buf, *rest = self._workspace.take(device, *wanted)
        scratch = rest[0] if rest else None
        fro = torch.empty(b, device=device) if scratch is not None else None  # else one call below
        spars = torch.empty(b, device=device)
        base_fro = torch.zeros(b, device=device)
        for i, spec in enumerate(chunk):
            W = spec.parameter().detach()
            B0 = prefetch.get(spec) if prefetch is not None else self.store.get(spec, device)
            _check_shapes(spec, spec.canonical(W), spec.canonical(B0))
            d = buf[i] if scratch is None else scratch
            if W.dtype == B0.dtype == torch.float32 and W.device == device:
                torch.sub(W, B0, out=d)  # one fused pass
            else:  # upcast first: a low-precision difference would round ΔW
                d.copy_(W)
                d.sub_(B0)
            spars[i] = _sampled_sparsity(d, W, B0, cfg.sparsity_eta)
            if scratch is not None:
                fro[i] = frobenius_sq(d)
                buf[i].copy_(scratch)
            if states[i].base_fro is None:
                base_fro[i] = torch.linalg.vector_norm(B0, dtype=torch.float32)
        if scratch is None:
            fro = frobenius_sq(buf)  # all layers in one call
        finite_list = torch.isfinite(fro).tolist()
        if not all(finite_list):
            bad = ~torch.isfinite(fro)
            buf[bad] = 0.0
            fro[bad] = 0.0
        D = buf.mT if transposed else buf
        U, S, V = randomized_svd(
            D, rank, niter=niter, oversample=self._oversample(init), init=init, generator=gen, sketch_dtype=sketch
        )
        if any(s.base_u is None for s in states):  # first measurement only: W_0's SVD is cached
            self._base_u(states, self._stack_base(chunk, device, sketch), gen, sketch_dtype=sketch)
        Ut = None
        if cfg.intruders:
            top = min(INTRUDER_TOP, m, n)
            start = _intruder_start(torch.stack([st.base_v.to(device) for st in states]), V, top)
            Ut = sketch_left_vectors([s.canonical(s.parameter().detach()).to(device) for s in chunk], start, top)
        return _Parts(U, S, V, fro, spars, base_fro, finite_list, Ut, full_singular_values(D) if full else None)

    def _stack_base(self, chunk: list[LayerSpec], device: torch.device, dtype: torch.dtype) -> Tensor:
        return torch.stack([c.canonical(self.store.get(c, device)).to(dtype) for c in chunk])

    def _decompose_large(
        self, spec: LayerSpec, device: torch.device, rank: int, init: Tensor | None, niter: int, gen: torch.Generator
    ) -> _Parts:
        """A layer over the memory budget: ΔW is never formed; every pass streams row blocks."""
        cfg = self.config
        m, n = spec.shape
        W = spec.canonical(spec.parameter().detach())
        B0 = spec.canonical(self.store.get(spec, device))
        _check_shapes(spec, W, B0)
        rows = max(1, self._budget // (n * 4 * 4))
        fro = torch.zeros((), dtype=torch.float64, device=device)
        base_sq = torch.zeros((), dtype=torch.float64, device=device)
        small = torch.zeros((), dtype=torch.float64, device=device)
        finite = torch.ones((), dtype=torch.bool, device=device)
        for r0 in range(0, m, rows):
            w, b0 = W[r0 : r0 + rows].to(device), B0[r0 : r0 + rows]
            d = w.float() - b0.float()
            fro += frobenius_sq(d).double()
            base_sq += frobenius_sq(b0).double()
            small += sparsity(d, w, b0, eta=cfg.sparsity_eta).double() * d.numel()
            finite &= torch.isfinite(d).all() & torch.isfinite(w).all()
        ok = bool(finite)
        zeros = torch.zeros(1, device=device)
        if not ok:
            return _Parts(
                torch.zeros(1, m, 1, device=device),
                torch.zeros(1, 1, device=device),
                torch.zeros(1, n, 1, device=device),
                zeros,
                zeros,
                zeros,
                [False],
                None,
                None,
            )
        sketch = self._sketch_dtype(device, numel=m * n)
        U, S, V = randomized_svd(
            W,
            rank,
            niter=niter,
            oversample=self._oversample(init),
            base=B0,
            init=init,
            generator=gen,
            block_rows=rows,
            sketch_dtype=sketch,
        )
        self._base_u([self._state(spec)], B0, gen, block_rows=rows, sketch_dtype=sketch)
        Ut = None
        if cfg.intruders:  # one product with W in place (on its own device): no block copies needed
            top = min(INTRUDER_TOP, m, n)
            start = _intruder_start(self._state(spec).base_v.to(device), V, top)
            Ut = sketch_left_vectors([W], start[None], top).to(device)
        return _Parts(
            U[None],
            S[None],
            V[None],
            fro.float()[None],
            (small / (m * n)).float()[None],
            base_sq.sqrt().float()[None],
            [True],
            Ut,
            None,
        )

    def _dense_values(
        self, chunk: list[LayerSpec], states: list[_LayerState], parts: _Parts, full: bool, report: StepReport
    ) -> dict[str, dict[str, float]]:
        """Per-layer metrics of a decomposed chunk (one host sync for all of them)."""
        cfg = self.config
        m, n = chunk[0].shape
        U, S, V, fro = parts.U, parts.S, parts.V, parts.fro
        k = S.shape[-1]
        device = S.device
        if parts.spectrum is not None:
            erank = effective_rank(parts.spectrum)
            fit = fit_power_law(parts.spectrum**2, min_tail=cfg.alpha_min_tail, max_ks=cfg.alpha_max_ks)
        else:
            top_sq = (S.double() ** 2).sum(-1).float()
            erank = effective_rank(S, residual_sq=(fro - top_sq).clamp_min(0), total=min(m, n))
            fit = fit_power_law(S**2, min_tail=cfg.alpha_min_tail, max_ks=cfg.alpha_max_ks, total=min(m, n))
        metric_t: dict[str, Tensor] = {
            "sigma1": S[:, 0],
            "rho1": energy_share(S, fro, 1),
            "topk_energy": energy_share(S, fro),
            "stable_rank": stable_rank(S, fro),
            "erank": erank,
            "gap": spectral_gap(S),
            "alpha": fit.alpha,
            "alpha_ks": fit.ks,
            "alpha_xmin": fit.xmin,
            "alpha_tail": fit.n_tail.float(),
            "alpha_reliable": fit.reliable.float(),
            "alpha_hat": fit.alpha * torch.log10(S[:, 0].clamp_min(1e-30) ** 2),
            "update_norm": fro.sqrt(),
            "sparsity": parts.sparsity,
            "_base_fro": parts.base_fro,
            "_covered": fit.covered.float(),
        }
        a = min(cfg.align_k, k)
        have_prev = [s.prev_u is not None for s in states]
        if any(have_prev):  # layers without a previous U get a placeholder, dropped below
            ap = min([a] + [s.prev_u.shape[-1] for s in states if s.prev_u is not None])
            prev_u = torch.stack(
                [U[j, :, :ap] if s.prev_u is None else s.prev_u[:, :ap].to(device) for j, s in enumerate(states)]
            )
            metric_t["align_prev"] = abs_cosine(U[:, :, 0], prev_u[:, :, 0])
            metric_t["overlap_prev"] = subspace_overlap(U[:, :, :ap], prev_u)
        base_u = torch.stack([s.base_u.to(device) for s in states])
        metric_t["align_base"] = base_alignment(base_u, U[:, :, 0])
        if parts.Ut is not None:
            top = parts.Ut.shape[-1]
            metric_t["intruders"] = intruder_count(
                parts.Ut, base_u, threshold=cfg.intruder_threshold, top=top, truncated=base_u.shape[-1] < min(m, n)
            ).float()
        keys = list(metric_t)  # every metric is (b,): one stacked copy to the host, one sync
        out = dict(zip(keys, torch.stack([metric_t[key].float() for key in keys]).cpu().tolist()))
        S_cpu = S.float().cpu()
        values: dict[str, dict[str, float]] = {}
        for i, (spec, st) in enumerate(zip(chunk, states)):
            if st.base_fro is None:
                st.base_fro = out["_base_fro"][i]
            zero = out["update_norm"][i] == 0.0
            ok = parts.finite[i]
            st.prev_u = None if zero or not ok else U[i, :, :a].clone()
            st.prev_v = None if zero or not ok else V[i].clone()
            if not ok:
                values[spec.name] = {"nonfinite": 1.0}
                report.skipped[spec.name] = "non-finite weights (NaN/Inf)"
                continue
            vals = {key: column[i] for key, column in out.items() if not key.startswith("_")}
            if not have_prev[i]:
                vals.pop("align_prev", None)
                vals.pop("overlap_prev", None)
            vals["update_rel"] = vals["update_norm"] / st.base_fro if st.base_fro else 0.0
            if zero:
                vals.pop("align_base", None)  # the top direction of a zero update is arbitrary
            vals["erank_exact"] = 1.0 if full else 0.0
            vals["rank"] = float(k)
            vals["nonfinite"] = 0.0
            values[spec.name] = vals
            report.spectra[spec.name] = S_cpu[i]
            covered = out["_covered"][i] == 1.0
            if (
                cfg.adaptive_rank
                and not full
                and not zero
                and _tail_may_continue(covered, vals["alpha_tail"], vals["alpha_ks"], cfg.alpha_max_ks)
            ):
                st.rank = max(st.rank, min(2 * st.rank, cfg.max_rank, min(m, n) // 4))
        return values

    def _measure_lora(self, spec: LayerSpec, report: StepReport) -> dict[str, dict[str, float]]:
        cfg = self.config
        st = self._state(spec)
        factors = spec.lora_factors()
        if factors is None:
            report.skipped[spec.name] = "no active LoRA adapter"
            return {}
        B, A = factors
        if not (torch.isfinite(B).all() and torch.isfinite(A).all()):
            if cfg.strict:
                raise NonFiniteError(f"non-finite LoRA factors in {spec.name!r}")
            report.skipped[spec.name] = "non-finite weights (NaN/Inf)"
            return {spec.name: {"nonfinite": 1.0}}
        U, S, V = lora_svd(B, A, 1.0)
        fro = (S.double() ** 2).sum().float()
        W0 = spec.canonical(spec.parameter().detach()).float()
        if st.base_fro is None or st.base_u is None:
            st.base_fro = float(W0.norm())
            self._base_u([st], W0, self._generator(W0.device, 0))
        fit = fit_power_law(S**2, min_tail=cfg.alpha_min_tail, max_ks=cfg.alpha_max_ks)
        vals = {
            "sigma1": float(S[0]),
            "rho1": float(energy_share(S, fro, 1)),
            "topk_energy": 1.0 if fro > 0 else 0.0,
            "stable_rank": float(stable_rank(S, fro)),
            "erank": float(effective_rank(S)),
            "erank_exact": 1.0,
            "gap": float(spectral_gap(S)),
            "alpha": float(fit.alpha),
            "alpha_ks": float(fit.ks),
            "alpha_xmin": float(fit.xmin),
            "alpha_tail": float(fit.n_tail),
            "alpha_reliable": float(fit.reliable),
            "alpha_hat": float(fit.alpha * torch.log10(S[0].clamp_min(1e-30) ** 2)),
            "update_norm": math.sqrt(float(fro)),
            "rank": float(S.shape[0]),
            "nonfinite": 0.0,
        }
        vals["update_rel"] = vals["update_norm"] / st.base_fro if st.base_fro else 0.0
        a = min(cfg.align_k, S.shape[0])
        if st.prev_u is not None and vals["update_norm"] > 0:
            vals["align_prev"] = float(abs_cosine(U[:, 0], st.prev_u[:, 0].to(U.device)))
            vals["overlap_prev"] = float(subspace_overlap(U[:, :a], st.prev_u[:, :a].to(U.device)))
        base_u = st.base_u.to(U.device)  # restored state lives on the CPU
        if vals["update_norm"] > 0:
            vals["align_base"] = float(base_alignment(base_u, U[:, 0]))
        if cfg.intruders:
            Wt = W0 + B @ A
            top = min(INTRUDER_TOP, *spec.shape)
            Ut = sketch_left_vectors([Wt], _intruder_start(st.base_v.to(Wt.device), V, top)[None], top)[0]
            vals["intruders"] = float(
                intruder_count(
                    Ut, base_u, threshold=cfg.intruder_threshold, top=top, truncated=base_u.shape[-1] < min(*spec.shape)
                )
            )
        st.prev_u = U[:, :a].clone() if vals["update_norm"] > 0 else None
        report.spectra[spec.name] = S.float().cpu()
        return {spec.name: vals}

    def _aggregate(self, report: StepReport, values: dict[str, dict[str, float]]) -> None:
        types = {s.name: s.layer_type for s in self.specs}
        measured = {k: v for k, v in values.items() if v.get("nonfinite", 0.0) == 0.0}
        for metric in AGGREGATED:
            xs = [
                v[metric]
                for name, v in measured.items()
                if metric in v
                and math.isfinite(v[metric])
                and (metric != "alpha" or v.get("alpha_reliable", 0.0) == 1.0)
            ]
            if not xs:
                continue
            report.metrics[model_key(f"{metric}_mean")] = statistics.fmean(xs)
            report.metrics[model_key(f"{metric}_median")] = statistics.median(xs)
            report.metrics[model_key(f"{metric}_min")] = min(xs)
            report.metrics[model_key(f"{metric}_max")] = max(xs)
        for metric in BY_TYPE:
            by_type: dict[str, list[float]] = defaultdict(list)
            for name, v in measured.items():
                if metric in v and math.isfinite(v[metric]) and (metric != "alpha" or v.get("alpha_reliable") == 1.0):
                    by_type[types[name]].append(v[metric])
            for typ, xs in by_type.items():
                report.metrics[model_key(f"{metric}_mean/{typ}")] = statistics.fmean(xs)
        total_sq = sum(v["update_norm"] ** 2 for v in measured.values() if "update_norm" in v)
        report.metrics[model_key("update_norm_total")] = math.sqrt(total_sq)
        if measured:
            n_alpha = sum(1 for v in measured.values() if "alpha_reliable" in v)
            report.metrics[model_key("alpha_reliable_frac")] = sum(
                v.get("alpha_reliable", 0.0) for v in measured.values()
            ) / max(1, n_alpha)
        report.metrics[model_key("layers")] = float(len(measured))
        report.metrics[model_key("skipped")] = float(len(report.skipped))
        report.metrics[model_key("nonfinite")] = float(sum(v.get("nonfinite", 0.0) for v in values.values()))

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
        self._layers = {name: _LayerState(**st) for name, st in state["layers"].items()}
        base = state.get("base") or {}
        if base.get("kind") == "disk" and self.store is None:
            self.set_base(DiskStore(base["path"]))
