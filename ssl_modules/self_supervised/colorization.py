"""Colorization: predict the ab colour channels of an image from its lightness L."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl_modules.augment import weak_augmentation
from ssl_modules.augment.pretext import lab_to_rgb, rgb_to_lab
from ssl_modules.base import split_batch
from ssl_modules.callbacks import log_image_grid
from ssl_modules.evaluation import SelfSupervisedModule
from ssl_modules.losses.pretext import ColorizationLoss, ab_bin_centres, annealed_mean, hard_encode_ab

# ab values of sRGB colours lie within about +-110; regression predicts ab / AB_SCALE
AB_SCALE = 110.0


class FusionDecoder(nn.Module):
    """A light per-pixel decoder that fuses a global feature vector with a local input.

    ``out = conv1x1(relu(conv1x1(relu(conv3x3(local) + linear(features)))))``: the global
    backbone features are broadcast over the image (the fusion layer of Iizuka et al.), the
    3x3 convolution of the lightness tells the decoder *where* edges are, so *which* colour
    must come from the backbone. Kept small on purpose: the backbone must do the work.

    - [0] Let there be color, Iizuka et al., 2016, https://doi.org/10.1145/2897824.2925974

    Shape: features (B, in_features), local (B, local_channels, H, W) -> (B, out_channels, H, W).
    """

    def __init__(self, in_features: int, local_channels: int, out_channels: int, width: int = 64) -> None:
        super().__init__()
        self.global_projection = nn.Linear(in_features, width)
        self.local = nn.Conv2d(local_channels, width, 3, padding=1)
        self.fuse = nn.Sequential(
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, out_channels, 1),
        )

    def forward(self, features: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        fused = self.local(local) + self.global_projection(features)[:, :, None, None]  # (B, width, H, W)
        return self.fuse(fused)


class ColorizationPretext(SelfSupervisedModule):
    """Convert RGB to CIE Lab on the device, feed the lightness L to the backbone, predict the
    ab channels: as a distribution over quantised ab bins with soft-encoding and class
    rebalancing (``loss="classification"``, Zhang et al.), or as plain regression
    (``loss="regression"``: mean squared error on ab / 110, the L2 baseline both papers compare to).

    - [0] Colorization, Zhang et al., 2016, https://arxiv.org/abs/1603.08511
    - [1] Learning representations for automatic colorization, Larsson et al., 2016, https://arxiv.org/abs/1603.06668

    The kept backbone takes **one channel** (``backbone_channels=1``): ``embed`` converts the
    colour images it is given to L (scaled to [-1, 1]), so the online probe, kNN and
    ``test/acc`` probe colour images through their lightness. To fine-tune the backbone with
    ``SupervisedModule(pretrained=...)``, use data with one channel (the L or gray version).
    Predictions are made at ``1 / output_stride`` of the resolution, as in the paper, by a
    ``FusionDecoder`` from the backbone features and the (downsampled) L channel. The
    rebalancing prior is the running frequency of each ab bin in the training images (the
    buffer ``ab_bin_counts``, started at one count per bin), so it is estimated from the data
    and saved with the checkpoint.

    Args:
        backbone: backbone name (``ssl_modules.backbones``), built for 1 channel.
        loss: ``"classification"`` (Zhang) or ``"regression"``.
        ab_grid_size: side of the ab quantisation bins (the paper: 10).
        soft_neighbours: bins of the soft-encoding (the paper: 5).
        soft_sigma: Gaussian std of the soft-encoding and prior smoothing (the paper: 5).
        rebalance_lambda: class-rebalancing mixing weight (the paper: 0.5).
        annealing_temperature: temperature of the annealed-mean decoding for visuals (the paper: 0.38).
        output_stride: the prediction's down-sampling factor (the paper: 4).
        decoder_width: channels of the fusion decoder.
        lr: Adam learning rate (the paper: 3e-5 over 450k iterations; 1e-3 here for short runs).
        weight_decay: AdamW weight decay (the paper: 1e-3).
        knn_k, probe_weight_decay: evaluation (``SelfSupervisedModule``).
        data facts and optimizer/scheduler: as in ``SSLModuleBase``.

    Batch: ``{"labeled": LabeledBatch, "unlabeled": UnlabeledBatch}`` (``ssl_modules.batch``);
    images float RGB in [0, 1], shape (batch_size, 3, image_size, image_size).
    """

    def __init__(
        self,
        *,
        loss: str = "classification",
        ab_grid_size: float = 10.0,
        soft_neighbours: int = 5,
        soft_sigma: float = 5.0,
        rebalance_lambda: float = 0.5,
        annealing_temperature: float = 0.38,
        output_stride: int = 4,
        decoder_width: int = 64,
        lr: float = 1e-3,
        weight_decay: float = 1e-3,
        **kwargs: Any,
    ) -> None:
        if loss not in ("classification", "regression"):
            raise ValueError(f"loss must be 'classification' or 'regression'; got {loss!r}")
        if output_stride < 1:
            raise ValueError(f"output_stride must be >= 1; got {output_stride}")
        # the backbone reads the lightness channel alone; a checkpoint in the previous (flat)
        # hyper-parameter format records that as backbone_channels=1
        backbone_channels = kwargs.pop("backbone_channels", 1)
        if backbone_channels != 1:
            raise ValueError(
                f"ColorizationPretext's backbone reads the lightness channel only: backbone_channels is fixed to 1; "
                f"got {backbone_channels}. Leave it unset."
            )
        super().__init__(lr=lr, weight_decay=weight_decay, backbone_channels=1, **kwargs)
        if self.channels != 3:
            raise ValueError(
                f"ColorizationPretext needs colour (3-channel RGB) images, but the data has {self.channels} channel(s): "
                "there is no colour to predict. Use a colour dataset (e.g. configs/data/image_folder.yaml on "
                "images made by benchmarks/make_color_folder.py, or CIFAR-10) or another pretext task."
            )
        self.augment = weak_augmentation(self.image_size, self.horizontal_flip)
        centres = ab_bin_centres(ab_grid_size)  # (num_bins, 2)
        self.register_buffer("ab_centres", centres)
        self.register_buffer("ab_bin_counts", torch.ones(len(centres)))
        self.criterion = ColorizationLoss(centres, soft_neighbours, soft_sigma, rebalance_lambda)
        out_channels = len(centres) if loss == "classification" else 2
        self.decoder = FusionDecoder(self.backbone.num_features, 1, out_channels, decoder_width)

    @staticmethod
    def lightness_input(lab: torch.Tensor) -> torch.Tensor:
        """L in [0, 100] -> [-1, 1]. Shape: (B, 3, H, W) Lab -> (B, 1, H, W)."""
        return lab[:, :1] / 50.0 - 1.0

    def backbone_input(self, images: torch.Tensor) -> torch.Tensor:
        return self.lightness_input(rgb_to_lab(images))

    def predict_ab_output(self, lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder output at 1/output_stride resolution and the true ab there."""
        lightness = self.lightness_input(lab)  # (B, 1, H, W)
        features = self.backbone(lightness)  # (B, num_features)
        size = max(1, lab.shape[-1] // self.hparams.output_stride)
        ab = F.adaptive_avg_pool2d(lab[:, 1:], size)  # (B, 2, h, w)
        return self.decoder(features, F.adaptive_avg_pool2d(lightness, size)), ab

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        labeled, unlabeled = split_batch(batch)
        # images alone: labels are never read by the pretext loss
        images = labeled.images if unlabeled is None else torch.cat([labeled.images, unlabeled.images])
        lab = rgb_to_lab(self.augment(images))  # (B, 3, H, W), on the device
        output, ab = self.predict_ab_output(lab)  # (B, num_bins or 2, h, w), (B, 2, h, w)
        if self.hparams.loss == "classification":
            with torch.no_grad():  # the prior: running bin frequencies of the training images
                bins = hard_encode_ab(ab, self.ab_centres).flatten()
                self.ab_bin_counts += torch.bincount(bins, minlength=len(self.ab_bin_counts)).float()
            pretext_loss = self.criterion(output, ab, self.ab_bin_counts)
        else:
            pretext_loss = F.mse_loss(output.float(), ab / AB_SCALE)
        probe_loss = self.online_probe_loss(labeled)  # detached features, labeled split only
        self.log("train/pretext_loss", pretext_loss, prog_bar=True)
        return pretext_loss + probe_loss

    @torch.no_grad()
    def colorize(self, images: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] -> the model's colourisation of their lightness, RGB in [0, 1], same shape."""
        lab = rgb_to_lab(images)
        output, _ = self.predict_ab_output(lab)
        if self.hparams.loss == "classification":
            ab = annealed_mean(output, self.ab_centres, self.hparams.annealing_temperature)
        else:
            ab = output.float() * AB_SCALE
        ab = F.interpolate(ab, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return lab_to_rgb(torch.cat([lab[:, :1], ab], dim=1))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        if batch_idx == 0:
            images = batch[0][:8]
            lab = rgb_to_lab(images)
            gray = lab_to_rgb(torch.cat([lab[:, :1], torch.zeros_like(lab[:, 1:])], dim=1))
            log_image_grid(
                self,
                "val/colorization",
                torch.cat([gray, self.colorize(images), images]),
                caption="rows: grayscale input (L) / predicted colour / truth",
                nrow=len(images),
            )
