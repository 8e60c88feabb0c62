"""Scale: the protocol's Wide ResNets, the GPU path without host round-trips, the throughput
benchmark and the one-script GPU check (its CPU self-test, and CUDA-only checks that skip here).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from datamodules import SyntheticDataModule
from ssl_modules import FixMatchModule
from ssl_modules.accel import CudaSpeedups, DeviceBatches, DeviceResidentDataModule
from ssl_modules.backbones import WideResNet, build_backbone
from ssl_modules.batch import train_batch
from ssl_modules.semi_supervised._common import log_pseudo_label_stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

pytestmark = pytest.mark.filterwarnings("ignore:.*self.trainer. reference is not registered")

# name -> (widen factor k, groups, output width, depth)
WRNS = {"wrn_28_2": (2, 3, 128, 28), "wrn_28_8": (8, 3, 512, 28), "wrn_37_2": (2, 4, 256, 37)}


# -- Wide ResNets ----------------------------------------------------------------------------------
def expected_parameter_count(k: int, groups: int, channels: int = 3) -> int:
    """Written out from the architecture: 3x3 stem to 16, groups of 4 pre-activation blocks
    (BN, conv3x3, BN, conv3x3, 1x1 shortcut where the width or stride changes), final BN."""
    count = 9 * channels * 16
    cin = 16
    for group in range(groups):
        width = 16 * k * 2**group
        for block in range(4):
            block_in = cin if block == 0 else width
            count += 2 * block_in + 9 * block_in * width + 2 * width + 9 * width * width
            if block == 0 and (block_in != width or group > 0):
                count += block_in * width
        cin = width
    return count + 2 * cin


@pytest.mark.parametrize("name", list(WRNS))
def test_wrn_shape_depth_and_parameter_count(name):
    k, groups, width, depth = WRNS[name]
    backbone = build_backbone(name, channels=3)
    assert backbone.num_features == width and backbone.depth == depth
    assert sum(p.numel() for p in backbone.parameters()) == expected_parameter_count(k, groups)
    with torch.no_grad():
        assert backbone.eval()(torch.rand(2, 3, 16, 16)).shape == (2, width)
    gray = build_backbone(name, channels=1)
    assert gray.features[0].in_channels == 1


def test_wrn_parameter_counts_match_the_papers():
    """FixMatch (Sohn et al. 2020) and its PyTorch reproductions count the classifier in:
    WRN-28-2 1.47 M (10 classes), WRN-28-8 23.4 M (CIFAR-100), WRN-37-2 5.9 M (STL-10)."""

    def with_classifier(name: str, classes: int) -> int:
        backbone = build_backbone(name, 3)
        return sum(p.numel() for p in backbone.parameters()) + backbone.num_features * classes + classes

    assert with_classifier("wrn_28_2", 10) == 1_467_610
    assert round(with_classifier("wrn_28_8", 100) / 1e6, 1) == 23.4
    assert round(with_classifier("wrn_37_2", 10) / 1e6, 1) == 5.9


def test_wrn_is_fixmatchs_variant():
    """Leaky ReLU 0.1 everywhere (no ReLU), BatchNorm momentum 0.001 (TF 0.999), eps 1e-3,
    convolutions without bias."""
    backbone = build_backbone("wrn_28_2", 3)
    activations = [m for m in backbone.modules() if isinstance(m, (nn.ReLU, nn.LeakyReLU))]
    assert activations and all(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.1 for m in activations)
    norms = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 2 * 12 + 1
    assert all(m.momentum == 0.001 and m.eps == 1e-3 for m in norms)
    assert all(m.bias is None for m in backbone.modules() if isinstance(m, nn.Conv2d))


def test_wrn_initialisation_is_the_references():
    """Convs: He-normal, fan-out (std sqrt(2 / (k*k*out))); BN weight 1, bias 0; classifier
    helper: Xavier-normal (std sqrt(2 / (in + out))), bias 0."""
    torch.manual_seed(0)
    backbone = build_backbone("wrn_28_8", 3)
    convs = [m for m in backbone.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:
        k, out = conv.kernel_size[0], conv.out_channels
        if conv.weight.numel() >= 100_000:  # large enough for a 1 % estimate of the std
            assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (k * k * out)), rel=0.02)
            assert abs(conv.weight.mean().item()) < 0.02 * math.sqrt(2 / (k * k * out))
    assert sum(conv.weight.numel() >= 100_000 for conv in convs) >= 10
    for norm in (m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
    classifier = WideResNet.init_classifier(nn.Linear(512, 1000))
    assert classifier.weight.std().item() == pytest.approx(math.sqrt(2 / (512 + 1000)), rel=0.02)
    assert torch.all(classifier.bias == 0)


def reference_wrn(backbone: nn.Module, x: torch.Tensor, k: int, groups: int, training: bool) -> torch.Tensor:
    """The TensorFlow reference's forward (google-research/fixmatch ``libml/models.py``), written
    out with functional ops on the module's own parameters."""
    state = {name: value.clone() for name, value in backbone.state_dict().items()}

    def bn(y: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.batch_norm(
            y,
            state[f"{prefix}.running_mean"],
            state[f"{prefix}.running_var"],
            state[f"{prefix}.weight"],
            state[f"{prefix}.bias"],
            training=training,
            momentum=0.001,
            eps=1e-3,
        )

    def act(y: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(y, 0.1)

    y = F.conv2d(x, state["features.0.weight"], padding=1)
    index, cin = 1, 16
    for group in range(groups):
        width = 16 * k * 2**group
        for block in range(4):
            prefix = f"features.{index}"
            stride = 2 if block == 0 and group > 0 else 1
            activated = act(bn(y, f"{prefix}.bn1"))
            shortcut = activated if (group == 0 and block == 0) else y  # activate_before_residual
            out = F.conv2d(activated, state[f"{prefix}.conv1.weight"], stride=stride, padding=1)
            out = F.conv2d(act(bn(out, f"{prefix}.bn2")), state[f"{prefix}.conv2.weight"], padding=1)
            if block == 0 and (cin != width or stride != 1):
                shortcut = F.conv2d(shortcut, state[f"{prefix}.shortcut.weight"], stride=stride)
            y = shortcut + out
            cin, index = width, index + 1
    return act(bn(y, f"features.{index}")).mean(dim=(2, 3))


@pytest.mark.parametrize("name", ["wrn_28_2", "wrn_37_2"])
@pytest.mark.parametrize("training", [False, True])
def test_wrn_forward_equals_the_reference(name, training):
    torch.manual_seed(0)
    k, groups, _, _ = WRNS[name]
    backbone = build_backbone(name, 3)
    with torch.no_grad():  # non-trivial BatchNorm parameters and statistics
        for module in backbone.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    x = torch.randn(3, 3, 16, 16)
    expected = reference_wrn(backbone, x, k, groups, training)
    with torch.no_grad():
        actual = backbone.train(training)(x)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_fixmatch_on_wrn_gives_every_parameter_a_gradient():
    """Also the first BatchNorm of the blocks that change width (unused in some PyTorch ports)."""
    torch.manual_seed(0)
    model = FixMatchModule(
        num_classes=4, channels=3, image_size=8, backbone="wrn_28_2", confidence_threshold=0.0
    )
    images = torch.rand(2, 3, 8, 8)
    batch = train_batch(images, torch.tensor([0, 1]), torch.rand(4, 3, 8, 8))
    model.training_step(batch, 1).backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_wrn_28_2_is_not_slower_than_resnet18():
    """Speed: WRN-28-2 (0.36 GFLOPs a 32 px image, fwd) trains faster than the CIFAR-stem
    ResNet-18 (0.56 GFLOPs): best of interleaved repetitions, forward + backward."""
    import time

    torch.manual_seed(0)
    models = {name: build_backbone(name, 3) for name in ("wrn_28_2", "resnet18")}
    x = torch.rand(8, 3, 32, 32)
    best = dict.fromkeys(models, float("inf"))
    for _ in range(5):
        for name, model in models.items():
            start = time.perf_counter()
            model(x).sum().backward()
            best[name] = min(best[name], time.perf_counter() - start)
    # expected ~0.65x; the margin keeps a loaded CI machine from flaking the comparison
    assert best["wrn_28_2"] < 1.25 * best["resnet18"], best


def test_reference_configs_use_the_papers_backbones():
    expected = {"cifar10": "wrn_28_2", "svhn": "wrn_28_2", "cifar100": "wrn_28_8", "stl10": "wrn_37_2"}
    configs = sorted((ROOT / "configs" / "reference").glob("fixmatch_*.yaml"))
    assert len(configs) >= 9
    for path in configs:
        dataset = path.stem.split("_")[1]
        raw = yaml.safe_load(path.read_text())
        assert raw["model"]["init_args"]["backbone"] == expected[dataset], path.name
        assert "no Wide ResNet" not in path.read_text(), path.name


# -- no host synchronisation in the training step's logic and logging -------------------------------
class LogStub:
    def __init__(self) -> None:
        self.logged: dict[str, torch.Tensor] = {}

    def log(self, key: str, value: torch.Tensor, **kwargs) -> None:
        self.logged[key] = value


def test_pseudo_label_stats_values():
    stub = LogStub()
    labels = torch.tensor([0, 1, 2, 3])
    weights = torch.tensor([1.0, 0.5, 0.0, 1.0])  # the third is not kept
    hidden = torch.tensor([0, 2, 2, -1])  # the last is unknown
    log_pseudo_label_stats(stub, labels, weights, hidden)
    assert stub.logged["train/mask_rate"].item() == pytest.approx(0.75)
    assert stub.logged["train/pseudo_label_acc"].item() == pytest.approx(0.5)  # 1 right of 2 known kept
    log_pseudo_label_stats(stub, labels, torch.zeros(4), hidden)
    assert math.isnan(stub.logged["train/pseudo_label_acc"].item())  # nothing kept: undefined, not 0


def test_pseudo_label_stats_need_no_tensor_values():
    """On the meta device every op that reads a value (``.item()``, ``bool()``, boolean
    indexing: a host sync on CUDA) raises; a sync-free computation runs."""
    stub = LogStub()
    meta = torch.device("meta")
    log_pseudo_label_stats(
        stub,
        torch.zeros(8, dtype=torch.long, device=meta),
        torch.ones(8, device=meta),
        torch.zeros(8, dtype=torch.long, device=meta),
    )
    assert set(stub.logged) == {"train/mask_rate", "train/pseudo_label_acc"}


def test_fixmatch_step_logic_needs_no_tensor_values():
    """FixMatch's training step (its loss, pseudo-labels and logging; the augmentation swapped
    for the identity) and its EMA update run on meta tensors: no value is read on the host."""
    model = FixMatchModule(num_classes=4, channels=3, image_size=8)
    model.weak = nn.Identity()
    model.strong = nn.Identity()
    model = model.to("meta")
    stub = LogStub()
    model.log = stub.log
    meta = torch.device("meta")
    batch = train_batch(
        torch.rand(4, 3, 8, 8, device=meta),
        torch.zeros(4, dtype=torch.long, device=meta),
        torch.rand(8, 3, 8, 8, device=meta),
        torch.zeros(8, dtype=torch.long, device=meta),
    )
    model.training_step(batch, 1).backward()
    model.ema_model.ema_from(model.backbone, model.classifier, 0.99)
    assert "train/pseudo_label_acc" in stub.logged


# -- the device-resident training split ------------------------------------------------------------
def make_batches(**kwargs) -> DeviceBatches:
    labeled = (
        torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1).expand(6, 1, 2, 2).clone(),
        torch.arange(6),
    )
    unlabeled = (torch.zeros(64, 1, 2, 2, dtype=torch.uint8), torch.arange(64))
    return DeviceBatches(labeled, unlabeled, batch_size=4, unlabeled_batch_size=8, seed=3, **kwargs)


def test_device_batches_cover_every_image_once_per_pass():
    batches = make_batches()
    labeled = torch.cat([batches.batch(step)["labeled"].labels for step in range(3)])  # 12 = 2 passes of 6
    assert torch.bincount(labeled, minlength=6).tolist() == [2] * 6
    assert not torch.equal(labeled[:6], labeled[6:])  # every pass in a fresh order
    unlabeled = torch.cat(
        [batches.batch(step)["unlabeled"].hidden_labels for step in range(8)]
    )  # one pass of 64
    assert sorted(unlabeled.tolist()) == list(range(64))
    assert len(batches) == 8  # an epoch: one pass over the unlabeled pool


def test_device_batches_resume_where_they_stopped():
    """Batch k is a pure function of k: an iterator started at step 5 (a resumed run) draws what
    the uninterrupted run drew at step 5, and a different seed draws something else."""
    uninterrupted = list(make_batches())
    resumed = next(iter(make_batches(start_step=lambda: 5)))
    assert torch.equal(resumed["unlabeled"].index, uninterrupted[5]["unlabeled"].index)
    assert torch.equal(resumed["labeled"].index, uninterrupted[5]["labeled"].index)
    assert not torch.equal(uninterrupted[5]["unlabeled"].index, uninterrupted[4]["unlabeled"].index)


def test_device_batches_split_the_data_over_ranks():
    ranks = [make_batches(rank=rank, world_size=2) for rank in range(2)]
    for step in range(4):  # 2 ranks x 4 steps x 8 = one pass over the 64 unlabeled images
        first, second = (set(r.batch(step)["unlabeled"].index.tolist()) for r in ranks)
        assert not first & second
    assert len(ranks[0]) == 4


def test_device_resident_datamodule_fits_and_speedups_do_nothing_on_cpu():
    torch.manual_seed(0)
    data = DeviceResidentDataModule(SyntheticDataModule(num_classes=4, image_size=8, batch_size=4))
    assert (data.num_classes, data.channels, data.image_size) == (4, 3, 8)  # read through
    model = FixMatchModule(num_classes=4, channels=3, image_size=8, ema_decay=0.5)
    speedups = CudaSpeedups(channels_last=True, compile_backbone=True)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[speedups],
    )
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 3 and math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert not speedups.applied
    assert model.backbone._compiled_call_impl is None
    assert all(p.is_contiguous() for p in model.parameters())  # not channels_last


# -- the throughput benchmark and the GPU check -----------------------------------------------------
def test_throughput_benchmark_runs_tiny(tmp_path):
    # a fresh process, as the benchmark is run: forking DataLoader workers from the test process
    # (with the threads earlier tests left behind) can deadlock
    command = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--tiny", "--device", "cpu"]
    command += ["--steps", "2", "--warmup", "1", "--repeats", "1", "--workers", "1", "--out", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    result = json.loads((tmp_path / "throughput.json").read_text())
    for method in ("fixmatch", "simclr"):
        rows = result["methods"][method]["variants"]
        assert set(rows) == {"a_library", "b_usual_1w", "c_limit"}
        assert rows["c_limit"]["ratio_to_limit"] == 1.0
        assert all(row["images_per_s"] > 0 for row in rows.values())
        assert 0 < rows["a_library"]["augmentation_share"] < 1
        assert ("projected_hours_2^20_steps" in rows["a_library"]) == (method == "fixmatch")
    saved = json.loads((tmp_path / "throughput.json").read_text())
    assert saved["environment"]["sizes"] == "tiny"
    assert "| fixmatch | a_library |" in (tmp_path / "throughput.md").read_text()


def test_the_limit_and_the_usual_way_never_run_the_library_augmentation():
    import throughput

    args = throughput.parse_args(["--tiny", "--device", "cpu", "--warmup", "1"])
    bench = throughput.Bench("fixmatch", throughput.TINY["fixmatch"], torch.device("cpu"), args)
    calls = []
    for name, module in bench.augmentations.items():
        module.register_forward_hook(lambda *_, name=name: calls.append(name))
    assert bench.run_limit(2) > 0 and bench.run_usual(2, workers=0) > 0
    assert calls == []
    bench.run_augmentation_only(1)
    assert set(calls) == {"weak", "strong"}


def test_self_supervised_throughput_runs_tiny(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "self_supervised_throughput.py"), "--device", "cpu"]
    command += ["--methods", "byol", "dino", "mae", "--image-size", "16", "--batch-size", "4"]
    command += [
        "--backbone",
        "small_cnn",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--repeats",
        "2",
        "--out",
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    result = json.loads((tmp_path / "self_supervised_throughput.json").read_text())
    assert set(result["methods"]) == {"byol", "dino", "mae"}
    for row in result["methods"].values():
        assert row["train_samples_per_s"]["a_library"] > 0 and row["train_samples_per_s"]["c_limit"] > 0
        assert len(row["ratios_per_repetition"]) == 2
    assert result["methods"]["mae"]["backbone"] == "vit_mini"  # --backbone leaves MAE its ViT
    assert len(result["methods"]["dino"]["views"]) == 8  # the config's 2 global + 6 local crops
    assert "| dino | small_cnn | 2x16px + 6x" in (tmp_path / "self_supervised_throughput.md").read_text()


@pytest.mark.parametrize("method", ["swav", "mae"])
def test_self_supervised_limit_runs_no_augmentation_and_gives_it_back(method):
    import self_supervised_throughput as sst

    args = sst.parse_args(
        [
            "--device",
            "cpu",
            "--image-size",
            "8",
            "--batch-size",
            "4",
            "--warmup",
            "1",
            "--backbone",
            "small_cnn",
        ]
    )
    bench = sst.Bench(method, torch.device("cpu"), args)
    model = bench.model
    augment = model.augment if method == "mae" else model.multicrop
    calls = []
    augment.register_forward_hook(lambda *_: calls.append(1))
    seen = []
    original_step = model.training_step
    model.training_step = lambda batch, idx: seen.append(batch) or original_step(batch, idx)
    assert bench.run_limit(2) > 0
    assert calls == []  # the limit never augments
    assert len(seen) == 1 + 2  # warm-up and timed steps, each one training_step
    assert "make_views" not in vars(model)  # (a) augments again afterwards
    assert (model.augment if method == "mae" else model.multicrop) is augment
    views = (
        model.make_views(bench.ready["unlabeled"])
        if method != "mae"
        else [model.augment(bench.ready["unlabeled"])]
    )
    assert calls and all(view.shape[0] == 4 for view in views)


def test_usual_pipeline_views():
    import throughput

    weak, strong = throughput.fixmatch_transforms(16)
    image = throughput.Image.fromarray((torch.rand(16, 16, 3) * 255).to(torch.uint8).numpy())
    for view in (weak(image), strong(image)):
        assert view.shape == (3, 16, 16) and view.dtype == torch.float32
        assert 0 <= view.min() and view.max() <= 1
    feed = throughput.Feed()
    feed.queue = [torch.zeros(2, 3, 4, 4)]
    with pytest.raises(ValueError):
        feed(torch.zeros(3, 3, 4, 4))  # a prepared view of the wrong batch is refused


def test_gpu_check_script_runs_tiny_on_cpu(tmp_path):
    """The shell script end to end (no pip step), on CPU in the tiny mode: it cannot rot."""
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    command = ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--skip-pip", "--out", str(tmp_path)]
    command += [
        "--tiny",
        "--device",
        "cpu",
        "--modules",
        "FixMatchModule",
        "SimCLRModule",
        "--fit-steps",
        "2",
    ]
    command += ["--sections", "fits", "ddp", "throughput", "ssl_throughput"]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert not report["errors"], report["errors"]
    assert {(row["module"], row["precision"]) for row in report["fits"]} == {
        ("FixMatchModule", "bf16-mixed"),
        ("SimCLRModule", "bf16-mixed"),
    }
    assert all(row["losses_finite"] and row["steps"] == 2 for row in report["fits"])
    assert report["ddp"] == {"skipped": "no GPU"}
    assert "| simclr | c_limit |" in (tmp_path / "gpu_check.md").read_text()
    assert set(report["ssl_throughput"]["methods"]) == {"simclr", "dino"}
    assert "| dino | small_cnn | 2x16px + 6x" in (tmp_path / "gpu_check.md").read_text()


def test_sync_audit_attributes_a_sync_to_the_library_line_that_caused_it():
    """A sync raised inside a dependency (Lightning's ``self.log``) on behalf of the library's
    code counts at the library's line; one with no library frame on the stack counts where it was
    raised; warnings about anything else are ignored."""
    import gpu_check

    audit = gpu_check.SyncAudit()
    source = "def call(record):\n    record('cudaStreamSynchronize: synchronizing', UserWarning, '/x/lightning.py', 7)\n"
    namespace: dict = {}
    exec(compile(source, os.path.join(gpu_check.LIBRARY_DIR, "fake_module.py"), "exec"), namespace)
    namespace["call"](audit._record)
    audit._record("an unrelated warning", UserWarning, "/x/other.py", 1)
    audit._record("called a synchronizing CUDA operation", UserWarning, "/x/lightning.py", 9)
    audit.steps = 1
    summary = audit.summary()
    assert summary["library_locations"] == {"ssl_modules/fake_module.py:2": 1}
    assert summary["syncs_per_step"] == 2 and summary["library_syncs_per_step"] == 1
    assert list(summary["other_locations"]) == [os.path.relpath("/x/lightning.py", ROOT) + ":9"]


def test_gpu_check_ddp_section_on_cpu():
    """The DDP comparison's code path (2 gloo ranks on CPU) finds split == whole."""
    # in a fresh process, as the script runs it: spawning gloo ranks from the test process (with
    # the threads earlier tests left behind) hung once
    code = (
        "import json, sys, torch; sys.path.insert(0, 'benchmarks'); import gpu_check; "
        "r = gpu_check.ddp_equivalence(torch.device('cpu'), force_cpu=True); "
        "print(json.dumps({n: [bool(r[n]['same_parameters']), bool(r[n]['equal'])] for n in gpu_check.DDP_METHODS}))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result and all(same and equal for same, equal in result.values()), result


def test_prepare_gpu_wheels_dry_run():
    env = {**os.environ, "PYTHON": sys.executable}
    script = ROOT / "benchmarks" / "prepare_gpu_wheels.sh"
    completed = subprocess.run(["bash", str(script), "--dry-run"], env=env, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    for part in (
        "--only-binary=:all:",
        "--no-deps",
        "--python-version 3.12",
        "kornia",
        "jsonargparse",
        "wandb",
    ):
        assert part in completed.stdout


# -- CUDA only -------------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (set_sync_debug_mode)")


@cuda
def test_pseudo_label_stats_do_not_sync_on_cuda():
    stub = LogStub()
    device = torch.device("cuda")
    labels = torch.randint(0, 4, (64,), device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        log_pseudo_label_stats(stub, labels, torch.rand(64, device=device), labels.roll(1))
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda
def test_fixmatch_training_step_does_not_sync_on_cuda():
    """Under the Trainer on CUDA, from the second step on, FixMatch's training_step (loss,
    pseudo-labels, self.log) raises on any host sync. The augmentation is the identity here:
    the batched RandAugment's per-operation selection is audited by benchmarks/gpu_check.sh."""
    torch.manual_seed(0)
    model = FixMatchModule(num_classes=4, channels=3, image_size=16)
    model.weak = nn.Identity()
    model.strong = nn.Identity()
    step = model.training_step

    def strict(batch, batch_idx):
        if model.global_step == 0:
            return step(batch, batch_idx)  # the first step logs an image grid (a copy to the host)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return step(batch, batch_idx)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    model.training_step = strict
    data = DeviceResidentDataModule(SyntheticDataModule(num_classes=4, image_size=16, batch_size=8))
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 4
