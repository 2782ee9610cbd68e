"""measurement_threads: narrows PyTorch's intra-op threads inside the block, restores them exactly after."""

from __future__ import annotations

import re
import threading

import pytest
import torch

from spectral_monitor import _threads
from spectral_monitor._threads import measurement_threads

OPENMP = "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()


def _mkl_threads() -> int | None:
    """MKL's own thread count as PyTorch reports it (None without MKL): set separately from OpenMP's."""
    found = re.search(r"mkl_get_max_threads\(\) : (\d+)", torch.__config__.parallel_info())
    return int(found.group(1)) if found else None


@pytest.fixture
def two_threads():
    """The caller runs with 2 intra-op threads; the session's count is restored afterwards."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


@pytest.mark.skipif(not _threads._adjustable(), reason="native thread pool: the count is fixed")
def test_narrows_inside_and_restores_after(two_threads):
    with measurement_threads(1):
        assert torch.get_num_threads() == 1
        if _mkl_threads() is not None:
            assert _mkl_threads() == 1  # MKL's BLAS/LAPACK pool is narrowed too
        torch.linalg.qr(torch.randn(3, 64, 18))  # work inside the block runs
    assert torch.get_num_threads() == 2
    if _mkl_threads() is not None:
        assert _mkl_threads() == 2


@pytest.mark.skipif(not _threads._adjustable(), reason="native thread pool: the count is fixed")
def test_restores_on_exception(two_threads):
    with pytest.raises(RuntimeError, match="inside"), measurement_threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError("inside")
    assert torch.get_num_threads() == 2


@pytest.mark.skipif(not _threads._adjustable(), reason="native thread pool: the count is fixed")
def test_nested_blocks_restore_each_level(two_threads):
    with measurement_threads(1):
        with measurement_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_none_changes_nothing(two_threads):
    with measurement_threads(None):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 2


@pytest.mark.skipif(not _threads._adjustable(), reason="native thread pool: the count is fixed")
def test_never_raises_the_callers_count():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with measurement_threads(4):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(saved)


def test_fixed_pool_is_left_alone(two_threads, monkeypatch):
    # with PyTorch's native pool, set_num_threads after parallel work only warns: the block must not call it
    monkeypatch.setattr(_threads, "_adjustable", lambda: False)
    with measurement_threads(1):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "1"])
def test_rejects_bad_counts(bad):
    with pytest.raises(ValueError, match="threads"), measurement_threads(bad):
        pass


@pytest.mark.skipif(not OPENMP, reason="per-OS-thread counts are the OpenMP backend's semantics")
def test_other_threads_keep_their_count(two_threads):
    """A thread that already ran parallel work keeps its own count while another thread is in a block."""
    ready, inside, seen = threading.Event(), threading.Event(), threading.Event()
    counts: list[int] = []

    def trainer() -> None:
        torch.triu(torch.randn(3, 64, 18))  # initialises this thread's OpenMP state at 2 threads
        ready.set()
        inside.wait(timeout=10)
        counts.append(torch.get_num_threads())
        seen.set()

    worker = threading.Thread(target=trainer)
    worker.start()
    assert ready.wait(timeout=10)
    with measurement_threads(1):
        inside.set()
        assert seen.wait(timeout=10)
        assert torch.get_num_threads() == 1
    worker.join()
    assert counts == [2]
