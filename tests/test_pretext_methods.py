"""Pretext methods and the colorization loss: references, closed forms, invariants, tiny fits."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from datamodules import DigitsDataModule
from ssl_modules import ColorizationPretext, DenoisingAutoencoder, JigsawPretext, RotationPretext
from ssl_modules.batch import train_batch
from ssl_modules.losses.pretext import (
    ColorizationLoss,
    ab_bin_centres,
    annealed_mean,
    hard_encode_ab,
    rebalancing_weights,
    soft_encode_ab,
)

GRAY16 = {
    "num_classes": 10,
    "channels": 1,
    "image_size": 16,
    "mean": (0.3,),
    "std": (0.3,),
    "horizontal_flip": False,
}
RGB16 = {"num_classes": 10, "channels": 3, "image_size": 16, "mean": (0.5,) * 3, "std": (0.25,) * 3}


# -- colorization loss ------------------------------------------------------------------


def test_ab_bin_centres_are_in_gamut_grid_points():
    centres = ab_bin_centres()
    assert 200 < len(centres) < 330  # the paper keeps 313 in-gamut bins
    assert torch.equal(centres, torch.round(centres / 10) * 10)
    assert (centres == 0).all(dim=1).any()  # gray
    assert centres.abs().max() <= 130


def _soft_encode_reference(
    ab_pixel: torch.Tensor, centres: torch.Tensor, k: int, sigma: float
) -> torch.Tensor:
    distances = [math.dist(ab_pixel.tolist(), c.tolist()) for c in centres]
    nearest = sorted(range(len(centres)), key=lambda q: distances[q])[:k]
    weights = {q: math.exp(-(distances[q] ** 2) / (2 * sigma**2)) for q in nearest}
    total = sum(weights.values())
    return torch.tensor([weights.get(q, 0.0) / total for q in range(len(centres))])


def test_soft_encode_matches_the_plain_formula():
    centres = ab_bin_centres()
    # points with no ties among their 5 nearest bins
    ab = torch.tensor([[3.3, -7.1], [41.2, 17.9], [-53.4, 61.7]]).T.reshape(1, 2, 1, 3)
    encoded = soft_encode_ab(ab, centres, neighbours=5, sigma=5.0)
    assert encoded.shape == (1, len(centres), 1, 3)
    for pixel in range(3):
        expected = _soft_encode_reference(ab[0, :, 0, pixel], centres, 5, 5.0)
        torch.testing.assert_close(encoded[0, :, 0, pixel], expected, atol=1e-5, rtol=1e-4)
        assert (encoded[0, :, 0, pixel] > 0).sum() == 5


def test_soft_encode_of_a_bin_centre_with_one_neighbour_is_one_hot():
    centres = ab_bin_centres()
    ab = centres[[5, 17]].T.reshape(1, 2, 1, 2)
    encoded = soft_encode_ab(ab, centres, neighbours=1)
    assert encoded[0, 5, 0, 0] == 1 and encoded[0, 17, 0, 1] == 1 and encoded.sum() == 2
    assert hard_encode_ab(ab, centres).flatten().tolist() == [5, 17]


def _rebalancing_reference(prior, centres, lam, sigma):
    prior = [p / sum(prior) for p in prior]
    q_count = len(prior)
    smoothed = []
    for i in range(q_count):
        smoothed.append(
            sum(
                math.exp(-(math.dist(centres[i].tolist(), centres[j].tolist()) ** 2) / (2 * sigma**2))
                * prior[j]
                for j in range(q_count)
            )
        )
    smoothed = [s / sum(smoothed) for s in smoothed]
    weights = [1 / ((1 - lam) * s + lam / q_count) for s in smoothed]
    expectation = sum(s * w for s, w in zip(smoothed, weights))
    return torch.tensor([w / expectation for w in weights])


def test_rebalancing_weights_match_the_plain_formula_and_normalise():
    centres = ab_bin_centres()[:12]
    prior = torch.tensor([50.0, 1, 3, 0, 7, 2, 9, 1, 0, 4, 20, 5])
    weights = rebalancing_weights(prior, centres, rebalance_lambda=0.5, sigma=5.0)
    torch.testing.assert_close(
        weights, _rebalancing_reference(prior.tolist(), centres, 0.5, 5.0), rtol=1e-4, atol=1e-5
    )
    # invariant: E_p~[w] = 1 is built in; lambda = 1 is "no rebalancing"
    torch.testing.assert_close(rebalancing_weights(prior, centres, 1.0), torch.ones(12))
    with pytest.raises(ValueError, match="rebalance_lambda"):
        rebalancing_weights(prior, centres, 1.5)


def test_colorization_loss_matches_the_paper_formula():
    torch.manual_seed(0)
    centres = ab_bin_centres()
    loss_fn = ColorizationLoss(centres, neighbours=5, sigma=5.0, rebalance_lambda=0.5)
    logits = torch.randn(2, len(centres), 3, 3)
    ab = torch.empty(2, 2, 3, 3).uniform_(-60, 60)
    prior = torch.rand(len(centres)) + 0.01
    weights = rebalancing_weights(prior, centres, 0.5, 5.0)
    total = 0.0
    for n in range(2):
        for h in range(3):
            for w in range(3):
                target = _soft_encode_reference(ab[n, :, h, w], centres, 5, 5.0)
                log_probabilities = F.log_softmax(logits[n, :, h, w], dim=0)
                total += weights[int(target.argmax())] * -(target * log_probabilities).sum()
    torch.testing.assert_close(loss_fn(logits, ab, prior), total / 18, rtol=1e-4, atol=1e-5)


def test_colorization_loss_closed_form_uniform_logits():
    # uniform prediction, no rebalancing: the cross-entropy is log(Q) whatever the target
    centres = ab_bin_centres()
    loss_fn = ColorizationLoss(centres, rebalance_lambda=1.0)
    loss = loss_fn(torch.zeros(1, len(centres), 2, 2), torch.randn(1, 2, 2, 2) * 30, torch.ones(len(centres)))
    torch.testing.assert_close(loss, torch.tensor(math.log(len(centres))))


def test_annealed_mean_of_a_confident_prediction_is_the_bin_centre():
    centres = ab_bin_centres()
    logits = torch.full((1, len(centres), 1, 1), -50.0)
    logits[0, 9] = 50.0
    torch.testing.assert_close(annealed_mean(logits, centres)[0, :, 0, 0], centres[9])


# -- methods ----------------------------------------------------------------------------


def _batch(channels: int, size: int = 16, n: int = 8):
    return train_batch(
        torch.rand(n, channels, size, size),
        torch.arange(n) % 10,
        torch.rand(n, channels, size, size),
        torch.randint(0, 10, (n,)),
    )


def _step(model, batch):
    model.log = lambda *args, **kwargs: None  # no trainer attached
    return model.training_step(batch, 0)


@pytest.mark.parametrize(
    ("cls", "facts", "kwargs"),
    [
        (RotationPretext, GRAY16, {}),
        (RotationPretext, RGB16, {}),
        (JigsawPretext, GRAY16, {"num_permutations": 10}),
        (JigsawPretext, RGB16, {"num_permutations": 10}),
        (ColorizationPretext, RGB16, {}),
        (ColorizationPretext, RGB16, {"loss": "regression"}),
        (DenoisingAutoencoder, GRAY16, {}),
        (DenoisingAutoencoder, RGB16, {"mask_fraction": 0.0}),
    ],
)
def test_one_step_trains_every_parameter(cls, facts, kwargs):
    torch.manual_seed(0)
    model = cls(**facts, **kwargs)
    loss = _step(model, _batch(facts["channels"]))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert model.embed(torch.rand(3, facts["channels"], 16, 16)).shape == (3, model.backbone.num_features)


def test_pretext_losses_do_not_read_hidden_labels():
    for cls, facts, kwargs in [
        (RotationPretext, GRAY16, {}),
        (JigsawPretext, GRAY16, {"num_permutations": 10}),
        (ColorizationPretext, RGB16, {}),
        (DenoisingAutoencoder, GRAY16, {}),
    ]:
        torch.manual_seed(0)
        model = cls(**facts, **kwargs).eval()  # eval: BatchNorm does not move between the two calls
        batch = _batch(facts["channels"])
        twin = copy.deepcopy(model)  # colorization's step moves its bin-frequency prior
        torch.manual_seed(1)
        first = _step(model, batch)
        batch["unlabeled"] = batch["unlabeled"]._replace(
            hidden_labels=batch["unlabeled"].hidden_labels.flip(0) + 1
        )
        torch.manual_seed(1)
        torch.testing.assert_close(_step(twin, batch), first)


def test_colorization_refuses_single_channel_data():
    with pytest.raises(
        ValueError, match=r"needs colour \(3-channel RGB\) images, but the data has 1 channel"
    ):
        ColorizationPretext(**GRAY16)
    with pytest.raises(ValueError, match="loss must be"):
        ColorizationPretext(**RGB16, loss="l1")


def test_colorization_backbone_sees_lightness_and_prior_is_estimated_from_data():
    model = ColorizationPretext(**RGB16)
    assert model.backbone.features[0].in_channels == 1
    gray = torch.full((2, 3, 16, 16), 0.5)
    features_input = model.backbone_input(gray)
    assert features_input.shape == (2, 1, 16, 16)
    # sRGB 0.5 gray has L = 53.39 -> (53.39 / 50 - 1)
    torch.testing.assert_close(
        features_input, torch.full_like(features_input, 53.39 / 50 - 1), atol=1e-3, rtol=0
    )
    before = model.ab_bin_counts.clone()
    _step(model, _batch(3))
    added = model.ab_bin_counts - before
    assert added.sum() == 16 * 4 * 4  # every pixel of the 1/4-resolution target is counted once
    assert "ab_bin_counts" in model.state_dict()
    colour = model.colorize(torch.rand(2, 3, 16, 16))
    assert colour.shape == (2, 3, 16, 16) and colour.min() >= 0 and colour.max() <= 1


def test_jigsaw_permutations_are_a_deterministic_buffer_and_small_images_fail_clearly():
    first = JigsawPretext(**GRAY16, num_permutations=10)
    second = JigsawPretext(**GRAY16, num_permutations=10)
    assert torch.equal(first.permutations, second.permutations)
    assert "permutations" in first.state_dict()
    with pytest.raises(ValueError, match=r"image_size=8 is too small for a 3x3 jigsaw.*at least 12 px"):
        JigsawPretext(**{**GRAY16, "image_size": 8})


def test_denoising_decoder_rebuilds_the_full_image_from_the_encoder_features():
    model = DenoisingAutoencoder(**{**RGB16, "image_size": 20})
    images = torch.rand(2, 3, 20, 20)
    assert model.reconstruct(images).shape == (2, 3, 20, 20)
    assert set(dict(model.named_children())) >= {"backbone", "decoder", "online_probe"}


def test_rotation_pretext_accuracy_rises_and_visuals_are_logged(tmp_path: Path):
    L.seed_everything(0)
    datamodule = DigitsDataModule(image_size=16, labels_per_class=5, batch_size=32)
    facts = {k: getattr(datamodule, k) for k in ("num_classes", "channels", "image_size", "mean", "std")}
    model = RotationPretext(**facts, horizontal_flip=False)
    trainer = L.Trainer(
        max_steps=60,
        default_root_dir=tmp_path,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=2,
        val_check_interval=30,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )
    before = trainer.validate(model, datamodule=datamodule, verbose=False)[0]["val/pretext_acc"]
    trainer.fit(model, datamodule=datamodule)
    after = trainer.validate(model, datamodule=datamodule, verbose=False)[0]["val/pretext_acc"]
    assert after > max(0.5, before + 0.2)
    assert list(tmp_path.rglob("val_rotations_step*.png"))


@pytest.mark.parametrize(
    ("cls", "facts", "kwargs", "key"),
    [
        (JigsawPretext, GRAY16, {"num_permutations": 10}, "val_puzzles"),
        (ColorizationPretext, RGB16, {}, "val_colorization"),
        (DenoisingAutoencoder, GRAY16, {}, "val_denoising"),
    ],
)
def test_validation_logs_pretext_visuals(cls, facts, kwargs, key, tmp_path: Path):
    model = cls(**facts, **kwargs)
    images = torch.rand(10, facts["channels"], 16, 16)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, torch.arange(10)), batch_size=5
    )
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.validate(model, loader, verbose=False)
    assert list(tmp_path.rglob(f"{key}_step*.png"))
