"""Process bodies of tests/test_distributed.py: each runs on every rank of a gloo group and saves
what the test checks (the distributed results and the oracle's full weights) to ``out/rank{r}.pt``."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from spectral_monitor import distributed as smd

TIMEOUT_S = 20  # process-group timeout: a rank that skipped a collective fails the test instead of hanging it


class Conv1D(nn.Module):
    """HF GPT-2 ``Conv1D`` stand-in: weight stored ``(in, out)``; ``y = x W + b``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx**0.5)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


def model(seed: int = 0) -> nn.Sequential:
    """Layers with uneven (33 rows) and empty (1 row: one rank holds nothing) shards and a
    transposed Conv1D (FSDP2 shards its stored dim 0 = the canonical columns)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(48, 33),
        nn.Tanh(),
        Conv1D(40, 33),
        nn.Tanh(),
        nn.Linear(40, 64),
        nn.Tanh(),
        nn.Linear(64, 1),
    )


def layers_of(net: nn.Module) -> list[smd.DistLayer]:
    out = []
    for name, mod in net.named_modules():
        if isinstance(mod, (nn.Linear, Conv1D)):
            p = mod.weight
            out.append(smd.DistLayer(_short(name), p, smd.global_shape(p, mod), isinstance(mod, Conv1D)))
    return out


def train(net: nn.Module, steps: int, seed: int) -> None:
    """SGD on random regression data: a low-rank (<= 4 * steps) ΔW per layer."""
    gen = torch.Generator().manual_seed(seed + dist.get_rank())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(steps):
        x = torch.randn(4, 48, generator=gen)
        y = torch.randn(4, 1, generator=gen)
        loss = (net(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def summary(results: list[smd.LayerResult]) -> dict:
    return {
        r.name: {
            "U": r.U,
            "S": r.S,
            "V": r.V,
            "fro": r.fro,
            "route": r.route,
            "owner": r.owner,
            "error": r.error,
        }
        for r in results
    }


def run(rank: int, world: int, scenario: str, out: str) -> None:
    """Entry point for ``torch.multiprocessing.start_processes``."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out}/store",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=TIMEOUT_S),
    )
    try:
        data = globals()[f"scenario_{scenario}"]()
        torch.save(data, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _fsdp2() -> tuple[nn.Module, list[smd.DistLayer]]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    net = model()
    for mod in net:
        if isinstance(mod, (nn.Linear, Conv1D)):
            fully_shard(mod, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net, layers_of(net)


def _plant(layer: smd.DistLayer, spikes: list[float], noise: float) -> None:
    """W += U diag(spikes) Vᵀ + noise · G / sqrt(n) (stored orientation; U, V orthonormal, G Gaussian),
    the same update on every rank. G's top singular value is about noise · (1 + sqrt(m / n))."""
    from torch.distributed.tensor import distribute_tensor

    gen = torch.Generator().manual_seed(7 + len(layer.name))
    m, n = layer.shape
    k = len(spikes)
    U = torch.linalg.qr(torch.randn(m, k, generator=gen)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=gen)).Q
    full = (U * torch.tensor(spikes)) @ V.mT + noise * torch.randn(m, n, generator=gen) / n**0.5
    p = layer.param
    with torch.no_grad():
        p.add_(distribute_tensor(full, p.device_mesh, p.placements))


def scenario_fsdp2() -> dict:
    """FSDP2: base snapshot, SGD steps, a planted rank-1 update on one layer; both routes."""
    net, layers = _fsdp2()
    base = smd.ShardedBase.snapshot(layers)
    w0 = {layer.name: layer.param.full_tensor().detach().clone() for layer in layers}
    train(net, 3, seed=1)
    planted = layers[2]  # Linear(40, 64): a rank-1 spike far above its SGD update, rho1 must read > 0.99
    _plant(planted, [5.0], 0.0)
    for layer in layers[:2]:  # spikes 3x above a full-rank noise floor: the top 4 need power iterations
        _plant(layer, [10.0, 8.0, 7.0, 6.0], 1.0)
    wt = {layer.name: layer.param.full_tensor().detach().clone() for layer in layers}
    kw = dict(niter=2, oversample=10, seed=3)
    sharded = smd.distributed_update_svd(layers, base, 8, gather_max_numel=0, **kw)
    gathered = smd.distributed_update_svd(layers, base, 8, gather_max_numel=1 << 30, **kw)
    # warm start from the previous V, no power iteration: accurate only if V reaches every rank's rows right
    prev = {r.name: r.V for r in sharded}
    warm = smd.distributed_update_svd(layers, base, 8, gather_max_numel=0, niter=0, oversample=10, seed=4, init=prev)
    pieces = {layer.name: tuple(base.local(layer, torch.device("cpu")).shape) for layer in layers}
    return {
        "kinds": {layer.name: smd.shard_kind(layer.param) for layer in layers},
        "sharded": summary(sharded),
        "gathered": summary(gathered),
        "warm": summary(warm),
        "w0": w0,
        "wt": wt,
        "planted": planted.name,
        "base_pieces": pieces,
        "base_nbytes": base.nbytes,
    }


def scenario_fsdp1() -> dict:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    net = FSDP(
        model(),
        auto_wrap_policy=ModuleWrapPolicy({nn.Linear, Conv1D}),
        device_id=torch.device("cpu"),
        use_orig_params=True,
    )
    layers = layers_of(net)

    def full() -> dict:
        with FSDP.summon_full_params(net, writeback=False):
            return {_short(n.removesuffix(".weight")): p.detach().clone() for n, p in _weights(net)}

    base = smd.ShardedBase.snapshot(layers)
    w0 = full()
    train(net, 3, seed=1)
    wt = full()
    results = smd.distributed_update_svd(layers, base, 8, niter=2, oversample=10, seed=3)
    return {
        "kinds": {layer.name: smd.shard_kind(layer.param) for layer in layers},
        "views": {layer.name: tuple(layer.param.shape) for layer in layers},
        "results": summary(results),
        "w0": w0,
        "wt": wt,
        "names": [layer.name for layer in layers],
    }


def _weights(net: nn.Module):
    return [(n, p) for n, p in net.named_parameters() if n.endswith("weight")]


def _short(name: str) -> str:
    return ".".join(p for p in name.split(".") if p not in ("_fsdp_wrapped_module", "module"))


def scenario_ddp() -> dict:
    net = nn.parallel.DistributedDataParallel(model())
    layers = layers_of(net)
    base = smd.ShardedBase.snapshot(layers)
    w0 = {layer.name: layer.param.detach().clone() for layer in layers}
    train(net, 3, seed=1)
    wt = {layer.name: layer.param.detach().clone() for layer in layers}
    results = smd.distributed_update_svd(layers, base, 8, niter=2, oversample=10, seed=3)
    own = smd.distributed_update_svd(layers, base, 8, niter=2, oversample=10, seed=3, share_factors=False)
    return {
        "kinds": {layer.name: smd.shard_kind(layer.param) for layer in layers},
        "results": summary(results),
        "own": {r.name: None if r.S is None else r.S for r in own},
        "w0": w0,
        "wt": wt,
        "base_names": sorted(base.pieces),
        "owners": base.owners,
    }


def scenario_failure() -> dict:
    """Rank 1 fails inside its share: a wrong-shape base piece of a sharded layer, and every
    owner-side SVD raising. Everyone must finish, with the same layers marked failed."""
    import spectral_monitor.distributed as mod

    net, layers = _fsdp2()
    base = smd.ShardedBase.snapshot(layers)
    w0 = {layer.name: layer.param.full_tensor().detach().clone() for layer in layers}
    train(net, 2, seed=1)
    wt = {layer.name: layer.param.full_tensor().detach().clone() for layer in layers}
    if dist.get_rank() == 1:
        base._tensors[layers[2].name] = torch.zeros(3, 3)  # sharded route below

        def broken(*args, **kwargs):
            raise RuntimeError("injected failure")

        mod.randomized_svd = broken
    # layers[2] (40x64 = 2560 elements) is sharded, the smaller ones are gathered to owners
    results = smd.distributed_update_svd(layers, base, 4, niter=1, oversample=4, seed=3, gather_max_numel=2000)
    after = smd.distributed_update_svd(layers[:1], smd.ShardedBase.snapshot(layers[:1]), 4)  # still in step
    # a NaN in rank 0's rows: the layer reads non-finite on every rank; the plain function raises on both
    with torch.no_grad():
        if dist.get_rank() == 0:
            layers[0].param.to_local()[0, 0] = float("nan")
    nan = smd.distributed_update_svd(layers[:1], base, 4, gather_max_numel=0)
    try:
        smd.sharded_randomized_svd(layers[0].param.to_local(), 4, shape=layers[0].shape)
        nan_error = None
    except smd.DistributedError as exc:
        nan_error = str(exc)
    return {
        "results": summary(results),
        "after": summary(after),
        "nan": summary(nan),
        "nan_error": nan_error,
        "w0": w0,
        "wt": wt,
    }


def scenario_svd() -> dict:
    """sharded_randomized_svd on plain tensors split by hand: rows / columns, uneven and empty
    blocks, float64, a zero and an exactly rank-2 matrix (singular Gram), bf16 products, batches."""
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(11)
    s = 0.7 ** torch.arange(20, dtype=torch.float64)
    U0 = torch.linalg.qr(torch.randn(70, 20, generator=gen, dtype=torch.float64)).Q
    V0 = torch.linalg.qr(torch.randn(50, 20, generator=gen, dtype=torch.float64)).Q
    A = (U0 * s) @ V0.mT
    B = A + 0.1 * torch.randn(70, 50, generator=gen, dtype=torch.float64)
    low = torch.randn(70, 2, generator=gen, dtype=torch.float64) @ torch.randn(
        2, 50, generator=gen, dtype=torch.float64
    )

    def rows(M: torch.Tensor, cuts: list[int]) -> torch.Tensor:
        return M[..., cuts[rank] : cuts[rank + 1], :]

    def cols(M: torch.Tensor, cuts: list[int]) -> torch.Tensor:
        return M[..., cuts[rank] : cuts[rank + 1]]

    def svd(local, shape, dim=0, k=6, **kw):
        g = torch.Generator().manual_seed(5)
        U, S, V = smd.sharded_randomized_svd(local, k, shape=shape, dim=dim, generator=g, **kw)
        return {"U": U, "S": S, "V": V}

    # float32, singular values 1 .. 1e-7: the sketch's condition number is ~1e6, where one CholeskyQR
    # pass leaves Q orthonormal to only ~1e-4
    ill = ((U0 * torch.logspace(0, -7, 20, dtype=torch.float64)) @ V0.mT).float()
    even, uneven, empty = [0, 35, 70], [0, 50, 70], [0, 0, 70]
    out = {
        "rows_even": svd(rows(A, even), (70, 50)),
        "rows_uneven_base": svd(rows(A + B, uneven), (70, 50), base=rows(B, uneven)),
        "rows_empty": svd(rows(A, empty), (70, 50)),
        "cols_uneven": svd(cols(A, [0, 31, 50]), (70, 50), dim=1),
        "cols_warm": svd(cols(A, [0, 31, 50]), (70, 50), dim=1, init=V0[:, :6].float()),
        "zero": svd(rows(torch.zeros(70, 50), even), (70, 50)),
        "rank2": svd(rows(low, uneven), (70, 50)),
        "bf16": svd(rows(A.float(), uneven), (70, 50), sketch_dtype=torch.bfloat16),
        "batch": svd(rows(torch.stack([A, low]), uneven), (70, 50)),
        "local_U": svd(rows(A, uneven), (70, 50), gather=False),
        "ill": svd(rows(ill, uneven), (70, 50), k=16, niter=0, oversample=0),  # U = the whole basis
    }
    try:  # blocks that do not tile the matrix: every rank must raise, none may hang
        svd(rows(A, even)[:-1], (70, 50))
        out["tile_error"] = None
    except smd.DistributedError as exc:
        out["tile_error"] = str(exc)
    out["A"], out["B"], out["low"] = A, B, low
    out["mesh2d"] = _two_dim_mesh(B.float(), A.float())
    return out


def _two_dim_mesh(W0: torch.Tensor, D: torch.Tensor) -> dict:
    """A DTensor on a 2-D (1 x world) mesh, placements (Replicate, Shard(0)) as HSDP gives: gathered."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1, dist.get_world_size()))
    p = nn.Parameter(distribute_tensor(W0, mesh, [Replicate(), Shard(0)]))
    layer = smd.DistLayer("w", p, smd.global_shape(p))
    base = smd.ShardedBase.snapshot([layer])
    with torch.no_grad():
        p.add_(distribute_tensor(D, mesh, [Replicate(), Shard(0)]))
    return summary(smd.distributed_update_svd([layer], base, 6, gather_max_numel=0))["w"]


def _zero3_model() -> tuple[nn.Module, list, dict, Callable[[], dict]]:
    """The test model partitioned by DeepSpeed ZeRO-3 on this process group: ``(net, layers, config,
    full)``, where ``full()`` gathers every layer's whole weight."""
    import deepspeed

    rank = str(dist.get_rank())
    os.environ.update(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=str(dist.get_world_size()))
    deepspeed.init_distributed(dist_backend="gloo")  # adopts the process group already there
    cfg = {
        "train_batch_size": 4 * dist.get_world_size(),
        "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,
        "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
    }
    with deepspeed.zero.Init(config_dict_or_path=cfg):
        net = model()
    layers = layers_of(net)

    def full() -> dict:
        with deepspeed.zero.GatheredParameters([layer.param for layer in layers]):
            return {layer.name: layer.param.detach().clone() for layer in layers}

    return net, layers, cfg, full


def scenario_zero3() -> dict:
    import deepspeed

    net, layers, cfg, full = _zero3_model()
    kinds = {layer.name: smd.shard_kind(layer.param) for layer in layers}
    base = smd.ShardedBase.snapshot(layers)
    w0 = full()
    engine, *_ = deepspeed.initialize(model=net, config=cfg, model_parameters=net.parameters())
    gen = torch.Generator().manual_seed(1 + dist.get_rank())
    for _ in range(3):
        loss = (engine(torch.randn(4, 48, generator=gen)) - torch.randn(4, 1, generator=gen)).square().mean()
        engine.backward(loss)
        engine.step()
    wt = full()
    results = smd.distributed_update_svd(layers, base, 8, niter=2, oversample=10, seed=3)
    return {"kinds": kinds, "results": summary(results), "w0": w0, "wt": wt}


# ------------------------------------------------------------------------ the monitor itself
def _monitored(net: nn.Module, full: callable) -> dict:
    """``MonitorRun`` on ``net`` (every rank): base at start, 3 SGD steps measured at 1 and 3, then
    a planted rank-1 update on ``2`` measured at step 4. Returns the reports and, for the
    single-process oracle, every layer's full weights at each measurement."""
    from spectral_monitor import MemorySink, MonitorRun

    sink = MemorySink()  # written on rank 0 only; every rank's own reports come with its decisions
    run = MonitorRun(net, every_n_steps=1, rank=32, niter=4, rules=[], sinks=[sink])
    run.start()
    weights = {0: full()}
    reports = []
    gen = torch.Generator().manual_seed(1 + dist.get_rank())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in (1, 2, 3):
        loss = (net(torch.randn(4, 48, generator=gen)) - torch.randn(4, 1, generator=gen)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        reports.append(run.on_optimizer_step(step).report)
        weights[step] = full()
    return {"run": run, "sink": sink, "weights": weights, "reports": reports}


def _plant_full(net: nn.Module, name: str, scale: float, full: callable) -> None:
    """Add ``scale`` · u vᵀ (canonical orientation) to layer ``name`` the way its parameter needs."""
    W = full()[name]
    gen = torch.Generator().manual_seed(21)
    u, v = torch.randn(W.shape[0], generator=gen), torch.randn(W.shape[1], generator=gen)
    add = scale * torch.outer(u / u.norm(), v / v.norm())
    p = dict(net.named_modules())[_find(net, name)].weight
    if smd.shard_kind(p) == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(net, writeback=True), torch.no_grad():
            dict(net.named_modules())[_find(net, name)].weight.add_(add)
        return
    with torch.no_grad():
        if smd.shard_kind(p) == "dtensor":
            from torch.distributed.tensor import distribute_tensor

            p.add_(distribute_tensor(add.to(p.dtype), p.device_mesh, p.placements))
        else:
            p.add_(add.to(p.dtype))


def _find(net: nn.Module, short: str) -> str:
    return next(n for n, _ in net.named_modules() if _short(n) == short)


def _finish_monitored(state: dict, net: nn.Module, full: callable) -> dict:
    _plant_full(net, "4", 3.0, full)
    state["reports"].append(state["run"].on_optimizer_step(4).report)
    state["weights"][4] = full()
    state["run"].finish()
    reports = state["reports"]
    return {
        "steps": [r.step for r in reports],
        "layers": [r.layers for r in reports],
        "skipped": [r.skipped for r in reports],
        "aggregates": [r.aggregates for r in reports],
        "weights": state["weights"],
        "base_bytes": state["run"].monitor.store.nbytes,
        "specs": [s.name for s in state["run"].monitor.specs],
        "sink_steps": [r.step for r in state["sink"].reports],
    }


def scenario_monitor_ddp() -> dict:
    net = nn.parallel.DistributedDataParallel(model())

    def full() -> dict:
        return {_short(n.removesuffix(".weight")): p.detach().clone() for n, p in _weights(net)}

    return _finish_monitored(_monitored(net, full), net, full)


def scenario_monitor_fsdp2() -> dict:
    net, _ = _fsdp2()

    def full() -> dict:
        return {_short(n.removesuffix(".weight")): p.full_tensor().detach().clone() for n, p in _weights(net)}

    return _finish_monitored(_monitored(net, full), net, full)


def scenario_monitor_fsdp1() -> dict:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    net = FSDP(
        model(),
        auto_wrap_policy=ModuleWrapPolicy({nn.Linear, Conv1D}),
        device_id=torch.device("cpu"),
        use_orig_params=True,
    )

    def full() -> dict:
        with FSDP.summon_full_params(net, writeback=False):
            return {_short(n.removesuffix(".weight")): p.detach().clone() for n, p in _weights(net)}

    return _finish_monitored(_monitored(net, full), net, full)


def scenario_monitor_zero3() -> dict:
    """The monitor under DeepSpeed ZeRO-3 (parameters partitioned, shape [0] outside a gather)."""
    import deepspeed

    from spectral_monitor import MonitorRun

    net, _, cfg, full = _zero3_model()
    run = MonitorRun(net, every_n_steps=1, rank=32, niter=4, rules=[])
    run.start()
    weights = {0: full()}
    reports = []
    engine, *_ = deepspeed.initialize(model=net, config=cfg, model_parameters=net.parameters())
    gen = torch.Generator().manual_seed(1 + dist.get_rank())
    for step in (1, 2, 3):
        loss = (engine(torch.randn(4, 48, generator=gen)) - torch.randn(4, 1, generator=gen)).square().mean()
        engine.backward(loss)
        engine.step()
        reports.append(run.on_optimizer_step(step).report)
        weights[step] = full()
    run.finish()
    return {
        "steps": [r.step for r in reports],
        "layers": [r.layers for r in reports],
        "skipped": [r.skipped for r in reports],
        "weights": weights,
        "base_bytes": run.monitor.store.nbytes,
        "specs": [s.name for s in run.monitor.specs],
    }


def scenario_monitor_budget() -> dict:
    """The overhead budget under DDP, the ranks' step times made to differ: every rank must still
    measure at the same steps (the schedule is agreed by all-reduce), or the job would hang."""
    import time

    from spectral_monitor import MonitorRun

    net = nn.parallel.DistributedDataParallel(model())
    run = MonitorRun(net, overhead=0.05, max_every=8, rules=[])
    run.start()
    steps = []
    gen = torch.Generator().manual_seed(1 + dist.get_rank())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(1, 41):
        loss = (net(torch.randn(4, 48, generator=gen)) - torch.randn(4, 1, generator=gen)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        time.sleep(0.002 * (1 + 3 * dist.get_rank()))
        if run.on_optimizer_step(step, final=step == 40).measured:
            steps.append(step)
    run.finish()
    return {"steps": steps, "main": run.is_main}
