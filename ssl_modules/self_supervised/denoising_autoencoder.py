"""Denoising autoencoder: reconstruct the clean image from a corrupted one."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl_modules.augment.pretext import corrupt
from ssl_modules.base import split_batch
from ssl_modules.callbacks import log_image_grid
from ssl_modules.evaluation import SelfSupervisedModule


class ConvDecoder(nn.Module):
    """A light decoder from a feature vector to an image: a linear map to a
    ``width x s x s`` map (``s = ceil(image_size / 4)``), two (2x upsample, 3x3 conv, BN, ReLU)
    blocks, a 3x3 convolution to ``channels``, resized to the image size.

    Shape: (batch_size, in_features) -> (batch_size, channels, image_size, image_size).
    """

    def __init__(self, in_features: int, channels: int, image_size: int, width: int = 64) -> None:
        super().__init__()
        self.image_size = image_size
        self.width = width
        self.side = math.ceil(image_size / 4)
        self.project = nn.Linear(in_features, width * self.side * self.side)

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]

        self.upsample = nn.Sequential(*block(width, width), *block(width, width // 2))
        self.output = nn.Conv2d(width // 2, channels, 3, padding=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        grid = F.relu(self.project(features)).view(-1, self.width, self.side, self.side)
        images = self.output(self.upsample(grid))  # (B, channels, 4 * side, 4 * side)
        if images.shape[-1] != self.image_size:
            images = F.interpolate(images, size=self.image_size, mode="bilinear", align_corners=False)
        return images


class DenoisingAutoencoder(SelfSupervisedModule):
    """Corrupt every image (masking noise: a fraction of pixels set to 0; then additive
    Gaussian noise), encode it with the backbone, decode, and regress the clean image
    (mean squared error in the normalised pixel space). Labels are never used.

    - [0] Denoising autoencoders, Vincent et al., 2008, https://doi.org/10.1145/1390156.1390294
    - [1] Stacked denoising autoencoders, Vincent et al., 2010, https://jmlr.org/papers/v11/vincent10a.html

    Encoder = ``self.backbone`` (its pooled feature vector is the code); decoder = a
    ``ConvDecoder`` that rebuilds the whole image from that vector alone (no skip
    connections, so everything the decoder needs must pass through the kept encoder). Only
    the encoder is used by the probe and kept for fine-tuning.

    Args:
        backbone: backbone name (``ssl_modules.backbones``), the encoder.
        mask_fraction: fraction of pixels zeroed (Vincent et al. 2008: 0.1-0.5; 0.25 here).
        noise_std: std of the additive Gaussian noise on [0, 1] pixels (2010 paper; 0 disables).
        decoder_width: channels of the decoder.
        lr: Adam learning rate.
        weight_decay: AdamW weight decay.
        knn_k, probe_weight_decay: evaluation (``SelfSupervisedModule``).
        data facts and optimizer/scheduler: as in ``SSLModuleBase``.

    Batch: ``{"labeled": LabeledBatch, "unlabeled": UnlabeledBatch}`` (``ssl_modules.batch``); images
    float in [0, 1], shape (batch_size, channels, image_size, image_size).
    """

    def __init__(
        self,
        *,
        mask_fraction: float = 0.25,
        noise_std: float = 0.1,
        decoder_width: int = 64,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        **kwargs: Any,
    ) -> None:
        if not 0.0 <= mask_fraction < 1.0 or noise_std < 0:
            raise ValueError(
                f"mask_fraction must be in [0, 1) and noise_std >= 0; got {mask_fraction}, {noise_std}"
            )
        super().__init__(lr=lr, weight_decay=weight_decay, **kwargs)
        self.decoder = ConvDecoder(self.backbone.num_features, self.channels, self.image_size, decoder_width)

    def reconstruct(self, corrupted: torch.Tensor) -> torch.Tensor:
        """Corrupted images in [0, 1] -> reconstruction in the normalised pixel space, same shape."""
        return self.decoder(self.backbone(self.normalize(corrupted)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        labeled, unlabeled = split_batch(batch)
        # images alone: labels are never read by the pretext loss
        images = labeled.images if unlabeled is None else torch.cat([labeled.images, unlabeled.images])
        corrupted, _ = corrupt(images, self.hparams.mask_fraction, self.hparams.noise_std)  # (B, C, H, W)
        reconstruction = self.reconstruct(corrupted)  # (B, C, H, W), normalised space
        pretext_loss = F.mse_loss(reconstruction.float(), self.normalize(images))
        probe_loss = self.online_probe_loss(labeled)  # detached features, labeled split only
        self.log("train/pretext_loss", pretext_loss, prog_bar=True)
        return pretext_loss + probe_loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        images = batch[0]
        corrupted, _ = corrupt(images, self.hparams.mask_fraction, self.hparams.noise_std)
        reconstruction = self.reconstruct(corrupted)
        self.log(
            "val/reconstruction_mse",
            F.mse_loss(reconstruction.float(), self.normalize(images)),
            sync_dist=True,
        )
        if batch_idx == 0:
            shown = min(8, len(images))
            rows = [corrupted[:shown].clamp(0, 1), self.denormalize(reconstruction[:shown]), images[:shown]]
            log_image_grid(
                self,
                "val/denoising",
                torch.cat(rows),
                caption="rows: corrupted input / reconstruction / clean",
                nrow=shown,
            )
