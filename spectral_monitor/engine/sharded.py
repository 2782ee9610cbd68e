"""The dense layers of a data-parallel or sharded run, measured by every rank together.

Under ``torch.distributed`` (DDP, FSDP1, FSDP2/DTensor, DeepSpeed ZeRO-3) each rank keeps only its
share of the base (:class:`~spectral_monitor.distributed.ShardedBase`: its shards, or the whole
matrices of the replicated layers it owns) and every rank runs the same collective
:func:`~spectral_monitor.distributed.distributed_update_svd`, which splits the work (owners by
cost, or a sharded randomized SVD of large sharded layers) and leaves every layer's top-k SVD and
‖ΔW‖_F on every rank. The per-layer metrics then come from the same pure function as on one
process, so every rank builds the same report and takes the same decisions.

What the sharded path does not compute (they need W_t or W_0 in full on one rank): ``sparsity``,
``align_base``, ``intruders`` and full-spectrum measurements; the sketch rank stays at ``rank``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from spectral_monitor.config import MonitorConfig
from spectral_monitor.distributed import DistLayer, ShardedBase, distributed_update_svd, local_piece
from spectral_monitor.engine.metrics import Decomposition, LayerResult, layer_values
from spectral_monitor.engine.state import LayerState, remember, sketch_iterations
from spectral_monitor.layers import LayerSpec

__all__ = ["ShardedMeasurement", "world_group"]


def world_group() -> dist.ProcessGroup | None:
    """The default process group when this process is one of several ranks, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


class ShardedMeasurement:
    """The collective measurement of ``specs`` (dense layers, the same list on every rank)."""

    def __init__(self, specs: Sequence[LayerSpec], config: MonitorConfig, group: dist.ProcessGroup | None) -> None:
        self.specs = list(specs)
        self.layers = [DistLayer.from_spec(s) for s in self.specs]
        self.config = config
        self.group = group

    def snapshot(self) -> ShardedBase:
        """This rank's share of W_0 (no collective)."""
        return ShardedBase.snapshot(self.layers, group=self.group)

    def base_norms(self, base: ShardedBase, device: torch.device) -> list[float]:
        """‖W_0‖_F of every layer (collective: one all-reduce of the pieces' squared norms)."""
        pieces = base.pieces
        sq = torch.tensor(
            [
                float(pieces[layer.name].double().square().sum()) if layer.name in pieces else 0.0
                for layer in self.layers
            ],
            dtype=torch.float64,
            device=device,
        )
        dist.all_reduce(sq, group=self.group)
        return sq.sqrt().tolist()

    def measure(
        self,
        step: int,
        base: ShardedBase,
        states: Sequence[LayerState],
        sketch_dtype: torch.dtype | None,
    ) -> list[tuple[LayerResult | None, torch.Tensor | None, str | None]]:
        """Every layer's ``(result, top-k σ on the CPU, why it failed)`` (collective)."""
        cfg = self.config
        device = local_piece(self.layers[0].param).device
        if any(s.base_fro is None for s in states):
            for state, norm in zip(states, self.base_norms(base, device)):
                state.base_fro = norm
        init = {layer.name: s.prev_v for layer, s in zip(self.layers, states) if s.prev_v is not None}
        warm = len(init) == len(self.layers)  # one setting for all: the ranks' plans must agree
        niter, oversample = sketch_iterations(cfg, torch.empty(0) if warm else None)
        results = distributed_update_svd(
            self.layers,
            base,
            cfg.rank,
            niter=niter,
            oversample=oversample,
            seed=cfg.seed * 1_000_003 + step,
            init=init if warm else None,
            sketch_dtype=sketch_dtype,
            group=self.group,
            device=device,
        )
        out = []
        for spec, state, res in zip(self.specs, states, results):
            if res.failed:
                out.append((None, None, res.error))
                continue
            finite = math.isfinite(res.fro)
            fro = torch.tensor([res.fro if finite else 0.0], dtype=torch.float32, device=res.S.device)
            dec = Decomposition(res.U[None].float(), res.S[None].float(), res.V[None].float(), fro, None, None, None)
            [value] = layer_values(
                dec,
                finite=[finite],
                base_u=None,
                base_fro=[state.base_fro],
                prev_u=[state.prev_u],
                shape=spec.shape,
                config=cfg,
            )
            remember([state], dec, [value], spec.shape, cfg, warm=True, adapt=False)
            out.append((value, res.S.float().cpu() if finite else None, None))
        return out
