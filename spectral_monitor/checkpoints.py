"""Checkpoints on disk for the offline comparison of a base and a tuned model.

:func:`open_checkpoint` opens a Hugging Face model folder (``model.safetensors``, or shards with
``model.safetensors.index.json``), a single ``.safetensors`` file, or a PEFT LoRA adapter folder
(``adapter_config.json`` + ``adapter_model.safetensors``). Only the safetensors headers are read
when opening; tensor data is read one tensor at a time, on demand.

:func:`plan_updates` matches the monitored weights of BASE and TUNED from the headers alone
(names, shapes, dtypes, architectures), so every mismatch is raised before any data is read;
:func:`pair_updates` then yields one :class:`TensorPair` per layer with the canonical ``(out, in)``
base weight and either the tuned weight or the LoRA factors. Peak memory is about one layer of each
side plus the caller's ΔW buffer, never a whole model.

Which weights: every 2-D ``*.weight`` except embeddings, output/classifier heads and norms (the
names of ``layers.DEFAULT_EXCLUDE``, plus embedding/norm names that ``select_layers`` leaves out by
module type). GPT-2-family ``Conv1D`` weights (``c_attn``, ``q_attn``, ``c_fc``, ``c_proj``) are
stored ``(in, out)`` and transposed.

Name matching between the two sides: names are compared after removing wrapper components
(``module.``, ``_orig_mod.``, ...) and a leading PEFT ``base_model.model.``; then one leading
prefix per side (``""`` or the first one or two dotted components, e.g. ``transformer.`` or
``model.language_model.``) is removed from the names that carry it, choosing the pair of prefixes
that makes the most monitored names equal (ties: the shortest prefixes). So ``GPT2Model``'s
``h.0.attn.c_attn.weight`` matches ``GPT2LMHeadModel``'s ``transformer.h.0.attn.c_attn.weight``.
Tied weights are always embeddings or heads, which are never compared, so a tensor that one side
stores only as a tie is never reported missing.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from spectral_monitor.errors import CheckpointError, ConfigError
from spectral_monitor.layers import exclusions, is_selected, layer_depth, layer_type, select_names
from spectral_monitor.snapshot import strip_wrappers

__all__ = [
    "CONV1D_MODEL_TYPES",
    "AdapterCheckpoint",
    "Checkpoint",
    "PairPlan",
    "TensorInfo",
    "TensorPair",
    "UpdatePlan",
    "open_checkpoint",
    "pair_updates",
    "plan_updates",
]

# transformers model types whose c_attn / q_attn / c_fc / c_proj are Conv1D (weight stored (in, out)).
CONV1D_MODEL_TYPES = frozenset(
    {"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp", "clvp_encoder", "clvp_decoder"}
)
_CONV1D_MODULE = re.compile(r"(^|\.)(c_attn|q_attn|c_fc|c_proj)$")

# Leaf-module names that are never linear layers; select_layers drops them by module type, here
# only the name is known: embeddings (embed_in, embed_positions, token_type_embeddings, T5's shared
# and relative_attention_bias) and norms.
_NOT_LINEAR = re.compile(r"(^|\.)([^.]*embed[^.]*|shared|relative_attention_bias|[^.]*norm[^.]*|ln_[^.]*|ln)$", re.I)

# safetensors dtype -> torch dtype of the weights that can be compared (float8 is a quantized
# format whose scales live in other tensors, so raw float8 values are not the weights).
_FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}

# LoraConfig fields that turn on a LoRA variant (PEFT marks them is_lora_variant; QALoRA pools the input).
_LORA_VARIANTS = (
    "use_dora",
    "use_qalora",
    "use_bdlora",
    "velora_config",
    "alora_invocation_tokens",
    "monteclora_config",
    "arrow_config",
    "kasa_config",
)

_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+?)\.lora_(?P<part>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")
_LORA_EMBEDDING_KEY = re.compile(r"^(?P<module>.+?)\.lora_embedding_[AB](?:\.[^.]+)?$")
_SAVED_MODULE_KEY = re.compile(r"^(?P<module>.+?)(?:\.modules_to_save(?:\.[^.]+)?)?\.weight$")


@dataclass(frozen=True)
class TensorInfo:
    """Header entry of one stored tensor: ``shape`` as stored, ``dtype`` as safetensors names it (``BF16``)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    file: Path


class Checkpoint:
    """A model checkpoint on disk: tensor headers, ``config.json`` and the stored weight layout.

    ``kind``: ``model`` (HF folder), ``file`` (one safetensors file) or ``adapter``.
    ``conv1d``: True when GPT-2-style Conv1D weights are stored ``(in, out)``; ``layout_source``
    says what decided it (the config's ``model_type`` or, without a config, the shape of a
    ``c_attn``/``c_fc`` weight: Conv1D stores ``(d, 3d)`` / ``(d, 4d)``).
    """

    def __init__(self, path: Path, tensors: dict[str, TensorInfo], config: dict, kind: str) -> None:
        self.path = path
        self.kind = kind
        self.config = config
        self._tensors = tensors
        self.conv1d, self.layout_source = _conv1d_layout(config, tensors)

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @property
    def architectures(self) -> tuple[str, ...]:
        return tuple(self.config.get("architectures") or ())

    @property
    def files(self) -> tuple[Path, ...]:
        """The safetensors files holding the tensors, in name order."""
        return tuple(sorted({info.file for info in self._tensors.values()}))

    def names(self) -> list[str]:
        """Stored tensor names, in natural order (``h.2`` before ``h.10``)."""
        return sorted(self._tensors, key=_natural)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def info(self, name: str) -> TensorInfo:
        """Header entry of tensor ``name``; :class:`CheckpointError` when it is not stored."""
        try:
            return self._tensors[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._tensors, n=3, cutoff=0.6)
            raise CheckpointError(f"{self.path}: no tensor {name!r} (close matches: {close or 'none'})") from None

    def is_transposed(self, module: str) -> bool:
        """True when ``module``'s weight is stored ``(in, out)`` (a Conv1D of a GPT-2-family model)."""
        return self.conv1d and _CONV1D_MODULE.search(module) is not None

    def read(self, name: str) -> Tensor:
        """Tensor ``name`` as stored (shape and dtype), read from its file alone.

        The file is opened for this one read, so no memory map outlives it.
        """
        from safetensors import safe_open

        info = self.info(name)
        try:
            with safe_open(str(info.file), framework="pt", device="cpu") as f:
                tensor = f.get_tensor(name)
        except Exception as exc:
            raise CheckpointError(f"{info.file}: cannot read tensor {name!r}: {exc}") from exc
        if tuple(tensor.shape) != info.shape:
            raise CheckpointError(
                f"{info.file}: tensor {name!r} read with shape {tuple(tensor.shape)} but its header says {info.shape}"
            )
        return tensor

    def __repr__(self) -> str:
        arch = self.model_type or "unknown model type"
        return f"{type(self).__name__}({str(self.path)!r}, {self.kind}, {arch}, {len(self)} tensors)"


@dataclass(frozen=True)
class _Target:
    """What an adapter changes in one base module: LoRA factors or a full saved weight."""

    module: str
    kind: str  # "lora" | "dense"
    keys: tuple[str, ...]  # lora: (B key, A key); dense: (weight key,)
    scale: float


class AdapterCheckpoint(Checkpoint):
    """A PEFT LoRA adapter folder; ΔW of each target is ``scale · B @ A`` applied to a base checkpoint.

    ``adapter_config``: the parsed ``adapter_config.json``. ``targets`` maps each module name as
    the base model names it (``base_model.model.`` and the adapter name removed) to its factors.
    Weights saved through ``modules_to_save`` are full replacements of the base weight.
    """

    def __init__(self, path: Path, tensors: dict[str, TensorInfo], adapter_config: dict) -> None:
        super().__init__(path, tensors, {}, "adapter")
        self.adapter_config = adapter_config
        self.targets, self.ignored = _adapter_targets(self, adapter_config)


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a model folder, a ``.safetensors`` file or a PEFT adapter folder (headers only).

    Raises :class:`CheckpointError` when the path is missing, is not a safetensors checkpoint,
    or a file is corrupt or truncated. An ``adapter_model.safetensors`` file opens its folder.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file():
        if path.name == "adapter_model.safetensors" and (path.parent / "adapter_config.json").is_file():
            return _open_adapter(path.parent)
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: not a safetensors checkpoint (only .safetensors files can be read)")
        tensors = _read_headers([path])
        config_path = path.parent / "config.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        ckpt = Checkpoint(path, tensors, config, "file")
        _reject_adapter_file(ckpt)
        return ckpt
    if (path / "adapter_config.json").is_file():
        return _open_adapter(path)
    files = _model_files(path)
    config = _read_json(path / "config.json") if (path / "config.json").is_file() else {}
    ckpt = Checkpoint(path, files, config, "model")
    _reject_adapter_file(ckpt)
    return ckpt


@dataclass(frozen=True)
class PairPlan:
    """One planned pair, from the headers: nothing read yet.

    ``name``: module name in BASE (``transformer.h.0.attn.c_attn``); ``kind``: ``dense`` or
    ``lora``; ``base_key``: BASE tensor name; ``tuned_keys``: ``(weight,)`` or ``(lora_B, lora_A)``;
    ``shape``: canonical ``(out, in)``; ``transposed``: stored ``(in, out)``; ``scale``: LoRA scale
    (1.0 for dense); ``layer_type``/``depth`` as in :class:`~spectral_monitor.layers.LayerSpec`.
    """

    name: str
    kind: str
    base_key: str
    tuned_keys: tuple[str, ...]
    shape: tuple[int, int]
    transposed: bool
    scale: float
    layer_type: str
    depth: int | None


@dataclass(frozen=True, eq=False)
class TensorPair:
    """One layer of the comparison, canonical ``(out, in)``.

    ``base``: W_base ``(out, in)`` in its stored dtype (a transposed view for Conv1D). ``tuned``:
    W_tuned ``(out, in)`` in its stored dtype, or None for LoRA. ``lora``: ``(B, A)`` float32 with
    ``B`` ``(out, r)`` carrying the scale and ``A`` ``(r, in)``, so ΔW = B @ A; None for dense.
    """

    plan: PairPlan
    base: Tensor
    tuned: Tensor | None
    lora: tuple[Tensor, Tensor] | None

    @property
    def name(self) -> str:
        return self.plan.name

    def delta(self) -> Tensor:
        """ΔW = W_tuned − W_base as a new float32 ``(out, in)`` tensor."""
        if self.lora is not None:
            b, a = self.lora
            return b @ a
        # One contiguous float32 buffer; the subtraction runs in float32 (or float64) even for bf16 inputs.
        out = torch.empty(self.plan.shape, dtype=torch.float32)
        return out.copy_(self.tuned).sub_(self.base)


@dataclass(frozen=True)
class UpdatePlan:
    """Every pair of a comparison, checked against both headers; :meth:`read` loads one.

    ``prefixes``: the (BASE, TUNED) name prefixes removed to match names. ``skipped``:
    ``(name, reason)`` for adapter entries that are not compared (embeddings, heads, biases).
    ``notes``: differences that were accepted (e.g. another head on the same ``model_type``).
    """

    base: Checkpoint
    tuned: Checkpoint
    pairs: tuple[PairPlan, ...]
    prefixes: tuple[str, str]
    skipped: tuple[tuple[str, str], ...]
    notes: tuple[str, ...]

    def read(self, pair: PairPlan) -> TensorPair:
        """Load one pair: the base weight and the tuned weight or LoRA factors (about two layers)."""
        base = self.base.read(pair.base_key)
        base = base.t() if pair.transposed else base
        if pair.kind == "lora":
            b = self.tuned.read(pair.tuned_keys[0]).float() * pair.scale
            a = self.tuned.read(pair.tuned_keys[1]).float()
            return TensorPair(pair, base, None, (b, a))
        tuned = self.tuned.read(pair.tuned_keys[0])
        return TensorPair(pair, base, tuned.t() if pair.transposed else tuned, None)

    @property
    def max_layer_bytes(self) -> int:
        """Bytes of the largest pair as stored (base + tuned or factors): the reader's peak, without ΔW."""
        best = 0
        for p in self.pairs:
            n = _nbytes(self.base.info(p.base_key)) + sum(_nbytes(self.tuned.info(k)) for k in p.tuned_keys)
            best = max(best, n)
        return best


def plan_updates(
    base: Checkpoint,
    tuned: Checkpoint,
    *,
    layers: str | Sequence[str] = "all-linear",
    exclude: Sequence[str] = (),
) -> UpdatePlan:
    """Match BASE's monitored weights with TUNED (a model or a LoRA adapter) from the headers.

    ``layers``: ``"all-linear"``, ``"re:<regex>"`` on BASE module names, or explicit BASE module
    names; ``exclude``: regexes removed afterwards (as in ``select_layers``). For an adapter only
    its target modules are paired (every other weight is unchanged by construction). Raises
    :class:`CheckpointError` for other architectures, missing tensors, shape mismatches,
    non-floating dtypes and adapter targets absent from BASE.
    """
    if isinstance(base, AdapterCheckpoint):
        raise CheckpointError(f"{base.path}: BASE is a LoRA adapter; BASE must be a full model checkpoint")
    notes = _check_architecture(base, tuned)
    filters = _filters(layers, exclude)
    base_candidates = _linear_weights(base)
    base_modules = {_norm(k)[: -len(".weight")]: k for k in base_candidates}

    if isinstance(tuned, AdapterCheckpoint):
        tuned_names = {m + ".weight": m for m in tuned.targets}
    else:
        if tuned.conv1d != base.conv1d:
            raise CheckpointError(
                f"{base.path} stores Conv1D weights {'(in, out)' if base.conv1d else '(out, in)'} "
                f"({base.layout_source}) but {tuned.path} {'(in, out)' if tuned.conv1d else '(out, in)'} "
                f"({tuned.layout_source}): not the same architecture"
            )
        tuned_names = {_norm(k): k for k in _linear_weights(tuned)}
    pb, pt = _align({_norm(k) for k in base_candidates}, set(tuned_names))

    def to_base(norm_tuned: str) -> str:  # tuned name in BASE's (normalized) namespace
        return pb + norm_tuned[len(pt) :] if norm_tuned.startswith(pt) else norm_tuned

    selected = _select(list(base_modules), layers, exclude)
    if isinstance(tuned, AdapterCheckpoint):
        pairs, skipped = _plan_adapter(base, tuned, base_modules, selected, filters, to_base)
    else:
        pairs, skipped = _plan_dense(base, tuned, base_modules, selected, layers, filters, to_base, pb, pt), []
    if not pairs:
        raise CheckpointError(
            f"no weights to compare between {base.path} and {tuned.path} "
            f"(BASE has {len(base_modules)} linear weights, e.g. {sorted(base_modules)[:3]}; "
            f"TUNED {len(tuned_names)}, e.g. {sorted(tuned_names)[:3]})"
        )
    return UpdatePlan(base, tuned, tuple(pairs), (pb, pt), tuple(skipped), tuple(notes))


def pair_updates(
    base: Checkpoint,
    tuned: Checkpoint,
    *,
    layers: str | Sequence[str] = "all-linear",
    exclude: Sequence[str] = (),
) -> Iterator[TensorPair]:
    """Yield one :class:`TensorPair` per monitored layer, reading only that layer.

    Everything checkable from the headers is checked before this returns (see
    :func:`plan_updates`); the iterator keeps no reference to a pair once it is yielded.
    """
    plan = plan_updates(base, tuned, layers=layers, exclude=exclude)
    return (plan.read(p) for p in plan.pairs)


# ----------------------------------------------------------------------------------------- opening


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _read_headers(files: Sequence[Path], wanted: dict[str, Path] | None = None) -> dict[str, TensorInfo]:
    """Header entries of ``files`` (all their tensors, or only ``wanted`` name -> file)."""
    from safetensors import safe_open

    tensors: dict[str, TensorInfo] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                names = list(f.keys())
                if wanted is not None:
                    names = [n for n in names if wanted.get(n) == file]
                for name in names:
                    sl = f.get_slice(name)
                    tensors[name] = TensorInfo(name, tuple(sl.get_shape()), str(sl.get_dtype()), file)
        except Exception as exc:
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file: {exc}") from exc
    if wanted is not None:
        lost = sorted(set(wanted) - set(tensors))
        if lost:
            raise CheckpointError(
                f"{wanted[lost[0]]}: the index lists tensor {lost[0]!r} in this shard but the file does not hold it"
                + (f" ({len(lost) - 1} more missing)" if len(lost) > 1 else "")
            )
    return tensors


def _model_files(folder: Path) -> dict[str, TensorInfo]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no 'weight_map' in the index")
        wanted = {name: folder / shard for name, shard in weight_map.items()}
        shards = sorted(set(wanted.values()))
        missing = [s for s in shards if not s.is_file()]
        if missing:
            raise CheckpointError(f"{missing[0]}: shard listed in {index.name} is missing")
        return _read_headers(shards, wanted)
    if (folder / "model.safetensors").is_file():
        return _read_headers([folder / "model.safetensors"])
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    if shards:
        total = int(re.search(r"-of-(\d+)", shards[0].name).group(1))
        if len(shards) != total:
            raise CheckpointError(f"{folder}: {len(shards)} of {total} model shards present and no index file")
        return _read_headers(shards)
    others = sorted(folder.glob("*.safetensors"))
    if len(others) == 1:
        return _read_headers(others)
    found = sorted(p.name for p in folder.iterdir())[:8]
    raise CheckpointError(
        f"{folder}: not a checkpoint: no model.safetensors, model.safetensors.index.json, model shards "
        f"or adapter_config.json (found {found or 'nothing'}; .bin/.pt files are not read, convert them to safetensors)"
    )


def _open_adapter(folder: Path) -> AdapterCheckpoint:
    config = _read_json(folder / "adapter_config.json")
    file = folder / "adapter_model.safetensors"
    if not file.is_file():
        raise CheckpointError(f"{folder}: adapter_config.json but no adapter_model.safetensors (.bin is not read)")
    return AdapterCheckpoint(folder, _read_headers([file]), config)


def _reject_adapter_file(ckpt: Checkpoint) -> None:
    lora = next((k for k in ckpt.names() if _LORA_KEY.match(k)), None)
    if lora is not None:
        raise CheckpointError(
            f"{ckpt.path}: holds LoRA factors ({lora!r}), not model weights; "
            "pass the adapter folder with its adapter_config.json as TUNED"
        )


def _conv1d_layout(config: dict, tensors: dict[str, TensorInfo]) -> tuple[bool, str]:
    model_type = config.get("model_type")
    if model_type:
        return model_type in CONV1D_MODEL_TYPES, f"config model_type {model_type!r}"
    for name in sorted(tensors, key=_natural):
        shape = tensors[name].shape
        if re.search(r"(^|\.)(c_attn|c_fc)\.weight$", name) and len(shape) == 2 and shape[0] != shape[1]:
            # Conv1D stores (d, 3d) / (d, 4d); nn.Linear (3d, d) / (4d, d).
            return shape[1] > shape[0], f"shape {shape} of {name!r} (no config.json)"
    return False, "no config.json and no GPT-2-style c_attn/c_fc weight"


def _adapter_targets(ckpt: Checkpoint, config: dict) -> tuple[dict[str, _Target], list[tuple[str, str]]]:
    path = ckpt.path / "adapter_config.json"
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise CheckpointError(f"{path}: peft_type {peft_type!r} is not supported (only LORA: ΔW = scale·B·A)")
    variant = next((f for f in _LORA_VARIANTS if config.get(f)), None)
    if variant is not None or config.get("init_lora_weights") == "mica":
        field = variant or "init_lora_weights"
        raise CheckpointError(
            f"{path}: LoRA variant {field}={config[field]!r} (DoRA and the like): its ΔW is not scale·B·A (unsupported)"
        )
    if config.get("target_parameters"):
        raise CheckpointError(f"{path}: target_parameters (LoRA on parameters, not modules) is not supported")
    try:
        r_default, alpha_default = int(config["r"]), float(config["lora_alpha"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: needs integer 'r' and numeric 'lora_alpha' ({exc!r})") from exc

    factors: dict[str, dict[str, str]] = {}
    saved: dict[str, str] = {}
    ignored: list[tuple[str, str]] = []
    adapters: set[str] = set()
    for key in ckpt.names():
        name = key.removeprefix(_PEFT_PREFIX)
        if m := _LORA_KEY.match(name):
            if m["adapter"] is not None:
                adapters.add(m["adapter"])
            factors.setdefault(m["module"], {})[m["part"]] = key
        elif m := _LORA_EMBEDDING_KEY.match(name):
            ignored.append((m["module"], "LoRA on an embedding (not a linear layer)"))
        elif name.endswith(".base_layer.weight"):
            ignored.append((name, "frozen base weight saved with the adapter (save_embedding_layers)"))
        elif (m := _SAVED_MODULE_KEY.match(name)) and len(ckpt.info(key).shape) == 2:
            saved[m["module"]] = key
        else:
            ignored.append((name, "not a LoRA factor or a 2-D saved weight"))
    if len(adapters) > 1:
        raise CheckpointError(f"{path.parent}: holds several adapters {sorted(adapters)}; save one adapter per folder")

    targets: dict[str, _Target] = {}
    file = ckpt.path / "adapter_model.safetensors"
    for module, parts in factors.items():
        if set(parts) != {"A", "B"}:
            have = next(iter(parts))
            other = "B" if have == "A" else "A"
            raise CheckpointError(f"{file}: module {module!r} has lora_{have} but no lora_{other}")
        a, b = ckpt.info(parts["A"]), ckpt.info(parts["B"])
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            raise CheckpointError(
                f"{file}: module {module!r}: lora_A {a.shape} and lora_B {b.shape} are not (r, in) and (out, r)"
            )
        r = int(_pattern_value(config.get("rank_pattern") or {}, module, r_default, path))
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, alpha_default, path))
        if a.shape[0] != r:
            raise CheckpointError(f"{file}: module {module!r}: lora_A has rank {a.shape[0]} but {path.name} says r={r}")
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        targets[module] = _Target(module, "lora", (parts["B"], parts["A"]), scale)
    for module, key in saved.items():
        if module in targets:
            raise CheckpointError(f"{file}: module {module!r} has both LoRA factors and a saved full weight {key!r}")
        targets[module] = _Target(module, "dense", (key,), 1.0)
    return targets, ignored


def _pattern_value(patterns: dict, module: str, default: float, path: Path) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of the module name."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error as exc:
            raise CheckpointError(f"{path}: pattern {key!r} is not a valid regex: {exc}") from exc
    return default


# ---------------------------------------------------------------------------------------- matching


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _norm(key: str) -> str:
    return strip_wrappers(key.removeprefix(_PEFT_PREFIX))


def _nbytes(info: TensorInfo) -> int:
    return math.prod(info.shape) * _FLOAT_DTYPES[info.dtype].itemsize


def _linear_weights(ckpt: Checkpoint) -> list[str]:
    """Stored names of the 2-D ``*.weight`` tensors that can be linear layers, in natural order."""
    out = []
    for key in ckpt.names():
        if not key.endswith(".weight") or len(ckpt.info(key).shape) != 2:
            continue
        if _NOT_LINEAR.search(_norm(key)[: -len(".weight")]):
            continue
        out.append(key)
    return out


def _filters(layers: str | Sequence[str], exclude: Sequence[str]) -> list[re.Pattern]:
    try:
        return exclusions(layers, exclude)
    except re.error as exc:
        raise ConfigError(f"exclude pattern is not a valid regex: {exc}") from exc


def _select(modules: list[str], layers: str | Sequence[str], exclude: Sequence[str]) -> list[str]:
    if isinstance(layers, str) and layers != "all-linear":
        if not layers.startswith("re:"):
            raise ConfigError(f"layers={layers!r}: expected 'all-linear', 're:<regex>' or a list of module names")
        try:
            re.compile(layers[3:])
        except re.error as exc:
            raise ConfigError(f"layers={layers!r} is not a valid regex: {exc}") from exc
    try:
        return select_names(modules, layers, exclude, where="BASE")
    except KeyError as exc:
        raise ConfigError(exc.args[0]) from None


def _prefixes(names: set[str]) -> set[str]:
    out = {""}
    for name in names:
        parts = name.split(".")
        for k in (1, 2):
            if len(parts) > k + 1:
                out.add(".".join(parts[:k]) + ".")
    return out


def _align(base: set[str], tuned: set[str]) -> tuple[str, str]:
    """The (BASE, TUNED) prefixes whose removal makes the most names equal (ties: shortest)."""

    def strip(names: set[str], prefix: str) -> set[str]:
        return {n[len(prefix) :] if n.startswith(prefix) else n for n in names}

    best = (-1, 0, "", "")
    for pb in _prefixes(base):
        stripped = strip(base, pb)
        for pt in _prefixes(tuned):
            score = len(stripped & strip(tuned, pt))
            cand = (score, -len(pb) - len(pt), pb, pt)
            if cand[:2] > best[:2] or (cand[:2] == best[:2] and (pb, pt) < best[2:]):
                best = cand
    return best[2], best[3]


def _check_architecture(base: Checkpoint, tuned: Checkpoint) -> list[str]:
    if isinstance(tuned, AdapterCheckpoint):
        return []
    mb, mt = base.model_type, tuned.model_type
    ab, at = base.architectures, tuned.architectures
    notes = [f"{c.path} has no config.json: architecture not checked" for c in (base, tuned) if not c.config]
    if mb and mt and mb != mt:
        raise CheckpointError(
            f"other architecture: {base.path} is model_type {mb!r} {list(ab)} but {tuned.path} is {mt!r} {list(at)}"
        )
    if ab and at and set(ab) != set(at):
        if not (mb and mt):
            raise CheckpointError(
                f"other architecture: {base.path} is {list(ab)} but {tuned.path} is {list(at)} (no model_type to match)"
            )
        notes.append(f"architectures differ ({list(ab)} vs {list(at)}) on the same model_type {mb!r}: the heads differ")
    return notes


def _check_dtype(info: TensorInfo) -> None:
    if info.dtype not in _FLOAT_DTYPES:
        kind = "float8 (quantized)" if info.dtype.startswith("F8") else "not floating point"
        raise CheckpointError(
            f"{info.file}: tensor {info.name!r} has dtype {info.dtype}, {kind}; "
            f"only {'/'.join(_FLOAT_DTYPES)} weights can be compared (dequantize the checkpoint first)"
        )


def _canonical(ckpt: Checkpoint, module: str, info: TensorInfo) -> tuple[int, int]:
    return (info.shape[1], info.shape[0]) if ckpt.is_transposed(module) else info.shape


def _plan_dense(
    base: Checkpoint,
    tuned: Checkpoint,
    base_modules: dict[str, str],
    selected: list[str],
    layers: str | Sequence[str],
    filters: list[re.Pattern],
    to_base: Callable[[str], str],
    pb: str,
    pt: str,
) -> list[PairPlan]:
    tuned_by_base: dict[str, str] = {}
    for key in tuned.names():
        tuned_by_base.setdefault(to_base(_norm(key)), key)
    # A monitored weight that only TUNED has: BASE lacks it (another architecture or a cut checkpoint).
    for key in _linear_weights(tuned):
        module = to_base(_norm(key))[: -len(".weight")]
        if module not in base_modules and is_selected(module, layers, filters):
            raise CheckpointError(
                f"tensor {key!r} of {tuned.files[0] if len(tuned.files) == 1 else tuned.path} is missing in BASE "
                f"{base.path} (looked for {module + '.weight'!r}; name prefixes removed: BASE {pb!r}, TUNED {pt!r})"
            )
    pairs = []
    for module in selected:
        bkey = base_modules[module]
        binfo = base.info(bkey)
        tkey = tuned_by_base.get(module + ".weight")
        if tkey is None:
            raise CheckpointError(
                f"tensor {bkey!r} of BASE {binfo.file} is missing in TUNED {tuned.path} "
                f"(name prefixes removed: BASE {pb!r}, TUNED {pt!r})"
            )
        tinfo = tuned.info(tkey)
        _check_dtype(binfo)
        _check_dtype(tinfo)
        if tinfo.shape != binfo.shape:
            raise CheckpointError(
                f"shape mismatch for {module!r}: BASE {binfo.file} has {binfo.shape}, "
                f"TUNED {tinfo.file} has {tinfo.shape}"
            )
        shape, transposed = _canonical(base, module, binfo), base.is_transposed(module)
        pairs.append(
            PairPlan(module, "dense", bkey, (tkey,), shape, transposed, 1.0, layer_type(module), layer_depth(module))
        )
    return pairs


def _plan_adapter(
    base: Checkpoint,
    adapter: AdapterCheckpoint,
    base_modules: dict[str, str],
    selected: list[str],
    filters: list[re.Pattern],
    to_base: Callable[[str], str],
) -> tuple[list[PairPlan], list[tuple[str, str]]]:
    chosen = set(selected)
    skipped = list(adapter.ignored)
    afile = adapter.files[0]
    pairs = []
    for target in adapter.targets.values():
        module = to_base(target.module + ".weight")[: -len(".weight")]
        if module not in chosen:
            if _NOT_LINEAR.search(module) or any(p.search(module) for p in filters):
                skipped.append((target.module, "embedding, head or norm (never compared)"))
                continue
            if module in base_modules:
                skipped.append((target.module, "not selected by layers/exclude"))
                continue
            stored = next((k for k in base.names() if _norm(k) == module + ".weight"), None)
            if stored is not None:
                raise CheckpointError(
                    f"adapter {afile} targets module {target.module!r} but BASE {base.path} stores {stored!r} "
                    f"with shape {base.info(stored).shape}, not a 2-D linear weight"
                )
            raise CheckpointError(
                f"adapter {afile} targets module {target.module!r} but BASE {base.path} has no weight "
                f"{module + '.weight'!r} (is the adapter for another model?)"
            )
        bkey = base_modules[module]
        binfo = base.info(bkey)
        _check_dtype(binfo)
        shape = _canonical(base, module, binfo)
        transposed = base.is_transposed(module)
        infos = [adapter.info(k) for k in target.keys]
        for info in infos:
            _check_dtype(info)
        if target.kind == "lora":
            b, a = infos
            got = (b.shape[0], a.shape[1])
        else:
            got = _canonical(base, module, infos[0])
        if got != shape:
            raise CheckpointError(
                f"shape mismatch for {module!r}: BASE {binfo.file} has (out, in) {shape}, adapter {afile} "
                f"{'lora_B/lora_A give' if target.kind == 'lora' else 'saved weight gives'} {got}"
            )
        pairs.append(
            PairPlan(
                module,
                target.kind,
                bkey,
                target.keys,
                shape,
                transposed,
                target.scale,
                layer_type(module),
                layer_depth(module),
            )
        )
    pairs.sort(key=lambda p: _natural(p.name))
    return pairs, skipped
