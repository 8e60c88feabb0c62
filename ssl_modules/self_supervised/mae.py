"""Masked autoencoder (MAE): a ViT encodes the visible 25 % of the patches, a light decoder
predicts the pixels of the masked ones."""

from __future__ import annotations

import math
from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import nn

from ssl_modules.augment.views import BatchedResizedCrop
from ssl_modules.backbones import VIT_SHAPES
from ssl_modules.base import WarmupCosine, split_batch
from ssl_modules.callbacks import log_image_grid
from ssl_modules.evaluation import SelfSupervisedModule
from ssl_modules.losses.masked_modeling import (
    denormalize_patches,
    mae_loss,
    patchify,
    random_patch_masking,
    unpatchify,
)
from ssl_modules.optim import param_groups


def sincos_position_embedding(
    dim: int, grid_size: tuple[int, int], num_prefix_tokens: int = 0
) -> torch.Tensor:
    """MAE's fixed 2D sine-cosine position embedding.

    For the patch in row ``r``, column ``c`` of the grid (row-major) and ``k < dim / 4``, with
    ``omega_k = 10000^(-k / (dim / 4))``::

        e = [sin(c omega), cos(c omega), sin(r omega), cos(r omega)]

    (the first half encodes the column, the second the row, as in the paper's code). The
    ``num_prefix_tokens`` leading rows (the class token) are zeros.

    - [0] MAE (sine-cosine position embeddings), He et al., 2022, https://arxiv.org/abs/2111.06377

    Shape: -> (num_prefix_tokens + rows * cols, dim).
    """
    if dim % 4 != 0:
        raise ValueError(f"a 2D sine-cosine embedding needs dim divisible by 4; got {dim}")
    rows, cols = grid_size
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim / 4,)
    row = torch.arange(rows, dtype=torch.float64).repeat_interleave(cols)  # (rows * cols,)
    col = torch.arange(cols, dtype=torch.float64).repeat(rows)
    col_angle, row_angle = col[:, None] * omega, row[:, None] * omega  # (rows * cols, dim / 4) each
    patches = torch.cat([col_angle.sin(), col_angle.cos(), row_angle.sin(), row_angle.cos()], dim=1)
    return torch.cat([torch.zeros(num_prefix_tokens, dim, dtype=torch.float64), patches]).float()


class MAEDecoder(nn.Module):
    """MAE's decoder: the encoded visible tokens, projected to ``decoder_dim``, are completed
    with a shared learned mask token at every masked position, put back in patch order, given
    the fixed sine-cosine position embedding, passed through ``depth`` transformer blocks and a
    LayerNorm, and a linear layer predicts each patch's pixels. Used only during pre-training.

    - [0] MAE (section 3, "MAE decoder"), He et al., 2022, https://arxiv.org/abs/2111.06377

    Args:
        encoder_dim: width of the encoder's tokens.
        grid_size: ``(rows, cols)`` of the patch grid.
        patch_dim: pixels per patch, ``patch * patch * channels``.
        decoder_dim: token width of the decoder (paper: 512).
        depth: transformer blocks (paper: 8).
        num_heads: attention heads (paper: 16).
        num_prefix_tokens: class tokens in front of the patches (1 for the ViTs here).

    Shape: encoded (batch_size, num_prefix_tokens + num_kept, encoder_dim), restore_index
    (batch_size, N) -> (batch_size, N, patch_dim).
    """

    def __init__(
        self,
        encoder_dim: int,
        grid_size: tuple[int, int],
        patch_dim: int,
        decoder_dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        num_prefix_tokens: int = 1,
    ) -> None:
        super().__init__()
        if depth < 1 or decoder_dim % num_heads != 0:
            raise ValueError(
                f"need decoder_depth >= 1 and decoder_dim divisible by decoder_num_heads; got "
                f"{depth}, {decoder_dim}, {num_heads}"
            )
        self.num_prefix_tokens = num_prefix_tokens
        self.embed = nn.Linear(encoder_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        position = sincos_position_embedding(decoder_dim, grid_size, num_prefix_tokens)
        self.register_buffer("position_embedding", position[None], persistent=False)  # fixed, not learned
        self.blocks = nn.Sequential(
            *(
                Block(decoder_dim, num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=nn.LayerNorm)
                for _ in range(depth)
            )
        )
        self.norm = nn.LayerNorm(decoder_dim)
        self.predict = nn.Linear(decoder_dim, patch_dim)
        self.apply(self._init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # the paper's code: Xavier-uniform linear layers, zero biases
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, encoded: torch.Tensor, restore_index: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(encoded)  # (B, P + K, D_dec)
        batch_size, num_patches = restore_index.shape
        prefix, visible = tokens[:, : self.num_prefix_tokens], tokens[:, self.num_prefix_tokens :]
        mask_tokens = self.mask_token.to(tokens.dtype).expand(batch_size, num_patches - visible.shape[1], -1)
        shuffled = torch.cat([visible, mask_tokens], dim=1)  # (B, N, D_dec): shuffled order
        index = restore_index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        patches = shuffled.gather(1, index)  # (B, N, D_dec): patch order
        tokens = torch.cat([prefix, patches], dim=1) + self.position_embedding.to(tokens.dtype)
        tokens = self.norm(self.blocks(tokens))
        return self.predict(tokens[:, self.num_prefix_tokens :])  # (B, N, patch_dim)


class MAEModule(SelfSupervisedModule):
    """Masked autoencoder: mask 75 % of each image's patches at random, encode only the visible
    ones with the ViT backbone, and reconstruct the pixels of the masked ones with a light
    decoder; the loss is the mean squared error on the masked patches, against targets
    normalised per patch. Labels are never used (only by the online probe).

    - [0] MAE, He et al., 2022, https://arxiv.org/abs/2111.06377

    Encoder = ``self.backbone``, a ViT (``vit_mini``, ``vit_tiny``, ``vit_small``, ``vit_base``)
    run by ``forward_encoder_visible`` on the class token and the visible patches only; its
    position embedding is set to the paper's fixed 2D sine-cosine one and frozen. Decoder =
    ``MAEDecoder``, used only here. ``embed`` (the probe, kNN, ``test/acc``, downstream use) is
    the encoder on the whole image, every patch and no masking, its class token as features.
    It trains on the batch's unlabeled images (the labeled ones when there is no unlabeled
    loader); the views are the paper's: a random resized crop (area ``crop_min_scale`` to 1)
    and a horizontal flip where the data allows it.

    The paper's optimisation: AdamW, betas (0.9, 0.95), weight decay 0.05 (not on biases and
    norms), base lr 1.5e-4 scaled by ``batch / 256`` (``lr`` is the scaled value: 1.5e-4 at a
    batch of 256 images), a linear warm-up over the first ``warmup_fraction`` of the steps
    (40 of 800 epochs) then a cosine decay.

    At the first step of every epoch the masked inputs, the reconstructions (visible patches
    pasted, masked ones predicted and taken back to pixels with each true patch's mean and
    variance) and the originals are logged as one image grid, ``train/mae_reconstructions``.

    Args:
        backbone: the ViT encoder (``ssl_modules.backbones``); a convolutional backbone is refused.
        mask_ratio: fraction of the patches masked (paper: 0.75).
        decoder_dim: decoder token width (paper: 512).
        decoder_depth: decoder transformer blocks (paper: 8).
        decoder_num_heads: decoder attention heads (paper: 16).
        norm_pix_loss: normalise each target patch by its mean and variance (paper: True).
        crop_min_scale: smallest crop area of the random resized crop (paper: 0.2).
        warmup_fraction: fraction of the steps with a linear lr warm-up (paper: 40 / 800 = 0.05).
        lr: AdamW learning rate (paper: 1.5e-4 x batch_size / 256).
        weight_decay: AdamW weight decay (paper: 0.05).
        knn_k, probe_weight_decay: evaluation (``SelfSupervisedModule``).
        data facts and optimizer/scheduler: as in ``SSLModuleBase``.

    Batch: ``{"labeled": (x, y), "unlabeled": (x, y_hidden)}``; x float in [0, 1], shape
    (batch_size, channels, image_size, image_size), ``image_size`` a multiple of the ViT's patch.
    """

    def __init__(
        self,
        *,
        backbone: str = "vit_mini",
        mask_ratio: float = 0.75,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        norm_pix_loss: bool = True,
        crop_min_scale: float = 0.2,
        warmup_fraction: float = 0.05,
        lr: float = 1.5e-4,
        weight_decay: float = 0.05,
        **kwargs: Any,
    ) -> None:
        if backbone not in VIT_SHAPES:
            raise ValueError(
                f"MAE needs a Vision Transformer backbone (its encoder runs on the visible patches "
                f"only); got backbone={backbone!r}. Choose one of: {', '.join(VIT_SHAPES)}."
            )
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1) (paper: 0.75); got {mask_ratio}")
        if not 0.0 < crop_min_scale <= 1.0 or not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(
                f"crop_min_scale must be in (0, 1] and warmup_fraction in [0, 1); got "
                f"{crop_min_scale}, {warmup_fraction}"
            )
        super().__init__(backbone=backbone, lr=lr, weight_decay=weight_decay, **kwargs)
        encoder = self.backbone
        self.patch_size = encoder.patch_size
        self.grid_size = (self.image_size // self.patch_size, self.image_size // self.patch_size)
        num_patches = self.grid_size[0] * self.grid_size[1]
        if int(num_patches * (1.0 - mask_ratio)) < 1:
            raise ValueError(
                f"mask_ratio {mask_ratio} leaves no visible patch of the {num_patches} of a "
                f"{self.image_size} px image; lower mask_ratio or use larger images."
            )
        # the paper's encoder position embedding: fixed 2D sine-cosine (class token slot: zeros)
        with torch.no_grad():
            prefix = encoder.pos_embed.shape[1] - num_patches
            encoder.pos_embed.copy_(
                sincos_position_embedding(encoder.embed_dim, self.grid_size, prefix)[None]
            )
        encoder.pos_embed.requires_grad_(False)
        self.decoder = MAEDecoder(
            encoder.embed_dim,
            self.grid_size,
            self.patch_size * self.patch_size * self.channels,
            decoder_dim=decoder_dim,
            depth=decoder_depth,
            num_heads=decoder_num_heads,
            num_prefix_tokens=encoder.num_prefix_tokens,
        )
        self.augment = BatchedResizedCrop(
            self.image_size, scale=(crop_min_scale, 1.0), horizontal_flip=self.horizontal_flip
        )

    # -- the method -----------------------------------------------------------------------
    def reconstruct(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask, encode the visible patches, decode every patch.

        Args:
            images: float images in [0, 1]. Shape: (batch_size, C, H, W).
            generator: the masks' random generator (default: the global one).

        Returns:
            predictions: pixels of every patch, in the normalised-pixel space of the target
                (per-patch normalised when ``norm_pix_loss``). Shape: (batch_size, N, patch * patch * C).
            mask: 1 where a patch was masked. Shape: (batch_size, N).
        """
        keep_index, mask, restore_index = random_patch_masking(
            len(images),
            self.grid_size[0] * self.grid_size[1],
            self.hparams.mask_ratio,
            generator=generator,
            device=images.device,
        )
        encoded = self.backbone.forward_encoder_visible(self.normalize(images), keep_index)  # (B, 1 + K, D)
        return self.decoder(encoded, restore_index), mask

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        labeled, unlabeled = split_batch(batch)
        # the unlabeled images (the labeled ones without an unlabeled loader), as the
        # joint-embedding methods: the few labeled images, repeated, would outweigh the rest
        images = labeled.images if unlabeled is None else unlabeled.images
        self.check_images(images)
        views = self.augment(images)  # (B, C, H, W)
        predictions, mask = self.reconstruct(views)
        loss = mae_loss(
            predictions,
            self.normalize(views),
            mask,
            self.patch_size,
            norm_pix_loss=self.hparams.norm_pix_loss,
        )
        probe_loss = self.online_probe_loss(labeled)  # the full image, detached features
        self.log("train/loss", loss, prog_bar=True)
        if batch_idx == 0:
            self.log_reconstructions(views, predictions, mask, "train/mae_reconstructions")
        return loss + probe_loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        images = batch[0]
        # the same masks at every validation: the loss is comparable across the run
        generator = torch.Generator(device=images.device).manual_seed(batch_idx)
        predictions, mask = self.reconstruct(images, generator)
        loss = mae_loss(
            predictions,
            self.normalize(images),
            mask,
            self.patch_size,
            norm_pix_loss=self.hparams.norm_pix_loss,
        )
        self.log("val/reconstruction_loss", loss, sync_dist=True, batch_size=len(images))

    # -- visuals ----------------------------------------------------------------------------
    def reconstruction_rows(
        self, images: torch.Tensor, predictions: torch.Tensor, mask: torch.Tensor, fill: float = 0.5
    ) -> torch.Tensor:
        """Three rows of images in [0, 1]: the masked input (masked patches set to ``fill``), the
        reconstruction (visible patches pasted from the input, masked patches predicted) and
        the original.

        Predictions are taken back to pixels with each true patch's mean and standard deviation
        when ``norm_pix_loss`` (as the paper's figures), then with the data's mean and std.

        Shape: images (n, C, H, W), predictions (n, N, patch * patch * C), mask (n, N)
        -> (3 n, C, H, W).
        """
        with torch.no_grad():
            patch, channels = self.patch_size, images.shape[1]
            images = images.float()
            target = patchify(self.normalize(images), patch)  # (n, N, D), normalised space
            predicted = predictions.float()
            if self.hparams.norm_pix_loss:
                predicted = denormalize_patches(predicted, target)
            masked = mask.bool().unsqueeze(-1)  # (n, N, 1)
            pasted = torch.where(masked, predicted, target)
            reconstruction = self.denormalize(unpatchify(pasted, patch, channels, self.grid_size))
            hidden = unpatchify(masked.expand_as(target).float(), patch, channels, self.grid_size).bool()
            masked_input = images.masked_fill(hidden, fill)
            return torch.cat([masked_input, reconstruction.clamp(0, 1), images.clamp(0, 1)])

    def log_reconstructions(
        self, images: torch.Tensor, predictions: torch.Tensor, mask: torch.Tensor, key: str, shown: int = 8
    ) -> None:
        """Log ``reconstruction_rows`` of the first ``shown`` images as one uint8 grid."""
        shown = min(shown, len(images))
        rows = self.reconstruction_rows(images[:shown], predictions[:shown], mask[:shown])
        log_image_grid(
            self,
            key,
            rows,
            caption="rows: masked input / reconstruction (visible pasted, masked predicted) / original",
            max_images=3 * shown,
            nrow=shown,
        )

    # -- optimisation -----------------------------------------------------------------------
    def default_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """AdamW, betas (0.9, 0.95); no weight decay on biases and norm parameters."""
        return torch.optim.AdamW(
            param_groups(params, self.hparams.weight_decay), lr=self.hparams.lr, betas=(0.9, 0.95)
        )

    def default_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        warmup = math.floor(self.hparams.warmup_fraction * total)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total, warmup_steps=warmup))
