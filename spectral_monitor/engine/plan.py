"""Which layers are decomposed together, on which device, in which dtype.

A measurement walks :class:`Batch` es: same-shape dense layers stacked into one batched randomized
SVD within the memory budget, a layer larger than the budget alone (its ΔW is never formed:
``streamed``), and each LoRA layer alone (ΔW from its factors).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from spectral_monitor.config import MonitorConfig
from spectral_monitor.layers import LayerSpec

__all__ = ["SMALL_LAYER", "Batch", "Planner", "fast_bf16"]

#: layers of at most this many weights: float32 sketches (bf16 does not repay its conversions
#: there) and one batch per shape whatever their sketch ranks (their cost is per-batch overhead)
SMALL_LAYER = 1 << 20


def fast_bf16(device: torch.device) -> bool:
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


@dataclass(frozen=True)
class Batch:
    """Layers decomposed together. ``kind``: ``dense`` (b same-shape layers, ΔW formed in a
    buffer of ``sketch_dtype``), ``streamed`` (one layer over the memory budget) or ``lora``
    (one adapter layer); ``rank``: the sketch rank (the largest of the layers')."""

    kind: str
    specs: tuple[LayerSpec, ...]
    device: torch.device
    sketch_dtype: torch.dtype
    rank: int

    @property
    def shape(self) -> tuple[int, int]:
        """Canonical ``(m, n)`` of every layer of the batch."""
        return self.specs[0].shape


class Planner:
    """Groups the monitored layers into batches and picks each batch's sketch dtype.

    ``capability`` answers "are bf16 matmuls fast on this device?" (default :func:`fast_bf16`),
    asked once per device.
    """

    def __init__(self, config: MonitorConfig, capability: Callable[[torch.device], bool] | None = None) -> None:
        self.config = config
        self._capability = capability
        self._fast: dict[torch.device, bool] = {}

    @property
    def budget(self) -> int:
        """Working-set bound of one batch in bytes."""
        return self.config.memory_budget_mb * 2**20

    def device(self, spec: LayerSpec) -> torch.device:
        """Compute device of a layer: the configured one, else its weight's own."""
        return torch.device(self.config.device) if self.config.device else spec.parameter().device

    def sketch_dtype(self, device: torch.device, full: bool = False, numel: int | None = None) -> torch.dtype:
        """dtype of the ΔW buffers and their products: float32 on full-spectrum measurements and,
        with ``auto``, for layers of at most :data:`SMALL_LAYER` weights (``numel``)."""
        choice = self.config.sketch_dtype
        if full or choice == "float32" or (choice == "auto" and numel is not None and numel <= SMALL_LAYER):
            return torch.float32
        if choice == "bfloat16":
            return torch.bfloat16
        if device not in self._fast:
            self._fast[device] = (self._capability or fast_bf16)(device)
        return torch.bfloat16 if self._fast[device] else torch.float32

    def batch_size(self, m: int, n: int, dtype: torch.dtype) -> int:
        """Layers per batch within the budget (0: one layer is over it). A batch holds each layer's
        ΔW in ``dtype``; a low-precision batch also one float32 m x n scratch to form ΔW in."""
        scratch = m * n * 4 if dtype != torch.float32 else 0
        return max(0, (self.budget - scratch) // (m * n * dtype.itemsize))

    def batches(self, specs: Sequence[LayerSpec], ranks: Callable[[LayerSpec], int], full: bool) -> list[Batch]:
        """The batches of one measurement, in the order of the layers' first appearance.

        ``ranks(spec)``: the layer's current sketch rank. Small layers of one shape share a batch
        whatever their ranks (the largest is used); larger ones are grouped by rank too.
        """
        groups: dict[tuple, list[LayerSpec]] = defaultdict(list)
        for spec in specs:
            if spec.kind == "lora":
                groups[("lora", spec.name)].append(spec)
            else:
                rank = 0 if math.prod(spec.shape) <= SMALL_LAYER else ranks(spec)
                groups[(spec.shape, spec.transposed, self.device(spec), rank)].append(spec)
        out: list[Batch] = []
        for members in groups.values():
            first = members[0]
            device = self.device(first)
            if first.kind == "lora":
                dtype = self.sketch_dtype(device, numel=math.prod(first.shape))  # W_0's basis only
                out.append(Batch("lora", (first,), device, dtype, ranks(first)))
                continue
            m, n = first.shape
            dtype = self.sketch_dtype(device, full, m * n)
            size = self.batch_size(m, n, dtype)
            if size == 0:  # over the budget: the full spectrum is not taken, ΔW is streamed
                streamed = self.sketch_dtype(device, numel=m * n)
                out.extend(Batch("streamed", (s,), device, streamed, ranks(s)) for s in members)
                continue
            for i in range(0, len(members), size):
                chunk = tuple(members[i : i + size])
                out.append(Batch("dense", chunk, device, dtype, max(ranks(s) for s in chunk)))
        return out
