"""The batch contract: named fields, each image's index in its dataset.

Every loader of the datamodules yields one of two named tuples (they unpack like tuples and
Lightning moves them to the device field by field):

- ``LabeledBatch(images, labels, index)``: the labeled training loader, validation and test.
- ``UnlabeledBatch(images, hidden_labels, index)``: the unlabeled training loader.
  ``hidden_labels`` is the true label where the dataset knows it and ``-1`` where it does not;
  diagnostics only, never a loss.

A training batch is ``{"labeled": LabeledBatch, "unlabeled": UnlabeledBatch}`` (Lightning's
``max_size_cycle`` combination of the two loaders; ``"unlabeled"`` is absent for a method with
``uses_unlabeled = False``).

Shapes: ``images`` (batch_size, C, H, W), uint8 in [0, 255] as loaded, float in [0, 1] after
``on_after_batch_transfer``; ``labels``/``hidden_labels``/``index`` (batch_size,) int64.

``index`` is the position of the image in the dataset its loader draws from: ``0 ..
num_labeled - 1`` for the labeled loader (the labeled set is repeated to fill an epoch; a
repeat keeps its image's index), ``0 .. num_unlabeled - 1`` for the unlabeled loader (the
unlabeled pool, then any extra unlabeled split). It is the key of per-sample state (FlexMatch's
learning status): it does not depend on shuffling, on the DDP rank that draws the image, or on
a resumption, and it is the same in every epoch.

``train_batch`` builds a training batch by hand (tests, notebooks), with ``index = arange``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch


class LabeledBatch(NamedTuple):
    """Labeled images (training, validation or test). Shapes: (B, C, H, W), (B,), (B,)."""

    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor


class UnlabeledBatch(NamedTuple):
    """Unlabeled images; ``hidden_labels`` for diagnostics only (-1: unknown). Shapes: (B, C, H, W), (B,), (B,)."""

    images: torch.Tensor
    hidden_labels: torch.Tensor
    index: torch.Tensor


def _arange_like(labels: torch.Tensor) -> torch.Tensor:
    return torch.arange(len(labels), device=labels.device)


def train_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    unlabeled_images: torch.Tensor | None = None,
    hidden_labels: torch.Tensor | None = None,
) -> dict[str, Any]:
    """``{"labeled": LabeledBatch, "unlabeled": UnlabeledBatch}`` from tensors, indices ``0 .. B - 1``.

    ``hidden_labels`` defaults to ``-1`` (unknown) for every unlabeled image.
    """
    batch: dict[str, Any] = {"labeled": LabeledBatch(images, labels, _arange_like(labels))}
    if unlabeled_images is not None:
        if hidden_labels is None:
            hidden_labels = torch.full((len(unlabeled_images),), -1, dtype=torch.long, device=labels.device)
        batch["unlabeled"] = UnlabeledBatch(unlabeled_images, hidden_labels, _arange_like(hidden_labels))
    return batch


def _named(part: Any, kind: type, role: str) -> Any:
    if part is None or isinstance(part, kind):
        return part
    fields = ", ".join(kind._fields)
    raise TypeError(
        f'batch["{role}"] must be a {kind.__name__}({fields}) (ssl_modules.batch); got '
        f"{type(part).__name__}{f' of {len(part)} items' if isinstance(part, (tuple, list)) else ''}. "
        "Use the library's datamodules, or build batches with ssl_modules.batch.train_batch(...)."
    )


def split_batch(batch: Any) -> tuple[LabeledBatch, UnlabeledBatch | None]:
    """``(labeled, unlabeled)`` of a training batch; ``unlabeled`` is None when absent.

    Refuses, with the fix, a batch that is not ``{"labeled": LabeledBatch, "unlabeled":
    UnlabeledBatch}``: a method keyed on ``index`` must never get positions that are not the
    images' own.
    """
    if not isinstance(batch, dict) or "labeled" not in batch:
        raise TypeError(
            'a training batch is {"labeled": LabeledBatch, "unlabeled": UnlabeledBatch} (ssl_modules.batch); '
            f"got {type(batch).__name__}. Use the library's datamodules, or ssl_modules.batch.train_batch(...)."
        )
    return _named(batch["labeled"], LabeledBatch, "labeled"), _named(
        batch.get("unlabeled"), UnlabeledBatch, "unlabeled"
    )


def images_and_labels(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of an evaluation batch: a ``LabeledBatch`` or a plain ``(images, labels)``."""
    if isinstance(batch, (LabeledBatch, UnlabeledBatch)):
        return batch[0], batch[1]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(
        f"an evaluation batch is a LabeledBatch(images, labels, index) or (images, labels); got {type(batch).__name__}."
    )
