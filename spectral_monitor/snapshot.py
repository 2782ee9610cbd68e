"""Base-weight stores: where W_0 lives while the model trains.

Every store maps a :class:`LayerSpec` to its base weight in the parameter's own orientation
and dtype. Stores:

* :class:`DeviceStore`  a copy on the model's device (fastest; costs one model's worth of memory there)
* :class:`CPUStore`     a CPU copy, pinned when CUDA is present, streamed per layer
* :class:`DiskStore`    memory-mapped safetensors file(s), read per layer
* :class:`ReferenceStore`  an existing module (e.g. a TRL reference model): no copy at all
* LoRA layers need no store: their base is the frozen ``base_layer`` and ΔW comes from B·A.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from spectral_monitor.errors import BaseMismatchError
from spectral_monitor.layers import LayerSpec

__all__ = [
    "BaseStore",
    "CPUStore",
    "DeviceStore",
    "DiskStore",
    "ReferenceStore",
    "load_store",
    "make_store",
    "persist",
    "strip_wrappers",
]

_WRAPPER_COMPONENTS = ("module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def strip_wrappers(name: str) -> str:
    """Parameter name without DDP/compile/FSDP wrapper components (whole dotted components only)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_COMPONENTS)


class BaseStore(ABC):
    """Maps each dense layer to its base weight. ``nbytes``: memory held by the store itself."""

    kind: str = ""

    @abstractmethod
    def get(self, spec: LayerSpec, device: torch.device) -> Tensor:
        """Base weight of ``spec`` on ``device`` (parameter orientation and dtype)."""

    @property
    def nbytes(self) -> int:
        return 0

    def describe(self) -> dict:
        """Plain data saying where the base lives (for checkpoints and logs)."""
        return {"kind": self.kind, "nbytes": self.nbytes}


def _check_match(specs: Iterable[LayerSpec], shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    for spec in specs:
        if spec.kind == "lora":
            continue
        want = tuple(spec.parameter().shape)
        got = shapes.get(spec.param_name)
        if got is None:
            raise BaseMismatchError(
                f"base ({source}) has no parameter {spec.param_name!r} (model shape {want}); "
                "is the base from another model?"
            )
        if tuple(got) != want:
            raise BaseMismatchError(
                f"base ({source}) parameter {spec.param_name!r} has shape {tuple(got)} but the model's is {want}; "
                "the base snapshot is from another model or the layer changed shape"
            )


class _TensorStore(BaseStore):
    def __init__(self, tensors: dict[str, Tensor]) -> None:
        self._tensors = tensors

    def get(self, spec: LayerSpec, device: torch.device) -> Tensor:
        return self._tensors[spec.param_name].to(device, non_blocking=True)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())


class DeviceStore(_TensorStore):
    """A detached copy of each monitored weight on its own device."""

    kind = "device"

    @classmethod
    def snapshot(cls, specs: Iterable[LayerSpec]) -> DeviceStore:
        with torch.no_grad():
            return cls({s.param_name: s.parameter().detach().clone() for s in specs if s.kind != "lora"})


class CPUStore(_TensorStore):
    """A CPU copy (pinned when CUDA is available, so per-layer uploads overlap compute)."""

    kind = "cpu"

    @classmethod
    def snapshot(cls, specs: Iterable[LayerSpec]) -> CPUStore:
        pin = torch.cuda.is_available()
        out = {}
        with torch.no_grad():
            for s in specs:
                if s.kind == "lora":
                    continue
                t = s.parameter().detach().to("cpu", copy=True)
                out[s.param_name] = t.pin_memory() if pin else t
        return cls(out)


class DiskStore(BaseStore):
    """Base weights in a safetensors file, memory-mapped and read one layer at a time.

    ``path`` holds the tensors; ``path.with_suffix('.json')`` a manifest with the
    parameter names, shapes and a fingerprint so a resumed run can check it.
    """

    kind = "disk"

    def __init__(self, path: str | os.PathLike) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        try:
            self._file = safe_open(str(self.path), framework="pt", device="cpu")
            # the file is memory-mapped: reading past its end after it was truncated raises SIGBUS and
            # kills the process, so every read first checks the size of the file that was opened
            self._fd = os.open(self.path, os.O_RDONLY)
        except Exception as exc:
            raise BaseMismatchError(f"base file {self.path} cannot be read: {type(exc).__name__}: {exc}") from None
        weakref.finalize(self, os.close, self._fd)
        self._size = os.fstat(self._fd).st_size
        self._keys = set(self._file.keys())

    @classmethod
    def snapshot(cls, specs: Iterable[LayerSpec], path: str | os.PathLike) -> DiskStore:
        """Write the monitored weights to ``path`` (atomically) and open it."""
        with torch.no_grad():
            tensors = {s.param_name: s.parameter().detach().to("cpu") for s in specs if s.kind != "lora"}
        _write_safetensors(tensors, Path(path))
        return cls(path)

    def check(self, specs: Iterable[LayerSpec]) -> None:
        """Raise :class:`BaseMismatchError` unless every dense spec is in the file with its shape."""
        shapes = {k: tuple(self._file.get_slice(k).get_shape()) for k in self._keys}
        _check_match(specs, shapes, f"file {self.path}")

    def get(self, spec: LayerSpec, device: torch.device) -> Tensor:
        if os.fstat(self._fd).st_size < self._size:
            raise BaseMismatchError(f"the base file {self.path} was truncated while in use")
        try:
            tensor = self._file.get_tensor(spec.param_name)
        except Exception as exc:
            raise BaseMismatchError(f"base file {self.path}, tensor {spec.param_name!r}: {exc}") from None
        return tensor.to(device, non_blocking=True)

    def verify(self) -> None:
        """Raise :class:`BaseMismatchError` when the file's contents differ from the fingerprint its
        manifest recorded when it was written (bytes changed on disk); no manifest: nothing to check."""
        manifest = self.path.with_suffix(".json")
        if not manifest.exists():
            return
        want = json.loads(manifest.read_text()).get("fingerprint")
        got = fingerprint({k: self._file.get_tensor(k) for k in self._keys})
        if want is not None and want != got:
            raise BaseMismatchError(
                f"base file {self.path} does not match the fingerprint in {manifest.name}: its contents changed on disk"
            )

    def describe(self) -> dict:
        return {"kind": self.kind, "nbytes": 0, "path": str(self.path)}


class ReferenceStore(BaseStore):
    """Reads W_0 from a live module holding the base weights (no copy)."""

    kind = "reference"

    def __init__(self, reference: nn.Module, specs: Iterable[LayerSpec]) -> None:
        params = {strip_wrappers(n): p for n, p in reference.named_parameters()}
        # PEFT-wrapped policies carry "base_model.model." while a plain reference does not.
        for spec in specs:
            if spec.kind != "lora" and spec.param_name not in params:
                alt = spec.param_name.removeprefix("base_model.model.")
                if alt in params:
                    params[spec.param_name] = params[alt]
        specs = list(specs)
        _check_match(specs, {n: tuple(p.shape) for n, p in params.items()}, "reference model")
        self._params = {s.param_name: params[s.param_name] for s in specs if s.kind != "lora"}

    def get(self, spec: LayerSpec, device: torch.device) -> Tensor:
        return self._params[spec.param_name].detach().to(device, non_blocking=True)


def _write_safetensors(tensors: dict[str, Tensor], path: Path) -> None:
    """Atomically write ``tensors`` to ``path`` plus a ``.json`` manifest (names, shapes, fingerprint)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "writer": "spectral_monitor"})
    os.replace(tmp, path)
    manifest = {"params": {k: list(v.shape) for k, v in tensors.items()}, "fingerprint": fingerprint(tensors)}
    path.with_suffix(".json").write_text(json.dumps(manifest))


def fingerprint(tensors: Mapping[str, Tensor]) -> str:
    """Cheap content hash: names, shapes and a strided sample of each tensor's values."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().reshape(-1)
        sample = t[:: max(1, t.numel() // 256)].float().cpu().numpy().tobytes()
        h.update(name.encode())
        h.update(str(tuple(tensors[name].shape)).encode())
        h.update(sample)
    return h.hexdigest()[:16]


def make_store(
    kind: str, specs: list[LayerSpec], *, base_dir: str | None = None, reference: nn.Module | None = None
) -> BaseStore | None:
    """Build the store ``kind`` for ``specs``; None when every spec is LoRA (no store needed).

    ``auto`` picks ``reference`` when a reference module is given, else ``device``.
    """
    dense = [s for s in specs if s.kind != "lora"]
    if not dense:
        return None
    if kind == "auto":
        kind = "reference" if reference is not None else "device"
    if kind == "lora":
        raise BaseMismatchError(
            f"base_store='lora' but {len(dense)} monitored layers are not LoRA layers, e.g. {dense[0].name!r}"
        )
    if kind == "reference":
        if reference is None:
            raise BaseMismatchError("base_store='reference' needs a reference module (e.g. TRL's ref_model)")
        return ReferenceStore(reference, dense)
    if kind == "device":
        return DeviceStore.snapshot(dense)
    if kind == "cpu":
        return CPUStore.snapshot(dense)
    if kind == "disk":
        if base_dir is None:
            raise BaseMismatchError("base_store='disk' needs base_dir")
        # one file per run: a later run with the same base_dir must not replace this run's base
        return DiskStore.snapshot(dense, Path(base_dir) / f"base-{uuid.uuid4().hex[:12]}.safetensors")
    raise BaseMismatchError(f"unknown base store {kind!r}")


def persist(store: BaseStore, specs: list[LayerSpec], path: str | os.PathLike) -> Path:
    """Write the base weights held by ``store`` to a safetensors file and return its path.

    A :class:`DiskStore` is already on disk: its own path is returned. Used by adapters so a
    resumed run compares against the original base, not the weights at the resume point.
    """
    if isinstance(store, DiskStore):
        return store.path
    path = Path(path)
    dense = [s for s in specs if s.kind != "lora"]
    _write_safetensors({s.param_name: store.get(s, torch.device("cpu")) for s in dense}, path)
    return path


def load_store(path: str | os.PathLike, kind: str, specs: list[LayerSpec]) -> BaseStore:
    """Reopen a persisted base: memory-mapped for ``disk``, else loaded into a device/CPU store."""
    disk = DiskStore(path)
    disk.check(specs)
    disk.verify()
    if kind == "disk":
        return disk
    dense = [s for s in specs if s.kind != "lora"]
    if kind == "cpu":
        return CPUStore({s.param_name: disk.get(s, torch.device("cpu")) for s in dense})
    return DeviceStore({s.param_name: disk.get(s, s.parameter().device).to(s.parameter().dtype) for s in dense})
