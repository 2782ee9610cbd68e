"""Configuration: frozen, keyword-only, validated in ``__post_init__``."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from spectral_monitor.errors import ConfigError

__all__ = ["BASE_STORES", "SKETCH_DTYPES", "MonitorConfig", "build_config"]

BASE_STORES = ("auto", "device", "cpu", "disk", "reference", "lora")
SKETCH_DTYPES = ("auto", "bfloat16", "float32")


@dataclass(frozen=True, kw_only=True)
class MonitorConfig:
    """What to monitor, how often, and how precisely.

    Layer selection
        ``layers``: ``"all-linear"`` (every 2-D linear weight of the blocks: ``nn.Linear``,
        HF ``Conv1D``, LoRA-wrapped linears; not embeddings, ``lm_head``, norms), a list of
        module names, or a regex string prefixed with ``"re:"``. ``exclude``: extra regexes (one
        string is one regex). Weights with ``requires_grad=False`` are left out unless
        ``include_frozen`` (a frozen layer's update is zero).
    Schedule
        By default the monitor keeps its wall time within ``overhead`` (a fraction, 0.01 = 1 %) of
        the training time: it sets the gap to the next measurement from the last one's cost and the
        time of a training step, at most ``max_every`` steps (beyond that it measures round-robin
        groups of layers). ``every_n_steps`` fixes the cadence instead; ``schedule(step) -> bool``
        replaces it. The first step seen (``measure_first``) and the last (the adapter passes
        ``final=True``) are always measured.
    Decomposition
        ``rank`` k of the randomized SVD of ΔW, oversampled by ``oversample`` columns (twice that
        for a cold start, where a wider sketch buys the accuracy near the cut); ``niter`` power
        iterations from a random start (the first measurement; at most 3 for W_0's cached basis)
        and ``warm_niter`` once warm-started from the previous measurement's subspace (None =
        ``niter``): the update moves slowly, so one warm iteration is about as accurate as
        several cold ones. With ``adaptive_rank`` a layer whose power-law tail is not covered by
        the top-k, while the top-k fit still looks like a power law (KS D <= ``alpha_max_ks`` or
        <= 1.36/sqrt(tail)), gets k doubled next time, up to ``max_rank`` and a quarter of the
        layer's smaller side (beyond that a sketch costs about as much as the exact full
        spectrum: use ``full_every``). Every ``full_every``-th measurement takes the full
        spectrum (exact effective rank and α; 0 = never). ``sketch_dtype``: dtype of ΔW's buffer
        and its products (``auto``: ``bfloat16`` on CUDA GPUs with bf16 tensor cores and on CPUs
        with AMX or AVX512-BF16 for layers over 2**20 weights, else ``float32``). ΔW is formed
        in float32 (norms, sparsity and NaN checks use it) and rounded once; QRs and the small
        SVDs stay float32/64, so σ moves by <= 3e-4 relative (docs/metrics.md).
    Base
        ``base_store``: where W_0 lives (``auto``: reference model or LoRA factors when present,
        else ``device``); ``base_dir`` for ``disk``. ``memory_budget_mb`` bounds the working
        set (ΔW buffers) of one batch of same-shape layers.
    Threads
        ``threads``: the most PyTorch CPU intra-op threads a measurement uses (never more than the
        process's own; the caller's count is restored after it); None: the process's setting. A
        measurement is many tiny operations, and with several threads each one waits for every
        thread's turn on a shared CPU (docs/faq.md).
    Safety
        ``strict=True`` raises errors from inside the monitor instead of logging them once
        and skipping the measurement.
    """

    layers: str | Sequence[str] = "all-linear"
    exclude: str | Sequence[str] = ()
    include_frozen: bool = False
    every_n_steps: int | None = None
    overhead: float = 0.01
    max_every: int = 200
    measure_first: bool = True
    schedule: Callable[[int], bool] | None = field(default=None, compare=False)

    rank: int = 32
    oversample: int = 10
    niter: int = 6
    warm_niter: int | None = 1
    adaptive_rank: bool = True
    max_rank: int = 256
    full_every: int = 0
    align_k: int = 8
    base_k: int = 32
    sketch_dtype: str = "auto"
    intruders: bool = True
    intruder_threshold: float = 0.5
    sparsity_eta: float = 1e-3

    alpha_min_tail: int = 10
    alpha_max_ks: float = 0.1

    base_store: str = "auto"
    base_dir: str | None = None
    device: str | None = None
    memory_budget_mb: int = 1024
    seed: int = 0
    threads: int | None = 1
    strict: bool = False

    def __post_init__(self) -> None:
        if self.every_n_steps is not None and (
            not isinstance(self.every_n_steps, int) or isinstance(self.every_n_steps, bool) or self.every_n_steps < 1
        ):
            raise ConfigError(f"MonitorConfig.every_n_steps must be None or a positive int, got {self.every_n_steps!r}")
        if isinstance(self.overhead, bool) or not isinstance(self.overhead, (int, float)) or not 0 < self.overhead <= 1:
            raise ConfigError(f"MonitorConfig.overhead must be a fraction in (0, 1], got {self.overhead!r}")
        _positive = ("max_every", "rank", "max_rank", "align_k", "base_k", "alpha_min_tail", "memory_budget_mb")
        for name in _positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"MonitorConfig.{name} must be a positive int, got {value!r}")
        if self.warm_niter is not None and (not isinstance(self.warm_niter, int) or self.warm_niter < 0):
            raise ConfigError(f"MonitorConfig.warm_niter must be None or an int >= 0, got {self.warm_niter!r}")
        for name in ("oversample", "niter", "full_every", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"MonitorConfig.{name} must be an int >= 0, got {value!r}")
        if self.max_rank < self.rank:
            raise ConfigError(f"MonitorConfig.max_rank ({self.max_rank}) must be >= rank ({self.rank})")
        if self.sketch_dtype not in SKETCH_DTYPES:
            raise ConfigError(f"MonitorConfig.sketch_dtype must be one of {SKETCH_DTYPES}, got {self.sketch_dtype!r}")
        if self.base_store not in BASE_STORES:
            raise ConfigError(f"MonitorConfig.base_store must be one of {BASE_STORES}, got {self.base_store!r}")
        if self.base_store == "disk" and not self.base_dir:
            raise ConfigError("MonitorConfig.base_store='disk' needs base_dir=<folder for the snapshot>")
        if not 0.0 < self.intruder_threshold < 1.0:
            raise ConfigError(f"MonitorConfig.intruder_threshold must be in (0, 1), got {self.intruder_threshold!r}")
        if not 0.0 < self.alpha_max_ks <= 1.0:
            raise ConfigError(f"MonitorConfig.alpha_max_ks must be in (0, 1], got {self.alpha_max_ks!r}")
        if isinstance(self.layers, str):
            if self.layers != "all-linear" and not self.layers.startswith("re:"):
                raise ConfigError(
                    f"MonitorConfig.layers must be 'all-linear', 're:<regex>' or a list of names, got {self.layers!r}"
                )
            if self.layers.startswith("re:"):
                _check_regex("layers", self.layers[3:], self.layers)
        else:
            object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "exclude", (self.exclude,) if isinstance(self.exclude, str) else tuple(self.exclude))
        for pattern in self.exclude:
            _check_regex("exclude", pattern, pattern)
        if self.schedule is not None and not callable(self.schedule):
            raise ConfigError(f"MonitorConfig.schedule must be callable(step) -> bool, got {self.schedule!r}")
        if self.device is not None:
            _check_device(self.device)
        if self.threads is not None and (
            not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 1
        ):
            raise ConfigError(f"MonitorConfig.threads must be None or a positive int, got {self.threads!r}")

    def is_scheduled(self, step: int) -> bool:
        """True when optimizer step ``step`` is on the fixed schedule (``schedule(step)``, else a
        multiple of ``every_n_steps``; never without either: the budget decides then, see
        :mod:`spectral_monitor.schedule`). The run adds the first step it sees and the last."""
        if self.schedule is not None:
            return bool(self.schedule(step))
        return self.every_n_steps is not None and step % self.every_n_steps == 0

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-friendly data (the schedule callable is shown by name)."""
        data = asdict(self)
        data["layers"] = data["layers"] if isinstance(data["layers"], str) else list(data["layers"])
        data["exclude"] = list(data["exclude"])
        data["schedule"] = getattr(self.schedule, "__name__", repr(self.schedule)) if self.schedule else None
        return data


def _check_regex(name: str, pattern: str, shown: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"MonitorConfig.{name}={shown!r} is not a valid regular expression: {exc}") from None


def _check_device(device: str) -> None:
    """A device string torch understands and this machine has."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"MonitorConfig.device={device!r} is not a device: {exc}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"MonitorConfig.device={device!r}, but torch sees no CUDA device on this machine")
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"MonitorConfig.device={device!r}, but torch sees only {count} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"MonitorConfig.device={device!r}, but MPS is not available on this machine")


def build_config(config: MonitorConfig | None, kwargs: Mapping[str, Any], *, owner: str) -> MonitorConfig:
    """``config``, or a :class:`MonitorConfig` from ``kwargs`` (not both); a misspelt field name gets
    a :class:`ConfigError` that suggests the right one. ``owner`` names the caller in messages."""
    names = [f.name for f in fields(MonitorConfig)]
    unknown = [k for k in kwargs if k not in names]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, names, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"{owner} got unknown option(s) {', '.join(hints)}; the options are MonitorConfig's fields")
    if config is not None and kwargs:
        raise ConfigError(f"{owner}: pass either config=MonitorConfig(...) or keyword arguments, not both")
    return config if config is not None else MonitorConfig(**kwargs)
