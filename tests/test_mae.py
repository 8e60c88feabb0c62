"""MAEModule: the encoder sees the visible patches only, the loss comes from the masked ones,
``embed`` sees the whole image, the paper's defaults, a tiny fit, and the visuals.

- [0] MAE, He et al., 2022, https://arxiv.org/abs/2111.06377
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules import SyntheticDataModule
from ssl_modules.batch import train_batch
from ssl_modules.losses.masked_modeling import mae_loss, normalize_patches, patchify, unpatchify
from ssl_modules.self_supervised.mae import MAEModule, sincos_position_embedding

GRAY16 = {
    "num_classes": 10,
    "channels": 1,
    "image_size": 16,
    "mean": (0.3,),
    "std": (0.3,),
    "horizontal_flip": False,
}
SMALL_DECODER = {"decoder_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2}
NUM_PATCHES = 16  # 16 px images, vit_mini's 4 px patches: a 4 x 4 grid
NUM_KEPT = int(NUM_PATCHES * 0.25)


def make_model(**kwargs) -> MAEModule:
    torch.manual_seed(0)
    model = MAEModule(**{**GRAY16, **SMALL_DECODER, **kwargs})
    model.log = lambda *args, **kw: None  # no trainer attached
    return model


def make_batch(n: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, 16, 16, generator=generator)
    unlabeled = torch.rand(n, 1, 16, 16, generator=generator)
    return train_batch(
        images, torch.arange(n) % 10, unlabeled, torch.randint(0, 10, (n,), generator=generator)
    )


def count_tokens(model: MAEModule) -> list[int]:
    """Tokens entering the encoder's first block, one entry per encoder pass."""
    counts: list[int] = []
    model.backbone.blocks[0].register_forward_pre_hook(lambda module, args: counts.append(args[0].shape[1]))
    return counts


def pixel_mask(mask: torch.Tensor, patch: int = 4) -> torch.Tensor:
    """Per-patch mask (n, N) -> per-pixel mask (n, 1, H, W), True on masked patches."""
    return unpatchify(mask[..., None].expand(-1, -1, patch * patch).float(), patch, 1).bool()


# -- the encoder sees the visible patches only ------------------------------------------
def test_encoder_sees_only_the_visible_tokens_in_training():
    model = make_model()
    counts = count_tokens(model)
    model.training_step(make_batch(), 0)
    # the masked pass (class token + 4 visible patches), then the online probe's full pass
    assert counts == [1 + NUM_KEPT, 1 + NUM_PATCHES]


def test_predictions_do_not_depend_on_the_masked_pixels():
    model = make_model()
    images = torch.rand(3, 1, 16, 16)
    predictions, mask = model.reconstruct(images, torch.Generator().manual_seed(0))
    hidden = pixel_mask(mask)
    changed_masked = torch.where(hidden, torch.rand_like(images), images)
    again, same_mask = model.reconstruct(changed_masked, torch.Generator().manual_seed(0))
    assert torch.equal(same_mask, mask)
    torch.testing.assert_close(again, predictions, rtol=0, atol=1e-6)
    # a visible patch does reach the predictions
    changed_visible = torch.where(hidden, images, 1 - images)
    moved, _ = model.reconstruct(changed_visible, torch.Generator().manual_seed(0))
    assert (moved - predictions).abs().max() > 1e-3


def test_each_image_gets_its_own_mask_of_75_percent():
    model = make_model()
    _, mask = model.reconstruct(torch.rand(6, 1, 16, 16), torch.Generator().manual_seed(1))
    assert torch.equal(mask.sum(1), torch.full((6,), float(NUM_PATCHES - NUM_KEPT)))
    assert len({tuple(row.tolist()) for row in mask}) > 1


# -- the loss comes from the masked patches ------------------------------------------------
def test_training_loss_is_the_masked_patch_loss_on_normalised_targets():
    model = make_model()
    model.augment = torch.nn.Identity()  # the views are the images
    batch = make_batch()
    captured = {}

    def keep(module, args, output):
        output.retain_grad()
        captured["predictions"], captured["restore"] = output, args[1]

    model.decoder.register_forward_hook(keep)
    model.online_probe_loss = lambda labeled: torch.zeros(())  # the reconstruction loss alone
    loss = model.training_step(batch, 1)
    predictions = captured["predictions"]
    images = batch["unlabeled"].images  # the unlabeled images alone are reconstructed
    # the mask read back from the restore index: the first NUM_KEPT shuffled positions are visible
    mask = (captured["restore"] >= NUM_KEPT).float()
    # the loss written out: per-patch normalised target, squared error, mean over masked patches
    target = patchify(model.normalize(images), 4)
    mean = target.mean(-1, keepdim=True)
    var = ((target - mean) ** 2).sum(-1, keepdim=True) / (target.shape[-1] - 1)
    error = ((predictions - (target - mean) / torch.sqrt(var + 1e-6)) ** 2).mean(-1)  # (B, N)
    torch.testing.assert_close(loss, (error * mask).sum() / mask.sum())
    loss.backward()
    grad = predictions.grad.abs().sum(-1)  # (B, N)
    assert (grad[mask == 0] == 0).all() and (grad[mask == 1] > 0).all()


def test_decoder_puts_mask_tokens_at_the_masked_positions():
    model = make_model()
    captured = {}
    model.decoder.blocks[0].register_forward_pre_hook(
        lambda module, args: captured.setdefault("input", args[0])
    )
    _, mask = model.reconstruct(torch.rand(3, 1, 16, 16), torch.Generator().manual_seed(2))
    # decoder input minus its position embedding, class token dropped: (B, N, decoder_dim)
    content = (captured["input"] - model.decoder.position_embedding)[:, 1:]
    mask_token = model.decoder.mask_token[0, 0]
    for b in range(3):
        for patch_id in range(NUM_PATCHES):
            is_mask_token = torch.allclose(content[b, patch_id], mask_token, atol=1e-6)
            assert is_mask_token == bool(mask[b, patch_id]), (b, patch_id)


def test_hidden_labels_never_reach_the_loss():
    model = make_model()
    batch = make_batch()
    torch.manual_seed(3)
    first = model.training_step(batch, 1)
    batch["unlabeled"] = batch["unlabeled"]._replace(
        hidden_labels=(batch["unlabeled"].hidden_labels + 1) % 10
    )
    torch.manual_seed(3)
    torch.testing.assert_close(model.training_step(batch, 1), first)


# -- embed sees the whole image ------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False])
def test_embed_uses_every_patch_and_no_masking(training):
    model = make_model().train(training)
    counts = count_tokens(model)
    images = torch.rand(2, 1, 16, 16)
    first = model.embed(images)
    second = model.embed(images)
    assert counts == [1 + NUM_PATCHES, 1 + NUM_PATCHES]
    assert torch.equal(first, second)  # no random mask
    assert first.shape == (2, 192)
    # every patch reaches the features
    for patch_id in (0, 5, 15):
        changed = images.clone()
        row, col = divmod(patch_id, 4)
        changed[:, :, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4] = (
            1 - changed[:, :, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4]
        )
        assert (model.embed(changed) - first).abs().max() > 1e-4, patch_id


# -- construction ---------------------------------------------------------------------------
def test_refuses_a_convolutional_backbone_naming_the_vits():
    with pytest.raises(ValueError, match="Vision Transformer.*vit_mini.*vit_tiny.*vit_small.*vit_base"):
        MAEModule(**GRAY16, backbone="small_cnn")


def test_refuses_a_mask_ratio_that_leaves_nothing_visible():
    with pytest.raises(ValueError, match="mask_ratio"):
        MAEModule(**GRAY16, **SMALL_DECODER, mask_ratio=1.0)
    with pytest.raises(ValueError, match="no visible patch"):
        MAEModule(**GRAY16, **SMALL_DECODER, mask_ratio=0.97)


def test_paper_defaults_and_optimizer():
    model = MAEModule(**GRAY16)
    hparams = model.hparams
    assert (hparams.mask_ratio, hparams.decoder_dim, hparams.decoder_depth, hparams.decoder_num_heads) == (
        0.75,
        512,
        8,
        16,
    )
    assert hparams.norm_pix_loss and hparams.lr == 1.5e-4 and hparams.weight_decay == 0.05
    assert len(model.decoder.blocks) == 8 and model.decoder.mask_token.shape == (1, 1, 512)
    optimizer = model.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    for group in optimizer.param_groups:
        assert group["betas"] == (0.9, 0.95)
        assert group["weight_decay"] == (0.05 if group["params"][0].ndim >= 2 else 0.0)
    assert model.augment.scale == (0.2, 1.0) and not model.augment.horizontal_flip  # the data's flip
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(model.backbone.pos_embed) not in in_optimizer  # fixed sine-cosine


def sincos_loop(dim: int, rows: int, cols: int) -> list[list[float]]:
    """MAE's get_2d_sincos_pos_embed, written out: the column in the first half, the row in the second."""
    quarter = dim // 4
    table = []
    for r in range(rows):
        for c in range(cols):
            omegas = [1 / 10000 ** (k / quarter) for k in range(quarter)]
            table.append(
                [math.sin(c * w) for w in omegas]
                + [math.cos(c * w) for w in omegas]
                + [math.sin(r * w) for w in omegas]
                + [math.cos(r * w) for w in omegas]
            )
    return table


def test_sincos_position_embedding_matches_the_formula():
    embedding = sincos_position_embedding(8, (2, 3), num_prefix_tokens=1)
    assert embedding.shape == (1 + 6, 8)
    assert torch.equal(embedding[0], torch.zeros(8))
    torch.testing.assert_close(embedding[1:], torch.tensor(sincos_loop(8, 2, 3)))


def test_encoder_and_decoder_position_embeddings_are_fixed_sincos():
    model = make_model()
    expected_encoder = sincos_position_embedding(192, (4, 4), num_prefix_tokens=1)
    torch.testing.assert_close(model.backbone.pos_embed[0].detach(), expected_encoder)
    assert not model.backbone.pos_embed.requires_grad
    torch.testing.assert_close(
        model.decoder.position_embedding[0], sincos_position_embedding(32, (4, 4), num_prefix_tokens=1)
    )


def test_warmup_then_cosine_schedule():
    model = make_model(warmup_fraction=0.1)

    class _Trainer:
        estimated_stepping_batches = 100

    model._trainer = _Trainer()
    optimizer = torch.optim.AdamW(torch.nn.Linear(1, 1).parameters(), lr=1.0)
    scheduler = model.default_scheduler(optimizer)
    factors = []
    for _ in range(100):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0, abs=1e-3) and factors[99] < 0.01
    model._trainer = None


# -- visuals ---------------------------------------------------------------------------------
class _Trainer:
    sanity_checking = False
    global_step = 0
    global_rank = 0

    def __init__(self, logger: object) -> None:
        self.loggers = [logger]


def test_visuals_are_uint8_with_the_right_shape_and_content():
    added = {}

    class TensorBoardLogger:  # log_image_grid dispatches on the class name
        class experiment:
            @staticmethod
            def add_image(key: str, image: torch.Tensor, global_step: int) -> None:
                added[key] = image

    model = make_model()
    images = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    _, mask = model.reconstruct(images, torch.Generator().manual_seed(0))
    # a perfect predictor: the normalised target patches; the reconstruction must be the image
    perfect = normalize_patches(patchify(model.normalize(images), 4))
    model._trainer = _Trainer(TensorBoardLogger())
    try:
        model.log_reconstructions(images, perfect, mask, "train/mae_reconstructions")
    finally:
        model._trainer = None
    grid = added["train/mae_reconstructions"]
    assert grid.dtype == torch.uint8
    assert grid.shape == (3, 3 * 17 + 1, 8 * 17 + 1)  # rows: masked / reconstruction / original; 1 px padding
    cell = lambda row, col: grid[0, 1 + 17 * row : 17 * row + 17, 1 + 17 * col : 17 * col + 17]  # noqa: E731
    hidden = pixel_mask(mask)
    for col in range(8):
        original = (images[col, 0] * 255).round().to(torch.uint8)
        assert torch.equal(cell(2, col), original)
        assert (
            cell(1, col).int() - original.int()
        ).abs().max() <= 1  # un-normalised per patch back to pixels
        masked_input = cell(0, col)
        assert (masked_input[hidden[col, 0]] == 128).all()  # masked patches shown grey
        assert torch.equal(masked_input[~hidden[col, 0]], original[~hidden[col, 0]])


def test_reconstruction_pastes_the_visible_patches():
    model = make_model()
    images = torch.rand(2, 1, 16, 16)
    _, mask = model.reconstruct(images, torch.Generator().manual_seed(0))
    garbage = torch.randn(2, NUM_PATCHES, 16) * 5
    rows = model.reconstruction_rows(images, garbage, mask)
    assert rows.shape == (6, 1, 16, 16) and 0 <= rows.min() and rows.max() <= 1
    hidden = pixel_mask(mask)
    torch.testing.assert_close(rows[2:4][~hidden], images[~hidden])  # visible: the input
    assert (rows[2:4][hidden] - images[hidden]).abs().max() > 0.1  # masked: the (bad) prediction


# -- a tiny fit ------------------------------------------------------------------------------
def test_a_few_training_steps_with_vit_mini_log_finite_losses_and_reconstructions(tmp_path: Path):
    L.seed_everything(0)
    data = SyntheticDataModule(
        num_classes=4, channels=1, image_size=16, train_per_class=8, labels_per_class=2
    )
    model = MAEModule(
        **{**GRAY16, "num_classes": 4, "mean": data.mean, "std": data.std},
        **SMALL_DECODER,
        backbone="vit_mini",
    )
    trainer = L.Trainer(
        max_steps=4,
        default_root_dir=tmp_path,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accelerator="cpu",
    )
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 4
    loss = trainer.callback_metrics["train/loss"]
    assert torch.isfinite(loss) and loss > 0
    assert list(tmp_path.rglob("train_mae_reconstructions_step0.png"))
    # the loss the step logged is the masked-patch loss of a fresh mask on these images
    images = torch.rand(4, 1, 16, 16)
    predictions, mask = model.reconstruct(images)
    assert torch.isfinite(mae_loss(predictions, model.normalize(images), mask, 4))
