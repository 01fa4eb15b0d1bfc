"""Shared test settings: float64 for gradient checks, W&B kept offline."""

import os

import jax

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
jax.config.update("jax_enable_x64", True)
