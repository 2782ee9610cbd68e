"""Extra memory of each base-snapshot store (device, cpu, disk, reference, lora) during snapshot + one measurement.

Model: GPT-2 small from config (random init, float32; its 48 block matrices, 85 M weights, 340 MB
in float32, are monitored). Each store runs in a fresh child process so that peak counters start
clean. In the child: build the model (plus what that store needs to exist anyway: a reference copy
for ``reference``; a PEFT LoRA wrapper, r=16 on c_attn/c_proj/c_fc, for ``lora``), warm torch up,
record the baseline, then reset the peak counter, ``monitor.snapshot()``, apply an update (in place),
``monitor.measure(1)`` with the default config, and read:

* ``store.nbytes``: bytes held by the store itself (0 for disk -- memory-mapped -- and reference);
* CPU: peak RSS (VmHWM, reset through /proc/self/clear_refs) minus the baseline RSS, i.e. the peak
  extra resident memory of snapshot + measurement (store + the measurement's float32 ΔW batch,
  bounded by ``memory_budget_mb`` = 1024, + randomized-SVD temporaries); RssAnon/RssFile after;
  and tracemalloc's peak of Python-heap allocations (torch tensors are not Python-heap, so this is
  only the bookkeeping); ``monitor.workspace_bytes``: the ΔW buffers the monitor keeps between
  measurements (CPU);
* CUDA (``--device cuda``): ``torch.cuda.max_memory_allocated()`` minus the allocation before the
  snapshot (the model on the GPU), plus the host's peak extra RSS (the ``cpu`` store is pinned).

Run: ``python benchmarks/bench_memory.py [--quick] [--device cuda] [--json out.json]``
(``--quick``: GPT-2 with 4 blocks.)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch
from harness import fmt_s, gpt2, loadavg, parser, start

STORES = ("device", "cpu", "disk", "reference", "lora")
MB = 2**20


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def child(store: str, device: str, n_layer: int) -> dict:
    from spectral_monitor import MonitorConfig, SpectralMonitor

    model = gpt2(0, n_layer=n_layer).eval().to(device)
    reference = None
    if store == "reference":
        reference = copy.deepcopy(model)  # e.g. TRL's ref_model: exists anyway, not the monitor's cost
    if store == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=16, lora_alpha=32, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
        )
    tmp = tempfile.mkdtemp(prefix="sm_mem_") if store == "disk" else None
    cfg = MonitorConfig(base_store="auto" if store == "lora" else store, base_dir=tmp)
    monitor = SpectralMonitor(model, cfg, reference=reference)
    # warm torch's kernels up on a tiny matrix, outside the measured window
    from spectral_monitor.functional import randomized_svd

    randomized_svd(torch.randn(64, 48, device=device), 8)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        gpu0 = torch.cuda.memory_allocated()
    base_rss = status_kb("VmRSS")
    reset_peak_rss()
    tracemalloc.start()
    t0 = time.perf_counter()
    held = monitor.snapshot()
    snap_s = time.perf_counter() - t0
    rss_after_snap = status_kb("VmRSS")
    with torch.no_grad():  # the update (in place: no new memory)
        g = torch.Generator(device="cpu").manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name or (store != "lora" and p.dim() == 2 and ".h." in name):
                p.add_(torch.randn(p.shape, generator=g).to(device) * 1e-3)
    t0 = time.perf_counter()
    report = monitor.measure(1)
    meas_s = time.perf_counter() - t0
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out = {
        "store": store,
        "kind": held.kind if held is not None else "none (all layers LoRA)",
        "nbytes": held.nbytes if held is not None else 0,
        "layers": len(monitor.specs),
        "weights": sum(s.shape[0] * s.shape[1] for s in monitor.specs),
        "snapshot_s": snap_s,
        "measure_s": meas_s,
        "skipped": len(report.skipped),
        "base_rss_mb": base_rss / 1024,
        "rss_extra_after_snapshot_mb": (rss_after_snap - base_rss) / 1024,
        "rss_peak_extra_mb": (status_kb("VmHWM") - base_rss) / 1024,
        "rss_anon_mb": status_kb("RssAnon") / 1024,
        "rss_file_mb": status_kb("RssFile") / 1024,
        "python_heap_peak_mb": py_peak / MB,
        "workspace_mb": monitor.workspace_bytes / MB,
    }
    if device.startswith("cuda"):
        out["gpu_peak_extra_mb"] = (torch.cuda.max_memory_allocated() - gpu0) / MB
    return out


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--child", choices=STORES, help=argparse.SUPPRESS)
    p.add_argument("--n-layer", type=int, default=None)
    args = p.parse_args()
    n_layer = args.n_layer or (4 if args.quick else 12)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.device, n_layer)), flush=True)
        return
    out = start("bench_memory: extra memory per snapshot store", args)
    rows, results = [], []
    for store in STORES:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            store,
            "--device",
            args.device,
            "--n-layer",
            str(n_layer),
        ]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"   {store}: child failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}", flush=True)
            results.append({"store": store, "error": proc.stderr[-2000:]})
            continue
        r = json.loads(line[7:])
        results.append(r)
        print(f"   {store}: done (load {loadavg()})", flush=True)
        row = [
            store,
            r["kind"],
            f"{r['nbytes'] / MB:.0f}",
            f"{r['workspace_mb']:.0f}",
            f"{r['rss_extra_after_snapshot_mb']:.0f}",
            f"{r['rss_peak_extra_mb']:.0f}",
            f"{r['python_heap_peak_mb']:.1f}",
            fmt_s(r["snapshot_s"]),
            fmt_s(r["measure_s"]),
        ]
        if args.device.startswith("cuda"):
            row.insert(6, f"{r['gpu_peak_extra_mb']:.0f}")
        rows.append(row)
    weights = next((r["weights"] for r in results if "weights" in r), 0)
    hdr = [
        "store",
        "store kind",
        "store.nbytes (MB)",
        "workspace kept (MB)",
        "RSS after snapshot (+MB)",
        "peak RSS, snapshot+measure (+MB)",
        "Python-heap peak (MB)",
        "snapshot",
        "measure()",
    ]
    if args.device.startswith("cuda"):
        hdr.insert(6, "GPU peak extra (MB)")
    out.table(
        f"GPT-2 small ({n_layer} blocks): {weights / 1e6:.1f} M monitored weights = "
        f"{weights * 4 / MB:.0f} MB in float32; default config (memory_budget_mb=1024)",
        hdr,
        rows,
        note="   +MB: above the process's resident memory before the snapshot (model already built). disk: "
        "memory-mapped pages read during the measurement count in RSS (RssFile) but are page cache the "
        "kernel can drop; reference: the reference model itself is the user's and is not counted.",
    )
    out.data["rows"] = results
    out.finish()


if __name__ == "__main__":
    main()
