"""Image-folder loader benchmark: imgclf's parallel decoder against torchvision's
ImageFolder + DataLoader, same machine, same run, same number of workers.

Called by `cargo xtask bench loader` as

    python xtask/bench/loader.py --imgclf BIN --root ROOT [--workers W ...] [--images N]
                                 [--batch B] [--epochs E] [--repeats R]

The data: N realistic JPEGs (smooth scenes with shapes and sensor-like noise, 500x375 and
375x500, quality 90, 4:2:0 like most photographs) in 4 class folders, generated once into
ROOT/target/bench/loader-jpeg/train/ (regenerated when N changes).

Both sides do, per image: decode the JPEG to RGB, RandomResizedCrop(224) (scale (0.08, 1),
ratio (3/4, 4/3), bilinear with antialiasing), RandomHorizontalFlip(0.5), scale to [0, 1] and
normalise with ImageNet's mean/std; then batch B images (shuffled, last batch kept).

* torchvision: ImageFolder(root, transform=Compose([RandomResizedCrop(224),
  RandomHorizontalFlip(), ToTensor(), Normalize(mean, std)])) and
  DataLoader(batch_size=B, shuffle=True, num_workers=W) (W = 0: the main process).
* imgclf: `BIN datasets loader-bench DIR --workers W`: the loader `imgclf train` uses for
  image folders (W threads decode, crop, flip and write uint8 batches), each batch then
  normalised to float32 on the consuming thread (`imgclf train` does that step on the
  training device instead).

Each side runs one untimed epoch (worker start-up, page cache), then E timed epochs; the
sides alternate and the best of R runs each is reported as images/s. Prints a markdown table
and writes JSON to ROOT/target/bench/loader.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def generate(root: str, n: int) -> str:
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    data = os.path.join(root, "target", "bench", "loader-jpeg")
    train = os.path.join(data, "train")
    stamp = os.path.join(data, "stamp.json")
    want = {"images": n, "version": 1}
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == want:
                return train
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = (500, 375) if i % 3 else (375, 500)
        base = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BICUBIC)
        draw = ImageDraw.Draw(img)
        for _ in range(12):
            x0, y0 = rng.integers(0, w), rng.integers(0, h)
            x1, y1 = x0 + rng.integers(10, 200), y0 + rng.integers(10, 200)
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            if rng.random() < 0.5:
                draw.ellipse([x0, y0, x1, y1], fill=color)
            else:
                draw.rectangle([x0, y0, x1, y1], fill=color)
        img = img.filter(ImageFilter.GaussianBlur(1.2))
        arr = np.asarray(img).astype(np.int16)
        arr += rng.normal(0, 6, size=arr.shape).astype(np.int16)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        folder = os.path.join(train, f"class{i % 4}")
        os.makedirs(folder, exist_ok=True)
        img.save(os.path.join(folder, f"img{i:05d}.jpg"), quality=90)
    with open(stamp, "w") as f:
        json.dump(want, f)
    return train


def run_torchvision(train: str, workers: int, batch: int, epochs: int) -> dict:
    import torch
    import torchvision
    from torchvision import transforms as T

    torch.manual_seed(0)
    ds = torchvision.datasets.ImageFolder(
        train,
        transform=T.Compose(
            [T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)]
        ),
    )
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    for _ in loader:  # untimed: worker start-up, page cache
        pass
    n = 0
    t0 = time.perf_counter()
    for _ in range(epochs):
        for x, _y in loader:
            n += x.shape[0]
    secs = time.perf_counter() - t0
    return {"images": n, "seconds": secs, "images_per_s": n / secs}


def run_imgclf(binary: str, train: str, workers: int, batch: int, epochs: int) -> dict:
    out = subprocess.run(
        [
            binary,
            "datasets",
            "loader-bench",
            train,
            "--workers",
            str(workers),
            "--batch-size",
            str(batch),
            "--epochs",
            str(epochs),
            "--image-size",
            "224",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--imgclf", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--workers", type=int, nargs="+", default=[2])
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()

    train = generate(a.root, a.images)
    rows = []
    for w in a.workers:
        best = {"torchvision": 0.0, "imgclf": 0.0}
        for _ in range(a.repeats):
            tv = run_torchvision(train, w, a.batch, a.epochs)
            best["torchvision"] = max(best["torchvision"], tv["images_per_s"])
            ours = run_imgclf(a.imgclf, train, w, a.batch, a.epochs)
            best["imgclf"] = max(best["imgclf"], ours["images_per_s"])
        rows.append({"workers": w, **best, "ratio": best["imgclf"] / best["torchvision"]})

    import PIL
    import torch
    import torchvision

    print(
        f"\nloader bench: {a.images} JPEGs 500x375/375x500 q90 -> RandomResizedCrop(224) + flip + "
        f"normalise, batch {a.batch}, {a.epochs} timed epochs, best of {a.repeats}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, Pillow {PIL.__version__}\n"
    )
    print("| workers | torchvision ImageFolder + DataLoader (img/s) | imgclf loader (img/s) | imgclf / torchvision |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['torchvision']:.0f} | {r['imgclf']:.0f} | {r['ratio']:.2f} |")
    os.makedirs(os.path.join(a.root, "target", "bench"), exist_ok=True)
    with open(os.path.join(a.root, "target", "bench", "loader.json"), "w") as f:
        json.dump({"rows": rows, "images": a.images, "batch": a.batch, "epochs": a.epochs}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
