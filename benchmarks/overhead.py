"""Lightning overhead: SupervisedModule under the Trainer vs a plain PyTorch loop.

Both train the same backbone on the same in-memory digits with the same batch size, the same
batched kornia flip/shift augmentation, SGD (Nesterov) and per-step cosine schedule. The
Trainer side uses the real datamodule (labeled + unlabeled loaders, combined per step) and
the real module (logging included). Steady-state throughput is timed from step ``warmup``
to the end; the two sides alternate for ``repeats`` rounds and the medians are compared.

    python benchmarks/overhead.py [--steps 150] [--repeats 5] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from datamodules import DigitsDataModule
from ssl_modules import SupervisedModule
from ssl_modules.augment import weak_augmentation
from ssl_modules.backbones import build_backbone
from ssl_modules.base import WarmupCosine


class StepTimer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = 0.0
        self.end = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end = time.perf_counter()


def lightning_throughput(steps: int, warmup: int, batch_size: int) -> float:
    data = DigitsDataModule(batch_size=batch_size, val_size=0)
    model = SupervisedModule(
        num_classes=data.num_classes,
        channels=data.channels,
        image_size=data.image_size,
        mean=data.mean,
        std=data.std,
        horizontal_flip=data.horizontal_flip,
    )
    timer = StepTimer(warmup)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(model, datamodule=data)
    return (steps - warmup) * batch_size / (timer.end - timer.start)


def plain_throughput(steps: int, warmup: int, batch_size: int) -> float:
    data = DigitsDataModule(batch_size=batch_size, val_size=0)
    data.setup("fit")
    images = data.train_dataset.images  # uint8, (N, 1, 16, 16)
    labels = data.train_dataset.targets
    backbone = build_backbone("small_cnn", data.channels)
    model = nn.Sequential(backbone, nn.Linear(backbone.num_features, data.num_classes))
    augment = weak_augmentation(data.image_size, data.horizontal_flip)
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, nesterov=True, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(steps))
    model.train()
    step = 0
    start = 0.0
    while step < steps:
        order = torch.randperm(len(images))
        for first in range(0, len(order) - batch_size + 1, batch_size):
            if step == warmup:
                start = time.perf_counter()
            index = order[first : first + batch_size]
            x = images[index].float().div_(255.0)
            y = labels[index]
            x = (augment(x) - mean) / std
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step == steps:
                break
    return (steps - warmup) * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    lightning_runs, plain_runs = [], []
    for repeat in range(args.repeats):
        plain_runs.append(plain_throughput(args.steps, args.warmup, args.batch_size))
        lightning_runs.append(lightning_throughput(args.steps, args.warmup, args.batch_size))
        print(
            f"round {repeat}: plain {plain_runs[-1]:.0f} img/s, SupervisedModule {lightning_runs[-1]:.0f} img/s"
        )
    plain, lightning = statistics.median(plain_runs), statistics.median(lightning_runs)
    print(f"median plain loop       : {plain:.0f} img/s")
    print(f"median SupervisedModule : {lightning:.0f} img/s")
    print(f"ratio (module / plain)  : {lightning / plain:.3f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
