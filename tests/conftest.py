"""Shared test settings: float64 for gradient checks, W&B kept offline, quick
compilation."""

import os

# The tests compile many small programs and run each briefly, so XLA's slower
# optimisation passes cost more time than they save; subprocesses inherit it.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]
).strip()
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
