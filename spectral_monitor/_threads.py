"""CPU threads for one measurement: ``with measurement_threads(1): monitor.measure(step)``.

A measurement of small layers is many tiny operations (QRs of ``(m, l)`` blocks, ``l x l``
eigendecompositions, skinny products, ``triu`` of a batch), each a few microseconds of work. With
more than one intra-op thread, many of them still open an OpenMP parallel region (PyTorch's own
``parallel_for`` over a batch, or MKL's threading), and a region ends only when every thread of
the team has run. PyTorch's OpenMP (libgomp) workers spin-wait between regions; when the cores
are shared with another busy process, a worker that is not on a core delays every region by one
or more scheduler slices (milliseconds), so a 7 ms measurement can take seconds. One thread
removes the regions entirely. This module narrows PyTorch's intra-op thread count for the
duration of a block and restores the caller's value exactly, even on an exception.

Scope (PyTorch's semantics, OpenMP backend): the count is per OS thread. Threads that already
ran a parallel operation keep their own count while the block runs; a thread that starts its
first parallel operation inside the block takes the narrowed count for its lifetime. The
interop pool (``torch.get_num_interop_threads``) is not touched. With PyTorch's native thread
pool backend the count cannot change once parallel work started, so the block changes nothing.
Every ``torch.set_num_threads`` call also turns MKL's dynamic thread adjustment off for the
process and clears oneDNN's convolution cache (PyTorch's own doing, on any call): the next CPU
convolution after a block rebuilds its primitive once.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

__all__ = ["measurement_threads"]


@functools.cache
def _adjustable() -> bool:
    """True unless PyTorch uses its native thread pool, whose size is fixed once parallel work started
    (``torch.set_num_threads`` then only warns)."""
    return "native thread pool" not in torch.__config__.parallel_info()


@contextlib.contextmanager
def measurement_threads(threads: int | None) -> Iterator[None]:
    """Run the block with at most ``threads`` PyTorch intra-op CPU threads, then restore the previous count.

    Args:
        threads: the most intra-op threads the block may use (>= 1); never raises the caller's
            current count (a user who chose 1 thread keeps 1). ``None``: leave everything as it is.

    The calls inside the block are unchanged otherwise (same kernels, same results up to the
    summation order of a multi-threaded reduction). Costs two ``torch.set_num_threads`` calls
    (well under a microsecond each) when the count actually changes, nothing otherwise. CUDA
    kernels do not use these threads.
    """
    if threads is None:
        yield
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be None or an int >= 1, got {threads!r}")
    previous = torch.get_num_threads()
    wanted = min(threads, previous)
    if wanted == previous or not _adjustable():
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
