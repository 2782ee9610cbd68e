"""Batching: same-shape layers together within the budget, over-budget layers streamed, LoRA alone."""

from __future__ import annotations

import torch
from torch import nn

from spectral_monitor.config import MonitorConfig
from spectral_monitor.engine.plan import SMALL_LAYER, Planner
from spectral_monitor.layers import select_layers


def _model() -> nn.Module:
    return nn.ModuleDict(
        {
            "a": nn.Linear(32, 64, bias=False),
            "b": nn.Linear(16, 16, bias=False),
            "c": nn.Linear(32, 64, bias=False),
            "d": nn.Linear(32, 64, bias=False),
        }
    )


def test_same_shapes_share_a_batch_in_first_appearance_order():
    specs = select_layers(_model(), "re:.")
    planner = Planner(MonitorConfig(), capability=lambda device: False)
    batches = planner.batches(specs, lambda s: 8, full=False)
    assert [[s.name for s in b.specs] for b in batches] == [["a", "c", "d"], ["b"]]
    assert all(b.kind == "dense" and b.sketch_dtype == torch.float32 and b.rank == 8 for b in batches)


def test_the_budget_splits_batches_and_streams_a_layer_over_it():
    specs = select_layers(_model(), "re:.")
    per_layer = 64 * 32 * 4
    planner = Planner(MonitorConfig(), capability=lambda device: False)
    assert planner.batch_size(64, 32, torch.float32) == 2**30 // per_layer
    tight = Planner(MonitorConfig(memory_budget_mb=1), capability=lambda device: False)
    assert tight.batch_size(1024, 1024, torch.float32) == 0
    assert tight.batch_size(512, 256, torch.float32) == 2
    big = nn.ModuleDict({"x": nn.Linear(1024, 1024, bias=False)})
    [batch] = tight.batches(select_layers(big, "re:."), lambda s: 8, full=False)
    assert batch.kind == "streamed"
    assert len(specs) == 4


def test_ranks_split_large_layers_but_not_small_ones():
    small = nn.ModuleDict({k: nn.Linear(16, 16, bias=False) for k in "ab"})
    specs = select_layers(small, "re:.")
    planner = Planner(MonitorConfig(), capability=lambda device: False)
    ranks = {"a": 8, "b": 16}
    [batch] = planner.batches(specs, lambda s: ranks[s.name], full=False)
    assert batch.rank == 16  # the larger rank serves both
    assert SMALL_LAYER >= 16 * 16


def test_sketch_dtype_policy():
    cpu = torch.device("cpu")
    fast = Planner(MonitorConfig(), capability=lambda device: True)
    assert fast.sketch_dtype(cpu, numel=SMALL_LAYER + 1) == torch.bfloat16
    assert fast.sketch_dtype(cpu, numel=SMALL_LAYER) == torch.float32
    assert fast.sketch_dtype(cpu, full=True, numel=SMALL_LAYER + 1) == torch.float32
    slow = Planner(MonitorConfig(), capability=lambda device: False)
    assert slow.sketch_dtype(cpu, numel=SMALL_LAYER + 1) == torch.float32
    forced = Planner(MonitorConfig(sketch_dtype="bfloat16"), capability=lambda device: False)
    assert forced.sketch_dtype(cpu) == torch.bfloat16
