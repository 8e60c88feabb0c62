"""Features and backbones out of any checkpoint of the library.

- ``load_backbone(ckpt)``: the backbone alone, a plain ``nn.Module`` with ``num_features``, in
  eval mode, holding the weights the method **evaluates** with (FixMatch's EMA model when
  ``evaluate_with_ema``, Mean Teacher's EMA teacher, else the live network; the online backbone of
  a self-supervised method). It takes images normalised as in training, ``(x - mean) / std`` with
  ``x`` float in [0, 1] and the checkpoint's ``mean``/``std`` (``checkpoint_info``);
  ``ColorizationPretext``'s backbone takes the lightness channel instead (use ``embed``).
- ``load_module(ckpt)``: the whole module (its class read from the checkpoint), in eval mode;
  ``module.embed(images)`` maps images as the datamodules yield them to those features.
- ``export_backbone(ckpt, out)`` (``ssl-modules export CKPT --out backbone.pt``): the backbone as a
  plain state dict, keyed as the torchvision model of that name where the backbone is one
  (``resnet18``: torchvision's ``resnet18`` with the small-image stem, see ``export_backbone``),
  plus ``<out>.json`` describing it.
- ``predict(...)`` (``ssl-modules predict CKPT --split val --what embeddings --out feats.npy``):
  embeddings, class probabilities or predicted classes of one split, from the checkpoint alone.

Every checkpoint is read with ``torch.load(..., weights_only=True)``: loading runs no code, and a
class named by a checkpoint is imported only from this library (or from modules already imported).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from ssl_modules.backbones import TorchvisionBackbone, build_backbone
from ssl_modules.batch import images_and_labels

SPLITS = ("labeled", "unlabeled", "val", "test")
OUTPUTS = ("embeddings", "probabilities", "predictions")
DATA_FACTS = ("num_classes", "channels", "image_size")  # must agree between checkpoint and data


# -- reading checkpoints ----------------------------------------------------------------------
def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict, loaded with ``weights_only=True``; a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; pass the path of a .ckpt file.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (torch raises several unrelated types here)
        raise ValueError(
            f"{str(path)!r} is not a checkpoint torch can load safely ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); pass a .ckpt written by fitting a module "
            "of this library (ssl-modules fit, or Trainer.save_checkpoint)."
        ) from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(
            f"{str(path)!r} is not a Lightning checkpoint (no 'state_dict'); pass a .ckpt written by fitting "
            "a module of this library (ssl-modules fit, or Trainer.save_checkpoint)."
        )
    return checkpoint


def evaluation_prefix(state: dict[str, torch.Tensor], hparams: dict[str, Any]) -> str:
    """Prefix of the weights the module evaluates with: ``teacher.`` (Mean Teacher),
    ``ema_model.`` (FixMatch with ``evaluate_with_ema``) or ``""`` (the live network)."""
    if hparams.get("teacher") == "ema" and any(key.startswith("teacher.backbone.") for key in state):
        return "teacher."
    if hparams.get("evaluate_with_ema", False) and any(
        key.startswith("ema_model.backbone.") for key in state
    ):
        return "ema_model."
    return ""


def _backbone_state(checkpoint: dict[str, Any], path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    state = checkpoint["state_dict"]
    prefix = evaluation_prefix(state, checkpoint.get("hyper_parameters", {})) + "backbone."
    backbone = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    if not backbone:
        raise ValueError(
            f"{str(path)!r} has no '{prefix}*' weights; pass a checkpoint of a module of this library."
        )
    return backbone, prefix


def _input_channels(state: dict[str, torch.Tensor], hparams: dict[str, Any]) -> int:
    if hparams.get("backbone_channels"):
        return int(hparams["backbone_channels"])
    for value in state.values():  # the first convolution comes first: (out, in_channels, k, k)
        if value.ndim == 4:
            return int(value.shape[1])
    return int(hparams["channels"])


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    """What a checkpoint's backbone is and takes: ``backbone`` (name), ``channels`` (its input
    channels), ``num_features``, ``mean``/``std``/``image_size`` (the data it was trained on),
    ``num_classes``, ``class_path`` (the module, where known) and ``weights`` (the prefix taken)."""
    checkpoint = read_checkpoint(path)
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    state, prefix = _backbone_state(checkpoint, path)
    backbone = _build_backbone(state, hparams, path)
    return {
        "backbone": hparams["backbone"],
        "channels": _input_channels(state, hparams),
        "num_features": int(backbone.num_features),
        "mean": [float(v) for v in hparams.get("mean", [])],
        "std": [float(v) for v in hparams.get("std", [])],
        "image_size": hparams.get("image_size"),
        "num_classes": hparams.get("num_classes"),
        "class_path": _class_path(checkpoint),
        "weights": prefix,
    }


def _build_backbone(state: dict[str, torch.Tensor], hparams: dict[str, Any], path: str | Path) -> nn.Module:
    name = hparams.get("backbone")
    if not name:
        raise ValueError(
            f"{str(path)!r} names no backbone in its hyper_parameters; was it saved by this library?"
        )
    backbone = build_backbone(
        str(name), _input_channels(state, hparams), image_size=hparams.get("image_size")
    )
    backbone.load_state_dict(state)
    return backbone


def load_backbone(path: str | Path) -> nn.Module:
    """The backbone of checkpoint ``path`` with the weights its method evaluates with, in eval mode.

    A plain ``nn.Module`` (the class ``ssl_modules.backbones.build_backbone`` builds) with
    ``num_features``: ``(B, C, H, W)`` images normalised as in training -> ``(B, num_features)``.
    """
    checkpoint = read_checkpoint(path)
    state, _ = _backbone_state(checkpoint, path)
    return _build_backbone(state, dict(checkpoint.get("hyper_parameters", {})), path).eval()


def export_backbone(path: str | Path, out: str | Path) -> Path:
    """Write ``load_backbone(path)``'s weights to ``out`` as a plain state dict, and ``<out>.json``.

    Where the backbone is a torchvision model the keys are that model's own, so the file loads
    into it with its classifier replaced by ``nn.Identity()``. ``"resnet18"``/``"resnet50"`` here
    carry the small-image stem of the CIFAR experiments: load them into torchvision's model after
    ``model.conv1 = nn.Conv2d(channels, 64, 3, 1, 1, bias=False)``, ``model.maxpool = nn.Identity()``
    and ``model.fc = nn.Identity()``. Other backbones (``small_cnn``, ``wrn_28_2``, ...) load into
    ``ssl_modules.backbones.build_backbone(name, channels)``. The JSON holds ``checkpoint_info``.
    """
    out = Path(out)
    backbone = load_backbone(path)
    inner = backbone.model if isinstance(backbone, TorchvisionBackbone) else backbone
    state = {key: value.detach().clone() for key, value in inner.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    info = checkpoint_info(path)
    info["checkpoint"] = str(path)
    info["keys"] = "torchvision" if isinstance(backbone, TorchvisionBackbone) else "ssl_modules.backbones"
    Path(f"{out}.json").write_text(json.dumps(info, indent=2))
    return out


# -- whole modules ----------------------------------------------------------------------------
def _class_path(checkpoint: dict[str, Any]) -> str | None:
    recorded = checkpoint.get("ssl_modules", {})
    if isinstance(recorded, dict) and recorded.get("class_path"):
        return str(recorded["class_path"])
    cli_path = checkpoint.get("hyper_parameters", {}).get("_class_path")  # saved by LightningCLI
    return str(cli_path) if cli_path else None


def resolve_class(name: str, package: str, trusted: bool) -> type:
    """A class from a dotted path or a short name exported by ``package``.

    ``trusted=False`` (a name read from a file): only modules of ``package`` or already imported
    ones are imported, so a checkpoint cannot make us import arbitrary code.
    """
    module_name, _, attribute = name.rpartition(".")
    module_name = module_name or package
    if not trusted and module_name not in sys.modules and not module_name.startswith(package):
        raise ValueError(
            f"the checkpoint names class {name!r} from a module that is not imported; pass the class "
            "explicitly (--model / model_class, --data) if you trust it."
        )
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(
            f"cannot find class {name!r} ({error}); pass a dotted path, e.g. {package}.X"
        ) from error


def load_module(path: str | Path, model_class: type | str | None = None, map_location: Any = "cpu") -> Any:
    """The module saved in checkpoint ``path``, in eval mode; its class is read from the checkpoint
    (recorded by every module of this library, or LightningCLI's ``_class_path``) unless given."""
    from ssl_modules.base import SSLModuleBase

    checkpoint = read_checkpoint(path)
    if isinstance(model_class, str):
        model_class = resolve_class(model_class, "ssl_modules", trusted=True)
    if model_class is None:
        recorded = _class_path(checkpoint)
        if recorded is None:
            raise ValueError(
                f"{str(path)!r} does not say which module saved it; pass model_class (e.g. "
                "ssl_modules.SimCLRModule) or --model."
            )
        model_class = resolve_class(recorded, "ssl_modules", trusted=False)
    if not (isinstance(model_class, type) and issubclass(model_class, SSLModuleBase)):
        raise ValueError(f"{model_class!r} is not a module of this library (a subclass of SSLModuleBase)")
    del checkpoint
    return model_class.load_from_checkpoint(path, map_location=map_location, weights_only=True).eval()


# -- data ------------------------------------------------------------------------------------
def load_data_config(spec: str) -> tuple[str, dict[str, Any]]:
    """``(class_path, init_args)`` of a data YAML (``configs/data/digits.yaml``, a ``data:``
    section or a bare ``class_path``/``init_args``) or of a class name (``DigitsDataModule``)."""
    if spec.endswith((".yaml", ".yml")) or Path(spec).is_file():
        text = yaml.safe_load(Path(spec).read_text()) or {}
        section = text.get("data", text)
        if not isinstance(section, dict) or "class_path" not in section:
            raise ValueError(
                f"{spec!r} has no data class_path; pass a data config such as configs/data/digits.yaml"
            )
        return str(section["class_path"]), dict(section.get("init_args") or {})
    return spec, {}


def _recorded_datamodule(checkpoint: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The datamodule a checkpoint's run used: the CLI's saved config
    (``datamodule_hyper_parameters``), else the one ``SSLModuleBase.on_save_checkpoint`` recorded."""
    saved = checkpoint.get("datamodule_hyper_parameters")
    if isinstance(saved, dict) and saved.get("_class_path"):
        return str(saved["_class_path"]), {k: v for k, v in saved.items() if not k.startswith("_")}
    recorded = checkpoint.get("ssl_modules", {})
    data = recorded.get("datamodule") if isinstance(recorded, dict) else None
    if isinstance(data, dict) and data.get("class_path"):
        return str(data["class_path"]), dict(data.get("init_args") or {})
    return None


def build_datamodule(
    checkpoint: dict[str, Any], data: str | None = None, overrides: list[str] | None = None
) -> Any:
    """The datamodule to read a split from: ``data`` (a data YAML or class name) or, without
    it, the one recorded in the checkpoint; ``overrides`` (``KEY=VALUE``) change its arguments."""
    if data is not None:
        class_path, init_args = load_data_config(data)
        trusted = True
    else:
        recorded = _recorded_datamodule(checkpoint)
        if recorded is None:
            raise ValueError(
                "the checkpoint records no datamodule; pass one with --data (e.g. --data configs/data/digits.yaml)."
            )
        class_path, init_args = recorded
        trusted = False
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set takes KEY=VALUE (e.g. batch_size=256); got {item!r}")
        key, value = item.split("=", 1)
        init_args[key.removeprefix("data.").removeprefix("init_args.")] = yaml.safe_load(value)
    cls = resolve_class(class_path, "datamodules", trusted=trusted)
    return cls(**init_args)


def _check_data(module: Any, datamodule: Any, checkpoint: dict[str, Any]) -> None:
    for name in DATA_FACTS:
        expected, actual = module.hparams.get(name), getattr(datamodule, name, None)
        if expected is not None and actual is not None and expected != actual:
            raise ValueError(
                f"the checkpoint was trained with {name}={expected} but the datamodule has {name}={actual}; "
                f"use the data it was trained on (e.g. --set {name}={expected})."
            )
    saved = checkpoint.get(type(datamodule).__qualname__)
    if isinstance(saved, dict) and "labeled_indices" in saved:
        if list(saved["labeled_indices"]) != datamodule.labeled_indices.tolist():
            raise ValueError(
                "the datamodule chose another labeled split than the checkpoint's run; use that run's "
                "labels_per_class/label_fraction and split_seed (e.g. --set split_seed=...)."
            )


def split_loader(datamodule: Any, split: str) -> Any:
    """The loader of ``split`` (``labeled``, ``unlabeled``, ``val`` or ``test``), in order."""
    datamodule.setup("fit")
    if split == "labeled":
        return datamodule.labeled_dataloader()
    if split == "val":
        loader = datamodule.val_dataloader()
        if not loader:
            raise ValueError(
                "the datamodule has no validation split; set --set val_size=0.1 or choose another split"
            )
        return loader
    if split == "test":
        return datamodule.test_dataloader()
    if split == "unlabeled":
        from datamodules.base import NamedBatches, batch_collate
        from ssl_modules.batch import UnlabeledBatch

        dataset = NamedBatches(datamodule._unlabeled_dataset(), UnlabeledBatch)
        return torch.utils.data.DataLoader(
            dataset, batch_size=datamodule.batch_size * 2, shuffle=False, collate_fn=batch_collate
        )
    raise ValueError(f"split must be one of {SPLITS}; got {split!r}")


# -- predictions -------------------------------------------------------------------------------
@torch.no_grad()
def _embed_all(module: Any, loader: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    features, labels = [], []
    for batch in loader:
        images, targets = images_and_labels(batch)
        features.append(module.embed(images.to(device)).float().cpu())
        labels.append(torch.as_tensor(targets).long())
    return torch.cat(features), torch.cat(labels)


def _offline_probe(module: Any, datamodule: Any, device: torch.device) -> Any:
    """The probe behind ``test/acc`` where the module scores with one (self-supervised methods,
    ``SupervisedModule(freeze_backbone=True)``): the same L-BFGS fit on the labeled split."""
    from ssl_modules.evaluation.probe import fit_linear_probe
    from ssl_modules.evaluation.self_supervised import SelfSupervisedModule
    from ssl_modules.supervised import SupervisedModule

    if isinstance(module, SelfSupervisedModule):
        weight_decay = module.probe_weight_decay
    elif isinstance(module, SupervisedModule) and module.freeze_backbone:
        weight_decay = 1e-3  # SupervisedModule.on_test_epoch_start: fit_linear_probe's default
    else:
        return None
    features, labels = _embed_all(module, split_loader(datamodule, "labeled"), device)
    return fit_linear_probe(features, labels, num_classes=module.num_classes, weight_decay=weight_decay)


@torch.no_grad()
def predict(
    path: str | Path,
    split: str = "test",
    what: str = "embeddings",
    data: str | None = None,
    overrides: list[str] | None = None,
    model_class: type | str | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """``what`` for every image of ``split``, computed as the module's ``test/acc`` path does.

    - ``"embeddings"``: ``module.embed`` (the evaluated network's features), (N, num_features);
    - ``"probabilities"``: softmax of ``evaluation_logits`` (classifiers) or of the offline
      linear probe fitted on the labeled split (self-supervised methods), (N, num_classes);
    - ``"predictions"``: their argmax, (N,).

    Returns ``{what: tensor, "labels": (N,), "split", "checkpoint", "class_path"}``.
    """
    if what not in OUTPUTS:
        raise ValueError(f"what must be one of {OUTPUTS}; got {what!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    checkpoint = read_checkpoint(path)
    target = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    module = load_module(path, model_class).to(target)
    datamodule = build_datamodule(checkpoint, data, overrides)
    datamodule.setup("fit")
    _check_data(module, datamodule, checkpoint)
    loader = split_loader(datamodule, split)
    if what == "embeddings":
        values, labels = _embed_all(module, loader, target)
    else:
        probe = _offline_probe(module, datamodule, target)
        outputs, labels = [], []
        for batch in loader:
            images, targets = images_and_labels(batch)
            images = module.as_unit_float(images.to(target))
            logits = probe(module.embed(images)) if probe is not None else module.evaluation_logits(images)
            outputs.append(logits.float().softmax(dim=1).cpu())
            labels.append(torch.as_tensor(targets).long())
        values, labels = torch.cat(outputs), torch.cat(labels)
        if what == "predictions":
            values = values.argmax(dim=1)
    return {
        what: values,
        "labels": labels,
        "split": split,
        "checkpoint": str(path),
        "class_path": f"{type(module).__module__}.{type(module).__qualname__}",
    }


def write_output(result: dict[str, Any], what: str, out: str | Path) -> Path:
    """``.pt``: the whole ``result`` dict (with ``labels``); ``.npy``: the ``what`` array alone."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".pt":
        torch.save(result, out)
    elif out.suffix == ".npy":
        np.save(out, result[what].numpy())
    else:
        raise ValueError(f"--out must end in .pt or .npy; got {str(out)!r}")
    return out


# -- command line ------------------------------------------------------------------------------
def export_main(argv: list[str]) -> None:
    """``ssl-modules export CKPT --out backbone.pt``."""
    parser = argparse.ArgumentParser(
        prog="ssl-modules export",
        description="Write the backbone of a checkpoint (the weights its method evaluates with: EMA/teacher "
        "where test/acc uses them) as a plain state dict, plus <out>.json describing it.",
    )
    parser.add_argument("checkpoint", help="a .ckpt of any module of this library")
    parser.add_argument("--out", required=True, help="output file, e.g. backbone.pt")
    args = parser.parse_args(argv)
    try:
        out = export_backbone(args.checkpoint, args.out)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from error
    print(f"wrote {out} and {out}.json")


def predict_main(argv: list[str]) -> None:
    """``ssl-modules predict CKPT --split val --what embeddings --out feats.npy``."""
    parser = argparse.ArgumentParser(
        prog="ssl-modules predict",
        description="Embeddings, class probabilities or predicted classes of one split, from a checkpoint alone "
        "(module class and datamodule are read from it). `ssl-modules predict --config ... --ckpt_path ...` "
        "(options only, no checkpoint first) is LightningCLI's predict instead.",
    )
    parser.add_argument("checkpoint", help="a .ckpt of any module of this library")
    parser.add_argument(
        "--out", required=True, help="output file: .pt (dict with labels) or .npy (the array)"
    )
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--what", default="embeddings", choices=OUTPUTS)
    parser.add_argument("--data", help="data YAML or datamodule class (default: the one in the checkpoint)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="datamodule argument")
    parser.add_argument("--model", help="module class (default: the one recorded in the checkpoint)")
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)"
    )
    args = parser.parse_args(argv)
    try:
        result = predict(args.checkpoint, args.split, args.what, args.data, args.set, args.model, args.device)
        out = write_output(result, args.what, args.out)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from error
    print(f"wrote {out}: {args.what} of the {args.split} split, shape {tuple(result[args.what].shape)}")
