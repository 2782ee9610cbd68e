"""One-shot GPU benchmark: a 7B-shaped model's full measure(), randomized SVD and power-law fits on CUDA.

Prepared to run ONCE on a GPU machine (hard 10-minute limit; this script aims at ~5 minutes,
skips what would not fit, prints as it goes and rewrites ``$OUT/gpu_results.json`` -- or
``--json PATH`` -- after every section, so a cut-off run still leaves its partial results).
Imports only torch, numpy and spectral_monitor (from the repo), plus ``harness.py`` and
``bench_rsvd.py`` beside it.

Sections:

(i)   a Llama-7B-shaped model (``harness.llama``): 32 blocks x 7 bias-free Linears (q/k/v/o_proj
      4096x4096, gate/up_proj 11008x4096, down_proj 4096x11008; 6.5 B weights), bf16 random weights
      (std 0.02) on the GPU; the monitor's default layer selection picks all 224. Base snapshot,
      then the ``synthetic`` update (``harness.UPDATE_KINDS``: per layer 2-24 low-rank directions
      over dense noise of std ~3e-4, built in float32, added to the bf16 weights), then
      ``measure()`` #1 (first: W_0's basis, one-off), #2, #3 (steady state; a 0.1x further update
      before each), #4 profiled per phase (``torch.profiler``, the engine's labels; host and
      kernel time). With ``base_store="device"`` (the base on the GPU), ``base_store="cpu"``
      (pinned host memory, streamed per batch) and the device store with ``sketch_dtype="float32"``
      (what the bf16 tensor-core products buy). Target: < 1 s.
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

import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from harness import (
    REPO,
    Results,
    apply_update,
    fmt_s,
    linear_names,
    llama,
    once,
    parser,
    print_table,
    profile_measure,
    start,
    sync,
    timeit,
)

T_START = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - T_START


def say(msg: str) -> None:
    print(f"[{elapsed():6.1f} s] {msg}", flush=True)


# ----------------------------------------------------------------------------- (i) 7B model
def section_model(args, out: Results, device: str) -> None:
    from spectral_monitor import MonitorConfig, SpectralMonitor

    n_blocks, h, f = (2, 64, 172) if args.tiny else (32, 4096, 11008)
    dtype = torch.bfloat16
    say(f"(i) building a {n_blocks}-block model, hidden {h}, ffn {f}, {dtype} on {device}")
    model = llama(n_blocks, h, f, dtype=dtype, device=device)
    names = linear_names(model)
    sync(device)
    n_w = sum(p.numel() for p in model.parameters())
    res: dict = {"blocks": n_blocks, "hidden": h, "ffn": f, "dtype": str(dtype), "weights": n_w}
    out.data["model_7b"] = res
    if device.startswith("cuda"):
        res["gpu_mem_model_gb"] = torch.cuda.memory_allocated() / 2**30
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
        res[f"snapshot_{store}_s"] = once(mon.snapshot, device=device).best
        monitors[store] = mon
        res[f"sketch_dtype_{store}"] = str(mon.planner.sketch_dtype(torch.device(device), numel=h * f))
        say(
            f"    snapshot base_store={store!r}: {fmt_s(res[f'snapshot_{store}_s'])}, {len(mon.specs)} layers, "
            f"store {mon.store.nbytes / 2**30:.2f} GiB, sketch {res[f'sketch_dtype_{store}']}"
        )
    apply_update(model, names, "synthetic", seed=1)
    sync(device)
    say("    update applied")
    out.save()
    for store, mon in monitors.items():
        if elapsed() > args.budget_s * 0.55:
            say(f"    skipping base_store={store!r}: time budget")
            continue
        rows = []
        for i in range(1, 5):
            if i > 1:
                apply_update(model, names, "synthetic", seed=10 + i, scale=0.1)
            sync(device)
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
                mem0 = torch.cuda.memory_allocated()
            phases = None
            t0 = time.perf_counter()
            if i == 4:
                try:
                    rep, phases = profile_measure(mon, i, device)
                except Exception as exc:  # no CUPTI: measure unprofiled, say so
                    say(f"    profiler failed ({type(exc).__name__}: {exc}); measuring without it")
                    rep = mon.measure(i)
            else:
                rep = mon.measure(i)
            sync(device)
            dt = time.perf_counter() - t0
            states = [mon.layer_state(s.name) for s in mon.specs]
            ranks = [st.rank for st in states if st is not None]
            row = {
                "measurement": i,
                "seconds": dt,
                "measure_s": rep.elapsed_s,
                "profiled": phases is not None,
                "skipped": len(rep.skipped),
                "reliable_frac": rep.model.get("alpha_reliable_frac"),
                "ranks_next": {str(r): ranks.count(r) for r in sorted(set(ranks))},
            }
            if device.startswith("cuda"):
                row["gpu_peak_extra_gb"] = (torch.cuda.max_memory_allocated() - mem0) / 2**30
            rows.append(row)
            say(
                f"    base_store={store!r} measure() #{i}: {fmt_s(dt)}"
                + (f" (profiled: measure_s {fmt_s(rep.elapsed_s)}; the rest is the profiler's)" if phases else "")
                + (f", GPU peak extra {row['gpu_peak_extra_gb']:.2f} GiB" if "gpu_peak_extra_gb" in row else "")
                + (f", {row['skipped']} layers skipped" if row["skipped"] else "")
            )
            if phases is not None:
                print_table(phases.headers(), phases.rows())
                row["profile"] = phases.to_json()
            res[f"measure_{store}"] = rows
            out.save()
            if elapsed() > args.budget_s * 0.6:
                say("    time budget: stopping this store's measurements")
                break
        steady = [r["seconds"] for r in rows[1:3]]
        if steady:
            res[f"steady_{store}_s"] = min(steady)
            say(
                f"    base_store={store!r}: first {fmt_s(rows[0]['seconds'])}, steady "
                f"{' / '.join(fmt_s(x) for x in steady)} (target < 1 s: "
                f"{'n/a, tiny shapes' if args.tiny else 'MET' if min(steady) < 1 else 'MISSED'})"
            )
        out.save()
    del monitors, model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- (ii) rsvd
def section_rsvd(args, out: Results, device: str) -> None:
    import bench_rsvd

    shapes = [(64, 64), (172, 64)] if args.tiny else [(4096, 4096), (11008, 4096), (4096, 11008)]
    rows_all: list[dict] = []
    out.data["rsvd"] = rows_all
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
        rows_all.extend(rows)
        out.save()


# ----------------------------------------------------------------------------- (iii) power-law fit
def section_fit(args, out: Results, device: str) -> None:
    from spectral_monitor.functional import fit_power_law

    b = 224
    res: dict = {}
    out.data["fit_power_law"] = res
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
        times, fits = {}, {}
        for dev in ("cpu", device) if device != "cpu" else ("cpu",):
            xd = x.to(dev)
            fit_power_law(xd[:2])
            t = timeit(lambda xd=xd: fit_power_law(xd), repeats=3 if k > 256 else 5, warmup=0, device=dev)
            times[dev], fits[dev] = t.best, t.result
        row = {f"{d}_s": t for d, t in times.items()}
        if device != "cpu":
            a_cpu, a_gpu = fits["cpu"].alpha.double(), fits[device].alpha.double().cpu()
            row["alpha_max_rel_diff"] = float(((a_cpu - a_gpu).abs() / a_cpu).max())
            row["speedup"] = times["cpu"] / times[device]
        res[f"{b}x{k}"] = row
        say(
            f"(iii) fit_power_law on {b} x {k}: "
            + ", ".join(f"{d} {fmt_s(t)}" for d, t in times.items())
            + (
                f", CUDA {row['speedup']:.1f}x faster, alpha max rel diff {row['alpha_max_rel_diff']:.1e}"
                if "speedup" in row
                else ""
            )
        )
        out.save()


# ----------------------------------------------------------------------------- (iv) pytest
def section_pytest(args, out: Results) -> None:
    left = args.budget_s - elapsed()
    res: dict = {}
    out.data["pytest_gpu"] = res
    try:
        import pytest  # noqa: F401
    except ImportError:
        res["status"] = "pytest not importable"
        say("(iv) pytest not importable: skipped")
        out.save()
        return
    timeout = max(30, min(240, int(left)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    say(f"(iv) pytest -m gpu -q (timeout {timeout} s)")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        res.update(rc=proc.returncode, tail=(proc.stdout + proc.stderr)[-3000:])
        print((proc.stdout + proc.stderr)[-3000:], flush=True)
    except subprocess.TimeoutExpired as exc:
        res.update(rc=None, status=f"timed out after {timeout} s", tail=str(exc.stdout or "")[-3000:])
        say(f"    pytest timed out after {timeout} s")
    out.save()


def main() -> None:
    p = parser(__doc__.splitlines()[0], device="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, to check the logic (e.g. on CPU)")
    p.add_argument("--budget-s", type=float, default=330.0, help="soft time budget; later sections shrink to fit")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: model,rsvd,fit,pytest")
    args = p.parse_args()
    json_path = args.json or (str(Path(os.environ["OUT"]) / "gpu_results.json") if os.environ.get("OUT") else None)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --tiny to check the logic")
    out = start("gpu.py: 7B-shaped measure(), randomized SVD and power-law fits", args, json_path=json_path)
    if device.startswith("cuda"):
        out.machine["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    # warm up CUDA / cuSOLVER / cuBLAS so no section pays the libraries' one-off load
    a = torch.randn(64, 48, device=device)
    torch.linalg.qr(a)
    torch.linalg.svd(a, full_matrices=False)
    torch.linalg.eigvalsh(a.T @ a)
    sync(device)
    out.save()
    skip = set(filter(None, args.skip.split(",")))
    for name, fn in (
        ("model", lambda: section_model(args, out, device)),
        ("rsvd", lambda: section_rsvd(args, out, device)),
        ("fit", lambda: section_fit(args, out, device)),
        ("pytest", lambda: section_pytest(args, out)),
    ):
        if name in skip:
            continue
        try:
            fn()
        except Exception as exc:  # keep going: a later section's numbers are still worth having
            out.data.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
            say(f"section {name} failed: {type(exc).__name__}: {exc}")
            out.save()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    out.data["total_s"] = elapsed()
    say(f"done in {elapsed():.0f} s" + (f"; results in {json_path}" if json_path else ""))
    out.finish()


if __name__ == "__main__":
    main()
