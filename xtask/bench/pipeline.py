"""Input-pipeline benchmark: imgclf's batched, on-device augmentation pipeline against
torchvision transforms with a DataLoader-style collate, same machine, same run.

Called by `cargo xtask bench pipeline` as

    python xtask/bench/pipeline.py --imgclf BIN --root ROOT [--steps N] [--batch B]
                                   [--repeats R] [--images M] [--device {cpu,cuda}]

The pipeline is the reference's CIFAR-style training input with Cutout and Mixup, on the
first M real Fashion-MNIST training images (uint8 1x28x28, decoded once into memory):
random crop (pad 4, zeros) -> horizontal flip (p 0.5) -> float, normalise
((x/255 - 0.2860)/0.3530) -> Cutout (16 px square, centre uniform, mask 0 in normalised
space) -> Mixup (alpha 1, one lambda and pairing per batch) -> soft targets.

* imgclf: `BIN preview --config configs/fashion_mnist/resnet_preact.yaml
  augmentation.use_cutout True augmentation.use_mixup True train.batch_size B --time N`,
  which gathers each batch from the in-memory dataset, moves it to the device and runs the
  training pipeline (what `imgclf train` runs before each step), then reports images/s over
  N batches after two untimed ones (waiting for the device at the end).
* torchvision: a fresh worker process with a map-style Dataset whose __getitem__ makes a PIL
  image (as torchvision's FashionMNIST does) and applies torchvision.transforms.v2
  (RandomCrop(28, padding=4), RandomHorizontalFlip, ToImage, ToDtype(float32, scale=True),
  Normalize) and a per-image Cutout written like the reference's; a DataLoader (shuffle,
  batch B, num_workers W) whose collate_fn is default_collate followed by v2.MixUp(alpha=1);
  each batch is moved to the device. Timed over the same N batches after two untimed ones;
  W = 0 and W = the core count are both measured.

Per-image stages (`--stages`, default randaugment,trivialaugment; `--stages none` skips
them): the loader with RandAugment (num_ops 2, magnitude 9, 31 bins) or TrivialAugment Wide
(31 bins) before the usual CIFAR augmentation, on a generated CIFAR-10 python release of
M images (3x32x32; the AutoAugment family's CIFAR order: the policy, then pad-4 crop, flip,
normalise):

* imgclf: `BIN preview --config configs/cifar/resnet_preact.yaml
  augmentation.use_randaugment True train.dataloader.num_workers W train.batch_size B
  --time N`: W loader threads run the stage on each uint8 image and batch; the training
  thread moves batches to the device and runs crop, flip and normalise there.
* torchvision: `datasets.CIFAR10` (PIL images) with transforms.Compose([RandAugment() or
  TrivialAugmentWide(), RandomCrop(32, padding=4), RandomHorizontalFlip(), ToTensor(),
  Normalize]) in a DataLoader (shuffle, batch B, num_workers W, drop_last), batches moved to
  the device.
Both sides use the same W, for W = 0 and W = the core count.

The sides run alternately and the best of R runs each is reported. torchvision must match
the torch of the venv (torch 2.11 -> torchvision 0.26.0); `cargo xtask bench pipeline`
installs it into the venv if it is missing. Prints a markdown table and writes JSON to
ROOT/target/bench/pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402  (shared helpers: IDX subsets, CPU model)

MEAN = 0.2860
STD = 0.3530
CONFIG = "configs/fashion_mnist/resnet_preact.yaml"
MASK_SIZE = 16


def worker_torchvision(a: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    import torchvision
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset, default_collate
    from torchvision.transforms import v2

    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device(a.device)
    raw = bench.read_idx_raw(os.path.join(a.data, "train-images-idx3-ubyte"))
    images = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    raw = bench.read_idx_raw(os.path.join(a.data, "train-labels-idx1-ubyte"))
    labels = np.frombuffer(raw, dtype=np.uint8, offset=8).astype(np.int64)

    class Cutout:
        """The reference's Cutout (transforms/cutout.py) on a C x H x W tensor."""

        def __init__(self, size: int) -> None:
            self.size, self.half = size, size // 2
            self.offset = 1 if size % 2 == 0 else 0

        def __call__(self, img: torch.Tensor) -> torch.Tensor:
            h, w = img.shape[-2:]
            cx = np.random.randint(0, w + self.offset)
            cy = np.random.randint(0, h + self.offset)
            x0, y0 = max(0, cx - self.half), max(0, cy - self.half)
            x1, y1 = min(w, cx - self.half + self.size), min(h, cy - self.half + self.size)
            img[..., y0:y1, x0:x1] = 0.0
            return img

    transform = v2.Compose([
        v2.RandomCrop(28, padding=4),
        v2.RandomHorizontalFlip(),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize([MEAN], [STD]),
        Cutout(MASK_SIZE),
    ])

    class FashionMNIST(Dataset):
        def __len__(self) -> int:
            return len(labels)

        def __getitem__(self, i: int):
            return transform(Image.fromarray(images[i], mode="L")), int(labels[i])

    mixup = v2.MixUp(alpha=1.0, num_classes=10)

    def collate(batch):
        return mixup(*default_collate(batch))

    loader = DataLoader(FashionMNIST(), batch_size=a.batch, shuffle=True, drop_last=True,
                        num_workers=a.workers, collate_fn=collate,
                        pin_memory=device.type == "cuda",
                        persistent_workers=a.workers > 0)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def batches():
        while True:
            for x, y in loader:
                yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    it = batches()
    for _ in range(2):
        next(it)
    sync()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        x, y = next(it)
    sync()
    secs = time.perf_counter() - t0
    assert x.shape == (a.batch, 1, 28, 28) and y.shape == (a.batch, 10)
    return {"images_per_sec": a.steps * a.batch / secs, "seconds": secs,
            "torchvision": torchvision.__version__, "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}


CIFAR_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR_STD = [0.2470, 0.2435, 0.2616]


def make_cifar10(dst: str, n: int, str_keys: bool) -> None:
    """A CIFAR-10 python release (cifar-10-batches-py/) of n training images in five batches
    and n // 5 test images: smooth random colour patterns, so that the operations have
    something to work on. The real release is a Python 2 pickle whose keys torchvision reads
    as `str` (encoding latin1) and imgclf as bytes: `str_keys` writes torchvision's form."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    key = (lambda k: k) if str_keys else (lambda k: k.encode())
    folder = os.path.join(dst, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    yy, xx = np.mgrid[0:32, 0:32]

    def images(k: int):
        a = rng.uniform(0, 6, size=(k, 3, 1, 1))
        b = rng.uniform(0, 6, size=(k, 3, 1, 1))
        base = 127.5 + 100 * np.sin(a * xx / 32 + b * yy / 32)
        noise = rng.normal(0, 12, size=(k, 3, 32, 32))
        return np.clip(base + noise, 0, 255).astype(np.uint8).reshape(k, 3072)

    per = n // 5
    for name, k in [(f"data_batch_{i}", per) for i in range(1, 6)] + [("test_batch", per)]:
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({key("data"): images(k), key("labels"): rng.integers(0, 10, k).tolist(),
                         key("batch_label"): name.encode(), key("filenames"): [b"x.png"] * k},
                        f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({key("label_names"): [f"c{i}" if str_keys else f"c{i}".encode()
                                          for i in range(10)],
                     key("num_cases_per_batch"): per, key("num_vis"): 3072}, f)


def worker_stage_torchvision(a: argparse.Namespace) -> dict:
    import torch
    import torchvision
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device(a.device)
    stage = {"randaugment": transforms.RandAugment(),
             "trivialaugment": transforms.TrivialAugmentWide()}[a.stage]
    transform = transforms.Compose([
        stage,
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(CIFAR_MEAN, CIFAR_STD),
    ])

    class Generated(datasets.CIFAR10):
        def _check_integrity(self) -> bool:  # generated files have no published checksums
            return True

        def _load_meta(self) -> None:  # nor does their metadata file
            self.classes = [f"c{i}" for i in range(10)]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    data = Generated(a.data, train=True, transform=transform, download=False)
    loader = DataLoader(data, batch_size=a.batch, shuffle=True, drop_last=True,
                        num_workers=a.workers, pin_memory=device.type == "cuda",
                        persistent_workers=a.workers > 0)

    def batches():
        while True:
            for x, y in loader:
                yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    it = batches()
    for _ in range(2):
        next(it)
    sync()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        x, _ = next(it)
    sync()
    secs = time.perf_counter() - t0
    assert x.shape == (a.batch, 3, 32, 32)
    return {"images_per_sec": a.steps * a.batch / secs, "seconds": secs,
            "torchvision": torchvision.__version__, "torch": torch.__version__}


def run_imgclf_stage(a: argparse.Namespace, data: str, stage: str, workers: int) -> dict:
    cmd = [a.imgclf, "preview", "--config", "configs/cifar/resnet_preact.yaml",
           "dataset.dataset_dir", data, f"augmentation.use_{stage}", "True",
           "train.dataloader.num_workers", str(workers), "train.batch_size", str(a.batch),
           "device", a.device, "--time", str(a.steps)]
    out = subprocess.run(cmd, cwd=a.root, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"bench: imgclf failed:\n{' '.join(cmd)}\n{out.stderr}")
    line = [l for l in out.stdout.splitlines() if l.startswith("{")][-1]
    return json.loads(line)


def run_torchvision_stage(a: argparse.Namespace, data: str, stage: str, workers: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--stage", stage,
           "--data", data, "--steps", str(a.steps), "--batch", str(a.batch),
           "--device", a.device, "--workers", str(workers)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"bench: torchvision worker failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def stages_driver(a: argparse.Namespace, stages: list, tmp: str) -> dict:
    cores = os.cpu_count() or 1
    data, tv_data = os.path.join(tmp, "cifar10"), os.path.join(tmp, "cifar10-torchvision")
    make_cifar10(data, a.images, str_keys=False)
    make_cifar10(tv_data, a.images, str_keys=True)
    rows = []
    for stage in stages:
        for w in (0, cores):
            ours, theirs = [], []
            for _ in range(a.repeats):
                ours.append(run_imgclf_stage(a, data, stage, w)["pipeline_images_per_sec"])
                theirs.append(run_torchvision_stage(a, tv_data, stage, w)["images_per_sec"])
            rows.append({"stage": stage, "num_workers": w, "imgclf": max(ours),
                         "torchvision": max(theirs), "runs": {"imgclf": ours,
                                                              "torchvision": theirs}})
    return {"pipeline": "per-image stage, then crop(pad 4) + flip + normalise; generated "
                        f"CIFAR-10 ({a.images} images)", "rows": rows}


def run_imgclf(a: argparse.Namespace, data: str) -> dict:
    cmd = [a.imgclf, "preview", "--config", CONFIG, "dataset.dataset_dir", data,
           "augmentation.use_cutout", "True", "augmentation.use_mixup", "True",
           "train.batch_size", str(a.batch), "device", a.device, "--time", str(a.steps)]
    out = subprocess.run(cmd, cwd=a.root, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"bench: imgclf failed:\n{' '.join(cmd)}\n{out.stderr}")
    line = [l for l in out.stdout.splitlines() if l.startswith("{")][-1]
    r = json.loads(line)
    return {"images_per_sec": r["pipeline_images_per_sec"], "seconds": r["seconds"]}


def run_torchvision(a: argparse.Namespace, data: str, workers: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--data", data,
           "--steps", str(a.steps), "--batch", str(a.batch), "--device", a.device,
           "--workers", str(workers)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"bench: torchvision worker failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def driver(a: argparse.Namespace) -> int:
    cores = os.cpu_count() or 1
    sides = {"imgclf": [], "torchvision (num_workers 0)": [],
             f"torchvision (num_workers {cores})": []}
    info = {}
    stages = [] if a.stages == "none" else a.stages.split(",")
    per_image = None
    with tempfile.TemporaryDirectory(prefix="imgclf-pipeline-") as tmp:
        if stages:
            per_image = stages_driver(a, stages, tmp)
        data = os.path.join(tmp, "data")
        bench.make_dataset(a.dataset_src, data, a.images, 16)
        for _ in range(0 if a.stages_only else a.repeats):
            sides["imgclf"].append(run_imgclf(a, data)["images_per_sec"])
            for w in (0, cores):
                r = run_torchvision(a, data, w)
                info = r
                sides[f"torchvision (num_workers {w})"].append(r["images_per_sec"])
    best = {k: max(v) for k, v in sides.items() if v}
    machine = info.get("gpu") or bench.cpu_model()
    result = {
        "pipeline": "crop(pad 4) + flip + normalise + cutout(16) + mixup(1.0), soft targets",
        "images": a.images, "batch": a.batch, "steps": a.steps, "repeats": a.repeats,
        "device": a.device, "machine": machine, "cores": cores,
        "python": platform.python_version(), "torch": info.get("torch"),
        "torchvision": info.get("torchvision"), "runs": sides, "best_images_per_sec": best,
        "per_image_stages": per_image,
    }
    os.makedirs(os.path.join(a.root, "target", "bench"), exist_ok=True)
    with open(os.path.join(a.root, "target", "bench", "pipeline.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nInput pipeline, {a.device} ({machine}, {cores} cores), batch {a.batch}, "
          f"{a.steps} batches, best of {a.repeats}; torch {info.get('torch')}, "
          f"torchvision {info.get('torchvision')}\n")
    print("| pipeline | images/s | vs imgclf |\n|---|---:|---:|")
    for k, v in best.items():
        print(f"| {k} | {v:,.0f} | {v / best['imgclf']:.2f}x |")
    if not best:
        print("(skipped: --stages-only)")
    if per_image:
        print(f"\nPer-image stages, {per_image['pipeline']}, same num_workers on both sides\n")
        print("| stage | num_workers | imgclf images/s | torchvision images/s | imgclf / torchvision |")
        print("|---|---:|---:|---:|---:|")
        for r in per_image["rows"]:
            print(f"| {r['stage']} | {r['num_workers']} | {r['imgclf']:,.0f} | "
                  f"{r['torchvision']:,.0f} | {r['imgclf'] / r['torchvision']:.2f}x |")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--imgclf", help="path to the imgclf binary")
    p.add_argument("--root", default=os.path.dirname(os.path.dirname(HERE)))
    p.add_argument("--steps", type=int, default=50, help="timed batches per run")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="alternating runs per side")
    p.add_argument("--images", type=int, default=10000, help="training images used")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dataset-src", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--stages", default="randaugment,trivialaugment",
                   help="per-image stages to measure (comma-separated), or none")
    p.add_argument("--stages-only", action="store_true",
                   help="measure only the per-image stages")
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        result = worker_stage_torchvision(a) if a.stage else worker_torchvision(a)
        print(json.dumps(result), flush=True)
        return 0
    if not a.imgclf:
        p.error("--imgclf is required")
    if min(a.steps, a.batch, a.repeats) < 1 or a.images < a.batch:
        p.error("--steps, --batch, --repeats must be >= 1 and --images >= --batch")
    a.root = os.path.abspath(a.root)
    return driver(a)


if __name__ == "__main__":
    sys.exit(main())
