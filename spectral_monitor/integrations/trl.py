"""TRL adapter (GRPOTrainer, SFTTrainer, DPOTrainer, ...): the HF callback, plus

* the trainer's **reference model** as the base when it exists and is fixed (GRPO/DPO with a
  KL term, ``sync_ref_model=False``, same weights and dtype as the policy at train start):
  no extra copy of the weights;
* PEFT/LoRA policies: ΔW from the adapter factors, no snapshot at all (automatic);
* the trainer's reward, KL, entropy, ... recorded beside the spectra as
  ``spectral/context/<name>`` (the latest values TRL logged before the measurement).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from spectral_monitor._imports import require
from spectral_monitor.integrations.hf import SpectralMonitorCallback as _HFCallback
from spectral_monitor.layers import select_layers
from spectral_monitor.snapshot import strip_wrappers

require("trl", "spectral_monitor.integrations.trl")

__all__ = ["SpectralMonitorCallback"]

log = logging.getLogger("spectral_monitor")


def _unwrap(module: nn.Module) -> nn.Module:
    # DeepSpeed engine / DDP keep the real model in .module
    while hasattr(module, "module") and isinstance(module.module, nn.Module):
        module = module.module
    return module


class SpectralMonitorCallback(_HFCallback):
    """The HF callback, reusing a TRL trainer's fixed reference model as the base when it can."""

    def reference_model(self, model: nn.Module) -> nn.Module | None:
        trainer = self.trainer
        ref = getattr(trainer, "ref_model", None)
        if ref is None or self.config.base_store not in ("auto", "reference"):
            return None
        if getattr(trainer.args, "sync_ref_model", False):
            log.info("spectral_monitor: sync_ref_model=True moves the reference model; taking an own snapshot")
            return None
        ref = _unwrap(ref)
        if trainer.state.global_step == 0 and not self._same_weights(model, ref):
            log.warning(
                "spectral_monitor: the trainer's reference model differs from the policy at train start "
                "(other checkpoint or dtype); taking an own snapshot instead"
            )
            return None
        return ref

    def _same_weights(self, model: nn.Module, ref: nn.Module) -> bool:
        ref_params = {strip_wrappers(n): p for n, p in ref.named_parameters()}
        with torch.no_grad():
            for spec in select_layers(model, self.config.layers, self.config.exclude):
                if spec.kind == "lora":
                    continue
                other = ref_params.get(spec.param_name)
                mine = spec.parameter()
                if other is None or other.shape != mine.shape or other.dtype != mine.dtype:
                    return False
                if not torch.equal(other.detach().to(mine.device), mine.detach()):
                    return False
        return True
