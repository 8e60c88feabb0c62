"""Small helpers shared by several test files (import as ``from helpers import ...``: pytest puts
``tests/`` on the path, as for ``fake_datasets``)."""

from __future__ import annotations

import lightning as L


def tiny_trainer(**overrides) -> L.Trainer:
    """A quiet one-device CPU Trainer for fits of a few steps: no logger, checkpoints, progress
    bar, model summary, sanity check or validation (each can be overridden)."""
    settings = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    return L.Trainer(**(settings | overrides))
