"""Subclassing is a first-class use: the README's "Extending a method" examples run as written,
train, and reload; a subclass with its own signature (``*args, **kwargs`` included) of every
module saves and reloads with ``load_from_checkpoint``; the per-step reseeding does not depend on
a subclass calling ``super()``."""

from __future__ import annotations

import inspect
import re
import sys
import types
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_trainer

import ssl_modules
from datamodules import SyntheticDataModule
from ssl_modules import FixMatchModule, SimCLRModule
from ssl_modules.batch import train_batch

README = Path(__file__).resolve().parents[1] / "README.md"
GRAY = dict(num_classes=3, channels=1, image_size=8, mean=(0.5,), std=(0.25,), horizontal_flip=False)


def readme_examples() -> dict[str, str]:
    """``<!-- example: NAME -->`` followed by a fenced python block in README.md -> its code."""
    text = README.read_text()
    found = re.findall(r"<!-- example: ([^>]+?) -->\s*```python\n(.*?)```", text, flags=re.S)
    return {name: code for name, code in found}


def run_example(name: str) -> dict:
    """The example run as a module of its own (importable by name: a checkpoint records a
    pseudo-label rule by its class path, as for a user's own module)."""
    module = types.ModuleType(f"readme_example_{re.sub(r'[^0-9a-zA-Z]+', '_', name)}")
    sys.modules[module.__name__] = module
    exec(compile(readme_examples()[name], f"README.md example {name!r}", "exec"), module.__dict__)
    return module.__dict__


def _data(**kwargs):
    settings = dict(
        num_classes=3, channels=1, image_size=8, train_per_class=12, labels_per_class=2, batch_size=6
    )
    return SyntheticDataModule(**{**settings, **kwargs})


def _facts(data) -> dict:
    return {name: getattr(data, name) for name in GRAY}


def _save(model, path: Path) -> Path:
    trainer = tiny_trainer()
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)
    return path


def _assert_same_module(reloaded, model) -> None:
    assert type(reloaded) is type(model)
    assert dict(reloaded.hparams) == dict(model.hparams)
    expected = model.state_dict()
    assert set(reloaded.state_dict()) == set(expected)
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)


def test_readme_has_the_three_examples():
    assert set(readme_examples()) == {
        "new head and loss",
        "pseudo-label rule and teacher update",
        "multi-crop for any joint-embedding method",
    }


def test_readme_multicrop_example_encodes_each_size_once_averages_every_pair_and_reloads(tmp_path):
    MultiCropSimCLR = run_example("multi-crop for any joint-embedding method")["MultiCropSimCLR"]
    facts = dict(GRAY, image_size=16)
    L.seed_everything(0)
    model = MultiCropSimCLR(**facts, num_local_crops=2, projection_hidden_dim=8, lars=False)
    images = torch.rand(4, 1, 16, 16)
    views = model.make_views(images)
    assert [tuple(v.shape) for v in views] == [(4, 1, 16, 16)] * 2 + [(4, 1, 8, 8)] * 2
    calls = []
    model.backbone.register_forward_hook(lambda module, inputs, output: calls.append(tuple(inputs[0].shape)))
    model.make_views = lambda batch: views  # the same views for the step and the reference
    loss = model.training_step(train_batch(images, torch.zeros(4, dtype=torch.long), images), 1)
    assert calls[:2] == [(8, 1, 16, 16), (8, 1, 8, 8)]  # one backbone call per size, global first
    with (
        torch.no_grad()
    ):  # the reference: one backbone call per size (BatchNorm sees each group), one head call
        features = [model.backbone(model.backbone_input(torch.cat(views[k : k + 2]))) for k in (0, 2)]
        z = model.projector(torch.cat(features)).chunk(4)
        pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
        expected = sum(model.criterion(z[i], z[j]) for i, j in pairs) / len(pairs)
        probe = model.online_probe_loss(
            train_batch(images, torch.zeros(4, dtype=torch.long), images)["labeled"]
        )
    torch.testing.assert_close(loss.detach(), expected + probe, rtol=1e-4, atol=1e-5)
    del model.make_views
    data = _data(image_size=16)
    tiny_trainer(max_steps=2).fit(model, datamodule=data)
    path = _save(model, tmp_path / "multicrop.ckpt")
    reloaded = MultiCropSimCLR.load_from_checkpoint(path)
    _assert_same_module(reloaded, model)
    assert reloaded.multicrop.num_local_crops == 2


def test_readme_head_and_loss_example_trains_and_reloads(tmp_path):
    LinearHeadSimCLR = run_example("new head and loss")["LinearHeadSimCLR"]
    L.seed_everything(0)
    data = _data()
    model = LinearHeadSimCLR(**_facts(data), head_dim=8, projection_hidden_dim=8, lars=False)
    assert model.criterion.temperature == 0.2
    images = torch.rand(4, 1, 8, 8)
    assert model.projector(model.backbone(model.normalize(images))).shape == (4, 8)  # the new head
    trainer = tiny_trainer(max_steps=3)
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 3
    trainer.save_checkpoint(tmp_path / "head.ckpt")
    reloaded = LinearHeadSimCLR.load_from_checkpoint(tmp_path / "head.ckpt")
    _assert_same_module(reloaded, model)
    assert reloaded.hparams.head_dim == 8 and reloaded.projector.out_features == 8


def test_readme_pseudo_label_example_follows_its_rule_trains_and_reloads(tmp_path):
    namespace = run_example("pseudo-label rule and teacher update")
    SoftFixMatch = namespace["SoftFixMatch"]
    # the rule: every pseudo-label kept, weighted by its confidence
    weak = torch.randn(5, 3, generator=torch.Generator().manual_seed(1)).softmax(1)
    pseudo = namespace["ConfidenceWeighted"]()(weak, torch.arange(5))
    confidence, labels = weak.max(1)
    torch.testing.assert_close(pseudo.weights, confidence)
    assert torch.equal(pseudo.targets, labels)

    L.seed_everything(0)
    data = _data()
    model = SoftFixMatch(**_facts(data), ema_start=100, ema_decay=0.5)
    assert type(model.rule).__name__ == "ConfidenceWeighted"
    # the module's unlabeled loss is the rule's: mean over the batch of confidence * CE(pseudo-label)
    batch = train_batch(torch.rand(4, 1, 8, 8), torch.arange(4) % 3, torch.rand(5, 1, 8, 8))
    model.weak = model.strong = torch.nn.Identity()  # the same view: the loss is a function of the images
    unlabeled = batch["unlabeled"].images
    with torch.no_grad():  # the step's one forward: labeled, weak and strong views together
        logits = model(torch.cat([batch["labeled"].images, unlabeled, unlabeled]))
    weak_logits, strong_logits = logits[4:].split(5)
    confidence, labels = weak_logits.softmax(1).max(1)
    expected = (
        F.cross_entropy(logits[:4], batch["labeled"].labels)
        + (confidence * F.cross_entropy(strong_logits, labels, reduction="none")).mean()
    )
    torch.testing.assert_close(model.training_step(batch, 0), expected, rtol=1e-4, atol=1e-5)
    model = SoftFixMatch(**_facts(data), ema_start=100, ema_decay=0.5)
    trainer = tiny_trainer(max_steps=3)
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 3
    # the teacher update: before ema_start the EMA is a copy of the live model
    for live, ema in zip(model.backbone.parameters(), model.ema_model.backbone.parameters()):
        torch.testing.assert_close(ema, live)
    trainer.save_checkpoint(tmp_path / "soft.ckpt")
    reloaded = SoftFixMatch.load_from_checkpoint(tmp_path / "soft.ckpt")
    _assert_same_module(reloaded, model)
    assert reloaded.hparams.ema_start == 100 and type(reloaded.rule).__name__ == "ConfidenceWeighted"


def _args_kwargs_subclass(cls: type) -> type:
    class Extended(cls):
        def __init__(self, *args, extra: float = 1.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.extra = extra

    return Extended


@pytest.mark.parametrize("name", ssl_modules.__all__)
def test_every_module_subclassed_with_args_and_kwargs_saves_and_reloads(name, tmp_path):
    base = getattr(ssl_modules, name)
    facts = dict(GRAY)
    if name == "JigsawPretext":
        facts["image_size"] = 12
    if name == "ColorizationPretext":
        facts.update(channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    small = dict(projection_hidden_dim=8, projection_dim=8, queue_size=16, head_hidden=8)  # fast to build
    accepted = inspect.signature(base.__init__).parameters
    facts.update({key: value for key, value in small.items() if key in accepted})
    torch.manual_seed(0)
    Extended = _args_kwargs_subclass(base)
    model = Extended(**facts, extra=2.5)
    assert model.hparams.extra == 2.5
    reloaded = Extended.load_from_checkpoint(_save(model, tmp_path / "sub.ckpt"))
    _assert_same_module(reloaded, model)
    assert reloaded.extra == 2.5
    reloaded.configure_optimizers()  # nothing the module reads from its hparams went missing


def test_subclass_built_with_keywords_reloads_and_positional_arguments_are_refused(tmp_path):
    Extended = _args_kwargs_subclass(FixMatchModule)
    with pytest.raises(TypeError, match="positional"):  # the constructors are keyword-only
        Extended(3, 1, 8, (0.5,), (0.25,), False, "small_cnn", 0.7, extra=3.0)
    model = Extended(**GRAY, backbone="small_cnn", confidence_threshold=0.7, extra=3.0)
    assert model.hparams.confidence_threshold == 0.7
    reloaded = Extended.load_from_checkpoint(_save(model, tmp_path / "positional.ckpt"))
    _assert_same_module(reloaded, model)


def test_subclass_changing_a_default_as_its_own_argument_reloads(tmp_path):
    class PlainSGDSimCLR(SimCLRModule):  # the README's rule for changing a default of the method
        def __init__(self, *args, lars: bool = False, **kwargs):
            super().__init__(*args, lars=lars, **kwargs)

    model = PlainSGDSimCLR(**GRAY, projection_hidden_dim=8)
    reloaded = PlainSGDSimCLR.load_from_checkpoint(_save(model, tmp_path / "sgd.ckpt"))
    _assert_same_module(reloaded, model)
    assert (
        reloaded.hparams.lars is False
        and type(reloaded.configure_optimizers()["optimizer"]).__name__ == "SGD"
    )


def test_subclass_with_a_fixed_signature_keeps_the_method_settings_it_fixes(tmp_path):
    class TinySimCLR(SimCLRModule):  # no **kwargs: sets the method's arguments itself
        def __init__(self, num_classes: int = 3, projection_dim: int = 4):
            super().__init__(
                num_classes=num_classes,
                channels=1,
                image_size=8,
                mean=(0.5,),
                std=(0.25,),
                horizontal_flip=False,
                projection_dim=projection_dim,
                lars=False,
            )

    model = TinySimCLR(projection_dim=6)
    assert model.hparams.lars is False and model.hparams.lr == 0.3  # read by default_optimizer
    reloaded = TinySimCLR.load_from_checkpoint(_save(model, tmp_path / "tiny.ckpt"))
    _assert_same_module(reloaded, model)
    reloaded.configure_optimizers()


class _DrawsInTrainingStep(SimCLRModule):
    """Overrides ``on_train_batch_start`` without ``super()`` and records a random draw per step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.draws: list[float] = []

    def on_train_batch_start(self, batch, batch_idx):
        pass  # no super(): the reseeding must not depend on it

    def training_step(self, batch, batch_idx):
        self.draws.append(float(torch.rand(())))
        return super().training_step(batch, batch_idx)


def test_per_step_reseeding_does_not_need_super_in_on_train_batch_start():
    draws = []
    for global_state in (1, 2):  # a resumed process starts from any global RNG state
        L.seed_everything(0)
        data = _data()
        model = _DrawsInTrainingStep(**_facts(data), projection_hidden_dim=8, lars=False)
        torch.manual_seed(global_state)
        tiny_trainer(max_steps=3).fit(model, datamodule=data)
        draws.append(model.draws)
    assert len(draws[0]) == 3 and draws[0] == draws[1]
    assert len(set(draws[0])) == 3  # a new seed at every step, not one seed for the run
