"""Thin adapters: ``hf`` (transformers Trainer), ``trl`` (GRPO/SFT/DPO), ``lightning``.

Import the one you need; importing this package imports no framework.
"""
