"""Shared wiring for every method: data facts, input normalisation, optimizer and scheduler
injection, per-epoch seeding and ``test/acc``. Not the algorithm: each method writes out its
own ``training_step``.

- ``SSLModuleBase``: the wiring above.
- ``ClassifierModule``: backbone + linear classifier, evaluated with ``evaluation_logits``
  (the live network, or the EMA/teacher where the method evaluates with it). Supervised and
  semi-supervised methods derive from it.
- Self-supervised methods derive from ``ssl_modules.evaluation.SelfSupervisedModule``.
"""

from __future__ import annotations

import ast
import inspect
import math
import os
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from ssl_modules.augment import to_float_images
from ssl_modules.backbones import build_backbone, first_conv_in_channels
from ssl_modules.batch import images_and_labels, split_batch  # noqa: F401  (split_batch: re-exported)


class WarmupCosine:
    """LR factor: linear warm-up for ``warmup_steps``, then a half cosine from 1 to ``final_factor``.

    ``factor(k) = (k + 1) / W`` for ``k < W``, then with ``p = min(1, (k - W) / (K - W))``::

        factor(k) = final + (1 - final) * (1 + cos(pi * p)) / 2

    so 1 at the end of the warm-up, ``(1 + final) / 2`` half-way, ``final`` at ``K``. A pure
    function of the step, so a resumed run continues exactly.

    - [0] SGDR (cosine annealing), Loshchilov & Hutter, 2017, https://arxiv.org/abs/1608.03983
    """

    def __init__(self, total_steps: int, warmup_steps: int = 0, final_factor: float = 0.0) -> None:
        if warmup_steps < 0 or not 0.0 <= final_factor <= 1.0:
            raise ValueError(
                f"warmup_steps must be >= 0 and final_factor in [0, 1]; got {warmup_steps}, {final_factor}"
            )
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = int(warmup_steps)
        self.final_factor = final_factor

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.final_factor + (1 - self.final_factor) * 0.5 * (1 + math.cos(math.pi * progress))


class FixMatchCosine:
    """FixMatch's LR factor ``cos(7 pi k / (16 K))`` at step ``k`` of ``K``: 1 at the start,
    ``cos(7 pi / 32) = 0.773`` half-way, ``cos(7 pi / 16) = 0.195`` at the end, never 0.

    ``fraction`` is the ``7/16``: the factor is ``cos(fraction * pi * k / K)``, clamped at ``K``.
    A pure function of the step.

    - [0] FixMatch, Sohn et al., 2020, https://arxiv.org/abs/2001.07685 (section 4, "cosine
      learning rate decay ... eta cos(7 pi k / 16 K)")
    """

    def __init__(self, total_steps: int, fraction: float = 7 / 16) -> None:
        if not 0.0 < fraction < 0.5:
            raise ValueError(f"fraction must be in (0, 0.5) so the factor stays > 0; got {fraction}")
        self.total_steps = max(1, int(total_steps))
        self.fraction = fraction

    def __call__(self, step: int) -> float:
        progress = min(1.0, step / self.total_steps)
        return math.cos(self.fraction * math.pi * progress)


def _images_to_float(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return to_float_images(batch) if batch.ndim == 4 else batch
    if isinstance(batch, dict):
        return {key: _images_to_float(value) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # LabeledBatch, UnlabeledBatch
        return type(batch)(*(_images_to_float(value) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_images_to_float(value) for value in batch)
    return batch


def load_pretrained_backbone_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The ``backbone.*`` weights and the hyperparameters of a checkpoint of any module here.

    Loads with ``weights_only=True``: a checkpoint cannot run code on load.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained checkpoint {str(path)!r} does not exist; pass the path of a .ckpt file."
        )
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint)
    backbone = {key[len("backbone.") :]: value for key, value in state.items() if key.startswith("backbone.")}
    if not backbone:
        raise ValueError(
            f"{str(path)!r} has no 'backbone.*' weights; pass a checkpoint saved by an ssl_modules module."
        )
    return backbone, dict(checkpoint.get("hyper_parameters", {}))


def _fixed_keywords(cls: type) -> set[str]:
    """The keywords ``cls.__init__`` passes explicitly to ``super().__init__(...)`` (read from its
    source; empty where the source cannot be read)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls.__init__))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return set()
    fixed: set[str] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "__init__"
            and isinstance(node.func.value, ast.Call)
            and isinstance(node.func.value.func, ast.Name)
            and node.func.value.func.id == "super"
        ):
            fixed |= {keyword.arg for keyword in node.keywords if keyword.arg is not None}
    return fixed


def _arguments_to_forget(module: nn.Module, frame: Any) -> list[str]:
    """The recorded ``__init__`` arguments that ``type(module)(**hparams)`` would refuse.

    Lightning's ``save_hyperparameters`` records the arguments of every ``__init__`` on the way
    from the concrete class down to ``SSLModuleBase``, and ``load_from_checkpoint`` passes them
    all back to a class whose ``__init__`` takes ``**kwargs``. Two kinds would be refused:

    - an argument a class fixes for its base, ``super().__init__(backbone_channels=1, **kwargs)``
      (colorization; a user's subclass fixing ``temperature=0.2``): passed back through
      ``**kwargs`` it is a duplicate keyword;
    - an argument of a class below the first ``__init__`` without ``**kwargs``, when that class
      is one of this library's (a user's class without ``**kwargs`` is left alone: Lightning
      filters the arguments by its signature, and the user's code may read ``self.hparams``).

    These are forgotten; the classes that fix or hide them set them again on load.

    Args:
        frame: the frame of ``SSLModuleBase.__init__``.
    """
    levels: list[tuple[type, inspect.Signature]] = []  # from the concrete class down to the base
    while frame is not None and frame.f_code.co_name == "__init__":
        owner = next(
            (
                cls
                for cls in type(module).__mro__
                if getattr(cls.__dict__.get("__init__"), "__code__", None) is frame.f_code
            ),
            None,
        )
        if owner is None or frame.f_locals.get(frame.f_code.co_varnames[0]) is not module:
            break
        levels.insert(0, (owner, inspect.signature(owner.__init__)))
        frame = frame.f_back
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)

    def names(signature: inspect.Signature) -> set[str]:
        return {p.name for p in list(signature.parameters.values())[1:] if p.kind in named}

    def forwards(signature: inspect.Signature) -> bool:
        return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())

    if not levels or not forwards(levels[0][1]):
        return []
    accepted: set[str] = set()
    fixed_above: set[str] = set()
    for owner, signature in levels:
        declared = names(signature)
        accepted |= declared - fixed_above
        if not forwards(signature):
            if owner.__module__.split(".")[0] != "ssl_modules":
                return []
            break
        fixed_above |= _fixed_keywords(owner) - declared
    recorded = set().union(*(names(signature) for _, signature in levels))
    return sorted(recorded - accepted)


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, (list, tuple)) and all(_plain(item) for item in value)


def _datamodule_record(datamodule: Any) -> dict[str, Any] | None:
    """``{"class_path", "init_args"}`` of a datamodule, its arguments read back from the
    attributes of the same name (as the datamodules here keep them); None when a required
    argument cannot be read back."""
    if type(datamodule).__module__.split(".")[0] != "datamodules":
        return None  # only the library's datamodules are rebuilt from a checkpoint
    init_args: dict[str, Any] = {}
    parameters = list(inspect.signature(type(datamodule).__init__).parameters.values())[1:]
    for parameter in parameters:
        if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        value = getattr(datamodule, parameter.name, inspect.Parameter.empty)
        if isinstance(value, Path):
            value = str(value)
        if value is inspect.Parameter.empty or not _plain(value):
            if parameter.default is inspect.Parameter.empty:
                return None
            continue
        init_args[parameter.name] = value
    return {
        "class_path": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}",
        "init_args": init_args,
    }


IMAGE_RANGE_TOLERANCE = 1e-3  # float images may exceed [0, 1] by rounding, not more


class ReseedEachStep(L.Callback):
    """Calls ``pl_module.reseed_for_step()`` at the start of every training batch (callback hooks
    run before the module's own ``on_train_batch_start``)."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        pl_module.reseed_for_step()


class SSLModuleBase(L.LightningModule):
    """Base of every module: the data facts, the optimizer and the scheduler, declared once.

    A method's ``__init__`` states only its own hyper-parameters (with its paper's ``lr`` and
    ``weight_decay``) and forwards the rest as keywords::

        def __init__(self, temperature: float = 0.5, lr: float = 0.3, weight_decay: float = 1e-6, **kwargs):
            super().__init__(lr=lr, weight_decay=weight_decay, **kwargs)
            # the data facts are attributes from here on: self.image_size, self.channels, ...

    The CLI sees every argument of the chain (jsonargparse follows ``**kwargs`` into the bases)
    and links the six data facts from the datamodule. All arguments are keyword-only. The data
    facts default to CIFAR-10's shape (10 classes, 3 x 32 x 32); a model built by hand for
    other data must pass them.

    Args:
        num_classes: classes of the downstream task (linked from the datamodule).
        channels: image channels (linked).
        image_size: image side in pixels (linked).
        mean: per-channel mean of the images in [0, 1] (linked). Shape: (channels,)
        std: per-channel standard deviation (linked). Shape: (channels,)
        horizontal_flip: whether mirrored images keep their class (linked).
        lr: base learning rate of the method's default optimizer.
        weight_decay: weight decay of the method's default optimizer.
        optimizer: replaces the default optimizer (LightningCLI ``OptimizerCallable``).
        scheduler: replaces the default warm-up + cosine schedule (``LRSchedulerCallable``),
            stepped every optimizer step.
    """

    part_arguments: tuple[str, ...] = ()  # __init__ arguments that are nn.Module parts (not saved as such)

    def __init__(
        self,
        *,
        num_classes: int = 10,
        channels: int = 3,
        image_size: int = 32,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.25, 0.25, 0.25),
        horizontal_flip: bool = True,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2; got {num_classes}")
        if len(mean) != channels or len(std) != channels:
            raise ValueError(
                f"mean {tuple(mean)} and std {tuple(std)} must have one value per channel ({channels}); "
                "they are linked from the datamodule, so pass matching values when building the model by hand."
            )
        if lr <= 0:
            raise ValueError(f"lr must be > 0; got {lr}")
        # the concrete class's arguments (a subclass's own and those it forwards with **kwargs),
        # so that ``type(self).load_from_checkpoint(path)`` can pass them all back
        forget = _arguments_to_forget(self, inspect.currentframe())
        self._forgotten_arguments = frozenset(forget)
        # arguments that are parts (nn.Module, e.g. FixMatch's rule) are recorded by their class as
        # plain values, never as objects: a checkpoint loads with weights_only=True
        self.save_hyperparameters(ignore=["optimizer", "scheduler", *self.part_arguments, *forget])
        self.num_classes = num_classes
        self.channels = channels
        self.image_size = image_size
        self.horizontal_flip = horizontal_flip
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.register_buffer(
            "input_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "input_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )

    # -- inputs -----------------------------------------------------------------------
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Images travel as uint8 (4x less host->device traffic) and become floats on the device.
        An override of this hook must call ``super()``: it fails loudly without it (the images
        stay uint8)."""
        return _images_to_float(batch)

    def configure_callbacks(self) -> list[L.Callback]:
        """``ReseedEachStep``: the per-step reseeding runs in a callback, before the module's own
        ``on_train_batch_start``, so a subclass may override that hook without ``super()``. A
        subclass that overrides ``configure_callbacks`` must include ``super().configure_callbacks()``."""
        return [ReseedEachStep()]

    def reseed_for_step(self) -> None:
        """Seed the global RNG from (seed, step, rank), before each training step's augmentation.

        Augmentation and dropout draw from the global RNG; reseeding from (seed, step, rank)
        makes a resumed run draw exactly what the uninterrupted run drew, whatever the RNG
        state the resumed process started with or consumed while setting up its loaders.
        """
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        torch.manual_seed((seed * 1_000_003 + self.global_step * 7_919 + self.global_rank) % (2**63))

    def check_images(self, images: torch.Tensor, check_range: bool = False) -> None:
        """Refuse images this model cannot take: not (batch, channels, H, W), not uint8 or float,
        or (``check_range``) float values outside [0, 1] (costs one host synchronisation)."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"expected images as a torch.Tensor; got {type(images).__name__}")
        if images.ndim != 4 or images.shape[1] != self.channels:
            raise ValueError(
                f"expected images of shape (batch, {self.channels}, H, W); got {tuple(images.shape)}. "
                f"The model was built for {self.channels} channel(s): build it with channels={images.shape[1] if images.ndim == 4 else '?'} "
                "(the CLI links it from the datamodule) or convert the images."
            )
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise ValueError(
                f"expected uint8 images in [0, 255] or float images in [0, 1]; got dtype {images.dtype}. "
                "Convert them with images.to(torch.uint8) (values 0-255) or images.float() / 255."
            )
        if check_range and images.is_floating_point() and images.numel():
            low, high = (float(v) for v in torch.aminmax(images.detach()))
            if low < -IMAGE_RANGE_TOLERANCE or high > 1 + IMAGE_RANGE_TOLERANCE:
                hint = (
                    "they look like 0-255 values: divide by 255 (or pass them as uint8)"
                    if low >= -IMAGE_RANGE_TOLERANCE and high > 2
                    else "they look normalised already: pass the images before normalisation "
                    "(the model normalises with its own mean/std)"
                )
                raise ValueError(
                    f"expected float images in [0, 1] (or uint8 in [0, 255]), as the datamodules yield them; "
                    f"got values in [{low:.4g}, {high:.4g}]: {hint}."
                )

    def as_unit_float(self, images: torch.Tensor) -> torch.Tensor:
        """Images as the datamodules yield them -> float in [0, 1]: uint8 is divided by 255,
        float is checked to lie in [0, 1]; anything else is refused with the fix. The value check
        is skipped inside the training loop, whose batches are converted already (it would
        synchronise the host at every step)."""
        in_training_loop = self._trainer is not None and self.trainer.training
        self.check_images(images, check_range=not in_training_loop)
        return to_float_images(images)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1] -> standardised with the data's mean/std."""
        return (images - self.input_mean) / self.input_std

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        return images * self.input_std + self.input_mean

    # -- optimisation -----------------------------------------------------------------
    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def default_optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """The method's paper optimizer at ``lr``/``weight_decay``; subclasses override."""
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def default_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total))

    def configure_optimizers(self) -> Any:
        params = self.trainable_parameters()
        optimizer = (
            self.optimizer_factory(params) if self.optimizer_factory else self.default_optimizer(params)
        )
        if self.scheduler_factory is not None:
            scheduler = self.scheduler_factory(optimizer)
        else:
            scheduler = self.default_scheduler(optimizer)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # what ``ssl_modules.export`` (``ssl-modules predict``) rebuilds the module and its data from
        record: dict[str, Any] = {"class_path": f"{type(self).__module__}.{type(self).__qualname__}"}
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:
            data = _datamodule_record(datamodule)
            if data is not None:
                record["datamodule"] = data
        checkpoint["ssl_modules"] = record

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._trainer is not None and self.trainer.optimizers:
            self.log(
                "train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False
            )


class ClassifierModule(SSLModuleBase):
    """Backbone + linear classifier; supervised and semi-supervised methods derive from it.

    ``val/acc`` and ``test/acc`` are top-1 accuracy of ``evaluation_logits`` (override it, with
    ``evaluation_backbone``/``evaluation_classifier``, to evaluate with an EMA or teacher
    network). ``forward`` is the live network; ``embed`` gives the evaluated network's features.

    Args:
        backbone: a name accepted by ``ssl_modules.backbones.build_backbone``.
        drop_rate: dropout before the classifier.
        pretrained: path of a checkpoint of any module here whose ``backbone.*`` weights
            initialise the backbone when fitting starts (e.g. a SimCLR checkpoint).
        allow_class_mismatch: accept a ``pretrained`` checkpoint trained for another number of
            classes (only its backbone is used); without it such a checkpoint is refused.
        the rest (keywords): as in ``SSLModuleBase``.
    """

    def __init__(
        self,
        *,
        backbone: str = "small_cnn",
        drop_rate: float = 0.0,
        pretrained: str | None = None,
        allow_class_mismatch: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.backbone = build_backbone(
            backbone, self.channels, drop_rate=drop_rate, image_size=self.image_size
        )
        self.classifier = nn.Linear(self.backbone.num_features, self.num_classes)
        self.pretrained = pretrained
        self.allow_class_mismatch = allow_class_mismatch
        # 1 once the pretrained weights are in; saved, so a reloaded or resumed model never
        # overwrites its trained backbone with the pretrained one again
        self.register_buffer("pretrained_loaded", torch.zeros((), dtype=torch.uint8))

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.pretrained and not bool(self.pretrained_loaded):
            self.load_pretrained(self.pretrained)

    def load_pretrained(self, path: str | Path) -> None:
        """Copy the backbone of checkpoint ``path`` into this model, after checking it fits."""
        state, hparams = load_pretrained_backbone_state(path)
        source_backbone = hparams.get("backbone", self.hparams.backbone)
        if source_backbone != self.hparams.backbone:
            raise ValueError(
                f"checkpoint {str(path)!r} has backbone {source_backbone!r} but this model was built with "
                f"{self.hparams.backbone!r}; set model.backbone={source_backbone}."
            )
        source_classes = hparams.get("num_classes", self.num_classes)
        if source_classes != self.num_classes and not self.allow_class_mismatch:
            raise ValueError(
                f"checkpoint {str(path)!r} was trained for {source_classes} classes but the data has "
                f"{self.num_classes}; use a checkpoint from the same label set, or set "
                "model.allow_class_mismatch=true to keep only its backbone and train a new classifier."
            )
        expected = first_conv_in_channels(self.backbone)
        for value in state.values():
            if value.ndim == 4:  # the first convolution's weight: (out, in_channels, k, k)
                if value.shape[1] != expected:
                    raise ValueError(
                        f"checkpoint {str(path)!r} expects {value.shape[1]}-channel images but the data has "
                        f"{expected}; pretrain on data with {expected} channel(s) (or convert the images)."
                    )
                break
        self.backbone.load_state_dict(state)
        self.pretrained_loaded.fill_(1)

    def evaluation_backbone(self) -> nn.Module:
        """The backbone behind ``val/acc``/``test/acc`` (overridden where an EMA or teacher is)."""
        return self.backbone

    def evaluation_classifier(self) -> nn.Module:
        """The classifier behind ``val/acc``/``test/acc``: ``evaluation_logits`` is this
        classifier on ``embed``'s features."""
        return self.classifier

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Features of the network the method evaluates with (``evaluation_backbone``: the EMA
        or teacher where ``test/acc`` uses it), for downstream use.

        Takes images as the datamodules yield them: uint8 in [0, 255] or float in [0, 1];
        anything else is refused (``as_unit_float``). Call ``model.eval()`` first for inference.
        Shape: (batch_size, C, H, W) -> (batch_size, num_features).
        """
        images = self.as_unit_float(images)
        return self.evaluation_backbone()(self.normalize(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The live network: images in [0, 1] (or uint8), shape (batch_size, C, H, W) -> logits
        (batch_size, num_classes). What training steps call; ``evaluation_logits`` evaluates."""
        self.check_images(images)
        return self.classifier(self.backbone(self.normalize(to_float_images(images))))

    def evaluation_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self(images)

    def _evaluate(self, batch: Any, stage: str) -> torch.Tensor:
        images, labels = images_and_labels(batch)
        logits = self.evaluation_logits(images)
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        self.log(f"{stage}/loss", loss, sync_dist=True, batch_size=len(labels))
        self.log(f"{stage}/acc", accuracy, prog_bar=True, sync_dist=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.evaluation_logits(images).softmax(dim=1)
