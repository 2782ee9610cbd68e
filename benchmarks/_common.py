"""Shared helpers for the benchmark scripts: machine description, timing, tables, JSON.

Only the standard library and torch are imported here, so every script (and ``gpu.py``'s
logic) runs on a machine without the optional baselines.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def _threads_from_argv() -> int | None:
    """``--threads N`` read before torch/NumPy load, so their BLAS/OpenMP pools start that size."""
    for i, arg in enumerate(sys.argv):
        value = arg.split("=", 1)[1] if arg.startswith("--threads=") else None
        if arg == "--threads" and i + 1 < len(sys.argv):
            value = sys.argv[i + 1]
        if value is not None:
            return int(value)
    return None


_THREADS = _threads_from_argv()
if _THREADS is not None:
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[_var] = str(_THREADS)

import torch  # noqa: E402

_POOL_LIMIT = None
if _THREADS is not None:
    torch.set_num_threads(_THREADS)
    try:  # NumPy/SciPy BLAS already loaded by an earlier import: limit it at run time
        from threadpoolctl import threadpool_limits

        _POOL_LIMIT = threadpool_limits(limits=_THREADS)
    except ImportError:
        pass

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO))


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What ran the benchmark: CPU, threads, torch, device (GPU name when CUDA)."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
        **library_version(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


def library_version() -> dict[str, Any]:
    """Commit of the checkout and a hash of the library's sources as run (others edit it too)."""
    import hashlib
    import subprocess

    h = hashlib.sha256()
    for f in sorted((REPO / "spectral_monitor").rglob("*.py")):
        h.update(f.read_bytes())
    out: dict[str, Any] = {"library_sha256_12": h.hexdigest()[:12]}
    try:
        out["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "spectral_monitor"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        out["library_uncommitted_changes"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def print_machine(info: dict[str, Any], title: str) -> None:
    print(f"== {title}")
    dev = info["device"] + (f" ({info['gpu']}, CUDA {info['cuda']})" if "gpu" in info else "")
    print(
        f"   machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, torch {info['torch']} "
        f"({info['torch_threads']} threads), device {dev}, {info['date']}"
    )
    print(f"   command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"   library: git {info.get('git_commit', '?')}"
        f"{' + uncommitted changes' if info.get('library_uncommitted_changes') else ''}, "
        f"sources sha256 {info['library_sha256_12']}"
    )
    print(
        f"   load average (1 min) at start: {info['loadavg_1m_at_start']} on {info['logical_cpus']} CPUs"
        " (other processes share this machine; a load above the CPU count inflates wall times)",
        flush=True,
    )


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def sync(device: str | torch.device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def timeit(
    fn: Callable[[], Any], *, device: str = "cpu", repeats: int = 5, warmup: int = 1, max_s: float | None = None
) -> dict[str, Any]:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs (synchronised on CUDA).

    ``max_s``: stop repeating once this much time was spent in timed runs (at least one run).
    Returns ``{"median_s", "min_s", "times", "cpu_median_s", "result"}`` (result of the last
    call); ``cpu_median_s`` is the median process CPU time (all threads), which other processes
    on a shared machine inflate much less than wall time.
    """
    result = None
    cpu: list[float] = []
    for _ in range(warmup):
        result = fn()
        sync(device)
    times: list[float] = []
    spent = 0.0
    for _ in range(max(1, repeats)):
        sync(device)
        c0 = time.process_time()
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        dt = time.perf_counter() - t0
        cpu.append(time.process_time() - c0)
        times.append(dt)
        spent += dt
        if max_s is not None and spent >= max_s:
            break
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "times": times,
        "cpu_median_s": statistics.median(cpu),
        "result": result,
    }


def fmt_s(seconds: float | None) -> str:
    if seconds is None or seconds != seconds:
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def fmt_t(t: dict | None) -> str:
    """``best / median`` of a :func:`timeit` result (one number when there was one run)."""
    if not t:
        return "-"
    if len(t["times"]) == 1:
        return fmt_s(t["median_s"])
    return f"{fmt_s(t['min_s'])} / {fmt_s(t['median_s'])}"


def fmt_g(x: float | None, digits: int = 3) -> str:
    if x is None or x != x:
        return "-"
    return f"{x:.{digits}g}"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A Markdown table (pastes into RESULTS.md as is)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print(line(r))
    sys.stdout.flush()


def base_parser(description: str, *, device: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="fast smoke mode (small sizes, few repeats)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    if device:
        p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch, NumPy/SciPy BLAS and OpenMP alike (default: the libraries' own default)",
    )
    return p


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(_jsonable(payload), indent=2))
    print(f"   wrote {path}", flush=True)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items() if k != "result"}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return repr(x)


def matmul_gflops(device: str = "cpu", n: int = 4096, repeats: int = 3, dtype: torch.dtype = torch.float32) -> float:
    """Achieved GFLOP/s of an n x n x n matmul in ``dtype`` (the machine's practical ceiling)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = timeit(lambda: a @ b, device=device, repeats=repeats, warmup=1)
    return 2 * n**3 / t["median_s"] / 1e9


def spectrum_matrix(
    m: int,
    n: int,
    *,
    alpha: float = 3.0,
    spike: float = 3.0,
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``U diag(s) V^T`` with Haar-random orthonormal U, V and power-law singular values.

    ``s_i = i^(-1/(alpha-1))`` style decay (eigenvalues lambda = s^2 with a heavy tail), plus a
    planted rank-1 spike: ``s_1 = spike * s_2``.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = min(m, n)
    U = torch.linalg.qr(torch.randn(m, r, generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=g)).Q
    i = torch.arange(1, r + 1, dtype=torch.float64)
    s = i ** (-1.0 / (alpha - 1.0))
    s[0] = spike * s[1]
    W = (U * s.float()) @ V.T
    return W.to(device=device, dtype=dtype)


class PhaseProfile:
    """Where ``SpectralMonitor.measure()`` spends its time, without editing the library.

    While active, wraps the functional calls the engine module imported (by name, in
    ``spectral_monitor.engine``) and ``SpectralMonitor._measure_dense`` with timers (synchronising
    CUDA around each, so a profiled measurement is a little slower than an unprofiled one).
    Phases:

    * ``fill ΔW (+sparsity, isfinite)``: inside ``_measure_dense``, from entry to the first
      randomized SVD (store reads, upcast copies, W_t copy for intruders, ΔW, its norm, sparsity,
      isfinite, ``.tolist()`` of the finite mask) -- sparsity and the norms are also shown on
      their own ("of which");
    * ``rsvd ΔW`` / ``rsvd W_0 (base)``: the ``randomized_svd`` calls, told apart by their caller;
      ``W_t sketch (intruders)``: ``sketch_left_vectors``;
    * ``power-law fit``, ``full spectrum (Gram+eigvalsh)``, ``frobenius``, ``intruder_count``;
    * ``rest of _measure_dense``: metric tensors, ``.cpu()`` copies, per-layer dicts, state updates;
    * ``outside _measure_dense``: grouping into chunks, aggregates, report keys.
    """

    WRAPPED = (
        "randomized_svd",
        "fit_power_law",
        "sparsity",
        "frobenius_sq",
        "full_singular_values",
        "intruder_count",
        "effective_rank",
        "sketch_left_vectors",
    )

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = str(device)
        self.totals: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._saved: dict[str, Any] = {}
        self._entry: float | None = None
        self._first_rsvd: float | None = None

    def _add(self, key: str, dt: float) -> None:
        self.totals[key] = self.totals.get(key, 0.0) + dt
        self.calls[key] = self.calls.get(key, 0) + 1

    def __enter__(self) -> PhaseProfile:
        from spectral_monitor import engine

        self._engine = engine
        for name in self.WRAPPED:
            fn = getattr(engine, name)
            self._saved[name] = fn
            setattr(engine, name, self._wrap(name, fn))
        cls = engine.SpectralMonitor
        self._saved["_measure_dense"] = cls._measure_dense
        orig_dense = cls._measure_dense
        prof = self

        def measure_dense(monitor, chunk, *args, **kwargs):
            sync(prof.device)
            t0 = time.perf_counter()
            prof._entry = t0
            prof._first_rsvd = None
            inner_before = sum(v for k, v in prof.totals.items() if not k.startswith(("_", "fill")))
            out = orig_dense(monitor, chunk, *args, **kwargs)
            sync(prof.device)
            total = time.perf_counter() - t0
            prof._add("_measure_dense total", total)
            inner = sum(v for k, v in prof.totals.items() if not k.startswith(("_", "fill"))) - inner_before
            fill = (prof._first_rsvd - t0) if prof._first_rsvd is not None else 0.0
            prof._add("fill ΔW (+sparsity, isfinite)", fill)
            # sparsity and the norms ran inside the fill window: do not count them twice in the remainder
            prof._add("rest of _measure_dense", total - inner - fill + prof._nested_in_chunk)
            prof._nested_in_chunk = 0.0
            return out

        self._nested_in_chunk = 0.0
        cls._measure_dense = measure_dense
        return self

    def _wrap(self, name: str, fn: Callable) -> Callable:
        prof = self

        def wrapped(*args, **kwargs):
            key = name
            if name == "randomized_svd":
                # told apart by caller: W_0's SVD is taken in _base_u, ΔW's in the decompose step
                caller = sys._getframe(1).f_code.co_name
                key = "rsvd W_0 (base)" if caller == "_base_u" else "rsvd ΔW"
                if prof._first_rsvd is None and prof._entry is not None:
                    sync(prof.device)
                    prof._first_rsvd = time.perf_counter()
            elif name == "fit_power_law":
                key = "power-law fit"
            elif name == "full_singular_values":
                key = "full spectrum (Gram+eigvalsh)"
            elif name == "sketch_left_vectors":
                key = "W_t sketch (intruders)"
            nested = name in ("sparsity", "frobenius_sq") and prof._first_rsvd is None and prof._entry is not None
            if nested:  # called while ΔW is being filled: part of the fill phase
                key = f"  of which {name}"
            sync(prof.device)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(prof.device)
            dt = time.perf_counter() - t0
            if nested:
                prof._nested_in_chunk += dt
            prof._add(key, dt)
            return out

        return wrapped

    def __exit__(self, *exc: Any) -> None:
        for name in self.WRAPPED:
            setattr(self._engine, name, self._saved[name])
        self._engine.SpectralMonitor._measure_dense = self._saved["_measure_dense"]

    def table(self, measure_s: float) -> list[list[str]]:
        """Rows ``[phase, seconds, share of measure_s, calls]`` for :func:`print_table`."""
        inside = self.totals.get("_measure_dense total", 0.0)
        rows = []
        order = [
            "fill ΔW (+sparsity, isfinite)",
            "  of which sparsity",
            "  of which frobenius_sq",
            "rsvd ΔW",
            "rsvd W_0 (base)",
            "W_t sketch (intruders)",
            "full spectrum (Gram+eigvalsh)",
            "power-law fit",
            "frobenius_sq",
            "intruder_count",
            "effective_rank",
            "rest of _measure_dense",
        ]
        for key in order:
            if key in self.totals:
                v = self.totals[key]
                rows.append([key, fmt_s(v), f"{100 * v / measure_s:.1f}%", str(self.calls[key])])
        rows.append(
            [
                "outside _measure_dense (chunks, aggregates)",
                fmt_s(measure_s - inside),
                f"{100 * (measure_s - inside) / measure_s:.1f}%",
                "-",
            ]
        )
        rows.append(["measure() total", fmt_s(measure_s), "100%", "1"])
        return rows
