"""The GPU check: everything a GPU machine should answer, in one run of a few minutes.

Run through ``benchmarks/gpu_check.sh`` (which installs the missing wheels offline and sets
``PYTHONPATH``); each section is recorded as it finishes, so a run cut short still reports what
it did. Sections:

1. ``environment``: versions, the GPUs.
2. ``fits``: every module of ``ssl_modules.__all__`` fitted for a few steps on generated
   32 px RGB data under ``bf16-mixed`` and ``16-mixed`` (CPU: ``bf16-mixed`` only): finite
   losses, and the host synchronisations of each step after the first, found with
   ``torch.cuda.set_sync_debug_mode("warn")`` and reported by source line, split into those
   raised from the library's own code (``training_step``, augmentation, logging, EMA) and
   those from elsewhere (Lightning, AMP's GradScaler).
3. ``ddp``: where more than one GPU is present, one step of SimCLR and FixMatch on a global
   batch split over 2 GPUs (NCCL) gives the gradient of the whole batch on one GPU
   (BatchNorm in eval mode, fixed views: what legitimately differs is removed, as in
   ``tests/test_ddp_gradients.py``).
4. ``throughput``: ``benchmarks/throughput.py`` at full size (``--workers 8``), then FixMatch
   again with the backbone compiled (``torch.compile``, opt-in in the library).
5. ``ssl_throughput``: ``benchmarks/self_supervised_throughput.py``: every self-supervised
   method's library step against its limit (ready views), RGB 32 px, batch 256.

Writes ``gpu_check.json`` and ``gpu_check.md`` (plus ``throughput.json``/``.md``) into ``--out``.

    bash benchmarks/gpu_check.sh --out /tmp/gpu_check         # on the GPU machine
    python benchmarks/gpu_check.py --tiny --device cpu --out /tmp/x   # seconds, on CPU (the tests)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import self_supervised_throughput  # noqa: E402
import throughput  # noqa: E402

import ssl_modules  # noqa: E402
from datamodules import SyntheticDataModule  # noqa: E402
from ssl_modules.batch import LabeledBatch, UnlabeledBatch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LIBRARY_DIR = str(ROOT / "ssl_modules")
# shrink paper defaults that do not fit a few-step smoke fit (as tests/test_conformance.py)
MODULE_KWARGS: dict[str, dict] = {"BarlowTwinsModule": {"projection_hidden_dim": 512, "projection_dim": 512}}


def modules() -> list[str]:
    return [name for name in ssl_modules.__all__ if isinstance(getattr(ssl_modules, name), type)]


# -- host synchronisations ---------------------------------------------------------------------
class SyncAudit(L.Callback):
    """Records the CUDA host synchronisations of every training step after the first ``skip``.

    From one ``on_train_batch_start`` to the next (``training_step``, backward, optimizer step,
    the module's EMA update, the module's own ``on_train_batch_end`` logging and the loop's
    bookkeeping) the sync debug mode is ``"warn"``; every warning is attributed to the innermost
    frame of the library's code on the stack (a sync that Lightning's ``self.log`` makes for the
    library counts as the library's line), else to the line that raised it. Does nothing on a
    device other than CUDA.
    """

    def __init__(self, skip: int = 1) -> None:
        self.skip = skip
        self.locations: Counter[str] = Counter()
        self.library_locations: Counter[str] = Counter()
        self.steps = 0
        self._catcher: Any = None

    def _record(self, message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" not in str(message).lower():
            return
        library = [
            frame for frame in traceback.extract_stack()[:-1] if frame.filename.startswith(LIBRARY_DIR)
        ]
        if library:
            where = f"{os.path.relpath(library[-1].filename, ROOT)}:{library[-1].lineno}"
            self.library_locations[where] += 1
        else:
            where = f"{os.path.relpath(filename, ROOT)}:{lineno}"
        self.locations[where] += 1

    def _open(self) -> None:
        self._catcher = warnings.catch_warnings()
        self._catcher.__enter__()
        warnings.simplefilter("always")
        warnings.showwarning = self._record
        torch.cuda.set_sync_debug_mode("warn")

    def _close(self) -> None:
        if self._catcher is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._catcher.__exit__(None, None, None)
            self._catcher = None
            self.steps += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._close()
        if pl_module.device.type == "cuda" and trainer.global_step >= self.skip:
            self._open()

    def on_train_end(self, trainer, pl_module) -> None:
        self._close()

    def summary(self) -> dict:
        steps = max(1, self.steps)
        return {
            "audited_steps": self.steps,
            "syncs_per_step": round(sum(self.locations.values()) / steps, 2),
            "library_syncs_per_step": round(sum(self.library_locations.values()) / steps, 2),
            "library_locations": dict(self.library_locations.most_common(8)),
            "other_locations": dict((self.locations - self.library_locations).most_common(5)),
        }


class LossRecorder(L.Callback):
    """Keeps every step's loss on the device; read once at the end (no per-step host sync)."""

    def __init__(self) -> None:
        self._losses: list[torch.Tensor] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._losses.append(loss.detach())

    def on_train_end(self, trainer, pl_module) -> None:
        self.losses = torch.stack(self._losses).float().cpu().tolist() if self._losses else []


# -- section 2: fits --------------------------------------------------------------------------
def fit_module(name: str, precision: str, device: torch.device, steps: int, tiny: bool) -> dict:
    torch.manual_seed(0)
    size, batch = (8, 4) if tiny else (32, 32)
    data = SyntheticDataModule(
        num_classes=4,
        channels=3,
        image_size=size,
        train_per_class=4 * batch,
        labels_per_class=batch // 2,
        batch_size=batch,
        unlabeled_batch_ratio=1 if tiny else 2,
    )
    cls = getattr(ssl_modules, name)
    kwargs = dict(MODULE_KWARGS.get(name, {}))
    if tiny and name == "BarlowTwinsModule":
        kwargs = {"projection_hidden_dim": 16, "projection_dim": 16}
    model = cls(
        num_classes=data.num_classes,
        channels=data.channels,
        image_size=data.image_size,
        mean=data.mean,
        std=data.std,
        horizontal_flip=data.horizontal_flip,
        **kwargs,
    )
    audit, losses = SyncAudit(), LossRecorder()
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision=precision,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[audit, losses],
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    result = {
        "module": name,
        "precision": precision,
        "steps": trainer.global_step,
        "losses_finite": bool(losses.losses) and all(math.isfinite(v) for v in losses.losses),
        "last_loss": round(losses.losses[-1], 4) if losses.losses else None,
        "seconds": round(time.perf_counter() - start, 1),
    }
    if device.type == "cuda":
        result.update(audit.summary())
    return result


def fit_every_module(device: torch.device, steps: int, tiny: bool, names: list[str]) -> list[dict]:
    precisions = ["bf16-mixed", "16-mixed"] if device.type == "cuda" else ["bf16-mixed"]
    results = []
    for precision in precisions:
        for name in names:
            try:
                results.append(fit_module(name, precision, device, steps, tiny))
            except Exception as error:  # recorded, the other fits go on
                results.append({"module": name, "precision": precision, "error": _error(error)})
    return results


# -- section 3: DDP ---------------------------------------------------------------------------------
DDP_METHODS = ("SimCLRModule", "FixMatchModule")
DDP_BATCH = 8


class _FixedViews(torch.nn.Module):
    """Deterministic 'augmentation': alternately the image and a brightened mirror of it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return images if self.calls % 2 else (images.flip(-1) * 0.8 + 0.1)


def _ddp_model(name: str, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    facts = dict(num_classes=4, channels=3, image_size=8, mean=(0.5,) * 3, std=(0.25,) * 3)
    if name == "SimCLRModule":
        model = ssl_modules.SimCLRModule(**facts, projection_hidden_dim=16, projection_dim=8)
        model.augment = _FixedViews()
    else:
        model = ssl_modules.FixMatchModule(**facts, confidence_threshold=0.0)
        model.weak = _FixedViews()
        model.strong = _FixedViews()
    return model.to(device).eval()  # eval: BatchNorm's running statistics, a per-sample function


def _ddp_batch(device: torch.device, part: slice = slice(None)) -> dict:
    generator = torch.Generator().manual_seed(123)
    images = torch.rand(DDP_BATCH, 3, 8, 8, generator=generator)
    labeled = torch.rand(DDP_BATCH, 3, 8, 8, generator=generator)
    labels = torch.randint(0, 4, (DDP_BATCH,), generator=generator)
    hidden = torch.full((DDP_BATCH,), -1)
    index = torch.arange(DDP_BATCH)  # each image's position in the whole batch, kept by a part
    return {
        "labeled": LabeledBatch(labeled[part].to(device), labels[part].to(device), index[part].to(device)),
        "unlabeled": UnlabeledBatch(images[part].to(device), hidden[part].to(device), index[part].to(device)),
    }


def _ddp_gradients(name: str, device: torch.device, batch: dict) -> dict[str, torch.Tensor]:
    model = _ddp_model(name, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.training_step(batch, 1).backward()
    return {key: p.grad.detach().clone() for key, p in model.named_parameters() if p.grad is not None}


def _ddp_worker(rank: int, world_size: int, backend: str, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        size = DDP_BATCH // world_size
        for name in DDP_METHODS:
            grads = _ddp_gradients(name, device, _ddp_batch(device, slice(rank * size, (rank + 1) * size)))
            for value in grads.values():
                dist.all_reduce(value)  # DDP: the mean of the ranks' gradients
                value /= world_size
            if rank == 0:
                torch.save({k: v.cpu() for k, v in grads.items()}, os.path.join(out_dir, f"{name}.pt"))
    finally:
        dist.destroy_process_group()


def ddp_equivalence(device: torch.device, force_cpu: bool = False) -> dict:
    """Split-batch DDP gradients (2 ranks) against the whole batch on one device."""
    import torch.multiprocessing as mp

    if device.type == "cuda" and torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU: the 2-GPU DDP step needs 2"}
    if device.type != "cuda" and not force_cpu:
        return {"skipped": "no GPU"}
    backend = "nccl" if device.type == "cuda" else "gloo"
    with tempfile.TemporaryDirectory() as out_dir:
        # CUDA needs fresh processes; on CPU (the self-test) forking skips re-importing everything
        mp.start_processes(
            _ddp_worker,
            args=(2, backend, os.path.join(out_dir, "init"), out_dir),
            nprocs=2,
            join=True,
            start_method="spawn" if backend == "nccl" else "fork",
        )
        results = {}
        for name in DDP_METHODS:
            split = torch.load(os.path.join(out_dir, f"{name}.pt"))
            single = {k: v.cpu() for k, v in _ddp_gradients(name, device, _ddp_batch(device)).items()}
            worst = max((split[k] - single[k]).abs().max().item() for k in single)
            scale = max(v.abs().max().item() for v in single.values())
            results[name] = {
                "backend": backend,
                "same_parameters": set(split) == set(single),
                "max_abs_difference": worst,
                "equal": set(split) == set(single) and worst <= 1e-4 * max(1.0, scale),
            }
    return results


# -- section 4: throughput -------------------------------------------------------------------------
def run_throughput(device: torch.device, out: Path, tiny: bool, workers: list[int]) -> dict:
    args = ["--device", str(device), "--workers", *map(str, workers), "--out", str(out)]
    args += (
        ["--tiny", "--steps", "2", "--warmup", "1", "--repeats", "1"]
        if tiny
        else ["--steps", "20", "--repeats", "3"]
    )
    return throughput.main(args)


def run_compiled_throughput(device: torch.device, out: Path, tiny: bool) -> dict:
    args = ["--device", str(device), "--methods", "fixmatch", "--compile", "--workers", "2"]
    args += ["--out", str(out / "compiled")]
    args += (
        ["--tiny", "--steps", "2", "--warmup", "1", "--repeats", "1"]
        if tiny
        else ["--steps", "20", "--warmup", "3"]
    )
    return throughput.main(args)


def run_self_supervised_throughput(device: torch.device, out: Path, tiny: bool) -> dict:
    args = ["--device", str(device), "--out", str(out)]
    args += (
        ["--image-size", "16", "--batch-size", "4", "--backbone", "small_cnn", "--methods", "simclr", "dino"]
        + ["--steps", "1", "--warmup", "1", "--repeats", "1"]
        if tiny
        else ["--batch-size", "256", "--steps", "10", "--repeats", "3"]
    )
    return self_supervised_throughput.main(args)


# -- report -----------------------------------------------------------------------------------------
def _error(error: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(error), error)).strip()[-800:]


def environment(device: torch.device) -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("torchvision", "lightning", "torchmetrics", "kornia", "jsonargparse", "wandb", "timm"):
        try:
            versions[package] = __import__(package).__version__
        except Exception as error:
            versions[package] = f"missing ({type(error).__name__})"
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"device": str(device), "gpus": gpus, "versions": versions}


def to_markdown(report: dict) -> str:
    env = report.get("environment", {})
    lines = [f"# GPU check ({', '.join(env.get('gpus') or ['no GPU'])}; {report.get('mode')})", ""]
    lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items()))
    lines += ["", "## Fits (finite losses; host syncs per step, library code / all)", ""]
    lines += [
        "| module | precision | steps | finite | last loss | lib syncs/step | all syncs/step | where (library) |"
    ]
    lines += ["|---|---|---:|---|---:|---:|---:|---|"]
    for row in report.get("fits", []):
        if "error" in row:
            lines.append(
                f"| {row['module']} | {row['precision']} | - | ERROR | - | - | - | {row['error'][:120]} |"
            )
            continue
        where = ", ".join(f"{k} x{v}" for k, v in row.get("library_locations", {}).items()) or "-"
        lines.append(
            f"| {row['module']} | {row['precision']} | {row['steps']} | {row['losses_finite']} | {row['last_loss']} | "
            f"{row.get('library_syncs_per_step', '-')} | {row.get('syncs_per_step', '-')} | {where} |"
        )
    lines += [
        "",
        "## DDP: 2-rank split batch vs one device",
        "",
        "```",
        json.dumps(report.get("ddp"), indent=1),
        "```",
    ]
    for key in ("throughput_table", "compiled_throughput_table", "ssl_throughput_table"):
        if report.get(key):
            lines += ["", f"## {key.replace('_table', '').replace('_', ' ')}", "", report[key]]
    if report.get("errors"):
        lines += ["", "## Errors", "", *[f"- {k}: {v}" for k, v in report["errors"].items()]]
    lines += ["", f"Total {report.get('seconds', 0):.0f} s."]
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_check.md").write_text(to_markdown(report))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"), help="folder for the report")
    parser.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    parser.add_argument("--tiny", action="store_true", help="seconds-long self-test sizes (CPU, the tests)")
    parser.add_argument("--modules", nargs="+", default=None, help="fit only these (default: all)")
    parser.add_argument("--fit-steps", type=int, default=6)
    parser.add_argument("--workers", type=int, nargs="+", default=[8], help="DataLoader workers of (b)")
    parser.add_argument(
        "--sections", nargs="+", default=["fits", "ddp", "throughput", "compiled", "ssl_throughput"]
    )
    parser.add_argument("--ddp-on-cpu", action="store_true", help="run the DDP section with gloo on CPU")
    parser.add_argument(
        "--budget-s", type=float, default=540.0, help="skip sections that start later than this"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    os.environ.setdefault("WANDB_MODE", "offline")
    throughput.quiet_lightning()
    device = throughput.resolve_device(args.device)
    out = Path(args.out)
    report: dict[str, Any] = {
        "mode": "tiny" if args.tiny else "full",
        "environment": environment(device),
        "errors": {},
    }
    write(report, out)
    sections = {
        "fits": lambda: report.__setitem__(
            "fits", fit_every_module(device, args.fit_steps, args.tiny, args.modules or modules())
        ),
        "ddp": lambda: report.__setitem__("ddp", ddp_equivalence(device, force_cpu=args.ddp_on_cpu)),
        "throughput": lambda: report.__setitem__(
            "throughput", run_throughput(device, out, args.tiny, [2] if args.tiny else args.workers)
        ),
        "compiled": lambda: report.__setitem__(
            "compiled_throughput", run_compiled_throughput(device, out, args.tiny)
        ),
        "ssl_throughput": lambda: report.__setitem__(
            "ssl_throughput", run_self_supervised_throughput(device, out, args.tiny)
        ),
    }
    for name in args.sections:
        if time.perf_counter() - started > args.budget_s:
            report["errors"][name] = f"skipped: the {args.budget_s:.0f} s budget was spent"
            continue
        try:
            sections[name]()
        except Exception as error:  # recorded; the other sections go on
            report["errors"][name] = _error(error)
        if "throughput" in report and "throughput_table" not in report:
            report["throughput_table"] = throughput.to_markdown(report["throughput"])
        if "compiled_throughput" in report and "compiled_throughput_table" not in report:
            report["compiled_throughput_table"] = throughput.to_markdown(report["compiled_throughput"])
        if "ssl_throughput" in report and "ssl_throughput_table" not in report:
            report["ssl_throughput_table"] = self_supervised_throughput.to_markdown(report["ssl_throughput"])
        report["seconds"] = time.perf_counter() - started
        write(report, out)
    print(to_markdown(report))
    return report


if __name__ == "__main__":
    main()
