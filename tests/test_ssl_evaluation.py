"""The shared self-supervised evaluation: offline probe fit, kNN, ``test/acc`` from the labeled split only."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

import ssl_modules.evaluation.self_supervised as self_supervised
from datamodules.synthetic import SyntheticDataModule
from ssl_modules.augment import to_float_images
from ssl_modules.base import split_batch
from ssl_modules.batch import train_batch
from ssl_modules.evaluation import SelfSupervisedModule, fit_linear_probe, knn_predict


class ProbeOnly(SelfSupervisedModule):
    """The smallest self-supervised module: no pretext loss, only the online probe."""

    def __init__(self, num_classes: int = 4, channels: int = 3, image_size: int = 16) -> None:
        super().__init__(
            num_classes=num_classes,
            channels=channels,
            image_size=image_size,
            mean=(0.5,) * channels,
            std=(0.25,) * channels,
            horizontal_flip=True,
            lr=0.01,
            weight_decay=0.0,
            backbone="small_cnn",
        )

    def training_step(self, batch, batch_idx):
        labeled, _ = split_batch(batch)
        return self.online_probe_loss(labeled)


def _trainer(**overrides) -> L.Trainer:
    settings = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**settings, **overrides})


# -- offline probe ------------------------------------------------------------------------


def test_fit_linear_probe_matches_sklearn_logistic_regression():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 6, generator=generator) * 2
    labels = torch.arange(60) % 3
    features = centres[labels] + torch.randn(60, 6, generator=generator) * 1.5 + 4.0
    weight_decay = 1e-2
    probe = fit_linear_probe(features, labels, num_classes=3, weight_decay=weight_decay, max_iter=500)
    # ours: mean CE + wd * |W|^2 on standardised features; sklearn: C * sum CE + |W|^2 / 2
    standardised = ((features - features.mean(0)) / features.std(0, unbiased=False)).double().numpy()
    reference = LogisticRegression(C=1 / (2 * len(labels) * weight_decay), tol=1e-10, max_iter=10_000)
    reference.fit(standardised, labels.numpy())
    test_features = centres[torch.arange(30) % 3] + torch.randn(30, 6, generator=generator) * 1.5 + 4.0
    test_standardised = (
        ((test_features - features.mean(0)) / features.std(0, unbiased=False)).double().numpy()
    )
    ours = probe(test_features).softmax(1).double().numpy()
    np.testing.assert_allclose(ours, reference.predict_proba(test_standardised), atol=2e-3)


def test_fit_linear_probe_separates_separable_data_and_works_under_inference_mode():
    features = torch.cat([torch.randn(20, 4) + 5, torch.randn(20, 4) - 5])
    labels = torch.cat([torch.zeros(20), torch.ones(20)]).long()
    with torch.inference_mode():  # Trainer.test calls on_test_epoch_start under inference mode
        probe = fit_linear_probe(features, labels, num_classes=2)
    assert (probe(features).argmax(1) == labels).all()


# -- kNN --------------------------------------------------------------------------------


def _knn_reference(query, bank, bank_labels, num_classes, k, temperature):
    scores = []
    for q in query.tolist():
        similarities = []
        for b, label in zip(bank.tolist(), bank_labels.tolist()):
            cosine = sum(x * y for x, y in zip(q, b)) / (
                math.sqrt(sum(x * x for x in q)) * math.sqrt(sum(y * y for y in b))
            )
            similarities.append((cosine, label))
        similarities.sort(key=lambda item: -item[0])
        votes = [0.0] * num_classes
        for cosine, label in similarities[:k]:
            votes[label] += math.exp(cosine / temperature)
        scores.append(votes)
    return torch.tensor(scores)


def test_knn_predict_matches_a_plain_loop():
    generator = torch.Generator().manual_seed(0)
    query, bank = torch.randn(7, 5, generator=generator), torch.randn(30, 5, generator=generator)
    bank_labels = torch.randint(0, 4, (30,), generator=generator)
    for k in (1, 5, 50):  # k larger than the bank uses the whole bank
        votes = knn_predict(query, bank, bank_labels, num_classes=4, k=k, temperature=0.5)
        expected = _knn_reference(query, bank, bank_labels, 4, min(k, 30), 0.5)
        torch.testing.assert_close(votes, expected, rtol=1e-4, atol=1e-4)
    # closed form: a query equal to a bank item with k=1 votes for that item's class
    votes = knn_predict(bank[3:4], bank, bank_labels, num_classes=4, k=1)
    assert int(votes.argmax(1)) == int(bank_labels[3])
    with pytest.raises(ValueError, match="temperature"):
        knn_predict(query, bank, bank_labels, num_classes=4, temperature=0.0)


# -- online probe -----------------------------------------------------------------------


def test_online_probe_sends_no_gradient_into_the_backbone():
    model = ProbeOnly()
    model.log = lambda *args, **kwargs: None
    loss = model.online_probe_loss(train_batch(torch.rand(6, 3, 16, 16), torch.arange(6) % 4)["labeled"])
    loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.online_probe.weight.grad is not None


# -- test/acc -----------------------------------------------------------------------------


def test_test_acc_is_a_probe_fitted_on_the_labeled_split_only(monkeypatch):
    L.seed_everything(0)
    data = SyntheticDataModule(num_classes=4, train_per_class=12, labels_per_class=2, batch_size=4)
    model = ProbeOnly()
    _trainer(max_steps=3, limit_val_batches=0).fit(model, datamodule=data)

    fitted_on = {}
    original = self_supervised.fit_linear_probe

    def recording_fit(features, labels, **kwargs):
        fitted_on["features"], fitted_on["labels"] = features.clone(), labels.clone()
        return original(features, labels, **kwargs)

    monkeypatch.setattr(self_supervised, "fit_linear_probe", recording_fit)
    result = _trainer().test(model, datamodule=data, verbose=False)[0]

    labeled_images, labeled_targets = data.train_dataset.__getitems__(data.labeled_indices.tolist())
    assert len(data.labeled_indices) == 8 < len(data.unlabeled_indices)
    assert torch.equal(fitted_on["labels"], labeled_targets)
    # an independent recomputation: eval-mode features of the labeled images -> probe -> test split
    model.eval()
    with torch.no_grad():
        features = model.embed(to_float_images(labeled_images))
        torch.testing.assert_close(fitted_on["features"], features)
        probe = original(features, labeled_targets, num_classes=4, weight_decay=model.probe_weight_decay)
        test_images, test_targets = data.test_dataset.images, data.test_dataset.targets
        expected = (probe(model.embed(to_float_images(test_images))).argmax(1) == test_targets).float().mean()
    assert result["test/acc"] == pytest.approx(float(expected), abs=1e-6)
    assert {"test/acc", "test/online_acc", "test/knn_acc"} <= set(result)
    # the refitted probe is not part of the model: a checkpoint saved after testing loads into a fresh one
    assert not [key for key in model.state_dict() if "offline_probe" in key]
    ProbeOnly().load_state_dict(model.state_dict())


def test_features_are_extracted_with_batchnorm_in_eval_mode():
    L.seed_everything(0)
    data = SyntheticDataModule(num_classes=4, train_per_class=8, labels_per_class=2, batch_size=4)
    model = ProbeOnly()
    _trainer(max_steps=2, limit_val_batches=0).fit(model, datamodule=data)
    batchnorms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    modes = []
    hooks = [
        bn.register_forward_pre_hook(lambda module, args: modes.append(module.training)) for bn in batchnorms
    ]
    statistics = [bn.running_mean.clone() for bn in batchnorms]
    model.train()
    features, labels = model._labeled_features()
    for hook in hooks:
        hook.remove()
    assert modes and not any(modes)  # every BatchNorm call was in eval mode
    assert all(torch.equal(bn.running_mean, s) for bn, s in zip(batchnorms, statistics))
    assert model.training  # and the module is back in its previous mode
    assert features.shape == (8, model.backbone.num_features) and len(labels) == 8
    # eval-mode features do not depend on the batch they are computed in
    torch.testing.assert_close(
        features[:1], model.eval().embed(to_float_images(data.train_dataset.images[data.labeled_indices[:1]]))
    )


def test_test_acc_falls_back_to_the_online_probe_without_a_datamodule():
    model = ProbeOnly()
    images = torch.rand(8, 3, 16, 16)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, torch.arange(8) % 4), batch_size=4
    )
    with pytest.warns(UserWarning, match="falls back to the online probe"):
        result = _trainer().test(model, loader, verbose=False)[0]
    expected = (
        (model.eval().online_probe(model.embed(images)).argmax(1) == torch.arange(8) % 4).float().mean()
    )
    assert result["test/acc"] == pytest.approx(float(expected))
