"""ViT backbones (timm): shapes and the patch-size rule, other image sizes (multi-crop), the MAE
encoder on visible patches, DINO's attention maps, and every path a backbone takes in the library
(training steps of three methods, pretrained loading, ``load_backbone`` and ``export``)."""

from __future__ import annotations

import lightning as L
import pytest
import timm
import torch
from helpers import tiny_trainer
from torch import nn

from datamodules import SyntheticDataModule
from ssl_modules import FixMatchModule, SimCLRModule, SupervisedModule, load_backbone
from ssl_modules.augment.multicrop import MultiCropViews, encode_views
from ssl_modules.backbones import (
    ViTBackbone,
    available_backbones,
    build_backbone,
    first_conv_in_channels,
    vit_patch_size,
)
from ssl_modules.export import checkpoint_info, export_backbone


def _vit_mini(channels: int = 3, image_size: int = 16) -> ViTBackbone:
    torch.manual_seed(0)
    return build_backbone("vit_mini", channels, image_size=image_size).eval()


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("image_size", [8, 16, 32])
def test_features_are_the_class_token_for_small_images(channels, image_size):
    backbone = _vit_mini(channels, image_size)
    assert isinstance(backbone, ViTBackbone) and backbone.num_features == 192
    assert first_conv_in_channels(backbone) == channels
    features = backbone(torch.rand(3, channels, image_size, image_size))
    assert features.shape == (3, 192) and torch.isfinite(features).all()
    # the features are the final-normed class token of the encoder's tokens
    tokens = backbone.forward_features(torch.rand(3, channels, image_size, image_size))
    assert tokens.shape == (3, 1 + (image_size // 4) ** 2, 192)


def test_patch_size_follows_the_image_size_and_must_divide_it():
    rule = {8: 4, 16: 4, 28: 4, 32: 4, 48: 8, 64: 8, 96: 16, 224: 16}
    assert {size: vit_patch_size(size) for size in rule} == rule
    for size in (8, 28, 32, 64):
        with torch.device("meta"):
            backbone = build_backbone("vit_mini", 3, image_size=size)
        patch = rule[size]
        assert backbone.patch_size == patch
        assert backbone.patch_embed.proj.kernel_size == (patch, patch)
        assert backbone.patch_embed.proj.stride == (patch, patch)
        assert backbone.pos_embed.shape == (1, 1 + (size // patch) ** 2, 192)
    with pytest.raises(ValueError, match="divisible by its patch size"):
        build_backbone("vit_mini", 3, image_size=30)
    with pytest.raises(ValueError, match="needs image_size"):
        build_backbone("vit_mini", 3)
    assert {"vit_mini", "vit_tiny", "vit_small", "vit_base"} <= set(available_backbones())


@pytest.mark.parametrize("name", ["vit_tiny", "vit_small", "vit_base"])
def test_standard_sizes_have_the_shapes_of_timms_models(name):
    # on the meta device: shapes only, no memory and no initialisation cost
    with torch.device("meta"):
        ours = build_backbone(name, 3, image_size=224)
        reference = timm.create_model(f"{name}_patch16_224", pretrained=False, num_classes=0)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    assert ours.num_features == reference.num_features
    heads = [[block.attn.num_heads for block in model.blocks] for model in (ours, reference)]
    assert heads[0] == heads[1]


def test_vit_mini_shape():
    backbone = _vit_mini()
    assert (backbone.embed_dim, len(backbone.blocks), backbone.blocks[0].attn.num_heads) == (192, 6, 3)
    assert backbone.blocks[0].mlp.fc1.out_features == 4 * 192


def test_other_image_sizes_and_multi_crop_views():
    backbone = _vit_mini(3, 16)
    for size in (8, 12, 20):  # multiples of the 4 px patch
        assert backbone(torch.rand(2, 3, size, size)).shape == (2, 192)
    # the position embedding is resampled to the smaller grid, not truncated: a local view
    # gives other features than the same pixels padded into a full-size image
    small = torch.rand(2, 3, 8, 8)
    padded = torch.zeros(2, 3, 16, 16)
    padded[..., :8, :8] = small
    assert not torch.allclose(backbone(small), backbone(padded))
    views = MultiCropViews(3, 16, num_local_crops=3)(torch.rand(4, 3, 16, 16))
    features = encode_views(backbone, views)
    assert [tuple(f.shape) for f in features] == [(4, 192)] * 5
    with torch.no_grad():  # grouped calls give what a call per view gives
        for view, feature in zip(views, features, strict=True):
            torch.testing.assert_close(feature, backbone(view), atol=1e-5, rtol=1e-4)


def test_encoder_on_visible_patches():
    backbone = _vit_mini(3, 16)
    images = torch.rand(2, 3, 16, 16)
    num_patches = 16
    with torch.no_grad():
        every = torch.arange(num_patches).expand(2, -1)
        tokens = backbone.forward_encoder_visible(images, every)
        assert tokens.shape == (2, 1 + num_patches, 192)
        torch.testing.assert_close(tokens[:, 0], backbone(images))  # all kept: the full forward

        # a subset: the same as the full sequence in which no token attends to the dropped ones
        keep = torch.stack([torch.randperm(num_patches)[:4] for _ in range(2)])  # (2, 4)
        visible = backbone.forward_encoder_visible(images, keep)
        assert visible.shape == (2, 5, 192)
        keys = torch.zeros(2, 1 + num_patches, dtype=torch.bool)
        keys[:, 0] = True
        keys.scatter_(1, keep + 1, True)
        mask = keys[:, None, None, :].expand(-1, 1, 1 + num_patches, -1)  # (B, 1, T, T)
        masked = backbone.forward_features(images, attn_mask=mask)  # (B, T, D)
        expected = torch.cat([masked[:, :1], masked.gather(1, (keep + 1)[..., None].expand(-1, -1, 192))], 1)
        torch.testing.assert_close(visible, expected, atol=1e-5, rtol=1e-4)

        # the patches carry their own positions: the order of the kept indices does not matter
        reversed_keep = keep.flip(1)
        shuffled = backbone.forward_encoder_visible(images, reversed_keep)
        torch.testing.assert_close(shuffled[:, 0], visible[:, 0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(shuffled[:, 1:], visible[:, 1:].flip(1), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="keep_index"):
        backbone.forward_encoder_visible(images, torch.arange(4))
    with pytest.raises(ValueError, match="integer"):
        backbone.forward_encoder_visible(images, torch.zeros(2, 4))


class _Recorder(nn.Module):
    """Stands in for the attention dropout: records the attention weights it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: torch.Tensor | None = None

    def forward(self, weights: torch.Tensor) -> torch.Tensor:
        self.weights = weights
        return weights


def test_last_block_attention_is_the_class_tokens_softmax():
    backbone = _vit_mini(1, 16)
    images = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        maps = backbone.last_block_attention(images)
        assert maps.shape == (2, 3, 16)
        # timm's own attention, unfused, records the weights of every query
        last = backbone.blocks[-1].attn
        last.fused_attn = False
        last.attn_drop = _Recorder()
        backbone(images)
    weights = last.attn_drop.weights  # (B, heads, T, T)
    torch.testing.assert_close(maps, weights[:, :, 0, 1:])
    assert (maps > 0).all() and (maps.sum(-1) < 1).all()  # the class token keeps some for itself
    local = backbone.last_block_attention(torch.rand(2, 1, 8, 8))
    assert local.shape == (2, 3, 4)


# -- every path of the library -------------------------------------------------------------
def _data(channels: int) -> SyntheticDataModule:
    return SyntheticDataModule(
        num_classes=4, channels=channels, image_size=16, train_per_class=4, labels_per_class=2, batch_size=8
    )


def _facts(data: SyntheticDataModule) -> dict:
    names = ("num_classes", "channels", "image_size", "mean", "std", "horizontal_flip")
    return {name: getattr(data, name) for name in names}


class _GradientRecorder(L.Callback):
    def __init__(self) -> None:
        self.without_gradient: list[str] | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.without_gradient is None:
            self.without_gradient = [
                name
                for name, param in pl_module.backbone.named_parameters()
                if param.grad is None or not torch.isfinite(param.grad).all() or not param.grad.any()
            ]


STEP_CASES = {
    "supervised": (SupervisedModule, {}, 1),
    "fixmatch": (FixMatchModule, dict(confidence_threshold=0.0, ema_decay=0.0), 3),
    "simclr": (SimCLRModule, dict(projection_hidden_dim=16, projection_dim=8), 3),
}


@pytest.mark.parametrize("case", STEP_CASES)
def test_one_training_step_with_a_vit(case):
    cls, settings, channels = STEP_CASES[case]
    L.seed_everything(0)
    data = _data(channels)
    model = cls(backbone="vit_mini", **_facts(data), **settings)
    assert isinstance(model.backbone, ViTBackbone) and model.backbone.patch_size == 4
    before = {name: p.detach().clone() for name, p in model.backbone.named_parameters()}
    recorder = _GradientRecorder()
    tiny_trainer(max_steps=1, callbacks=[recorder]).fit(model, datamodule=data)
    assert recorder.without_gradient == []  # the class token, position embedding, every block
    moved = [name for name, p in model.backbone.named_parameters() if not torch.equal(p, before[name])]
    assert "cls_token" in moved and "pos_embed" in moved and "patch_embed.proj.weight" in moved


def test_vit_checkpoints_load_export_and_initialise_a_classifier(tmp_path):
    data = _data(1)
    torch.manual_seed(0)
    model = SupervisedModule(backbone="vit_mini", **_facts(data)).eval()
    with torch.no_grad():
        model.backbone.pos_embed.normal_()  # weights a fresh model does not have
    trainer = tiny_trainer()
    trainer.strategy.connect(model)
    path = tmp_path / "vit.ckpt"
    trainer.save_checkpoint(path)

    images = torch.rand(3, 1, 16, 16)
    backbone = load_backbone(path)
    assert isinstance(backbone, ViTBackbone) and backbone.patch_size == 4
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), model.backbone(images))
    info = checkpoint_info(path)
    assert (info["backbone"], info["channels"], info["num_features"]) == ("vit_mini", 1, 192)

    # the exported state dict is keyed as timm's VisionTransformer
    out = export_backbone(path, tmp_path / "vit.pt")
    reference = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, in_chans=1, num_classes=0, embed_dim=192, depth=6, num_heads=3
    ).eval()
    reference.load_state_dict(torch.load(out, weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(reference(images), model.backbone(images))

    # a classifier starts from the checkpoint's ViT; one for other channels is refused
    finetune = SupervisedModule(backbone="vit_mini", pretrained=str(path), **_facts(data))
    finetune.setup("fit")
    torch.testing.assert_close(finetune.backbone.pos_embed, model.backbone.pos_embed)
    rgb = SupervisedModule(backbone="vit_mini", pretrained=str(path), **_facts(_data(3)))
    with pytest.raises(ValueError, match="1-channel images but the data has 3"):
        rgb.setup("fit")
