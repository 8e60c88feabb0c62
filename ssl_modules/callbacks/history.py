"""``ValidationHistory``: every ``val/acc`` of a fit, with its step (the bench's ``--last-k``)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback


class ValidationHistory(Callback):
    """Records ``val/acc`` after every validation run of ``fit`` (sanity checks excluded).

    Attributes:
        steps: ``global_step`` at each validation run.
        accuracies: ``val/acc`` of each run, same order.
    """

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.accuracies: list[float] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or "val/acc" not in trainer.callback_metrics:
            return
        self.steps.append(int(trainer.global_step))
        self.accuracies.append(float(trainer.callback_metrics["val/acc"]))
