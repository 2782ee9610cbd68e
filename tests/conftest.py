"""Session-wide test settings: no network, W&B offline, quiet tokenizers, reproducible property tests."""

import os

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
