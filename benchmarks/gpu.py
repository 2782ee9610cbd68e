"""One-shot GPU benchmark: a 7B-shaped model's full measure(), randomized SVD and power-law fits on CUDA.

Prepared to run ONCE on a GPU machine (hard 10-minute limit; this script aims at ~5 minutes,
skips what would not fit, prints as it goes and rewrites ``$OUT/gpu_results.json`` -- or
``--json PATH`` -- after every section, so a cut-off run still leaves its partial results).
Imports only torch, numpy and spectral_monitor (from the repo, via PYTHONPATH or its own path),
plus ``benchmarks/_common.py`` and ``benchmarks/bench_rsvd.py`` beside it.

Sections:

(i)   a Llama-7B-shaped model: 32 blocks x 7 bias-free Linears (q/k/v/o_proj 4096x4096,
      gate/up_proj 11008x4096, down_proj 4096x11008; 6.5 B weights), bf16 random weights (std 0.02)
      on the GPU; the monitor's default layer selection picks all 224. Base snapshot, then an update
      (per layer 2-24 low-rank directions over dense noise of std ~3e-4, in float32, added to the bf16
      weights), then ``measure()`` #1 (first: W_0's SVD, one-off), #2, #3 (steady state; a small
      further update before each), #4 profiled per phase. With ``base_store="device"`` (the base
      on the GPU), ``base_store="cpu"`` (pinned host memory, streamed per layer) and the device
      store with ``sketch_dtype="float32"`` (what the bf16 tensor-core products buy). Target: < 1 s.
(ii)  bench_rsvd's comparison on CUDA for the 7B shapes: ``randomized_svd(rank=32, p=10,
      niter=2)`` cold and warm, ``torch.svd_lowrank(q=42, niter=2)``, ``torch.linalg.svdvals``
      (and ``torch.linalg.svd`` for 4096x4096), with accuracy against svdvals.
(iii) ``fit_power_law`` on a batch of 224 spectra on CUDA vs CPU: 224 x 4096 values (a full
      spectrum per layer, the ``full_every`` case) and 224 x 42 (top-k, every measurement).
(iv)  ``pytest -m gpu -q`` in the repo (when pytest is importable), with what time is left.

Run on the GPU machine from the repo root:
``PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/gpu.py``
Check the logic anywhere: ``python benchmarks/gpu.py --device cpu --tiny``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
from _common import PhaseProfile, fmt_s, machine_info, print_table  # noqa: E402
from torch import nn  # noqa: E402

T_START = time.perf_counter()
RESULTS: dict = {}
JSON_PATH: str | None = None


def elapsed() -> float:
    return time.perf_counter() - T_START


def say(msg: str) -> None:
    print(f"[{elapsed():6.1f} s] {msg}", flush=True)


def save() -> None:
    if not JSON_PATH:
        return
    Path(JSON_PATH).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(JSON_PATH + ".tmp")
    tmp.write_text(json.dumps(RESULTS, indent=1, default=repr))
    os.replace(tmp, JSON_PATH)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- (i) 7B model
class Block(nn.Module):
    def __init__(self, h: int, f: int, dtype: torch.dtype, device: str) -> None:
        super().__init__()
        kw = {"bias": False, "dtype": dtype, "device": "meta"}
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.self_attn, name, nn.Linear(h, h, **kw))
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(h, f, **kw)
        self.mlp.up_proj = nn.Linear(h, f, **kw)
        self.mlp.down_proj = nn.Linear(f, h, **kw)


def build_model(n_blocks: int, h: int, f: int, dtype: torch.dtype, device: str) -> nn.Module:
    model = nn.Module()
    model.layers = nn.ModuleList([Block(h, f, dtype, device) for _ in range(n_blocks)])
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    return model


@torch.no_grad()
def update(model: nn.Module, *, seed: int, scale: float, device: str) -> None:
    """Per layer: 2-24 low-rank directions (s_1 = 3-10x the noise edge, s_j ~ j^-0.6) over dense
    noise of std 1.5e-4..6e-4 (x scale), built in float32 and added to the (bf16) weight."""
    g = torch.Generator(device=device).manual_seed(seed)
    for mod in model.modules():
        if not isinstance(mod, nn.Linear):
            continue
        m, n = mod.weight.shape
        r = int(torch.randint(2, 25, (1,), generator=g, device=device))
        std = float(1.5e-4 * 4 ** torch.rand(1, generator=g, device=device)) * scale
        s1 = std * (math.sqrt(m) + math.sqrt(n)) * float(3 + 7 * torch.rand(1, generator=g, device=device))
        s = s1 * torch.arange(1, r + 1, device=device, dtype=torch.float32) ** -0.6
        U = torch.linalg.qr(torch.randn(m, r, generator=g, device=device)).Q
        V = torch.linalg.qr(torch.randn(n, r, generator=g, device=device)).Q
        d = torch.randn(m, n, generator=g, device=device).mul_(std).addmm_(U * s, V.T)
        mod.weight.add_(d.to(mod.weight.dtype))
        del d


def section_model(args, device: str) -> None:
    from spectral_monitor import MonitorConfig, SpectralMonitor

    n_blocks, h, f = (2, 64, 172) if args.tiny else (32, 4096, 11008)
    dtype = torch.bfloat16
    say(f"(i) building a {n_blocks}-block model, hidden {h}, ffn {f}, {dtype} on {device}")
    model = build_model(n_blocks, h, f, dtype, device)
    sync(device)
    n_w = sum(p.numel() for p in model.parameters())
    out: dict = {"blocks": n_blocks, "hidden": h, "ffn": f, "dtype": str(dtype), "weights": n_w}
    RESULTS["model_7b"] = out
    if device.startswith("cuda"):
        out["gpu_mem_model_gb"] = torch.cuda.memory_allocated() / 2**30
    say(f"    {n_w / 1e9:.2f} B weights built")
    monitors = {}
    # "device_float32": the same as "device" with float32 sketch products, to show what bf16 buys
    configs = {
        "device": {"base_store": "device"},
        "cpu": {"base_store": "cpu"},
        "device_float32": {"base_store": "device", "sketch_dtype": "float32"},
    }
    for store, kwargs in configs.items():
        mon = SpectralMonitor(model, MonitorConfig(**kwargs))
        t0 = time.perf_counter()
        mon.snapshot()
        sync(device)
        out[f"snapshot_{store}_s"] = time.perf_counter() - t0
        monitors[store] = mon
        out[f"sketch_dtype_{store}"] = str(mon._sketch_dtype(torch.device(device), numel=h * f))
        say(
            f"    snapshot base_store={store!r}: {fmt_s(out[f'snapshot_{store}_s'])}, "
            f"{len(mon.specs)} layers, store {mon.store.nbytes / 2**30:.2f} GiB, sketch {out[f'sketch_dtype_{store}']}"
        )
    update(model, seed=1, scale=1.0, device=device)
    sync(device)
    say("    update applied")
    save()
    for store, mon in monitors.items():
        if elapsed() > args.budget_s * 0.55:
            say(f"    skipping base_store={store!r}: time budget")
            continue
        rows = []
        for i in range(1, 5):
            if i > 1:
                update(model, seed=10 + i, scale=0.1, device=device)
            sync(device)
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
                mem0 = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            if i == 4:
                with PhaseProfile(device) as prof:
                    rep = mon.measure(i)
            else:
                rep = mon.measure(i)
            sync(device)
            dt = time.perf_counter() - t0
            row = {
                "measurement": i,
                "seconds": dt,
                "measure_s": rep.elapsed_s,
                "profiled": i == 4,
                "skipped": len(rep.skipped),
                "reliable_frac": rep.metrics.get("spectral/model/alpha_reliable_frac"),
            }
            if device.startswith("cuda"):
                row["gpu_peak_extra_gb"] = (torch.cuda.max_memory_allocated() - mem0) / 2**30
            ranks = [mon._state(s).rank for s in mon.specs]
            row["ranks_next"] = {str(r): ranks.count(r) for r in sorted(set(ranks))}
            rows.append(row)
            say(
                f"    base_store={store!r} measure() #{i}{' (profiled)' if i == 4 else ''}: {fmt_s(dt)}"
                + (f", GPU peak extra {row['gpu_peak_extra_gb']:.2f} GiB" if "gpu_peak_extra_gb" in row else "")
                + (f", {row['skipped']} layers skipped" if row["skipped"] else "")
            )
            if i == 4:
                print_table(["phase", "time", "share", "calls"], prof.table(rep.elapsed_s))
                row["profile"] = prof.totals
            out[f"measure_{store}"] = rows
            save()
            if elapsed() > args.budget_s * 0.6:
                say("    time budget: stopping this store's measurements")
                break
        steady = [r["seconds"] for r in rows[1:3]]
        if steady:
            out[f"steady_{store}_s"] = min(steady)
            say(
                f"    base_store={store!r}: first {fmt_s(rows[0]['seconds'])}, steady "
                f"{' / '.join(fmt_s(x) for x in steady)} (target < 1 s: "
                f"{'n/a, tiny shapes' if args.tiny else 'MET' if min(steady) < 1 else 'MISSED'})"
            )
        save()
    del monitors, model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- (ii) rsvd
def section_rsvd(args, device: str) -> None:
    import bench_rsvd

    shapes = [(64, 64), (172, 64)] if args.tiny else [(4096, 4096), (11008, 4096), (4096, 11008)]
    out = []
    RESULTS["rsvd"] = out
    for i, (m, n) in enumerate(shapes):
        if elapsed() > args.budget_s * 0.8:
            say(f"(ii) skipping {m}x{n}: time budget")
            continue
        rows = bench_rsvd.bench_shape(
            m,
            n,
            device=device,
            repeats=3,
            full_svd=(m == n),
            seed=i,
            skip_note="skipped to save time (11008-wide full SVD)",
        )
        ours = next(r for r in rows if r["method"].startswith("randomized_svd("))["median_s"]
        say(f"(ii) {m}x{n} on {device}")
        print_table(
            ["method", "time (median)", "time / randomized_svd's", "max rel err s_1..32", "abs cos u_1"],
            [
                [
                    r["method"],
                    fmt_s(r["median_s"]),
                    f"{r['median_s'] / ours:.2f}" if r["median_s"] else "-",
                    f"{r.get('max_rel_err', float('nan')):.2g}",
                    f"{r.get('cos_u1', float('nan')):.6f}",
                ]
                for r in rows
            ],
        )
        out.extend(rows)
        save()


# ----------------------------------------------------------------------------- (iii) power-law fit
def section_fit(args, device: str) -> None:
    from spectral_monitor.functional import fit_power_law

    b = 224
    out = {}
    RESULTS["fit_power_law"] = out
    g = torch.Generator().manual_seed(0)
    for k in (42, 256) if args.tiny else (42, 4096):
        # Pareto(alpha=3) tail over a uniform bulk: one heavy-tailed spectrum per layer
        x = torch.cat(
            [
                torch.rand(b, k - k // 8, generator=g, dtype=torch.float64),
                (1 - torch.rand(b, k // 8, generator=g, dtype=torch.float64)) ** (-1 / 2),
            ],
            dim=1,
        )
        times = {}
        fits = {}
        for dev in ("cpu", device) if device != "cpu" else ("cpu",):
            xd = x.to(dev)
            fit_power_law(xd[:2])
            sync(dev)
            ts = []
            for _ in range(3 if k > 256 else 5):
                sync(dev)
                t0 = time.perf_counter()
                fits[dev] = fit_power_law(xd)
                sync(dev)
                ts.append(time.perf_counter() - t0)
            times[dev] = min(ts)
        row = {f"{d}_s": t for d, t in times.items()}
        if device != "cpu":
            a_cpu, a_gpu = fits["cpu"].alpha.double(), fits[device].alpha.double().cpu()
            row["alpha_max_rel_diff"] = float(((a_cpu - a_gpu).abs() / a_cpu).max())
            row["speedup"] = times["cpu"] / times[device]
        out[f"{b}x{k}"] = row
        say(
            f"(iii) fit_power_law on {b} x {k}: "
            + ", ".join(f"{d} {fmt_s(t)}" for d, t in times.items())
            + (
                f", CUDA {row['speedup']:.1f}x faster, alpha max rel diff {row['alpha_max_rel_diff']:.1e}"
                if "speedup" in row
                else ""
            )
        )
        save()


# ----------------------------------------------------------------------------- (iv) pytest
def section_pytest(args) -> None:
    left = args.budget_s - elapsed()
    out = {}
    RESULTS["pytest_gpu"] = out
    try:
        import pytest  # noqa: F401
    except ImportError:
        out["status"] = "pytest not importable"
        say("(iv) pytest not importable: skipped")
        save()
        return
    timeout = max(30, min(240, int(left)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    say(f"(iv) pytest -m gpu -q (timeout {timeout} s)")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"],
            cwd=HERE.parent,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        out.update(rc=proc.returncode, tail=(proc.stdout + proc.stderr)[-3000:])
        print((proc.stdout + proc.stderr)[-3000:], flush=True)
    except subprocess.TimeoutExpired as exc:
        out.update(rc=None, status=f"timed out after {timeout} s", tail=str(exc.stdout or "")[-3000:])
        say(f"    pytest timed out after {timeout} s")
    save()


def main() -> None:
    global JSON_PATH
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, to check the logic (e.g. on CPU)")
    p.add_argument("--json", default=None, help="results file (default $OUT/gpu_results.json when OUT is set)")
    p.add_argument("--budget-s", type=float, default=330.0, help="soft time budget; later sections shrink to fit")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: model,rsvd,fit,pytest")
    args = p.parse_args()
    JSON_PATH = args.json or (str(Path(os.environ["OUT"]) / "gpu_results.json") if os.environ.get("OUT") else None)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --tiny to check the logic")
    RESULTS["machine"] = machine_info(device)
    if device.startswith("cuda"):
        RESULTS["machine"]["gpu_mem_gb"] = torch.cuda.get_device_properties(0).total_memory / 2**30
        RESULTS["machine"]["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    say(
        f"gpu.py on {RESULTS['machine'].get('gpu', device)}; torch {torch.__version__}; "
        f"CPU {RESULTS['machine']['cpu']} x{RESULTS['machine']['logical_cpus']}"
    )
    # warm up CUDA / cuSOLVER / cuBLAS so no section pays the libraries' one-off load
    a = torch.randn(64, 48, device=device)
    torch.linalg.qr(a)
    torch.linalg.svd(a, full_matrices=False)
    torch.linalg.eigvalsh(a.T @ a)
    sync(device)
    save()
    skip = set(filter(None, args.skip.split(",")))
    for name, fn in (
        ("model", lambda: section_model(args, device)),
        ("rsvd", lambda: section_rsvd(args, device)),
        ("fit", lambda: section_fit(args, device)),
        ("pytest", lambda: section_pytest(args)),
    ):
        if name in skip:
            continue
        try:
            fn()
        except Exception as exc:  # keep going: a later section's numbers are still worth having
            RESULTS.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
            say(f"section {name} failed: {type(exc).__name__}: {exc}")
            save()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    RESULTS["total_s"] = elapsed()
    save()
    say(f"done in {elapsed():.0f} s" + (f"; results in {JSON_PATH}" if JSON_PATH else ""))


if __name__ == "__main__":
    main()
