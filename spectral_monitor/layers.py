"""Which layers are monitored, and how to read each one's weight and update.

A :class:`LayerSpec` names one monitored 2-D weight and knows its *canonical* orientation
``(out_features, in_features)``: HF ``Conv1D`` stores its weight transposed, so left singular
vectors always live in the output space. LoRA layers (PEFT ``LoraLayer``) are one spec whose
ΔW = Σ_a scale_a · B_a A_a is read from the adapter factors.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "LayerSpec",
    "LoraAdapter",
    "exclusions",
    "is_selected",
    "layer_depth",
    "layer_type",
    "select_layers",
    "select_names",
]

# Never monitored by "all-linear": embeddings, output and classifier heads (any module named
# ``head`` or ``<something>_head``), poolers.
DEFAULT_EXCLUDE = (
    r"(^|\.)(embed_out|embed_tokens|wte|wpe|word_embeddings|position_embeddings|score|classifier"
    r"|output_layer|pooler|(\w+_)?head)(\.|$)",
)

_TYPE_PATTERNS = (
    ("qkv", r"(c_attn|qkv_proj|query_key_value|Wqkv|qkv)$"),
    ("q", r"(q_proj|query|q|wq)$"),
    ("k", r"(k_proj|key|k|wk)$"),
    ("v", r"(v_proj|value|v|wv)$"),
    ("o", r"(o_proj|out_proj|attn\.c_proj|attention\.dense|attention\.output\.dense|wo|attn\.proj)$"),
    ("gate", r"(gate_proj|w1|gate)$"),
    ("up", r"(up_proj|c_fc|fc1|fc_in|dense_h_to_4h|w3|intermediate\.dense|up)$"),
    ("down", r"(down_proj|mlp\.c_proj|fc2|fc_out|dense_4h_to_h|w2|output\.dense|down)$"),
)


@dataclass(frozen=True, eq=False)
class LayerSpec:
    """One monitored matrix.

    ``name``: module name; ``param_name``: full name of the dense weight parameter (for LoRA,
    the frozen ``base_layer.weight``); ``shape``: canonical ``(out, in)``; ``kind``: ``dense``,
    ``conv1d`` (stored transposed) or ``lora``; ``layer_type``: q/k/v/o/qkv/up/down/gate/other;
    ``depth``: block index parsed from the name (None if there is none).
    """

    name: str
    module: nn.Module
    kind: str
    param_name: str
    shape: tuple[int, int]
    layer_type: str
    depth: int | None

    @property
    def transposed(self) -> bool:
        """True when the stored weight is ``(in, out)`` (HF Conv1D, or a LoRA over one)."""
        return self.kind == "conv1d" or (self.kind == "lora" and _is_conv1d(self.module.get_base_layer()))

    @property
    def trainable(self) -> bool:
        """Does training change this layer? (LoRA: an active adapter's factors require grad.)"""
        if self.kind != "lora":
            return self.parameter().requires_grad
        try:
            adapters = self.lora_adapters()
        except ValueError:
            return True  # a merged or variant adapter: let the measurement report why it is skipped
        return any(a.A.requires_grad or a.B.requires_grad for a in adapters)

    def parameter(self) -> Tensor:
        """The stored dense weight parameter (for LoRA: the frozen base weight)."""
        mod = self.module.get_base_layer() if self.kind == "lora" else self.module
        return mod.weight

    def canonical(self, weight: Tensor) -> Tensor:
        """A ``(out, in)`` view of a weight stored in this layer's parameter orientation."""
        return weight.t() if self.transposed else weight

    def lora_adapters(self) -> list[LoraAdapter]:
        """The active adapters of a LoRA layer (empty when none is active).

        Raises ``ValueError`` with the reason when ΔW is not Σ scale·B·A: a merged adapter, or a
        LoRA variant such as DoRA.
        """
        mod = self.module
        if getattr(mod, "merged", False):
            raise ValueError("LoRA adapter is merged into the base weight; ΔW cannot be read from B·A")
        variants = getattr(mod, "lora_variant", {}) or {}
        out = []
        for name in mod.active_adapters:
            if name not in mod.lora_A:
                continue
            if name in variants or getattr(mod, "use_dora", {}).get(name, False):
                raise ValueError(f"adapter {name!r} is a LoRA variant (e.g. DoRA): its update is not scale·B·A")
            out.append(LoraAdapter(name, float(mod.scaling[name]), mod.lora_A[name].weight, mod.lora_B[name].weight))
        return out

    def lora_factors(self) -> tuple[Tensor, Tensor] | None:
        """``(B, A)`` with ΔW = B @ A in canonical orientation, scales folded into B, float32.

        Sums over active adapters by concatenation (exact). None when the layer has no active
        adapter; ``ValueError`` as in :meth:`lora_adapters`.
        """
        adapters = self.lora_adapters()
        if not adapters:
            return None
        B = torch.cat([a.B.detach().float() * a.scale for a in adapters], dim=1)
        A = torch.cat([a.A.detach().float() for a in adapters], dim=0)
        return B, A


@dataclass(frozen=True)
class LoraAdapter:
    """One active LoRA adapter of a layer: ΔW_a = ``scale`` · B A with ``B`` ``(out, r)`` and ``A``
    ``(r, in)`` in canonical orientation (the parameters themselves)."""

    name: str
    scale: float
    A: nn.Parameter
    B: nn.Parameter


def _is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D (or FSDP2's FSDPConv1D subclass), matched by class name so
    # transformers is never imported here.
    named = any(cls.__name__ == "Conv1D" for cls in type(module).__mro__)
    return named and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _is_lora(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "lora_B") and hasattr(module, "get_base_layer")


def layer_type(name: str) -> str:
    """q/k/v/o/qkv/gate/up/down from a module name's last component(s), else ``other``."""
    for typ, pattern in _TYPE_PATTERNS:
        if re.search(r"(^|\.)" + pattern, name):
            return typ
    return "other"


def layer_depth(name: str) -> int | None:
    """The block index in a module name (``...h.3.attn`` -> 3), None without one."""
    match = re.search(r"\.(\d+)(\.|$)", name)
    return int(match.group(1)) if match else None


def _stored_shape(module: nn.Module) -> tuple[int, int]:
    """The whole weight's shape as stored: ``weight.shape``, or for a sharded training's flat view
    (FSDP1) or partition (DeepSpeed ZeRO-3) the full shape those record."""
    w = module.weight
    if w.dim() == 2 and w.numel() > 0:
        return (w.shape[0], w.shape[1])
    from spectral_monitor.distributed import global_shape  # imports torch.distributed: only when sharded

    return global_shape(w, module)


def _spec(name: str, module: nn.Module) -> LayerSpec | None:
    if _is_lora(module):
        base = module.get_base_layer()
        if not (isinstance(base, nn.Linear) or _is_conv1d(base)):
            return None
        rows, cols = _stored_shape(base)
        shape = (cols, rows) if _is_conv1d(base) else (rows, cols)
        return LayerSpec(name, module, "lora", f"{name}.base_layer.weight", shape, layer_type(name), layer_depth(name))
    if isinstance(module, nn.Linear):
        return LayerSpec(
            name, module, "dense", f"{name}.weight", _stored_shape(module), layer_type(name), layer_depth(name)
        )
    if _is_conv1d(module):
        rows, cols = _stored_shape(module)
        return LayerSpec(name, module, "conv1d", f"{name}.weight", (cols, rows), layer_type(name), layer_depth(name))
    return None


def select_layers(
    model: nn.Module, layers: str | Sequence[str] = "all-linear", exclude: Sequence[str] = ()
) -> list[LayerSpec]:
    """Monitored layers of ``model`` in ``named_modules()`` order (the same on every rank).

    ``layers``: ``"all-linear"``, ``"re:<regex>"`` matched against module names, or explicit
    module names (a missing name raises ``KeyError`` listing close candidates). ``exclude``:
    regexes removed after selection (``all-linear`` also applies the default exclusions).
    """
    specs: list[LayerSpec] = []
    inside_lora: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside_lora):
            continue  # base_layer / lora_A / lora_B of an adapter already taken as one spec
        spec = _spec(name, module)
        if spec is None:
            continue
        if spec.kind == "lora":
            inside_lora.append(name)
        specs.append(spec)

    by_name = {s.name: s for s in specs}
    return [by_name[n] for n in select_names(list(by_name), layers, exclude, where="the model")]


def exclusions(layers: str | Sequence[str], exclude: Sequence[str]) -> list[re.Pattern]:
    """The ``exclude`` regexes compiled, plus the default exclusions when ``layers`` is ``"all-linear"``."""
    return [re.compile(p) for p in (*exclude, *(DEFAULT_EXCLUDE if layers == "all-linear" else ()))]


def is_selected(name: str, layers: str | Sequence[str], excludes: Sequence[re.Pattern]) -> bool:
    """Whether ``layers`` selects ``name`` and none of ``excludes`` (see :func:`exclusions`) removes it."""
    if any(p.search(name) for p in excludes):
        return False
    if layers == "all-linear":
        return True
    if isinstance(layers, str):
        return re.search(layers[3:], name) is not None
    return name in layers


def select_names(names: Sequence[str], layers: str | Sequence[str], exclude: Sequence[str], *, where: str) -> list[str]:
    """The names ``layers``/``exclude`` select (see :func:`select_layers`): in ``names`` order, or
    in the order of an explicit list. An explicit name not in ``names`` raises ``KeyError`` naming
    ``where`` and the close candidates."""
    if not isinstance(layers, str):
        known = set(names)
        missing = [n for n in layers if n not in known]
        if missing:
            close = [c for n in missing for c in difflib.get_close_matches(n, names, n=3, cutoff=0.6)]
            raise KeyError(
                f"layers {missing} are not linear layers of {where}; "
                f"close matches: {close or 'none'}; known ({len(names)}): {sorted(names)[:8]}..."
            )
        names = layers
    excludes = exclusions(layers, exclude)
    return [n for n in names if is_selected(n, layers, excludes)]
