r"""Held-out probe: KL to the base, loss and top-1 agreement, measured without keeping the base model.

Weight spectra do not predict forgetting; the divergence of the tuned policy from the base,
:math:`KL(\pi_0 \,\|\, \pi_t)` on the new task's inputs, does (Shenfeld et al. 2025, *RL's Razor*). A
:class:`Probe` holds a few fixed batches, runs them once through the base model
(:meth:`Probe.start`) and caches, per counted token, the base's top-``k`` log-probabilities, their
token ids and the log-mass of the rest (:func:`~spectral_monitor.functional.divergence.base_topk`).
Each :meth:`Probe.measure` runs the same batches through the current model and returns a
:class:`ProbeResult`:

=================  ====================================================================================
``kl``             mean over counted tokens of the bucketed :math:`KL(\pi_0 \,\|\, \pi_t)` in nats: a
                   lower bound of the full-vocabulary KL, exact when ``k >= V`` (the bound and its gap:
                   :mod:`spectral_monitor.functional.divergence`)
``loss``           mean NLL of the counted targets (nats), the held-out loss
``loss_rel``       ``loss / base_loss - 1`` (0 on the base; NaN without targets or with a zero base loss)
``top1_agree``     share of counted tokens whose argmax is the base's most likely token
``seconds``        wall time of the call (forwards, the KL and the user metrics)
``tokens``         counted tokens
=================  ====================================================================================

plus one value per user metric (``metrics={"acc": fn}``, ``fn(model) -> float``). All means are
over tokens, pooled across batches.

The KL is per token along fixed (teacher-forced) sequences. The paper's sequence-level
:math:`KL(\pi_0 \,\|\, \pi_t)` is, by the chain rule, the expected *sum* of these per-token values
along responses sampled from the base, so batches of prompts with base-model generations make
``kl`` its per-token estimate; on other text (a held-out set, reference answers) it is a proxy.

**Which tokens count.** A causal LM's logits at position ``t`` predict token ``t + 1``, so by
default (``shift=True``, as Hugging Face causal LMs compute their loss) ``logits[:, :-1]`` are paired
with ``targets[:, 1:]``; ``shift=False`` pairs position ``t`` with ``t`` (classifiers, seq2seq
decoders fed their labels). The targets are ``labels``, or with ``shift=True`` and no labels the
``input_ids`` (HF's ``labels=input_ids`` convention). The counted positions are those whose target
is ``!= -100`` when ``labels`` are given, else those whose target position has ``attention_mask !=
0``, else all. Batches without targets (``shift=False`` and no ``labels``) count for ``kl`` and
``top1_agree`` but not for ``loss``; with none at all, ``loss`` and ``loss_rel`` are NaN.

**Forward.** Each batch is a dict of tensors exactly as the model's ``forward`` takes them; the
probe calls ``model(**batch)`` without ``labels`` (so HF models do not compute their own loss),
with ``use_cache=False`` added for models whose ``config`` has ``use_cache`` (HF), on at most
``max_tokens_per_forward`` padded tokens (whole rows: ``max(1, max_tokens_per_forward // T)``
rows of a batch of length ``T`` at a time). Tensors whose first dim is the batch's row count are
sliced along it and moved to the model's device; other values are passed as they are. The output
may be a logits tensor ``(rows, T, V)``, an object with ``.logits`` (HF ``ModelOutput``), a dict with
``"logits"`` or a tuple whose first item is the logits. Everything runs in eval mode under
``torch.no_grad()``; afterwards every module's ``training`` flag and the global torch RNG state (CPU,
and CUDA where it is initialised) are restored, also when something raises.

**Memory.** The cache holds ``8k' + 4`` bytes per counted token, ``k' = min(k, V)`` (``k'`` float32
log-probabilities, ``k'`` int32 token ids, one float32 tail): 260 B at ``k = 32``, 0.5 MiB for
64 x 32 tokens. It lives
on ``cache_device`` (default: where the logits were computed) and is moved to the logits' device
per forward. Beyond the model's own activations and logits for ``max_tokens_per_forward`` tokens,
a forward's peak is about ``n V (s + 8)`` bytes: the counted positions' logits and two float32
working copies (``n`` counted tokens, ``s`` bytes per logit in the model's dtype), 2.9 GiB for
2048 tokens at ``V`` = 152k in bf16; lower ``max_tokens_per_forward`` for large vocabularies on
a tight GPU.

**Distributed.** Call it on every rank under FSDP / ZeRO-3 (the forward needs all shards); under
DDP each rank computes the same numbers from its own replica.

Reference: I. Shenfeld, J. Pari, P. Agrawal, *RL's Razor: why online reinforcement learning
forgets less*, arXiv:2509.04259.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spectral_monitor.errors import BaseMismatchError, ConfigError
from spectral_monitor.functional.divergence import base_topk, kl_from_topk, top1_agreement

__all__ = ["Probe", "ProbeInputs", "ProbeResult", "make_probe", "text_batches"]

#: the label value of tokens that do not count (PyTorch's / HF's ``ignore_index``)
IGNORE_INDEX = -100
#: names of :meth:`ProbeResult.as_dict`'s built-in entries (user metrics may not reuse them)
RESULT_KEYS = ("kl", "loss", "loss_rel", "top1_agree", "seconds", "tokens")
_STATE_VERSION = 1


@dataclass(frozen=True)
class ProbeResult:
    """One probe measurement (see the module docstring for each field's definition and units)."""

    kl: float
    loss: float
    loss_rel: float
    top1_agree: float
    seconds: float
    tokens: int
    metrics: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        """Flat ``{name: float}``: ``kl``, ``loss``, ``loss_rel``, ``top1_agree``, ``seconds``, ``tokens`` and
        the user metrics under their own names."""
        out = {
            "kl": self.kl,
            "loss": self.loss,
            "loss_rel": self.loss_rel,
            "top1_agree": self.top1_agree,
            "seconds": self.seconds,
            "tokens": float(self.tokens),
        }
        out.update(self.metrics)
        return out


@dataclass
class _Batch:
    """One probe batch, prepared: forward inputs, counted positions and their targets."""

    raw: Mapping[str, Any]
    inputs: dict[str, Any]  # the batch without "labels"
    rows: int
    seq: int  # T, the padded length
    mask: Tensor  # (rows, T - shift) bool: counted predictions
    targets: Tensor | None  # (rows, T - shift) int64, or None
    row_tokens: list[int]  # counted tokens per row


class ProbeInputs:
    """A probe's batches, prepared once: which tokens count, their targets, and the forwards that give
    their logits (micro-batched to ``max_tokens_per_forward``). See :class:`Probe` for the arguments."""

    def __init__(
        self,
        batches: Iterable[Mapping[str, Any]],
        *,
        shift: bool = True,
        max_tokens_per_forward: int = 2048,
        device: str | torch.device | None = None,
        forward_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(max_tokens_per_forward, int) or max_tokens_per_forward < 1:
            raise ConfigError(f"max_tokens_per_forward must be an int >= 1, got {max_tokens_per_forward!r}")
        self.shift = bool(shift)
        self.max_tokens_per_forward = max_tokens_per_forward
        self.device = None if device is None else torch.device(device)
        self.forward_kwargs = None if forward_kwargs is None else dict(forward_kwargs)
        self.batches = [self._prepare(i, b) for i, b in enumerate(batches)]
        self.tokens = sum(sum(b.row_tokens) for b in self.batches)
        if self.tokens == 0:
            raise ConfigError("the probe batches have no counted tokens (all labels -100 / attention_mask 0?)")
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the batches' contents (keys, dtypes, shapes, bytes), computed once on first use."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for b in self.batches:
                h.update(b"batch")
                for key in sorted(b.raw):
                    value = b.raw[key]
                    h.update(str(key).encode())
                    if isinstance(value, Tensor):
                        t = value.detach().cpu().contiguous().reshape(-1)
                        h.update(f"{t.dtype}{tuple(value.shape)}".encode())
                        h.update(t.view(torch.uint8).numpy().tobytes())
                    else:
                        h.update(repr(value).encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def check_targets(self, vocab: int) -> None:
        """ConfigError when a counted target is outside a vocabulary of ``vocab`` tokens."""
        for i, b in enumerate(self.batches):
            if b.targets is not None and bool((b.targets[b.mask] >= vocab).any()):
                raise ConfigError(f"batch {i}: a counted target is >= the model's vocabulary size {vocab}")

    def _prepare(self, i: int, batch: Mapping[str, Any]) -> _Batch:
        if not isinstance(batch, Mapping):
            raise ConfigError(f"batch {i} must be a dict of forward arguments, got {type(batch).__name__}")
        labels = batch.get("labels")
        inputs = {key: v for key, v in batch.items() if key != "labels"}
        ids, attn = inputs.get("input_ids"), inputs.get("attention_mask")
        shape_src = next(
            (t for t in (labels, attn, ids, *inputs.values()) if isinstance(t, Tensor) and t.dim() >= 2), None
        )
        if shape_src is None:
            raise ConfigError(
                f"batch {i} has no (rows, T) tensor (labels, attention_mask or input_ids) to count tokens"
            )
        rows, seq = int(shape_src.shape[0]), int(shape_src.shape[1])
        s = int(self.shift)
        for name, t in (("labels", labels), ("attention_mask", attn), ("input_ids", ids)):
            if t is not None and (not isinstance(t, Tensor) or tuple(t.shape[:2]) != (rows, seq) or t.dim() != 2):
                raise ConfigError(f"batch {i}: {name} must be a (rows, T) = ({rows}, {seq}) tensor")
        if labels is not None:
            mask = labels[:, s:] != IGNORE_INDEX
        elif attn is not None:
            mask = attn[:, s:] != 0
        else:
            mask = torch.ones(rows, seq - s, dtype=torch.bool, device=shape_src.device)
        targets = labels if labels is not None else (ids if self.shift else None)
        if targets is not None:
            targets = targets[:, s:].long()
            if bool((targets[mask] < 0).any()):
                raise ConfigError(f"batch {i}: a counted target is negative (only {IGNORE_INDEX} marks ignored tokens)")
        return _Batch(
            raw=batch,
            inputs=inputs,
            rows=rows,
            seq=seq,
            mask=mask,
            targets=targets,
            row_tokens=mask.sum(-1).tolist(),
        )

    def _model_device(self, model: nn.Module) -> torch.device:
        if self.device is not None:
            return self.device
        p = next(model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _extra_kwargs(self, model: nn.Module) -> dict[str, Any]:
        if self.forward_kwargs is not None:
            return self.forward_kwargs
        use_cache = getattr(getattr(model, "config", None), "use_cache", None)
        return {"use_cache": False} if isinstance(use_cache, bool) else {}

    def forwards(self, model: nn.Module) -> Iterator[tuple[Tensor, Tensor | None]]:
        """Per forward: the counted positions' logits ``(n, V)`` and targets ``(n,)`` (or None), in cache order."""
        device = self._model_device(model)
        extra = self._extra_kwargs(model)
        for b in self.batches:
            step = max(1, self.max_tokens_per_forward // max(b.seq, 1))
            for r0 in range(0, b.rows, step):
                r1 = min(b.rows, r0 + step)
                if sum(b.row_tokens[r0:r1]) == 0:
                    continue
                inputs = {**extra, **{key: _rows(v, r0, r1, b.rows, device) for key, v in b.inputs.items()}}
                logits = _logits_of(model(**inputs))
                if logits.dim() != 3 or tuple(logits.shape[:2]) != (r1 - r0, b.seq):
                    raise ValueError(
                        f"expected logits of shape ({r1 - r0}, {b.seq}, V) from the model, got {tuple(logits.shape)}"
                    )
                if self.shift:
                    logits = logits[:, :-1]
                mask = b.mask[r0:r1].to(logits.device)
                sel = logits[mask]  # (n, V), a copy: the full logits are freed below
                targets = None if b.targets is None else b.targets[r0:r1].to(logits.device)[mask]
                del logits
                yield sel, targets


class Probe:
    """Held-out probe of a model against its base: KL(base ‖ model), loss, top-1 agreement.

    Args:
        batches: dicts of tensors, each exactly as ``model(**batch)`` takes it (``input_ids``,
            ``attention_mask``, ``labels``, ...; ``labels`` is not passed to the model). Kept by
            reference, not copied: do not modify them in place.
        k: base tokens cached per counted token, ``>= 1``; ``k >= V`` makes ``kl`` exact. The cache
            costs ``8 min(k, V) + 4`` bytes per token.
        shift: ``logits[:, :-1]`` predict ``targets[:, 1:]`` (causal LMs); ``False`` pairs equal positions.
        max_tokens_per_forward: padded tokens per forward (whole rows, at least one row).
        metrics: ``{name: fn}`` with ``fn(model) -> float``, evaluated on each :meth:`start` /
            :meth:`measure` under the same eval mode, ``no_grad`` and RNG restoration; names must not
            be one of :data:`RESULT_KEYS`.
        device: where the inputs go (default: the device of the model's first parameter).
        cache_device: where the base cache is kept (default: where the logits were computed).
        forward_kwargs: extra keyword arguments of every forward (default: ``{"use_cache": False}``
            for models whose ``config`` has ``use_cache``, else none); a batch's own keys win.

    Raises:
        ConfigError: invalid arguments, a batch without a usable 2-D tensor, or no counted tokens.
    """

    def __init__(
        self,
        batches: Iterable[Mapping[str, Any]],
        *,
        k: int = 32,
        shift: bool = True,
        max_tokens_per_forward: int = 2048,
        metrics: Mapping[str, Callable[[nn.Module], float]] | None = None,
        device: str | torch.device | None = None,
        cache_device: str | torch.device | None = None,
        forward_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ConfigError(f"k must be an int >= 1, got k={k!r}")
        self.metrics = dict(metrics or {})
        for name, fn in self.metrics.items():
            if name in RESULT_KEYS:
                raise ConfigError(f"metric name {name!r} is taken by a built-in probe value ({', '.join(RESULT_KEYS)})")
            if not callable(fn):
                raise ConfigError(f"metrics[{name!r}] must be callable fn(model) -> float, got {type(fn).__name__}")
        self.k = k
        self.shift = bool(shift)
        self.cache_device = None if cache_device is None else torch.device(cache_device)
        self.inputs = ProbeInputs(
            batches, shift=self.shift, max_tokens_per_forward=max_tokens_per_forward, device=device,
            forward_kwargs=forward_kwargs,
        )  # fmt: skip
        self.tokens = self.inputs.tokens
        self._vocab: int | None = None
        self._logp: Tensor | None = None  # (tokens, k') float32
        self._index: Tensor | None = None  # (tokens, k') int32
        self._tail: Tensor | None = None  # (tokens,) float32
        self.base: ProbeResult | None = None

    @classmethod
    def from_texts(
        cls,
        tokenizer: Any,
        texts: Sequence[str | tuple[str, str]],
        *,
        batch_size: int = 16,
        max_length: int | None = None,
        **kwargs: Any,
    ) -> Probe:
        """A probe of held-out text (see :func:`text_batches`); ``kwargs`` as for :class:`Probe`."""
        return cls(text_batches(tokenizer, texts, batch_size=batch_size, max_length=max_length), **kwargs)

    # ------------------------------------------------------------------ properties
    @property
    def has_base(self) -> bool:
        """True once :meth:`start` (or :meth:`load_state_dict` with a cache) has run."""
        return self._logp is not None

    @property
    def cache_bytes(self) -> int:
        """Bytes held by the base cache (0 before :meth:`start`)."""
        if self._logp is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self._logp, self._index, self._tail))

    # ------------------------------------------------------------------ public API
    def start(self, model: nn.Module) -> ProbeResult:
        """Run the batches through the base ``model`` and cache its top-k distribution (retakes the base).

        Returns:
            The base's :class:`ProbeResult` (``kl`` 0, ``top1_agree`` 1, ``loss_rel`` 0, the base
            loss and the user metrics), also kept as :attr:`base`.
        """
        t0 = time.perf_counter()
        logps, indices, tails = [], [], []
        nll, counted, with_targets, vocab = 0.0, 0, 0, None
        with _evaluating(model):
            for sel, targets in self.inputs.forwards(model):
                if vocab is None:
                    vocab = sel.shape[-1]
                    self.inputs.check_targets(vocab)
                elif sel.shape[-1] != vocab:
                    raise ValueError(f"the model's vocabulary changed between batches: {vocab} then {sel.shape[-1]}")
                logp, index, tail = base_topk(sel, self.k)
                store = self.cache_device or sel.device
                logps.append(logp.to(store, torch.float32))
                indices.append(index.to(store, torch.int32))
                tails.append(tail.to(store, torch.float32))
                if targets is not None:
                    nll += float(F.cross_entropy(sel.float(), targets, reduction="sum"))
                    with_targets += sel.shape[0]
                counted += sel.shape[0]
            metrics = self._user_metrics(model)
        self._check_count(counted)
        self._vocab = vocab
        self._logp, self._index, self._tail = torch.cat(logps), torch.cat(indices), torch.cat(tails)
        loss = nll / with_targets if with_targets else math.nan
        self.base = self._base_result(loss, time.perf_counter() - t0, metrics)
        return self.base

    def measure(self, model: nn.Module) -> ProbeResult:
        """Run the batches through ``model`` and compare it with the cached base.

        Raises:
            RuntimeError: no base yet (call :meth:`start` or :meth:`load_state_dict`).
            BaseMismatchError: the model's vocabulary differs from the base's.
        """
        if not self.has_base:
            raise RuntimeError("the probe has no base: call probe.start(base_model) (or load_state_dict) first")
        t0 = time.perf_counter()
        kl = agree = nll = 0.0
        offset = with_targets = 0
        with _evaluating(model):
            for sel, targets in self.inputs.forwards(model):
                if sel.shape[-1] != self._vocab:
                    raise BaseMismatchError(
                        f"the model's vocabulary has {sel.shape[-1]} tokens, the base's {self._vocab}"
                    )
                n = sel.shape[0]
                rows = slice(offset, offset + n)
                offset += n
                dev = sel.device
                base_index = self._index[rows].to(dev, non_blocking=True)
                # the same float32 log_softmax as start()'s, so an unchanged model reads exactly 0
                kl_tok = kl_from_topk(
                    self._logp[rows].to(dev, non_blocking=True), base_index, self._tail[rows].to(dev), sel
                )
                parts = [kl_tok.sum(), top1_agreement(base_index, sel).sum(dtype=torch.float32)]
                if targets is not None:
                    parts.append(F.cross_entropy(sel.float(), targets, reduction="sum"))
                values = torch.stack(parts).tolist()  # one device sync per forward
                kl += values[0]
                agree += values[1]
                if targets is not None:
                    nll += values[2]
                    with_targets += n
            metrics = self._user_metrics(model)
        self._check_count(offset)
        loss = nll / with_targets if with_targets else math.nan
        return ProbeResult(
            kl=kl / offset,
            loss=loss,
            loss_rel=self._relative(loss),
            top1_agree=agree / offset,
            seconds=time.perf_counter() - t0,
            tokens=offset,
            metrics=metrics,
        )

    def state_dict(self) -> dict[str, Any]:
        """The cached base (tensors included) and what identifies the batches, for checkpoints."""
        state: dict[str, Any] = {
            "version": _STATE_VERSION,
            "k": self.k,
            "shift": self.shift,
            "tokens": self.tokens,
            "fingerprint": self.inputs.fingerprint,
            "vocab": self._vocab,
        }
        if self.has_base:
            state.update(
                logp=self._logp,
                index=self._index,
                tail=self._tail,
                base_loss=self.base.loss,
                base_seconds=self.base.seconds,
                base_metrics=dict(self.base.metrics),
            )
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the cached base saved by :meth:`state_dict` (the probe must hold the same batches).

        Raises:
            BaseMismatchError: other batches (fingerprint), ``k``, ``shift`` or token count, or a
                malformed cache.
        """
        if state.get("version") != _STATE_VERSION:
            raise BaseMismatchError(f"unknown probe state version {state.get('version')!r} (expected {_STATE_VERSION})")
        if state.get("fingerprint") != self.inputs.fingerprint:
            raise BaseMismatchError("saved probe was built from other batches (their contents' fingerprints differ)")
        for key, mine in (("k", self.k), ("shift", self.shift), ("tokens", self.tokens)):
            if state.get(key) != mine:
                raise BaseMismatchError(f"saved probe has {key}={state.get(key)!r}, this one {key}={mine!r}")
        if state.get("vocab") is None:
            self._vocab, self._logp, self._index, self._tail, self.base = None, None, None, None, None
            return
        vocab = int(state["vocab"])
        logp, index, tail = state["logp"], state["index"], state["tail"]
        kept = min(self.k, vocab)
        if logp.shape != (self.tokens, kept) or index.shape != logp.shape or tail.shape != (self.tokens,):
            raise BaseMismatchError(
                f"saved probe cache has shapes {tuple(logp.shape)}, {tuple(index.shape)}, {tuple(tail.shape)}; "
                f"expected ({self.tokens}, {kept}) and ({self.tokens},)"
            )
        self.inputs.check_targets(vocab)
        move = (lambda t: t.to(self.cache_device)) if self.cache_device is not None else (lambda t: t)
        self._vocab = vocab
        self._logp, self._index, self._tail = move(logp), move(index.to(torch.int32)), move(tail)
        self.base = self._base_result(float(state["base_loss"]), float(state["base_seconds"]), state["base_metrics"])

    # ------------------------------------------------------------------ helpers
    def _user_metrics(self, model: nn.Module) -> dict[str, float]:
        out = {}
        for name, fn in self.metrics.items():
            value = fn(model)
            try:
                out[name] = float(value)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise TypeError(f"probe metric {name!r} returned {value!r}, not a number") from exc
        return out

    def _relative(self, loss: float) -> float:
        base = self.base.loss if self.base is not None else math.nan
        return loss / base - 1.0 if base > 0 else math.nan

    def _base_result(self, loss: float, seconds: float, metrics: Mapping[str, float]) -> ProbeResult:
        return ProbeResult(
            kl=0.0,
            loss=loss,
            loss_rel=0.0 if loss > 0 else math.nan,
            top1_agree=1.0,
            seconds=seconds,
            tokens=self.tokens,
            metrics={str(k): float(v) for k, v in metrics.items()},
        )

    def _check_count(self, counted: int) -> None:
        if counted != self.tokens:  # the model's logits did not cover the counted positions
            raise BaseMismatchError(f"the probe counted {counted} tokens, expected {self.tokens}")


def text_batches(
    tokenizer: Any,
    texts: Sequence[str | tuple[str, str]],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
) -> list[dict[str, Tensor]]:
    """Probe batches from text: each item a string (every token counts) or a ``(prompt, reference)``
    pair (the prompt is context, the reference's tokens count: KL and loss of the answer given the
    prompt). ``tokenizer(text)["input_ids"]`` tokenizes each item alone (no special tokens are
    added beyond what the tokenizer adds itself); rows are right-padded with the tokenizer's pad id
    (0 without one) and ``attention_mask``/``labels`` (-100) mark the padding. ``max_length``
    keeps each item's first tokens. Returns dicts of ``input_ids``, ``attention_mask``, ``labels``.
    """
    if not texts:
        raise ConfigError("a text probe needs at least one text")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = 0 if pad is None else int(pad)
    rows = []
    for item in texts:
        if isinstance(item, str):
            ids = list(tokenizer(item)["input_ids"])
            counted = [True] * len(ids)
        elif isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(x, str) for x in item):
            prompt = list(tokenizer(item[0])["input_ids"])
            answer = list(tokenizer(item[1])["input_ids"])
            ids, counted = prompt + answer, [False] * len(prompt) + [True] * len(answer)
        else:
            raise ConfigError(f"probe texts must be strings or (prompt, reference) pairs, got {item!r}")
        rows.append((ids[:max_length], counted[:max_length]) if max_length else (ids, counted))
    out = []
    for b0 in range(0, len(rows), batch_size):
        chunk = rows[b0 : b0 + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (ids, counted) in enumerate(chunk):
            input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[r, : len(ids)] = 1
            labels[r, : len(ids)] = torch.where(torch.tensor(counted), input_ids[r, : len(ids)], IGNORE_INDEX)
        out.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    return out


#: string fields of a dataset row that make a (prompt, reference) pair, in order of preference
_REFERENCE_FIELDS = ("completion", "answer", "reference", "response", "chosen")


def make_probe(
    spec: Any,
    *,
    tokenizer: Any = None,
    collate: Callable[[list[Any]], Mapping[str, Any]] | None = None,
    batch_size: int = 16,
) -> Probe:
    """A :class:`Probe` from what a user passes as ``probe=``:

    * a :class:`Probe` (used as it is);
    * strings, or ``(prompt, reference)`` pairs: tokenized with ``tokenizer`` (:func:`text_batches`);
    * rows with text fields — ``{"text": ...}``, or ``{"prompt": ..., "completion" | "answer" |
      "reference" | "response" | "chosen": ...}`` (TRL datasets): as strings or pairs;
    * batches: dicts of tensors exactly as the model's forward takes them;
    * other dataset examples (a ``torch.utils.data.Dataset`` or a list): collated with ``collate``
      (the trainer's data collator) into batches of ``batch_size``.
    """
    if isinstance(spec, Probe):
        return spec
    items = list(spec[i] for i in range(len(spec))) if not isinstance(spec, (list, tuple)) else list(spec)
    if not items:
        raise ConfigError("probe= is empty")
    first = items[0]
    if isinstance(first, (str, tuple)) or (isinstance(first, Mapping) and _text_row(first) is not None):
        if tokenizer is None:
            raise ConfigError("a text probe needs a tokenizer (the trainer's processing_class / tokenizer)")
        texts = [x if isinstance(x, (str, tuple)) else _text_row(x) for x in items]
        return Probe.from_texts(tokenizer, texts, batch_size=batch_size)
    if isinstance(first, Mapping) and all(isinstance(v, Tensor) and v.dim() >= 2 for v in first.values()):
        return Probe(items)
    if collate is None:
        raise ConfigError(
            f"probe= examples of type {type(first).__name__} need a collate function (the trainer's data collator), "
            "or pass batches (dicts of tensors), strings, or a Probe"
        )
    return Probe([collate(items[i : i + batch_size]) for i in range(0, len(items), batch_size)])


def _text_row(row: Mapping[str, Any]) -> str | tuple[str, str] | None:
    """A dataset row's text (``text``) or ``(prompt, reference)`` pair; None when it has neither."""
    if isinstance(row.get("text"), str):
        return row["text"]
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        for key in _REFERENCE_FIELDS:
            if isinstance(row.get(key), str):
                return prompt, row[key]
    return None


def _rows(value: Any, r0: int, r1: int, rows: int, device: torch.device) -> Any:
    """Rows ``r0:r1`` of a batch tensor on ``device``; other values (and tensors of another length) unchanged."""
    if isinstance(value, Tensor):
        if value.dim() >= 1 and value.shape[0] == rows:
            value = value[r0:r1]
        return value.to(device, non_blocking=True)
    return value


def _logits_of(out: Any) -> Tensor:
    """The logits in a model's output: a tensor, ``.logits``, ``["logits"]`` or the first item of a tuple."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, Mapping):
        logits = out.get("logits")
    if logits is None and isinstance(out, (tuple, list)) and out:
        logits = out[0]
    if not isinstance(logits, Tensor):
        raise TypeError(f"cannot find logits in the model's output of type {type(out).__name__}")
    return logits


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and ``no_grad`` inside; every module's ``training`` flag and the torch RNG restored after."""
    modes = [(m, m.training) for m in model.modules()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
