"""Pure, stateless spectral math on torch tensors (batched over leading dims, float32 inside)."""

from spectral_monitor.functional.divergence import LOG_EPS, base_topk, kl_from_topk, top1_agreement
from spectral_monitor.functional.powerlaw import PowerLawFit, fit_power_law
from spectral_monitor.functional.rsvd import lora_svd, randomized_svd, sketch_left_vectors
from spectral_monitor.functional.spectrum import (
    abs_cosine,
    base_alignment,
    effective_rank,
    energy_share,
    frobenius_sq,
    full_singular_values,
    intruder_count,
    sparsity,
    spectral_gap,
    stable_rank,
    subspace_overlap,
)

__all__ = [
    "LOG_EPS",
    "PowerLawFit",
    "abs_cosine",
    "base_alignment",
    "base_topk",
    "effective_rank",
    "energy_share",
    "fit_power_law",
    "frobenius_sq",
    "full_singular_values",
    "intruder_count",
    "kl_from_topk",
    "lora_svd",
    "randomized_svd",
    "sketch_left_vectors",
    "sparsity",
    "spectral_gap",
    "stable_rank",
    "subspace_overlap",
    "top1_agreement",
]
