r"""Rank-k substitution: replace every monitored update by its top-k part (the paper's probe).

For every monitored layer with weight :math:`W_t`, base :math:`W_0` and update
:math:`\Delta W = W_t - W_0 = \sum_i \sigma_i u_i v_i^\top`, the substituted weight is

.. math::  W_0 + c\,\Delta W_k, \qquad \Delta W_k = U_k \operatorname{diag}(S_k) V_k^\top,

with :math:`c = 1` (plain truncation, the default) or, with ``rescale=True``, AlphaRL's
:math:`c = \lVert\Delta W\rVert_F / \lVert\Delta W_k\rVert_F` (the top-k part stretched to the full
update's norm; Cai et al., arXiv 2510.00553, ``eval/upd_rank.py``). Rank 0 gives :math:`W_0`
(exactly: the base is copied in); a rank at or above the update's rank gives :math:`W_t` back
(to float32 round-off). :class:`PeriodicSubstitution` repeats it every K steps during training
(docs/substitution.md).

Two modes:

* :func:`substituted` — a context manager: evaluate anything inside, then every touched
  parameter is copied back from a backup, bit for bit, also when the body raises;
* :func:`substitute_` — keep the substituted weights (the "periodic" training mode). The
  optimizer state (e.g. Adam moments) is not touched; reset it yourself if you want that.

:func:`rank_k_probe` evaluates the full model and each rank-k model with one user function and
returns flat ``spectral/probe/...`` keys.

**How.** Dense and ``Conv1D`` layers: :math:`\Delta W` is formed per layer in float32 in the
canonical ``(out, in)`` orientation on the weight's device, decomposed by the randomized SVD
(warm-started from the monitor's last right subspace when it has one; ``exact=True`` takes a full
SVD), and :math:`W_0 + c\,\Delta W_k` is written back in the parameter's own orientation and dtype.
LoRA layers: :math:`\Delta W = \sum_a s_a B_a A_a` has an exact SVD from its factors; the rank-k part
is written into the *factors* — the first adapter gets :math:`B \leftarrow c\,U_k S_k / s`,
:math:`A \leftarrow V_k^\top` in its first k rows (further adapters take the components that do not
fit), every other column of B is zeroed, so :math:`\sum_a s_a B_a A_a = c\,\Delta W_k` exactly in
exact arithmetic. The unused rows of A keep their values: they are multiplied by zero columns of B,
so they add nothing, and in the periodic mode they keep those LoRA directions trainable
(a zero row of A and a zero column of B would both get zero gradient forever). The frozen base
weight of a LoRA layer is never written. LoRA variants (DoRA, ...) and merged adapters are skipped
(their update is not :math:`\sum_a s_a B_a A_a`), listed in :attr:`SubstitutionInfo.skipped`.

**Unmonitored parameters** (biases, norms, embeddings, layers not selected) stay as trained, or
with ``revert_unmonitored=True`` are set to their base values. The monitor's base store holds only
the monitored weights, so that option needs a full-model base: ``base_state_dict`` (e.g. the
``state_dict()`` of the model before training, or a checkpoint), or the monitor's ``reference``
module when it has one. Names are matched after removing DDP/compile/FSDP wrappers, PEFT's
``base_model.model.`` prefix and ``.base_layer``; parameters without an entry stay trained and are
listed in :attr:`SubstitutionInfo.not_reverted`. Buffers are never touched.

**Randomness.** Sketches draw from a private ``torch.Generator`` seeded with ``seed`` (default:
the monitor's config seed); the global RNG is never used.

Writes are in place (``copy_`` under ``no_grad``), so call these between optimizer steps, not
while an autograd graph that saved the weights is waiting for ``backward``. Single-process only:
under FSDP / ZeRO-3 the parameters are shards, not the weights.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from spectral_monitor.engine import SpectralMonitor
from spectral_monitor.errors import BaseMismatchError, NonFiniteError
from spectral_monitor.functional import frobenius_sq, lora_svd, randomized_svd
from spectral_monitor.layers import LayerSpec
from spectral_monitor.records import PREFIX
from spectral_monitor.snapshot import strip_wrappers

__all__ = [
    "LayerSubstitution",
    "PeriodicSubstitution",
    "SubstitutionInfo",
    "SubstitutionOptions",
    "rank_k_probe",
    "substitute_",
    "substituted",
]

log = logging.getLogger("spectral_monitor")

#: default number of power iterations of the substitution sketch (it runs rarely; its u₁, v₁ matter)
DEFAULT_NITER = 4


@dataclass(frozen=True)
class LayerSubstitution:
    """What was substituted in one layer.

    ``rank``: components kept (the requested rank, clamped to the layer's); ``update_norm``:
    ‖ΔW‖_F; ``kept_norm``: ‖ΔW_k‖_F; ``scale``: c (1 unless ``rescale``).
    """

    name: str
    kind: str
    rank: int
    update_norm: float
    kept_norm: float
    scale: float

    @property
    def energy_share(self) -> float:
        """‖ΔW_k‖_F² / ‖ΔW‖_F² (the top-k energy; NaN for a zero update)."""
        return self.kept_norm**2 / self.update_norm**2 if self.update_norm > 0 else math.nan

    @property
    def norm_ratio(self) -> float:
        """‖ΔW_k‖_F / ‖ΔW‖_F (NaN for a zero update)."""
        return self.kept_norm / self.update_norm if self.update_norm > 0 else math.nan


@dataclass
class SubstitutionInfo:
    """What :func:`substituted` / :func:`substitute_` did.

    ``layers``: per substituted layer; ``skipped``: layer name -> reason (left as trained);
    ``reverted``: unmonitored parameters set to their base (those already equal to it are not
    listed); ``not_reverted``: trainable unmonitored parameters with no entry in the base state dict.
    """

    rank: int
    rescale: bool
    layers: dict[str, LayerSubstitution] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    reverted: list[str] = field(default_factory=list)
    not_reverted: list[str] = field(default_factory=list)

    @property
    def energy_share(self) -> float:
        """Σ‖ΔW_k‖_F² / Σ‖ΔW‖_F² over the substituted layers (NaN when nothing moved)."""
        total = sum(s.update_norm**2 for s in self.layers.values())
        return sum(s.kept_norm**2 for s in self.layers.values()) / total if total > 0 else math.nan

    @property
    def norm_ratio(self) -> float:
        """Σ‖ΔW_k‖_F / Σ‖ΔW‖_F over the substituted layers — the number AlphaRL's script prints."""
        total = sum(s.update_norm for s in self.layers.values())
        return sum(s.kept_norm for s in self.layers.values()) / total if total > 0 else math.nan

    def metrics(self, prefix: str = f"{PREFIX}/probe/substitution") -> dict[str, float]:
        """Flat keys: ``<prefix>/energy_share/<layer>``, ``<prefix>/norm_ratio/<layer>``, the totals
        ``<prefix>/energy_share``, ``<prefix>/norm_ratio`` and ``<prefix>/skipped`` (a count)."""
        out = {f"{prefix}/energy_share": self.energy_share, f"{prefix}/norm_ratio": self.norm_ratio}
        for name, s in self.layers.items():
            out[f"{prefix}/energy_share/{name}"] = s.energy_share
            out[f"{prefix}/norm_ratio/{name}"] = s.norm_ratio
        out[f"{prefix}/skipped"] = float(len(self.skipped))
        return out


@dataclass(frozen=True, kw_only=True)
class SubstitutionOptions:
    """How to substitute.

    ``rank``: k >= 0 components kept per layer (0: the base weights). ``rescale``: c = ‖ΔW‖_F /
    ‖ΔW_k‖_F (AlphaRL) instead of c = 1. ``revert_unmonitored``: also set the unmonitored
    parameters to their base values, read from ``base_state_dict`` or, when that is None, from the
    monitor's ``reference`` module. ``exact``: full SVD per layer instead of the randomized one.
    ``niter``, ``oversample``: randomized-SVD power iterations and oversampling (``oversample``
    defaults to the monitor's config). ``seed``: seed of the private generator (default: the
    monitor's config seed). ``backup_device``: where the originals are kept meanwhile (default:
    each parameter's own device; ``"cpu"`` to spare accelerator memory). ``strict``: raise instead
    of skipping a layer that cannot be substituted (non-finite weights, DoRA, merged adapter);
    default: the monitor's ``config.strict``.
    """

    rank: int = 1
    rescale: bool = False
    revert_unmonitored: bool = False
    base_state_dict: Mapping[str, Tensor] | None = field(default=None, repr=False, compare=False)
    exact: bool = False
    niter: int = DEFAULT_NITER
    oversample: int | None = None
    seed: int | None = None
    backup_device: str | torch.device | None = None
    strict: bool | None = None

    def __post_init__(self) -> None:
        _check_rank(self.rank)
        if not isinstance(self.niter, int) or isinstance(self.niter, bool) or self.niter < 0:
            raise ValueError(f"niter must be an int >= 0, got niter={self.niter!r}")


def _options(rank: int, options: SubstitutionOptions | None, kwargs: Mapping[str, Any]) -> SubstitutionOptions:
    if options is None:
        return SubstitutionOptions(rank=rank, **kwargs)
    if kwargs:
        raise TypeError("pass either options=SubstitutionOptions(...) or keyword arguments, not both")
    return options


# ----------------------------------------------------------------------------- public API
@contextlib.contextmanager
def substituted(
    monitor: Any, rank: int = 1, *, options: SubstitutionOptions | None = None, **kwargs: Any
) -> Iterator[SubstitutionInfo]:
    """Temporarily set every monitored weight to W_0 + c·ΔW_k; restore it bit for bit on exit.

    ``monitor``: a :class:`SpectralMonitor` with a base (or a :class:`MonitorRun`); ``rank`` and the
    other keyword arguments are the fields of :class:`SubstitutionOptions` (or pass ``options=``).

    Yields :class:`SubstitutionInfo`. Every touched parameter keeps its storage; its values are
    copied back from the backup in ``finally``, so they are bit-identical afterwards, also when
    the body raises.
    """
    job = _Substitution(_as_monitor(monitor), _options(rank, options, kwargs))
    try:
        yield job.apply()
    finally:
        job.restore()


def substitute_(
    monitor: Any, rank: int = 1, *, options: SubstitutionOptions | None = None, **kwargs: Any
) -> SubstitutionInfo:
    """Set every monitored weight to W_0 + c·ΔW_k and keep it (the periodic training mode).

    Same arguments as :func:`substituted`. The parameters keep their identity and storage, so
    the optimizer keeps working on them, but its state (Adam moments, step counts) is left as
    it was: it still describes the pre-substitution trajectory. All or nothing: if anything
    fails midway, the weights already written are restored before the error propagates.
    """
    job = _Substitution(_as_monitor(monitor), _options(rank, options, kwargs))
    try:
        info = job.apply()
    except BaseException:
        job.restore()
        raise
    job.discard()
    return info


def rank_k_probe(
    monitor: Any,
    evaluate: Callable[[nn.Module], Mapping[str, Any]],
    ranks: Iterable[int] = (1,),
    *,
    rescale: bool = False,
    include_base: bool = False,
    prefix: str = f"{PREFIX}/probe",
    **kwargs: Any,
) -> dict[str, float]:
    """Evaluate the full model and each rank-k substituted model; flat keys for logging or rules.

    ``evaluate(model) -> {name: value}`` is called on the monitor's model as it is (key
    ``<prefix>/full/<name>``), once per rank k inside :func:`substituted` (``<prefix>/rank<k>/<name>``,
    ``rank<k>_rescaled`` with ``rescale=True``), and with ``include_base=True`` once at rank 0
    (``<prefix>/base/<name>``) plus the share of the gain kept,
    ``<prefix>/rank<k>/<name>_share`` = (rank-k − base) / (full − base) (NaN when full == base).
    Other keyword arguments are :class:`SubstitutionOptions` fields (``revert_unmonitored`` applies
    to the base evaluation too, which is then the true W_0 model). The model is restored exactly
    after each evaluation; ``evaluate`` itself decides train/eval mode, no_grad and its randomness.
    """
    mon = _as_monitor(monitor)
    ranks = [_check_rank(k) for k in ranks]
    tag = "_rescaled" if rescale else ""
    out: dict[str, float] = {}
    full = _floats(evaluate(mon.model), "full")
    out.update({f"{prefix}/full/{k}": v for k, v in full.items()})
    base = None
    if include_base:
        with substituted(mon, 0, **kwargs):
            base = _floats(evaluate(mon.model), "base")
        out.update({f"{prefix}/base/{k}": v for k, v in base.items()})
    for k in ranks:
        with substituted(mon, k, rescale=rescale, **kwargs):
            vals = _floats(evaluate(mon.model), f"rank {k}")
        for name, v in vals.items():
            out[f"{prefix}/rank{k}{tag}/{name}"] = v
            if base is not None and name in base and name in full:
                gain = full[name] - base[name]
                out[f"{prefix}/rank{k}{tag}/{name}_share"] = (v - base[name]) / gain if gain != 0 else math.nan
    return out


@dataclass(frozen=True, kw_only=True)
class PeriodicSubstitution:
    """Rank-k substitution on the monitor's measurement steps (``MonitorRun(substitution=...)``).

    ``every``: substitute at the measurements of every ``every``-th optimizer step (None: only at
    the last one). ``keep=True`` is the paper's training-time intervention: every monitored ΔW is
    replaced by its rank-``rank`` part and training continues from there (the optimizer state is
    left as it was); ``keep=False`` only evaluates the substituted model and restores the weights
    bit for bit. ``evaluate(model) -> {name: value}`` is called before and after the substitution:
    the report's probes get ``substitution/full/<name>``, ``substitution/rank<k>/<name>`` and the
    energy share kept, ``substitution/energy_share``. ``options``: the other
    :class:`SubstitutionOptions` fields (``rescale``, ``exact``, ...).

    Cost per substitution: one randomized SVD per monitored layer (about one measurement) plus two
    ``evaluate`` calls.
    """

    every: int | None = None
    rank: int = 1
    keep: bool = True
    evaluate: Callable[[nn.Module], Mapping[str, Any]] | None = field(default=None, compare=False)
    options: SubstitutionOptions | None = None

    def __post_init__(self) -> None:
        _check_rank(self.rank)
        if self.every is not None and (not isinstance(self.every, int) or self.every < 1):
            raise ValueError(f"every must be None or an int >= 1, got every={self.every!r}")

    def due(self, step: int, *, final: bool) -> bool:
        """Substitute at this measurement?"""
        return final if self.every is None else step % self.every == 0

    def apply(self, monitor: Any) -> dict[str, float]:
        """Evaluate, substitute (kept or restored), evaluate again; the probe values to log."""
        mon = _as_monitor(monitor)
        options = replace(self.options or SubstitutionOptions(), rank=self.rank)
        tag = f"rank{self.rank}"
        out: dict[str, float] = {}
        if self.evaluate is not None:
            out.update({f"substitution/full/{k}": v for k, v in _floats(self.evaluate(mon.model), "full").items()})
        if self.keep:
            info = substitute_(mon, options=options)
            after = _floats(self.evaluate(mon.model), tag) if self.evaluate is not None else {}
        else:
            with substituted(mon, options=options) as info:
                after = _floats(self.evaluate(mon.model), tag) if self.evaluate is not None else {}
        out.update({f"substitution/{tag}/{k}": v for k, v in after.items()})
        out["substitution/energy_share"] = info.energy_share
        out["substitution/skipped"] = float(len(info.skipped))
        return out


# ----------------------------------------------------------------------------- helpers
def _as_monitor(obj: Any) -> SpectralMonitor:
    if isinstance(obj, SpectralMonitor):
        return obj
    inner = getattr(obj, "monitor", None)  # MonitorRun (not imported: run sits above this module)
    if isinstance(inner, SpectralMonitor):
        return inner
    raise TypeError(f"expected a SpectralMonitor or MonitorRun, got {type(obj).__name__}")


def _check_rank(rank: Any) -> int:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise ValueError(f"rank must be an int >= 0, got rank={rank!r}")
    return rank


def _floats(values: Mapping[str, Any], what: str) -> dict[str, float]:
    if not isinstance(values, Mapping):
        raise TypeError(f"evaluate(model) must return a mapping name -> number, got {type(values).__name__} ({what})")
    out = {}
    for key, value in values.items():
        try:
            out[str(key)] = float(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"evaluate(model)[{key!r}] is not a number: {value!r} ({what})") from exc
    return out


def _normalise(name: str) -> str:
    """Parameter name without wrapper components, PEFT's prefix and ``.base_layer``."""
    name = strip_wrappers(name).removeprefix("base_model.model.")
    return ".".join(part for part in name.split(".") if part != "base_layer")


class _Substitution:
    """One substitution: computes and writes the new weights, keeps the backups, restores them."""

    def __init__(self, monitor: SpectralMonitor, options: SubstitutionOptions) -> None:
        self.monitor = monitor
        self.rank = options.rank
        self.rescale = options.rescale
        self.exact = options.exact
        self.niter = options.niter
        self.oversample = monitor.config.oversample if options.oversample is None else options.oversample
        self.seed = monitor.config.seed if options.seed is None else options.seed
        self.backup_device = None if options.backup_device is None else torch.device(options.backup_device)
        self.strict = monitor.config.strict if options.strict is None else options.strict
        self.revert_unmonitored = options.revert_unmonitored
        self.base_state_dict = options.base_state_dict
        if self.revert_unmonitored and self.base_state_dict is None:
            if monitor.reference is None:
                raise ValueError(
                    "revert_unmonitored=True needs the full-model base: pass base_state_dict= (e.g. the model's "
                    "state_dict() before training); the monitor's store holds only the monitored weights"
                )
            self.base_state_dict = monitor.reference.state_dict()
        self._backups: dict[int, tuple[Tensor, Tensor]] = {}
        self._generators: dict[torch.device, torch.Generator] = {}

    # ------------------------------------------------------------------ bookkeeping
    def _backup(self, p: Tensor) -> None:
        if id(p) not in self._backups:
            dev = p.device if self.backup_device is None else self.backup_device
            self._backups[id(p)] = (p, p.detach().to(dev, copy=True))

    def _write(self, p: Tensor, value: Tensor) -> None:
        """Back ``p`` up (once), then copy ``value`` into it (in ``p``'s dtype, storage kept)."""
        self._backup(p)
        p.copy_(value)

    def restore(self) -> None:
        with torch.no_grad():
            for p, saved in reversed(list(self._backups.values())):
                p.copy_(saved)
        self._backups.clear()

    def discard(self) -> None:
        self._backups.clear()

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed * 1_000_003 + 0x5B57)
            self._generators[device] = gen
        return self._generators[device]

    def _skip(self, info: SubstitutionInfo, spec: LayerSpec, reason: str, exc: type[Exception] = ValueError) -> None:
        if self.strict:
            raise exc(f"cannot substitute layer {spec.name!r}: {reason}")
        info.skipped[spec.name] = reason
        log.warning("spectral_monitor: substitution left layer %s as trained: %s", spec.name, reason)

    # ------------------------------------------------------------------ apply
    def apply(self) -> SubstitutionInfo:
        mon = self.monitor
        if not mon.has_base:
            raise RuntimeError("substitution needs the base W_0: call monitor.snapshot() (or set_base) first")
        info = SubstitutionInfo(rank=self.rank, rescale=self.rescale)
        with torch.no_grad():
            for spec in mon.specs:
                if spec.kind == "lora":
                    self._lora(spec, info)
                else:
                    self._dense(spec, info)
            if self.revert_unmonitored:
                self._revert(info)
        return info

    def _coefficient(self, update_norm: float, kept_norm: float) -> float:
        if self.rescale and kept_norm > 0:
            return update_norm / kept_norm
        return 1.0

    def _dense(self, spec: LayerSpec, info: SubstitutionInfo) -> None:
        p = spec.parameter()
        device = p.device
        base = self.monitor.store.get(spec, device)
        if tuple(base.shape) != tuple(p.shape):
            raise BaseMismatchError(
                f"layer {spec.name!r}: weight shape {tuple(p.shape)} vs base {tuple(base.shape)}; "
                "the base is from another model"
            )
        W0 = spec.canonical(base).float()
        D = spec.canonical(p.detach()).float() - W0  # a new float32 buffer
        if not bool(torch.isfinite(D).all()):
            self._skip(info, spec, "non-finite weights (NaN/Inf)", NonFiniteError)
            return
        update_norm = math.sqrt(float(frobenius_sq(D)))
        m, n = spec.shape
        k = min(self.rank, m, n)
        if k == 0 or update_norm == 0.0:
            info.layers[spec.name] = LayerSubstitution(spec.name, spec.kind, k, update_norm, 0.0, 1.0)
            self._write(p, base)  # W_0 bit for bit (a zero update: W_t already equals it)
            return
        if self.exact:
            U, S, Vh = torch.linalg.svd(D, full_matrices=False)
            U, S, V = U[:, :k], S[:k], Vh[:k].mT
        else:
            state = self.monitor.layer_state(spec.name)
            init = None
            if state is not None and state.prev_v is not None and state.prev_v.shape[0] == n:
                init = state.prev_v.to(device)
            U, S, V = randomized_svd(
                D, k, niter=self.niter, oversample=self.oversample, init=init, generator=self._generator(device)
            )
        del D
        kept = math.sqrt(float((S.double() ** 2).sum()))
        c = self._coefficient(update_norm, kept)
        new = torch.addmm(W0, U * (S * c), V.mT)  # W_0 + c·U_k S_k V_kᵀ, canonical, float32
        info.layers[spec.name] = LayerSubstitution(spec.name, spec.kind, k, update_norm, kept, c)
        self._write(p, new.t() if spec.transposed else new)

    def _lora(self, spec: LayerSpec, info: SubstitutionInfo) -> None:
        try:
            adapters = spec.lora_adapters()
        except ValueError as exc:
            self._skip(info, spec, str(exc))
            return
        if not adapters:
            info.skipped[spec.name] = "no active LoRA adapter"  # ΔW = 0: nothing to substitute
            return
        B = torch.cat([a.B.detach().float() * a.scale for a in adapters], dim=1)
        A = torch.cat([a.A.detach().float() for a in adapters], dim=0)
        if not (bool(torch.isfinite(B).all()) and bool(torch.isfinite(A).all())):
            self._skip(info, spec, "non-finite LoRA factors (NaN/Inf)", NonFiniteError)
            return
        U, S, V = lora_svd(B, A, 1.0)
        update_norm = math.sqrt(float((S.double() ** 2).sum()))
        k = min(self.rank, S.shape[0])
        kept = math.sqrt(float((S[:k].double() ** 2).sum()))
        c = self._coefficient(update_norm, kept)
        # components with σ = 0 need no room; the rest must fit into the adapters with a usable scale
        need = int((S[:k] > 0).sum())
        room = sum(a.B.shape[1] for a in adapters if a.scale != 0.0 and math.isfinite(a.scale))
        if need > room:
            self._skip(info, spec, f"{need} components do not fit into adapters of total rank {room}")
            return
        US = U[:, :need] * (S[:need] * c)
        Vt = V[:, :need].mT
        offset = 0
        for a in adapters:
            r = a.B.shape[1]
            used = 0 if a.scale == 0.0 or not math.isfinite(a.scale) else min(r, need - offset)
            newB = torch.zeros(a.B.shape, dtype=torch.float32, device=a.B.device)
            newB[:, :used] = US[:, offset : offset + used].to(a.B.device) / a.scale
            self._write(a.B, newB)
            if used:
                newA = a.A.detach().float().clone()
                newA[:used] = Vt[offset : offset + used].to(a.A.device)
                self._write(a.A, newA)
            offset += used
        info.layers[spec.name] = LayerSubstitution(spec.name, spec.kind, k, update_norm, kept, c)

    # ------------------------------------------------------------------ unmonitored
    def _revert(self, info: SubstitutionInfo) -> None:
        mon = self.monitor
        monitored = set()
        lora_prefixes = []
        for spec in mon.specs:
            monitored.add(spec.param_name)
            if spec.kind == "lora":
                lora_prefixes += [f"{spec.name}.lora_A.", f"{spec.name}.lora_B."]
        base = {_normalise(k): v for k, v in self.base_state_dict.items()}
        for name, p in mon.model.named_parameters():
            if name in monitored or (name.startswith(tuple(lora_prefixes)) and name.endswith(".weight")):
                continue  # substituted (a LoRA bias, lora_bias=True, counts as unmonitored)
            ref = base.get(_normalise(name))
            if ref is None:
                if p.requires_grad:
                    info.not_reverted.append(name)
                continue
            if tuple(ref.shape) != tuple(p.shape):
                raise BaseMismatchError(
                    f"base_state_dict entry for {name!r} has shape {tuple(ref.shape)} but the model's is "
                    f"{tuple(p.shape)}; is the base from another model?"
                )
            ref = ref.detach().to(p.device)
            if torch.equal(p.detach(), ref.to(p.dtype)):
                continue
            self._write(p, ref)
            info.reverted.append(name)
