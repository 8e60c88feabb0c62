"""Pseudo-label rules: which pseudo-labels of the weak view to trust, and how much.

A rule is a small module: given the weak view's class probabilities of an unlabeled batch
(and the images' ``index`` in the unlabeled set, ``ssl_modules.batch``), it returns
``PseudoLabels(targets, weights)``; the FixMatch-style module
(``ssl_modules.semi_supervised.FixMatchModule``) teaches ``targets`` on the strong view with
per-image ``weights``. A rule's state lives in buffers: it is checkpointed, resumed exactly, and
synchronised across DDP ranks where the rule's statistics are global (every rank updates with
the whole global batch, so all ranks hold the same state).

Choosing a rule in YAML::

    model:
      class_path: ssl_modules.semi_supervised.FixMatchModule
      init_args:
        rule:
          class_path: ssl_modules.semi_supervised.rules.FixedThreshold
          init_args: {threshold: 0.95}

Writing a rule: subclass ``PseudoLabelRule``, implement ``decide`` (and ``update`` for state
kept across steps, ``allocate`` for buffers sized by the data, ``extra_loss`` for a loss term of
the paper's own, ``log_values`` for what to chart). Constructor arguments must be plain values
(or another rule part such as ``DistributionAlignment``) stored under attributes of the same
name: that is how a checkpoint records and rebuilds the rule (``rule_record``/``build_rule``).

Shapes throughout: ``probs`` (U, num_classes), rows summing to 1; ``index`` (U,) int64.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from ssl_modules import dist as ssl_dist


class PseudoLabels(NamedTuple):
    """What a rule decides for each unlabeled image.

    targets: (U,) int64 hard pseudo-labels, or (U, num_classes) float soft targets (rows sum to 1).
    weights: (U,) float >= 0, the weight of each image's unlabeled loss term; 0 drops it.
    """

    targets: torch.Tensor
    weights: torch.Tensor


def global_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over every rank's ``tensor`` (all ranks pass the same shape): the statistic of the
    global batch. The identity in one process."""
    if not ssl_dist.is_distributed():
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / ssl_dist.world_size()


def _check_unit(name: str, value: float, low_open: bool = False) -> None:
    if not (0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0):
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name} must be in {interval}; got {value}")


class DistributionAlignment(nn.Module):
    """Distribution alignment: ``q <- normalize(q * target / p_model)``, with ``p_model`` the
    EMA (``momentum``) of the mean weak-view prediction over the global batch, before the rule
    looks at the probabilities. ``p_model`` starts at the first training batch's mean (as USB's
    ``DistAlignEMAHook``; a uniform start would leave the alignment idle for the first
    ``~1 / (1 - momentum)`` steps); until then (all zeros) the alignment changes nothing. ``target`` is uniform (SoftMatch's uniform alignment), which is
    also ReMixMatch's labeled marginal on the class-balanced splits of the benchmarks.

    - [0] ReMixMatch (distribution alignment), Berthelot et al., 2020, https://arxiv.org/abs/1911.09785
    - [1] SoftMatch (uniform alignment), Chen et al., 2023, https://arxiv.org/abs/2301.10921

    Args:
        momentum: EMA momentum of ``p_model`` (0.999).
    """

    def __init__(self, momentum: float = 0.999) -> None:
        super().__init__()
        _check_unit("momentum", momentum)
        self.momentum = momentum
        self.register_buffer("p_model", torch.zeros(0))

    def allocate(self, num_classes: int) -> None:
        if self.p_model.numel() != num_classes:
            self.p_model = torch.zeros(num_classes, device=self.p_model.device)  # zeros: not started

    @torch.no_grad()
    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        self.allocate(probs.shape[1])
        if self.training:
            batch_mean = global_mean(probs.mean(dim=0))
            moved = self.p_model * self.momentum + batch_mean * (1 - self.momentum)
            started = self.p_model.sum() > 0  # on the device: no host synchronisation
            self.p_model.copy_(torch.where(started, moved, batch_mean))
        target = torch.full_like(self.p_model, 1.0 / len(self.p_model))
        aligned = probs * (target / self.p_model.clamp_min(1e-12))
        return aligned / aligned.sum(dim=1, keepdim=True)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        saved = state_dict.get(prefix + "p_model")
        if saved is not None and saved.shape != self.p_model.shape:
            self.p_model = torch.empty_like(saved, device=self.p_model.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class PseudoLabelRule(nn.Module):
    """Base of pseudo-label rules (see the module docstring).

    ``forward(probs, index)`` runs, without gradient: the optional ``alignment`` on ``probs``,
    then ``update`` (training mode only: the state moves with training batches, never with an
    evaluation), then ``decide``.

    Args:
        alignment: a ``DistributionAlignment`` applied to the probabilities first (None: off).
    """

    def __init__(self, alignment: DistributionAlignment | None = None) -> None:
        super().__init__()
        self.alignment = alignment
        self.num_classes: int | None = None
        self.num_samples: int | None = None

    def allocate(self, num_classes: int, num_samples: int | None = None) -> None:
        """Size the state for ``num_classes`` classes and ``num_samples`` unlabeled images (None:
        unknown). Called by the module when fitting starts; subclasses allocate their buffers
        here and must keep what a loaded checkpoint put in them when the sizes agree."""
        self.num_classes = num_classes
        self.num_samples = num_samples
        if self.alignment is not None:
            self.alignment.allocate(num_classes)

    def forward(self, probs: torch.Tensor, index: torch.Tensor | None = None) -> PseudoLabels:
        if probs.ndim != 2:
            raise ValueError(f"probs must have shape (batch_size, num_classes); got {tuple(probs.shape)}")
        with torch.no_grad():
            probs = probs.detach().float()
            if self.num_classes is None:
                self.allocate(probs.shape[1], self.num_samples)
            if self.alignment is not None:
                probs = self.alignment(probs)
            if self.training:
                self.update(probs, index)
            return self.decide(probs, index)

    def update(self, probs: torch.Tensor, index: torch.Tensor | None) -> None:
        """Move the rule's state with this training batch (default: stateless)."""

    def decide(self, probs: torch.Tensor, index: torch.Tensor | None) -> PseudoLabels:
        raise NotImplementedError

    def extra_loss(self, strong_logits: torch.Tensor, pseudo: PseudoLabels) -> torch.Tensor | None:
        """A loss term of the rule's own paper, added to the unlabeled loss (default: none).

        Args:
            strong_logits: (U, num_classes), carries the gradient.
            pseudo: what ``forward`` decided for this batch.
        """
        return None

    def log_values(self) -> dict[str, torch.Tensor]:
        """Scalars to chart over training (e.g. per-class thresholds), keyed by name."""
        return {}


class FixedThreshold(PseudoLabelRule):
    """FixMatch's rule: the hard pseudo-label ``argmax q``, weight ``1(max q >= threshold)``.

    - [0] FixMatch, Sohn et al., 2020, https://arxiv.org/abs/2001.07685

    Args:
        threshold: ``tau`` in [0, 1] (0.95).
        alignment: optional ``DistributionAlignment``.
    """

    def __init__(self, threshold: float = 0.95, alignment: DistributionAlignment | None = None) -> None:
        super().__init__(alignment)
        _check_unit("threshold", threshold)
        self.threshold = threshold

    def decide(self, probs: torch.Tensor, index: torch.Tensor | None) -> PseudoLabels:
        confidence, labels = probs.max(dim=1)
        return PseudoLabels(labels, (confidence >= self.threshold).float())

    def log_values(self) -> dict[str, torch.Tensor]:
        return {"threshold": torch.tensor(float(self.threshold))}


# -- recording and rebuilding rules (checkpoint hyper-parameters hold plain values only) ------
def rule_record(part: nn.Module | None) -> dict[str, Any] | None:
    """``{"class_path", "init_args"}`` of a rule part, its arguments read back from the
    attributes of the same name (nested parts recorded the same way)."""
    if part is None:
        return None
    init_args: dict[str, Any] = {}
    for name, parameter in list(inspect.signature(type(part).__init__).parameters.items())[1:]:
        if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        if not hasattr(part, name):
            raise TypeError(
                f"{type(part).__name__} must keep its argument {name!r} as an attribute of the same name "
                "so that a checkpoint can record and rebuild it."
            )
        value = getattr(part, name)
        if isinstance(value, nn.Module):
            value = rule_record(value)
        elif isinstance(value, tuple):
            value = list(value)
        init_args[name] = value
    return {"class_path": f"{type(part).__module__}.{type(part).__qualname__}", "init_args": init_args}


_RULE_BASES = (PseudoLabelRule, DistributionAlignment)


def build_rule(record: Any) -> nn.Module | None:
    """A rule part from ``rule_record``'s dict (or the part itself, or None).

    Imports the named class only if it is a ``PseudoLabelRule`` or ``DistributionAlignment``:
    a checkpoint's hyper-parameters cannot make this build anything else.
    """
    if record is None or isinstance(record, nn.Module):
        return record
    if not isinstance(record, dict) or "class_path" not in record:
        raise TypeError(
            f"a pseudo-label rule is a PseudoLabelRule or a {{'class_path', 'init_args'}} dict; got {record!r}"
        )
    module_name, _, class_name = record["class_path"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"cannot import the rule class {record['class_path']!r}: {error}") from error
    if not (isinstance(cls, type) and issubclass(cls, _RULE_BASES)):
        raise TypeError(
            f"{record['class_path']!r} is not a PseudoLabelRule or DistributionAlignment; refusing to build it."
        )
    init_args = {
        key: build_rule(value) if isinstance(value, dict) and "class_path" in value else value
        for key, value in dict(record.get("init_args", {})).items()
    }
    return cls(**init_args)
