#!/usr/bin/env bash
# Download, on a machine with network, the wheels benchmarks/gpu_check.sh installs offline on a
# bare GPU machine (Python 3.12, Linux x86_64) whose Python has torch, torchvision, lightning,
# torchmetrics and timm but not kornia, jsonargparse or wandb.
#
#   bash benchmarks/prepare_gpu_wheels.sh [DIR] [--dry-run]   # DIR default: build/gpu_wheels (git-ignored)
#
# Every wheel is fetched with `pip download --only-binary=:all: --no-deps` for the GPU machine's
# Python and platform; the dependencies are then read from the wheels' metadata and fetched the same
# way, round after round until closed, except the heavy ones that environment already has (torch,
# numpy, ...: SKIP below). Small dependencies it may already have are fetched anyway: pip installs
# only what is missing there. Carry DIR (~40 MB) to the GPU machine with the checkout, then run
# `bash benchmarks/gpu_check.sh`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="$ROOT/build/gpu_wheels"
DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    *) DIR="$arg" ;;
  esac
done
export GPU_WHEELS_DIR="$DIR" GPU_WHEELS_DRY="$DRY" GPU_PYTHON_VERSION="${GPU_PYTHON_VERSION:-3.12}"
"${PYTHON:-python3}" - <<'PYEOF'
import glob, os, re, subprocess, sys, zipfile

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOTS = {"kornia": (), "jsonargparse": ("signatures",), "wandb": ()}
# already in a torch + torchvision + lightning + torchmetrics + timm environment, and heavy
SKIP = {"torch", "torchvision", "triton", "numpy", "pillow", "lightning", "pytorch-lightning",
        "lightning-utilities", "torchmetrics", "timm", "sympy", "mpmath", "networkx", "jinja2",
        "markupsafe", "filelock", "fsspec", "setuptools", "huggingface-hub", "safetensors"}
directory, dry = os.environ["GPU_WHEELS_DIR"], os.environ["GPU_WHEELS_DRY"] == "1"
version = os.environ["GPU_PYTHON_VERSION"]
marker_env = {"python_version": version, "python_full_version": version + ".0", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
              "implementation_name": "cpython", "platform_python_implementation": "CPython"}
command = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--no-deps",
           "--dest", directory, "--python-version", version, "--implementation", "cp",
           *[arg for tag in ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64",
                             "manylinux_2_34_x86_64") for arg in ("--platform", tag)]]
if dry:
    print(" ".join(command + sorted(ROOTS)))
    sys.exit(0)


def downloaded() -> dict[str, str]:
    names = {}
    for wheel in glob.glob(os.path.join(directory, "*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            names[canonicalize_name(re.search(r"^Name: *(\S+)", archive.read(meta).decode(), re.M)[1])] = wheel
    return names


def requirements(wheel: str, extras: tuple[str, ...]) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(meta).decode().splitlines()
    needed = set()
    for line in lines:
        if line.startswith("Requires-Dist: "):
            req = Requirement(line.split(": ", 1)[1].strip())
            if req.marker is None or any(req.marker.evaluate({**marker_env, "extra": e}) for e in ("", *extras)):
                needed.add(canonicalize_name(req.name))
    return needed


os.makedirs(directory, exist_ok=True)
wanted = dict(ROOTS)
for _ in range(20):
    have = downloaded()
    fetch = sorted(name for name in wanted if name not in have and name not in SKIP)
    if fetch:
        subprocess.run(command + fetch, check=True)
        have = downloaded()
    new = {}
    for name, extras in wanted.items():
        if name in have:
            for dependency in requirements(have[name], extras):
                if dependency not in wanted and dependency not in SKIP:
                    new[dependency] = ()
    if not new and not fetch:
        break
    wanted.update(new)
missing = sorted(name for name in wanted if name not in downloaded() and name not in SKIP)
if missing:
    sys.exit(f"no wheel found for: {missing}")
print(f"prepared {len(downloaded())} wheels in {directory}")
PYEOF
du -sh "$DIR" 2>/dev/null || true
