"""Training-step throughput: imgclf against PyTorch's best eager recipe, same device, same run.

Called by `cargo xtask bench` as

    python xtask/bench/step.py --imgclf BIN --root ROOT [--device {cpu,cuda}]
                               [--models resnet_preact_20,wrn_28_10]
                               [--precisions float32,mixed] [--steps N]
                               [--batch B] [--repeats R] [--threads T]

Rows: each model x precision. Both sides train the network of the reference's
configs/cifar/<model>.yaml (ResNet-preact-20: model.resnet_preact.depth 20;
WRN-28-10: the config as it is) on CIFAR-10 geometry (3x32x32, 10 classes)
for one epoch of N steps of batch B (default 128) over the same synthetic
uint8 images (seeded noise written as CIFAR-10's binary batches, so imgclf
reads them with its CIFAR-10 loader): random crop (pad 4, zeros) + horizontal
flip on the batch, normalisation, forward, cross-entropy, backward, SGD
(momentum 0.9, Nesterov, weight decay 5e-4, constant rate 0.1), and the
per-step loss / top-1 / top-5 meters. The number is images of the epoch /
epoch wall time (data preparation included), for both sides.

* imgclf: `BIN train --config configs/cifar/<model>.yaml ...` (its own
  defaults: channels_last and the device-resident dataset where they pay, cuDNN
  benchmark as the reference sets it); the `mixed` rows add
  `train.precision O1` (float16 on CUDA, bfloat16 on the CPU). The rate is
  `images_per_sec` of the last train record of metrics.jsonl.
* PyTorch's best eager recipe, in a fresh worker process (this file with
  --worker): the dataset as one uint8 tensor on the device, augmentation on the
  device, torch.optim.SGD(fused=True), zero_grad(set_to_none=True),
  cudnn.benchmark on CUDA; `mixed` is torch.autocast (float16 + GradScaler on
  CUDA; bfloat16, no scaler, on the CPU). channels_last: always on CUDA; on the
  CPU both layouts run and the faster counts ("channels_last where faster").

Sides alternate (imgclf, torch, imgclf, torch, ...) R times; the best of each
is reported. A row whose imgclf command is refused (e.g. a `train.precision`
this imgclf does not have yet) is reported as pending with imgclf's message.

Prints a markdown table and writes JSON to ROOT/target/bench/step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench import cpu_model, pin, usable_cores, version_of  # noqa: E402

MODELS = {
    "resnet_preact_20": ("configs/cifar/resnet_preact.yaml",
                         ["model.resnet_preact.depth", "20"]),
    "wrn_28_10": ("configs/cifar/wrn.yaml", []),
}
# Default steps per (device, model): enough for a stable rate, few enough for the CPU.
DEFAULT_STEPS = {
    ("cuda", "resnet_preact_20"): 200,
    ("cuda", "wrn_28_10"): 50,
    ("cpu", "resnet_preact_20"): 20,
    ("cpu", "wrn_28_10"): 2,
}
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
LR = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
PAD = 4
# imgclf overrides shared by every row: the optimizer and schedule the PyTorch side mirrors.
COMMON = ["train.optimizer", "sgd", "train.base_lr", str(LR), "train.momentum", str(MOMENTUM),
          "train.nesterov", "True", "train.weight_decay", str(WEIGHT_DECAY),
          "train.no_weight_decay_on_bn", "False", "scheduler.type", "constant",
          "scheduler.warmup.type", "none", "train.subdivision", "1",
          "train.gradient_clip", "0.0", "train.use_test_as_val", "True",
          "augmentation.use_random_crop", "True", "augmentation.random_crop.padding", str(PAD),
          "augmentation.use_random_horizontal_flip", "True"]
# The mixed-precision rows: apex's O1 (autocast), float16 on CUDA, bfloat16 on the CPU.
MIXED = {"cuda": ["train.precision", "O1"],
         "cpu": ["train.precision", "O1", "train.precision_dtype", "bfloat16"]}


# --------------------------------------------------------------------------
# data: seeded noise as CIFAR-10 binary batches
# --------------------------------------------------------------------------


def make_cifar(dst: str, n_train: int, n_test: int) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    d = os.path.join(dst, "cifar-10-batches-bin")
    os.makedirs(d, exist_ok=True)

    def write(name: str, n: int) -> None:
        rec = np.empty((n, 1 + 3072), dtype=np.uint8)
        rec[:, 0] = rng.integers(0, 10, n, dtype=np.uint8)
        rec[:, 1:] = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        rec.tofile(os.path.join(d, name))

    per = [n_train // 5 + (1 if i < n_train % 5 else 0) for i in range(5)]
    for i, n in enumerate(per):
        write(f"data_batch_{i + 1}.bin", n)
    write("test_batch.bin", n_test)


def read_cifar_train(dst: str):
    import numpy as np

    d = os.path.join(dst, "cifar-10-batches-bin")
    recs = [np.fromfile(os.path.join(d, f"data_batch_{i}.bin"), dtype=np.uint8).reshape(-1, 3073)
            for i in range(1, 6)]
    rec = np.concatenate(recs)
    return rec[:, 1:].reshape(-1, 3, 32, 32).copy(), rec[:, 0].astype(np.int64)


# --------------------------------------------------------------------------
# PyTorch worker (a fresh process per run)
# --------------------------------------------------------------------------


def worker(a) -> Dict:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, os.path.join(a.root, "tests", "python"))
    from check_reference_models import effective_config, model_of  # noqa: E402

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev = torch.device(a.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    config, overrides = MODELS[a.model]
    model = model_of(effective_config(os.path.join(a.root, config), overrides)).to(dev)
    cl = torch.channels_last if a.channels_last else torch.contiguous_format
    model = model.to(memory_format=cl)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True,
                          weight_decay=WEIGHT_DECAY, fused=True)
    mixed = a.precision == "mixed"
    amp_dtype = torch.float16 if dev.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if mixed and dev.type == "cuda" else None

    import numpy as np
    images, labels = read_cifar_train(a.data)
    images = torch.from_numpy(images).to(dev)  # N,3,32,32 uint8, resident on the device
    labels = torch.from_numpy(labels).to(dev)
    n, c, h, w = images.shape
    b = a.batch
    steps = n // b
    mean = torch.tensor(MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=dev).view(1, 3, 1, 1)
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    ar_c = torch.arange(c, device=dev)
    ar_b = torch.arange(b, device=dev)
    seen = 0
    loss_sum = correct1 = correct5 = 0.0

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    sync()
    t0 = time.perf_counter()
    order = torch.randperm(n, device=dev)
    for step in range(steps):
        idx = order[step * b:(step + 1) * b]
        x = images[idx].float()
        y = labels[idx]
        xp = F.pad(x, (PAD, PAD, PAD, PAD))
        oy = torch.randint(0, 2 * PAD + 1, (b,), device=dev)
        ox = torch.randint(0, 2 * PAD + 1, (b,), device=dev)
        rows = (oy[:, None] + ar_h[None, :])[:, None, :, None]
        cols = (ox[:, None] + ar_w[None, :])[:, None, None, :]
        x = xp[ar_b[:, None, None, None], ar_c[None, :, None, None], rows, cols]
        flip = torch.rand(b, device=dev) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        x = ((x / 255.0 - mean) / std).contiguous(memory_format=cl)
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=mixed):
            out = model(x)
            loss = F.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        with torch.no_grad():
            top5 = out.float().topk(5, dim=1).indices
            hit = top5.eq(y[:, None])
            correct1 += float(hit[:, 0].sum())
            correct5 += float(hit.any(dim=1).sum())
            loss_sum += float(loss) * b
        seen += b
    sync()
    secs = time.perf_counter() - t0
    return {"images_per_sec": seen / secs, "elapsed_s": secs, "steps": steps,
            "loss": loss_sum / seen, "acc1": correct1 / seen,
            "channels_last": a.channels_last, "amp_dtype": str(amp_dtype) if mixed else None,
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None}


# --------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------


def imgclf_cmd(a, model: str, precision: str, data: str, out: str) -> List[str]:
    config, overrides = MODELS[model]
    cmd = [a.imgclf, "train", "--config", config, "dataset.name", "CIFAR10",
           "dataset.dataset_dir", data, "train.output_dir", out,
           "train.val_period", "0", "train.log_period", "1000000", "scheduler.epochs", "1",
           "train.batch_size", str(a.batch), "device", a.device] + overrides + COMMON
    if precision == "mixed":
        cmd += MIXED[a.device]
    return cmd


def imgclf_run(a, cmd: List[str], out: str, log: str, prefix: List[str], steps: int) -> Dict:
    if os.path.exists(out):
        shutil.rmtree(out)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(prefix + cmd, cwd=a.root, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        with open(log) as f:
            raise SystemExit(f"bench: imgclf failed ({p.returncode}): {' '.join(cmd)}\n"
                             f"{f.read()[-3000:]}")
    recs = []
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            line = line.strip()
            if line:
                r = json.loads(line)
                if r.get("split") == "train" and "images_per_sec" in r:
                    recs.append(r)
    if not recs:
        raise SystemExit(f"bench: no train record in {out}/metrics.jsonl")
    last = recs[-1]
    if int(last["step"]) != steps:
        raise SystemExit(f"bench: imgclf ran {last['step']} steps, expected {steps}")
    return {"images_per_sec": float(last["images_per_sec"]), "loss": last.get("loss"),
            "process_wall_s": wall}


def refused(a, cmd: List[str], out: str) -> Optional[str]:
    """imgclf's message when it refuses the row's command (checked with --dry-run)."""
    p = subprocess.run(cmd[:2] + ["--dry-run"] + cmd[2:], cwd=a.root, capture_output=True,
                       text=True)
    if p.returncode == 0:
        return None
    lines = [l for l in (p.stderr or p.stdout).strip().splitlines() if l.strip()]
    return lines[-1] if lines else f"exit {p.returncode}"


def torch_run(a, model: str, precision: str, data: str, channels_last: bool, log: str,
              prefix: List[str]) -> Dict:
    cmd = prefix + [sys.executable, os.path.abspath(__file__), "--worker",
                    "--root", a.root, "--data", data, "--batch", str(a.batch),
                    "--threads", str(a.threads), "--device", a.device, "--model", model,
                    "--precision", precision] + (["--channels-last"] if channels_last else [])
    with open(log, "w") as f:
        p = subprocess.run(cmd, cwd=a.root, stdout=subprocess.PIPE, stderr=f, text=True)
    if p.returncode != 0:
        with open(log) as f:
            raise SystemExit(f"bench: torch worker failed ({p.returncode})\n{f.read()[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def driver(a) -> int:
    import torch

    a.root = os.path.abspath(a.root)
    a.imgclf = os.path.abspath(a.imgclf)
    gpu = None
    if a.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("bench: --device cuda but torch.cuda.is_available() is False")
        gpu = torch.cuda.get_device_name()
    cores = usable_cores()
    a.threads = a.threads or cores
    prefix = pin(a.threads)
    models = [m for m in a.models.split(",") if m]
    precisions = [p for p in a.precisions.split(",") if p]
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"bench: unknown model {m!r}; known: {', '.join(MODELS)}")
    for p in precisions:
        if p not in ("float32", "mixed"):
            raise SystemExit(f"bench: unknown precision {p!r}; known: float32, mixed")
    layouts = [True] if a.device == "cuda" else [False, True]
    bench_dir = os.path.join(a.root, "target", "bench")
    os.makedirs(bench_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="step-", dir=bench_dir)
    rows = []
    print(f"bench: {a.device}{f' ({gpu})' if gpu else ''}, batch {a.batch}, {a.threads} threads, "
          f"{a.repeats} alternating run(s) per side", flush=True)
    for model in models:
        steps = a.steps or DEFAULT_STEPS[(a.device, model)]
        data = os.path.join(work, f"data-{model}")
        make_cifar(data, a.batch * steps, 10)
        for precision in precisions:
            out = os.path.join(work, f"{model}-{precision}")
            cmd = imgclf_cmd(a, model, precision, data, out)
            why = refused(a, cmd, out)
            row = {"model": model, "precision": precision, "steps": steps, "imgclf": [],
                   "torch": [], "pending": why}
            for r in range(a.repeats):
                if why is None:
                    res = imgclf_run(a, cmd, out, out + f"-{r}.log", prefix, steps)
                    row["imgclf"].append(res)
                    print(f"  {model} {precision} imgclf run {r + 1}: "
                          f"{res['images_per_sec']:.1f} img/s", flush=True)
                for cl in layouts:
                    res = torch_run(a, model, precision, data, cl,
                                    out + f"-torch-{r}-{int(cl)}.log", prefix)
                    row["torch"].append(res)
                    print(f"  {model} {precision} torch (channels_last {cl}) run {r + 1}: "
                          f"{res['images_per_sec']:.1f} img/s", flush=True)
            best_t = max(row["torch"], key=lambda x: x["images_per_sec"])
            row["torch_best"] = best_t["images_per_sec"]
            row["torch_recipe"] = (("channels_last" if best_t["channels_last"] else "NCHW")
                                   + (f", autocast {best_t['amp_dtype']}" if best_t["amp_dtype"]
                                      else ""))
            if row["imgclf"]:
                row["imgclf_best"] = max(x["images_per_sec"] for x in row["imgclf"])
                row["ratio"] = row["imgclf_best"] / row["torch_best"]
            rows.append(row)
    result = {"benchmark": "training step, CIFAR-10 geometry, batch %d" % a.batch,
              "device": a.device, "cpu": cpu_model(), "gpu": gpu, "cores": cores,
              "threads": a.threads, "torch": torch.__version__,
              "imgclf": version_of(a.imgclf), "rows": rows,
              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "platform": platform.platform()}
    path = os.path.join(bench_dir, "step.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print()
    where = f"GPU: {gpu}" if gpu else f"CPU: {cpu_model()} ({cores} usable cores)"
    print(f"{where}; threads {a.threads}; batch {a.batch}; torch {torch.__version__}")
    print()
    print("| model | precision | steps | imgclf img/s | PyTorch best eager img/s (recipe) | ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        mine = f"{r['imgclf_best']:,.1f}" if "imgclf_best" in r else f"pending: {r['pending']}"
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else "-"
        print(f"| {r['model']} | {r['precision']} | {r['steps']} | {mine} | "
              f"{r['torch_best']:,.1f} ({r['torch_recipe']}) | {ratio} |")
    print(f"\nwrote {path}")
    if a.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--imgclf", help="imgclf binary")
    p.add_argument("--root", default=os.path.dirname(os.path.dirname(HERE)))
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--precisions", default="float32,mixed")
    p.add_argument("--steps", type=int, default=0,
                   help="steps per run (default: per device and model, see DEFAULT_STEPS)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="default: the usable cores")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    # internal: the PyTorch worker
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--precision", help=argparse.SUPPRESS)
    p.add_argument("--channels-last", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        a.root = os.path.abspath(a.root)
        print(json.dumps(worker(a)), flush=True)
        return 0
    if not a.imgclf:
        p.error("--imgclf is required")
    if a.batch < 1 or a.repeats < 1 or a.steps < 0:
        p.error("--batch and --repeats must be >= 1, --steps >= 0")
    return driver(a)


if __name__ == "__main__":
    sys.exit(main())
