"""The joint-embedding template: the skeleton of ``training_step`` shared by SimCLR, MoCo, BYOL,
Barlow Twins, VICReg, SimSiam, ..., written once.

A method states only what is its own:

- its views: ``self.augment`` (a batched augmentation, called once per step on the batch
  repeated ``num_views`` times), or an override of ``make_views`` returning any list of view
  tensors, e.g. multi-crop's global and local crops of two sizes;
- its heads and target networks: attributes built in ``__init__``;
- its loss: ``joint_embedding_loss(views, features)``, where ``features[v]`` is the online
  backbone's output for view ``v``; a target network's pass is written there, visibly, under
  ``torch.no_grad()`` (``self.encode(views, self.target_backbone)``);
- which (online, target) pairs follow each other by EMA: ``momentum_pairs()``.

What the template does, in this order, at every step:

1. split the batch (the unlabeled images; the labeled ones when a method trains without the
   unlabeled loader) and check the images;
2. make the views (on the device);
3. the online backbone pass, views grouped by resolution: one backbone call per image size
   (``view_groups``), so BatchNorm sees every view of a size together;
4. the method's loss;
5. the online probe on detached features of the labeled batch (no gradient into the backbone);
6. logging: ``train/loss``, ``train/momentum`` (with target networks), alignment and
   uniformity of the pair of embeddings the loss returns, the views at the first step;
7. after every optimizer step, the EMA update of every pair of ``momentum_pairs()`` with the
   momentum ``momentum()``, a pure function of ``global_step`` (so a resumed run continues exactly).

- [0] SimCLR, Chen et al., 2020, https://arxiv.org/abs/2002.05709
- [1] BYOL (cosine momentum schedule), Grill et al., 2020, https://arxiv.org/abs/2006.07733
- [2] Multi-crop, Caron et al., 2020 (SwAV), https://arxiv.org/abs/2006.09882
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from ssl_modules.augment.multicrop import MultiCropViews, indices_by_size
from ssl_modules.augment.views import make_views
from ssl_modules.base import split_batch
from ssl_modules.callbacks.embeddings import log_alignment_uniformity, log_views
from ssl_modules.ema import cosine_momentum, ema_update
from ssl_modules.evaluation.self_supervised import SelfSupervisedModule
from ssl_modules.optim import joint_embedding_optimizer


class JointEmbeddingLoss(NamedTuple):
    """What a method's ``joint_embedding_loss`` returns.

    Attributes:
        loss: the scalar the backbone is trained with (the online probe's loss is added by the template).
        z_a, z_b: embeddings of a positive pair (two views of the same images), logged as
            alignment and uniformity (detached by the template). Shape: (batch_size, dim) each.
    """

    loss: torch.Tensor
    z_a: torch.Tensor
    z_b: torch.Tensor


class JointEmbeddingModule(SelfSupervisedModule):
    """Base of the joint-embedding methods: views -> backbone -> the method's heads and loss.

    Subclasses set ``self.augment`` (or override ``make_views``) and implement
    ``joint_embedding_loss``; methods with target networks return their (online, target)
    pairs from ``momentum_pairs`` and declare a ``base_momentum`` hyperparameter (the
    momentum at step 0, rising to 1 on a cosine); methods whose views go through the online
    backbone differently override ``view_groups``.

    The default optimizer is ``joint_embedding_optimizer`` (LARS when the method has a
    ``lars`` hyperparameter set, else SGD with momentum 0.9), at ``lr``/``weight_decay``.

    Attributes:
        num_views: views per image made by the default ``make_views`` (2).

    Args: as in ``SelfSupervisedModule`` (keywords).
    """

    num_views: int = 2

    # -- the method's parts (hooks) -------------------------------------------------------
    def make_views(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The views of a batch: ``num_views`` independent draws of ``self.augment``, in [0, 1];
        after ``use_multicrop``, the global crops followed by the smaller local crops.

        Override to return any other list of views (each view a tensor of one size; sizes may
        differ). Shape: (batch_size, C, H, W) -> list of (batch_size, C, H_v, W_v).
        """
        multicrop = getattr(self, "multicrop", None)
        if multicrop is not None:
            return multicrop(images)
        return make_views(images, self.augment, self.num_views)  # independent parameters per image and view

    def use_multicrop(self, *, num_global_crops: int = 2, num_local_crops: int = 6, **crop_args: Any) -> None:
        """Make the views multi-crop (``MultiCropViews``): ``num_global_crops`` crops at
        ``image_size``, then ``num_local_crops`` smaller ones; sets ``self.multicrop`` and
        ``self.num_global_crops`` (the global crops are ``views[: self.num_global_crops]``).
        Call it in ``__init__`` (DINO and SwAV do; any joint-embedding method can).

        Args:
            crop_args: the other arguments of ``MultiCropViews`` (``local_size``,
                ``global_crop_scale``, ``local_crop_scale``, ...); the flip follows the module's.
        """
        if num_global_crops < 1 or num_global_crops + num_local_crops < 2:
            raise ValueError(
                f"{type(self).__name__} needs num_global_crops >= 1 and at least 2 views in all; got "
                f"{num_global_crops} global and {num_local_crops} local crops"
            )
        self.num_global_crops = num_global_crops
        self.multicrop = MultiCropViews(
            self.channels,
            self.image_size,
            num_global_crops=num_global_crops,
            num_local_crops=num_local_crops,
            horizontal_flip=self.horizontal_flip,
            **crop_args,
        )

    def view_groups(self, views: list[torch.Tensor]) -> list[list[int]]:
        """Which views the online backbone encodes, and which together in one call.

        Default: every view, grouped by resolution (all views of one size in one backbone call,
        in order of first appearance). A view in no group gets ``None`` as its features.
        """
        return list(indices_by_size(views).values())

    def joint_embedding_loss(
        self, views: list[torch.Tensor], features: list[torch.Tensor | None]
    ) -> JointEmbeddingLoss:
        """The method's loss from its views and their online backbone features.

        Args:
            views: the views (float in [0, 1], not normalised). Shape: (batch_size, C, H_v, W_v) each.
            features: the online backbone's features of each view (None for a view outside
                ``view_groups``). Shape: (batch_size, num_features) each.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement joint_embedding_loss(views, features)"
        )

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """``[(online, target), ...]``: each target becomes the EMA of its online module after
        every optimizer step (default: none)."""
        return []

    def momentum(self) -> float:
        """The EMA momentum: cosine from ``base_momentum`` at step 0 to 1 at the last step (BYOL),
        a pure function of ``global_step``."""
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        return cosine_momentum(self.global_step, int(total), self.hparams.base_momentum)

    # -- the shared skeleton --------------------------------------------------------------
    def encode(
        self,
        views: list[torch.Tensor],
        network: nn.Module | None = None,
        groups: list[list[int]] | None = None,
    ) -> list[torch.Tensor | None]:
        """``network`` (default: the online backbone) on ``backbone_input`` of the views, one call
        per group (default: ``view_groups(views)``, by resolution). Call it under
        ``torch.no_grad()`` for a target network.

        Shape: views (batch_size, C, H_v, W_v) each -> features (batch_size, num_features) each.
        """
        network = self.backbone if network is None else network
        groups = self.view_groups(views) if groups is None else groups
        features: list[torch.Tensor | None] = [None] * len(views)
        for group in groups:
            inputs = torch.cat([views[index] for index in group])  # (len(group) * n, C, H, W)
            outputs = network(self.backbone_input(inputs))  # (len(group) * n, num_features)
            for index, output in zip(group, outputs.split([len(views[index]) for index in group])):
                features[index] = output
        return features

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        labeled, unlabeled = split_batch(batch)
        images = (unlabeled or labeled).images  # hidden_labels are never read
        self.check_images(images)
        views = self.make_views(images)
        if len(views) < 2:
            raise ValueError(
                f"{type(self).__name__}.make_views must return at least 2 views; got {len(views)}"
            )
        features = self.encode(views)
        output = self.joint_embedding_loss(views, features)

        probe_loss = self.online_probe_loss(labeled)  # detached features: no gradient into the backbone
        self.log("train/loss", output.loss, prog_bar=True)
        if self.momentum_pairs():
            self.log("train/momentum", self.momentum())
        log_alignment_uniformity(self, output.z_a.detach(), output.z_b.detach())
        if self.global_step == 0 and batch_idx == 0:
            # one grid: the views of the first view's size (multi-crop's global crops)
            log_views(self, [view for view in views if view.shape == views[0].shape])
        return output.loss + probe_loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        pairs = self.momentum_pairs()
        if pairs:
            momentum = self.momentum()
            for online, target in pairs:
                ema_update(target, online, momentum)

    def default_optimizer(self, params: Any) -> torch.optim.Optimizer:
        lars = bool(self.hparams.get("lars", False))
        return joint_embedding_optimizer(self, self.hparams.lr, self.hparams.weight_decay, lars)
