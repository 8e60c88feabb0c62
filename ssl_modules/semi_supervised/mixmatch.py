"""MixMatch: sharpened guesses averaged over K weak views, MixUp of labeled and unlabeled.

The parts (``sharpen``, ``mixup``, ``soft_cross_entropy``, ``mixmatch_unlabeled_loss``,
``linear_rampup``) are plain functions of tensors, testable alone; ``MixMatchModule`` writes
out the step.

- [0] MixMatch, Berthelot et al., 2019, https://arxiv.org/abs/1905.02249
- [1] mixup, Zhang et al., 2018, https://arxiv.org/abs/1710.09412
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ssl_modules.augment import weak_augmentation
from ssl_modules.base import ClassifierModule, split_batch
from ssl_modules.callbacks import log_image_grid
from ssl_modules.ema import warn_if_ema_outlasts_run
from ssl_modules.semi_supervised._common import EvaluatesWithEMA, FrozenClassifier, log_pseudo_label_stats


# -- the parts -----------------------------------------------------------------------------
def _check_distributions(name: str, predictions: torch.Tensor, targets: torch.Tensor) -> None:
    if predictions.ndim != 2 or predictions.shape != targets.shape:
        raise ValueError(
            f"{name}: logits and targets must both have shape (batch_size, num_classes); got "
            f"{tuple(predictions.shape)} and {tuple(targets.shape)}"
        )


def sharpen(probabilities: torch.Tensor, temperature: float) -> torch.Tensor:
    """MixMatch's sharpening ``p_c^(1/T) / sum_c' p_c'^(1/T)`` (eq. 7): T < 1 lowers the entropy,
    T -> 0 tends to the one-hot argmax, T = 1 leaves ``p`` unchanged.

    - [0] MixMatch, Berthelot et al., 2019, https://arxiv.org/abs/1905.02249

    Args:
        probabilities: class probabilities. Shape: (batch_size, num_classes)
        temperature: ``T`` > 0 (0.5 in the paper).

    Returns: Shape: (batch_size, num_classes), rows summing to 1.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (the paper uses 0.5); got {temperature}")
    if probabilities.ndim != 2:
        raise ValueError(
            f"probabilities must have shape (batch_size, num_classes); got {tuple(probabilities.shape)}"
        )
    powered = probabilities.pow(1.0 / temperature)
    return powered / powered.sum(dim=1, keepdim=True)


def sample_mixup_weights(alpha: float, count: int) -> torch.Tensor:
    """``count`` draws of ``lambda ~ Beta(alpha, alpha)``, one per row to mix, from the global
    (reseeded) CPU RNG; ``mixup`` turns them into ``max(lambda, 1 - lambda)``. A function of its
    own so that tests can fix the draws. Shape: (count,)"""
    if alpha <= 0:
        raise ValueError(f"mixup_alpha must be > 0 (the paper uses 0.75); got {alpha}")
    concentration = torch.tensor(float(alpha))
    return torch.distributions.Beta(concentration, concentration).sample((count,))


def mixup_partners(count: int, device: torch.device) -> torch.Tensor:
    """The paper's ``W = Shuffle(Concat(X_hat, U_hat))`` as indices: row ``i`` is mixed with row
    ``partners[i]`` of the concatenation. Shape: (count,)"""
    return torch.randperm(count, device=device)


def mixup(
    inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, partners: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """MixMatch's MixUp (eqs. 8-11): ``lambda' = max(lambda, 1 - lambda)``, then
    ``x'_i = lambda'_i x_i + (1 - lambda'_i) x_{partners[i]}`` and the same for the targets, so
    that every mixed row stays closer to its own input (a labeled row stays labeled-dominated).
    One ``lambda`` per row, as in the reference implementation (USB draws one per batch).

    - [0] MixMatch, Berthelot et al., 2019, https://arxiv.org/abs/1905.02249
    - [1] mixup, Zhang et al., 2018, https://arxiv.org/abs/1710.09412

    Args:
        inputs: Shape: (N, ...), e.g. images (N, C, H, W).
        targets: label distributions. Shape: (N, num_classes)
        weights: ``lambda`` before the ``max``. Shape: (N,)
        partners: the row each row is mixed with. Shape: (N,)

    Returns: ``(mixed_inputs, mixed_targets)`` of the shapes of ``inputs`` and ``targets``.
    """
    count = len(inputs)
    if len(targets) != count or weights.shape != (count,) or partners.shape != (count,):
        raise ValueError(
            f"inputs ({count} rows), targets {tuple(targets.shape)}, weights {tuple(weights.shape)} and "
            f"partners {tuple(partners.shape)} must all have one entry per row"
        )
    lam = torch.maximum(weights, 1.0 - weights).to(inputs.dtype)  # (N,), each >= 0.5
    lam_inputs = lam.view(-1, *([1] * (inputs.ndim - 1)))
    lam_targets = lam.view(-1, 1).to(targets.dtype)
    mixed_inputs = lam_inputs * inputs + (1.0 - lam_inputs) * inputs[partners]
    mixed_targets = lam_targets * targets + (1.0 - lam_targets) * targets[partners]
    return mixed_inputs, mixed_targets


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``1/N sum_i H(target_i, softmax(logits_i))``: MixMatch's ``L_X`` on mixed labeled rows.

    Args:
        logits: Shape: (batch_size, num_classes)
        targets: label distributions (mixed one-hot labels). Shape: (batch_size, num_classes)
    """
    _check_distributions("soft_cross_entropy", logits, targets)
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def mixmatch_unlabeled_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """MixMatch's ``L_U = 1/(L |U'|) sum_u ||q_u - softmax(logits_u)||_2^2`` (eq. 4, ``L``
    classes): the squared error averaged over classes and rows, as the reference implementation
    and USB compute it. Bounded, unlike cross-entropy, so a wrong guess costs little.

    - [0] MixMatch, Berthelot et al., 2019, https://arxiv.org/abs/1905.02249

    Args:
        logits: predictions on the mixed unlabeled rows. Shape: (batch_size, num_classes)
        targets: their mixed guesses. Shape: (batch_size, num_classes)
    """
    _check_distributions("mixmatch_unlabeled_loss", logits, targets)
    return (logits.float().softmax(dim=1) - targets).pow(2).mean()


def linear_rampup(step: int, rampup_steps: int) -> float:
    """``min(1, step / rampup_steps)``: MixMatch's linear ramp of ``lambda_U`` from 0; 1 throughout
    when ``rampup_steps`` is 0. A pure function of the step, so a resumed run continues exactly."""
    if rampup_steps <= 0:
        return 1.0
    return min(1.0, max(0.0, step / rampup_steps))


@contextmanager
def batchnorm_statistics_kept(module: nn.Module) -> Iterator[None]:
    """BatchNorm normalises with the batch's statistics (train mode) inside the block, and its
    running statistics are restored on exit: a forward that computes targets does not count as
    a training batch (the reference and USB keep the label guess out of the running statistics)."""
    layers = [
        layer
        for layer in module.modules()
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.running_mean is not None
    ]
    saved = [[buffer.clone() for buffer in layer.buffers()] for layer in layers]
    try:
        yield
    finally:
        with torch.no_grad():
            for layer, buffers in zip(layers, saved):
                for buffer, value in zip(layer.buffers(), buffers):
                    buffer.copy_(value)


# -- the method ----------------------------------------------------------------------------
class MixMatchModule(EvaluatesWithEMA, ClassifierModule):
    """MixMatch with an EMA of the weights for evaluation.

    Per step, with a labeled batch ``(x, y)`` of ``B`` images and an unlabeled batch ``u``:

    1. ``x_hat`` = one weak view (flip + shift) of each labeled image, with one-hot ``p = y``;
       ``u_hat_k`` = ``K`` independent weak views of each unlabeled image.
    2. The guess ``q = sharpen(1/K sum_k softmax(f(u_hat_k)), T)``, shared by the ``K`` views;
       computed without gradient, with BatchNorm on the batch's statistics but its running
       statistics left as they were.
    3. ``W = shuffle(x_hat, u_hat_1 .. u_hat_K)``; each row is mixed with its ``W`` partner with
       ``lambda' = max(lambda, 1 - lambda)``, ``lambda ~ Beta(alpha, alpha)`` per row: the first
       ``B`` mixed rows are ``X'``, the rest ``U'``.
    4. ``loss = H(X') + lambda_u * r(step) * L2(U')`` with ``H`` the soft-target cross-entropy,
       ``L2`` the mean squared error between the softmax and the mixed guess (over classes and
       rows), ``r`` a linear ramp from 0 to 1 over ``rampup_steps``.

    One forward runs over the whole mixed batch ``X' + U'``, so BatchNorm's statistics are those
    of labeled and unlabeled rows together. The reference implementation runs ``K + 1``
    forwards of ``B`` rows each and interleaves rows between them so that each is such a mix
    (USB likewise); the single forward reaches that end directly (its statistics are over all
    ``(K + 1) B`` rows rather than per chunk, not bit-identical).

    Paper defaults (CIFAR-10): ``T = 0.5``, ``K = 2``, ``alpha = 0.75``, ``lambda_u = 75``
    (CIFAR-100: 150), ramp over 16,000 steps, Adam at lr 0.002 with no decay of the learning
    rate, evaluation with an EMA (0.999) of the weights. Weight decay follows the released code
    (google-research/mixmatch: each step, after Adam, conv and dense kernels shrink by
    ``1 - wd * lr`` with wd 0.02, 0.04 for the 26M-parameter CIFAR-100 model): here AdamW's
    decoupled decay, which shrinks by ``1 - lr * weight_decay``, on the weight matrices and
    kernels only (not biases nor BatchNorm). USB trains MixMatch with SGD (lr 0.03, momentum
    0.9, wd 5e-4) instead; pass ``optimizer`` for that.

    The EMA copy (``ema_model``) uses Mean Teacher's warm-up ``min(1 - 1/(step + 1), ema_decay)``
    as FixMatch's does here (the paper's EMA has none); fitting warns when the EMA's horizon
    ``1 / (1 - ema_decay)`` exceeds half the run, and when ``rampup_steps`` exceeds the run
    (``lambda_u`` would never be reached).

    - [0] MixMatch, Berthelot et al., 2019, https://arxiv.org/abs/1905.02249
    - [1] mixup, Zhang et al., 2018, https://arxiv.org/abs/1710.09412
    - [2] Mean Teacher (EMA warm-up), Tarvainen & Valpola, 2017, https://arxiv.org/abs/1703.01780
    - [3] Decoupled weight decay (AdamW), Loshchilov & Hutter, 2019, https://arxiv.org/abs/1711.05101

    Args:
        backbone: backbone name (``ssl_modules.backbones``).
        temperature: sharpening temperature ``T`` > 0 (0.5).
        num_augmentations: weak views ``K`` >= 1 per unlabeled image (2).
        mixup_alpha: ``alpha`` > 0 of ``Beta(alpha, alpha)`` (0.75).
        unlabeled_loss_weight: ``lambda_u`` >= 0 reached after the ramp (75 for CIFAR-10).
        rampup_steps: optimizer steps of the linear ramp of ``lambda_u`` from 0 (16,000; 0: none).
        ema_decay: decay of the evaluation EMA (0.999).
        evaluate_with_ema: report ``val/acc``/``test/acc`` with the EMA weights.
        drop_rate: dropout before the classifier.
        lr: Adam learning rate (0.002), constant.
        weight_decay: AdamW decoupled decay of the kernels (0.02: a shrink of ``1 - 4e-5`` per step).
        pretrained: checkpoint whose backbone initialises this one; the EMA copy follows it
            from the first step.
        data facts and optimizer/scheduler: as in ``SSLModuleBase``.
    """

    def __init__(
        self,
        *,
        temperature: float = 0.5,
        num_augmentations: int = 2,
        mixup_alpha: float = 0.75,
        unlabeled_loss_weight: float = 75.0,
        rampup_steps: int = 16_000,
        ema_decay: float = 0.999,
        evaluate_with_ema: bool = True,
        drop_rate: float = 0.0,
        lr: float = 0.002,
        weight_decay: float = 0.02,
        pretrained: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            lr=lr, weight_decay=weight_decay, drop_rate=drop_rate, pretrained=pretrained, **kwargs
        )
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 (the paper uses 0.5); got {temperature}")
        if num_augmentations < 1:
            raise ValueError(
                f"num_augmentations (K weak views per unlabeled image) must be >= 1; got {num_augmentations}"
            )
        if mixup_alpha <= 0:
            raise ValueError(f"mixup_alpha must be > 0 (the paper uses 0.75); got {mixup_alpha}")
        if unlabeled_loss_weight < 0:
            raise ValueError(f"unlabeled_loss_weight must be >= 0; got {unlabeled_loss_weight}")
        if rampup_steps < 0:
            raise ValueError(f"rampup_steps must be >= 0 (0: no ramp); got {rampup_steps}")
        if not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1]; got {ema_decay}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0; got {weight_decay}")
        self.weak = weak_augmentation(self.image_size, self.horizontal_flip)
        self.ema_model = FrozenClassifier(self.backbone, self.classifier)

    def unlabeled_weight(self) -> float:
        """``lambda_u * min(1, step / rampup_steps)`` at the current step."""
        ramp = linear_rampup(self.global_step, self.hparams.rampup_steps)
        return self.hparams.unlabeled_loss_weight * ramp

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        labeled, unlabeled = split_batch(batch)
        if unlabeled is None:
            raise ValueError(
                'MixMatch needs unlabeled images: the batch has no "unlabeled" part; use a semi-supervised '
                "datamodule (or ssl_modules.batch.train_batch(images, labels, unlabeled_images))."
            )
        images, labels = labeled.images, labeled.labels
        hidden_labels = unlabeled.hidden_labels  # diagnostics only
        num_labeled, num_unlabeled = len(images), len(unlabeled.images)
        num_views = self.hparams.num_augmentations
        weak_labeled = self.weak(images)
        # K independent draws; view k of unlabeled image i is row k * U + i
        unlabeled_views = torch.cat([self.weak(unlabeled.images) for _ in range(num_views)])
        with torch.no_grad(), batchnorm_statistics_kept(self.backbone):  # the guess is a target
            view_probs = self(unlabeled_views).float().softmax(dim=1)  # (K U, classes)
            mean_probs = view_probs.view(num_views, num_unlabeled, -1).mean(dim=0)  # (U, classes)
            guess = sharpen(mean_probs, self.hparams.temperature)  # (U, classes)
        inputs = torch.cat([weak_labeled, unlabeled_views])  # (B + K U, C, H, W)
        targets = torch.cat([F.one_hot(labels, self.num_classes).float(), guess.repeat(num_views, 1)])
        weights = sample_mixup_weights(self.hparams.mixup_alpha, len(inputs)).to(inputs.device)
        partners = mixup_partners(len(inputs), inputs.device)
        mixed_inputs, mixed_targets = mixup(inputs, targets, weights, partners)
        # one forward over X' and U' together: BatchNorm's statistics mix labeled and unlabeled
        logits = self(mixed_inputs)  # (B + K U, classes)
        supervised_loss = soft_cross_entropy(logits[:num_labeled], mixed_targets[:num_labeled])
        unlabeled_loss = mixmatch_unlabeled_loss(logits[num_labeled:], mixed_targets[num_labeled:])
        unlabeled_weight = self.unlabeled_weight()
        loss = supervised_loss + unlabeled_weight * unlabeled_loss
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/sup_loss", supervised_loss)
        self.log("train/unsup_loss", unlabeled_loss)
        self.log("train/unlabeled_weight", unlabeled_weight)
        every_guess_used = torch.ones(num_unlabeled, device=guess.device)  # MixMatch keeps every guess
        log_pseudo_label_stats(self, guess.argmax(dim=1), every_guess_used, hidden_labels)
        if self.global_step == 0 and batch_idx == 0:
            log_image_grid(
                self,
                "train/mixed_views",
                mixed_inputs[num_labeled:],
                caption="MixUp of weak unlabeled views with shuffled labeled/unlabeled views",
            )
        return loss

    def on_fit_start(self) -> None:
        super().on_fit_start()
        total = self.trainer.estimated_stepping_batches
        if self.hparams.evaluate_with_ema:
            warn_if_ema_outlasts_run(self.hparams.ema_decay, total, "MixMatch's evaluation EMA")
        if 0 < total < self.hparams.rampup_steps:
            rank_zero_warn(
                f"MixMatch: rampup_steps={self.hparams.rampup_steps} is longer than this {int(total)}-step run, "
                f"so the unlabeled weight never reaches lambda_u={self.hparams.unlabeled_loss_weight} "
                f"(it ends at {self.hparams.unlabeled_loss_weight * total / self.hparams.rampup_steps:.3g}). "
                "The paper's 16,000 steps assume ~1M; scale rampup_steps to the run (configs/mixmatch.yaml)."
            )

    def default_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """Adam (lr 0.002) with decoupled weight decay on kernels and weight matrices only, as the
        reference decays only ``kernel`` variables."""
        params = list(params)
        kernels = [p for p in params if p.ndim >= 2]
        others = [p for p in params if p.ndim < 2]  # biases, BatchNorm scales and shifts
        groups = [
            {"params": kernels, "weight_decay": self.hparams.weight_decay},
            {"params": others, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW([group for group in groups if group["params"]], lr=self.hparams.lr)

    def default_scheduler(self, optimizer: torch.optim.Optimizer) -> None:
        """None: the paper keeps the learning rate constant and evaluates an EMA instead."""
        return None
