"""Pure, stateless spectral math on torch tensors (batched over leading dims, float32 inside)."""

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
    "PowerLawFit",
    "abs_cosine",
    "base_alignment",
    "effective_rank",
    "energy_share",
    "fit_power_law",
    "frobenius_sq",
    "full_singular_values",
    "intruder_count",
    "lora_svd",
    "randomized_svd",
    "sketch_left_vectors",
    "sparsity",
    "spectral_gap",
    "stable_rank",
    "subspace_overlap",
]
