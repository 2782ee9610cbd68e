"""spectral_monitor.distributed on 1 vs 2 gloo ranks (CPU): time per measurement and base memory per rank.

Part 1 — monitor-style work: the block matrices of ``--blocks`` GPT-2-small blocks (``c_attn``
768x2304, ``attn.c_proj`` 768x768, ``c_fc`` 768x3072, ``mlp.c_proj`` 3072x768, stored as HF
``Conv1D`` ``(in, out)``), float32, each with an update ΔW = 4 planted directions over a full-rank
noise floor. One :func:`distributed_update_svd` call (rank 32, oversample 10) is one measurement:
cold (``niter=6``, the engine's cold default) and warm (``init`` = the previous V, ``niter=1``).
Layouts: FSDP2 ``fully_shard`` (every layer sharded on its stored dim 0, i.e. canonical Shard(1);
decomposed in place, or gathered to LPT owners), and DDP-style replicated parameters (LPT owners).
The reference is the plain single-process loop of ``randomized_svd`` over the same ΔW.

Part 2 — the per-layer rule: one FSDP2 layer (``nn.Linear``, canonical Shard(0)) of growing size,
sharded rSVD vs gather-to-owner + ``randomized_svd``, on 2 ranks.

Every time is the slowest rank's (all-reduced max), median over repeats, after one warm-up call.
Ranks use ``--threads`` threads each (default 1), so 2 ranks use 2 cores and 1 rank 1 core.

Run: ``python benchmarks/bench_distributed.py [--quick] [--blocks 2] [--threads 1] [--json out.json]``
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from harness import fmt_s, parser, start
from torch import nn

from spectral_monitor import distributed as smd
from spectral_monitor.functional import randomized_svd

RANK, OVERSAMPLE, COLD_NITER, WARM_NITER = 32, 10, 6, 1
GPT2_BLOCK = [("attn.c_attn", 768, 2304), ("attn.c_proj", 768, 768), ("mlp.c_fc", 768, 3072), ("mlp.c_proj", 3072, 768)]


class Conv1D(nn.Module):
    """HF GPT-2 ``Conv1D`` stand-in: weight stored ``(in, out)``."""

    def __init__(self, nx: int, nf: int) -> None:
        super().__init__()
        self.nx, self.nf = nx, nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx**0.5)


def _update(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """4 planted directions (singular values 8, 6, 5, 4 x the noise top) over full-rank noise."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    U = torch.linalg.qr(torch.randn(m, 4, generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, 4, generator=g)).Q
    noise = torch.randn(m, n, generator=g) / (m**0.5 + n**0.5)  # top singular value ~1
    return 1e-2 * ((U * torch.tensor([8.0, 6.0, 5.0, 4.0])) @ V.mT + noise)


def _timed(fn, repeats: int) -> tuple[dict, object]:
    """Medians over ``repeats`` (one warm-up call first) of the slowest rank's wall time and of the
    largest per-rank process CPU time (all threads; waiting in a collective takes none). On a
    shared, oversubscribed machine the CPU time is the steadier estimate of each rank's work."""
    out = fn()
    wall, cpu = [], []
    for _ in range(repeats):
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        dt = torch.tensor([time.perf_counter() - t0, time.process_time() - c0], dtype=torch.float64)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        wall.append(float(dt[0]))
        cpu.append(float(dt[1]))
    return {"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu)}, out


def _layers(net: nn.Module) -> list[smd.DistLayer]:
    return [
        smd.DistLayer(name, mod.weight, smd.global_shape(mod.weight, mod), isinstance(mod, Conv1D))
        for name, mod in net.named_modules()
        if isinstance(mod, (Conv1D, nn.Linear))
    ]


def _plant(layers: list[smd.DistLayer]) -> None:
    from torch.distributed.tensor import distribute_tensor

    with torch.no_grad():
        for i, layer in enumerate(layers):
            D = _update(layer.shape, i)
            p = layer.param
            p.add_(distribute_tensor(D, p.device_mesh, p.placements) if smd.shard_kind(p) == "dtensor" else D)


def _measure(layers, base, repeats: int, **kw) -> dict:
    cold_t, cold = _timed(lambda: smd.distributed_update_svd(layers, base, RANK, niter=COLD_NITER, **kw), repeats)
    init = {r.name: r.V for r in cold}
    warm_t, _ = _timed(
        lambda: smd.distributed_update_svd(layers, base, RANK, niter=WARM_NITER, init=init, **kw), repeats
    )
    nbytes = torch.tensor([base.nbytes], dtype=torch.float64)
    dist.all_reduce(nbytes, op=dist.ReduceOp.MAX)
    return {"cold": cold_t, "warm": warm_t, "base_bytes_max_rank": int(nbytes)}


def _latency(repeats: int = 50) -> float:
    """Median wall time of one 64-float all_reduce (the per-collective cost of the sharded route)."""
    x = torch.ones(64)
    for _ in range(5):
        dist.all_reduce(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dist.all_reduce(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _gpt2(blocks: int) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Module()
    for b in range(blocks):
        for name, nx, nf in GPT2_BLOCK:
            net.add_module(f"h{b}_{name.replace('.', '_')}", Conv1D(nx, nf))
    return net


def _worker(rank: int, world: int, store: str, out: str, args: dict) -> None:
    torch.set_num_threads(args["threads"])
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=600)
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    results: dict = {}
    reps = args["repeats"]
    mesh = init_device_mesh("cpu", (world,))

    # part 1: FSDP2 (sharded in place, and gathered), then replicated
    net = _gpt2(args["blocks"])
    for mod in net.children():
        fully_shard(mod, mesh=mesh)
    layers = _layers(net)
    base = smd.ShardedBase.snapshot(layers)
    _plant(layers)
    results["fsdp2_sharded"] = _measure(layers, base, reps, gather_max_numel=0)
    results["fsdp2_gather"] = _measure(layers, base, reps, gather_max_numel=1 << 40)
    rep = _gpt2(args["blocks"])
    layers = _layers(rep)
    base = smd.ShardedBase.snapshot(layers)
    _plant(layers)
    results["replicated"] = _measure(layers, base, reps)
    if world == 1:  # the plain loop the engine runs today, on the same ΔW
        deltas = [(layer.param.detach() - base.local(layer, torch.device("cpu"))).mT.contiguous() for layer in layers]
        g = lambda i: torch.Generator().manual_seed(i)  # noqa: E731
        t, _ = _timed(
            lambda: [randomized_svd(D, RANK, niter=COLD_NITER, generator=g(i)) for i, D in enumerate(deltas)], reps
        )
        results["single_process_cold"] = t

    # part 2: one layer, sharded vs gathered, by size
    if world > 1:
        rows = []
        for m, n in args["sizes"]:
            torch.manual_seed(1)
            lin = nn.Linear(n, m, bias=False)
            fully_shard(lin, mesh=mesh)
            layers = _layers(lin)
            base = smd.ShardedBase.snapshot(layers)
            _plant(layers)
            row = {"shape": [m, n]}
            for label, gmax in (("sharded", 0), ("gather", 1 << 40)):
                row[label] = _timed(
                    lambda gmax=gmax, layers=layers, base=base: smd.distributed_update_svd(
                        layers, base, RANK, niter=COLD_NITER, gather_max_numel=gmax
                    ),
                    reps,
                )[0]
            single = layers[0].param.full_tensor().detach()
            row["single"] = _timed(lambda single=single: randomized_svd(single, RANK, niter=COLD_NITER), reps)[0]
            rows.append(row)
        results["sizes"] = rows
    results["all_reduce_latency_s"] = _latency() if world > 1 else 0.0
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=2, help="GPT-2 blocks (4 matrices each)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if args.device != "cpu":
        raise SystemExit("bench_distributed runs gloo on CPU only")
    threads = args.threads or 1
    torch.set_num_threads(threads)  # what the header reports: each rank runs this many
    sizes = [(256, 256), (768, 768), (768, 3072), (2048, 2048), (4096, 4096)]
    if args.quick:
        sizes, args.blocks, args.repeats = [(256, 256), (768, 768)], 1, 1
    out = start("bench_distributed: distributed_update_svd on gloo (CPU), 1 vs 2 ranks", args)
    cfg = {"threads": threads, "blocks": args.blocks, "repeats": args.repeats, "sizes": sizes}
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            path = Path(tmp) / f"w{world}.json"
            mp.start_processes(
                _worker, args=(world, f"{tmp}/store{world}", str(path), cfg), nprocs=world, start_method="spawn"
            )
            runs[world] = json.loads(path.read_text())
    out.data.update(config=cfg, runs=runs)

    def cell(t: dict) -> str:
        return f"{fmt_s(t['wall_s'])} / {fmt_s(t['cpu_s'])}"

    print(f"\n   2-rank gloo all_reduce of 64 floats: {fmt_s(runs[2]['all_reduce_latency_s'])} (median)")
    rows = []
    for key, label in (
        ("fsdp2_sharded", "FSDP2, sharded rSVD (in place)"),
        ("fsdp2_gather", "FSDP2, gathered to LPT owners"),
        ("replicated", "replicated (DDP), LPT owners"),
    ):
        r1, r2 = runs[1][key], runs[2][key]
        mib = [f"{r['base_bytes_max_rank'] / 2**20:.1f}" for r in (r1, r2)]
        rows.append([label, cell(r1["cold"]), cell(r2["cold"]), cell(r1["warm"]), cell(r2["warm"]), *mib])
    rows.append(["single process, randomized_svd loop", cell(runs[1]["single_process_cold"]), *["-"] * 5])
    out.table(
        f"{4 * args.blocks} GPT-2-small block matrices, rank {RANK}, oversample {OVERSAMPLE}, float32",
        ["layout", "cold, 1 rank", "cold, 2 ranks", "warm, 1 rank", "warm, 2 ranks",
         "base MiB/rank (1)", "base MiB/rank (2)"],
        rows,
        note=f"cold: niter={COLD_NITER}; warm: init = previous V, niter={WARM_NITER}; "
        "cells: slowest rank's wall / busiest rank's CPU time (medians)",
    )  # fmt: skip
    out.table(
        f"one FSDP2 nn.Linear (canonical Shard(0)), 2 ranks, rank {RANK}, niter {COLD_NITER}",
        ["shape", "sharded rSVD", "gather + owner rSVD", "1-process randomized_svd"],
        [
            [f"{r['shape'][0]}x{r['shape'][1]}", cell(r["sharded"]), cell(r["gather"]), cell(r["single"])]
            for r in runs[2]["sizes"]
        ],
        note="cells: slowest rank's wall / busiest rank's CPU time (medians)",
    )
    out.finish()


if __name__ == "__main__":
    main()
