"""Session-wide test settings: no network, W&B offline, quiet tokenizers, reproducible property tests."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:  # property tests draw the same examples on every run (a CI failure is reproducible)
    from hypothesis import settings

    settings.register_profile("spectral_monitor", derandomize=True)
    settings.load_profile("spectral_monitor")
except ImportError:
    pass


@pytest.fixture
def wandb_dir(tmp_path, monkeypatch):
    """Offline, silent W&B writing under ``tmp_path/wandb_home``; finishes any run a failing test left.

    W&B reads its settings (``WANDB_DIR`` among them) once per process, so the fixture calls
    ``wandb.teardown()`` before and after the test to make every test see its own directory.
    """
    wandb = pytest.importorskip("wandb")
    home = tmp_path / "wandb_home"
    home.mkdir()
    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(home),
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
    }.items():
        monkeypatch.setenv(name, value)
    wandb.teardown()
    yield home
    if wandb.run is not None:
        wandb.run.finish()
    wandb.teardown()


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: tiny models on a shared 2-core machine, where two threads
    mostly contend (and one thread gives bit-identical losses between runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
