"""Data-parallel benchmark: imgclf on 1 and 2 ranks against PyTorch DDP under torchrun.

Called by `cargo xtask bench dist` as

    python xtask/bench/dist.py --imgclf BIN --root ROOT [--steps N] [--batch B]
                               [--depth D] [--device {cpu,cuda}]

Both sides train ResNet-preact-D (default 20) on real Fashion-MNIST with B images per rank
per step (the reference's train.batch_size semantics), no random crop or flip, SGD (momentum
0.9, Nesterov, weight decay 5e-4), backend Gloo on CPU (NCCL with --device cuda):

* imgclf: `BIN train ...` (1 rank: a plain single process) and `BIN train --nproc-per-node 2
  ...` (its own launcher; c10d Gloo, gradient all-reduce in 25 MB buckets);
* PyTorch: this file as the worker of `torchrun --nproc_per_node W` (W = 1, 2) with
  torch.distributed (gloo) and DistributedDataParallel, each rank taking its slice of the
  global batch, as imgclf does.

Every rank gets OMP_NUM_THREADS = cores / W on both sides (torchrun's and imgclf's launcher
both share the cores). The number is global images per second over the steps after the first
3 (warm-up): for imgclf from the elapsed_s of the train records in metrics.jsonl, for PyTorch
timed by rank 0 after a barrier. Scaling efficiency = images/s at 2 ranks / (2 x images/s at
1 rank). Prints a markdown table and writes JSON to ROOT/target/bench/dist.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import cpu_model, make_dataset, usable_cores  # noqa: E402

CONFIG = "configs/fashion_mnist/resnet_preact.yaml"
WARMUP = 3
FASHION = "/usr/share/datasets/fashion-mnist"


def worker(a) -> None:
    """One rank of the PyTorch side (run by torchrun)."""
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    sys.path.insert(0, os.path.join(a.root, "tests", "python"))
    from reference_models import ResNetPreact, read_idx  # noqa: E402

    dev = torch.device(a.device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    images = read_idx(os.path.join(a.data, "train-images-idx3-ubyte"))
    labels = read_idx(os.path.join(a.data, "train-labels-idx1-ubyte"))
    images = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)
    labels = torch.from_numpy(labels.astype(np.int64))
    model = ResNetPreact(depth=a.depth, n_channels=1, image_size=28, n_classes=10).to(dev)
    model = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    b = a.batch
    steps = len(images) // (b * world)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    t0 = None
    for step in range(steps):
        if step == WARMUP:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            dist.barrier()
            t0 = time.perf_counter()
        start = step * b * world + rank * b
        idx = order[start:start + b]
        x = ((images[idx].to(dev).float() / 255.0) - 0.2860) / 0.3530
        y = labels[idx].to(dev)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    dist.barrier()
    secs = time.perf_counter() - t0
    if rank == 0:
        print(json.dumps({"images_per_sec": (steps - WARMUP) * b * world / secs,
                          "steps": steps, "threads": torch.get_num_threads()}))
    dist.destroy_process_group()


def env_for(world: int) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(max(1, usable_cores() // world))
    return env


def imgclf_run(a, data: str, out: str, world: int) -> dict:
    if os.path.exists(out):
        shutil.rmtree(out)
    cmd = [a.imgclf, "train"]
    if world > 1:
        cmd += ["--nproc-per-node", str(world)]
    cmd += ["--config", CONFIG, "dataset.dataset_dir", data, "train.output_dir", out,
            "model.resnet_preact.depth", str(a.depth),
            "augmentation.use_random_crop", "False",
            "augmentation.use_random_horizontal_flip", "False",
            "train.val_period", "0", "train.log_period", "1", "scheduler.epochs", "1",
            "train.batch_size", str(a.batch)]
    if world > 1:
        cmd += ["train.dist.backend", "nccl" if a.device == "cuda" else "gloo"]
    if a.device == "cuda":
        cmd += ["device", "cuda"]
    log = out + ".log"
    with open(log, "w") as f:
        p = subprocess.run(cmd, cwd=a.root, stdout=f, stderr=subprocess.STDOUT,
                           env=env_for(world))
    if p.returncode != 0:
        with open(log) as f:
            raise SystemExit(f"bench dist: imgclf failed ({p.returncode})\n{f.read()[-3000:]}")
    recs = []
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r.get("split") == "train" and "elapsed_s" in r and "step" in r:
                recs.append(r)
    steps = {int(r["step"]): float(r["elapsed_s"]) for r in recs}
    last = max(steps)
    if WARMUP not in steps:
        raise SystemExit(f"bench dist: no record of step {WARMUP} in {out}/metrics.jsonl")
    secs = steps[last] - steps[WARMUP]
    return {"images_per_sec": (last - WARMUP) * a.batch * world / secs, "steps": last}


def torch_run(a, data: str, world: int) -> dict:
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nproc_per_node", str(world), "--master_port", str(29400 + world),
           os.path.abspath(__file__), "--worker", "--root", a.root, "--data", data,
           "--batch", str(a.batch), "--depth", str(a.depth), "--device", a.device]
    p = subprocess.run(cmd, cwd=a.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, env=env_for(world))
    if p.returncode != 0:
        raise SystemExit(f"bench dist: torchrun failed ({p.returncode})\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--imgclf")
    ap.add_argument("--root", required=True)
    ap.add_argument("--steps", type=int, default=30, help="global steps of the 2-rank run")
    ap.add_argument("--batch", type=int, default=64, help="images per rank per step")
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--data")
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return
    work = os.path.join(a.root, "target", "bench", "dist")
    os.makedirs(work, exist_ok=True)
    data = os.path.join(work, "data")
    n = a.steps * a.batch * 2
    make_dataset(FASHION, data, n, 64)
    results = {"cpu": cpu_model(), "cores": usable_cores(), "batch_per_rank": a.batch,
               "depth": a.depth, "device": a.device, "images": n,
               "backend": "nccl" if a.device == "cuda" else "gloo", "runs": {}}
    for world in (1, 2):
        ours = imgclf_run(a, data, os.path.join(work, f"imgclf{world}"), world)
        theirs = torch_run(a, data, world)
        results["runs"][str(world)] = {"imgclf": ours, "pytorch_ddp": theirs}
        print(f"bench dist: {world} rank(s): imgclf {ours['images_per_sec']:.1f}, "
              f"PyTorch DDP {theirs['images_per_sec']:.1f} images/s", file=sys.stderr)
    r = results["runs"]
    eff = {side: r["2"][side]["images_per_sec"] / (2 * r["1"][side]["images_per_sec"])
           for side in ("imgclf", "pytorch_ddp")}
    results["scaling_efficiency"] = eff
    with open(os.path.join(a.root, "target", "bench", "dist.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nResNet-preact-{a.depth}, Fashion-MNIST, batch {a.batch} per rank, "
          f"{results['backend']}, {results['cpu']} ({results['cores']} cores)\n")
    print("| ranks | imgclf images/s | PyTorch DDP images/s | imgclf / PyTorch |")
    print("|---|---|---|---|")
    for world in ("1", "2"):
        i, t = r[world]["imgclf"]["images_per_sec"], r[world]["pytorch_ddp"]["images_per_sec"]
        print(f"| {world} | {i:.1f} | {t:.1f} | {i / t:.2f} |")
    print(f"| scaling efficiency (2 ranks) | {eff['imgclf']:.2f} | {eff['pytorch_ddp']:.2f} | |")


if __name__ == "__main__":
    main()
