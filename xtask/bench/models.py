"""Per-architecture throughput: imgclf against PyTorch eager, same machine, same run.

Called by `cargo xtask bench models` as

    python xtask/bench/models.py --imgclf BIN --root ROOT [--device {cpu,cuda}]
                                 [--size {small,paper}] [--batch B] [--steps N]
                                 [--warmup W] [--repeats R] [--models a,b,...]

For every architecture of the reference (vgg, resnet, resnet_preact, wrn,
densenet, pyramidnet, resnext, shake_shake, se_resnet_preact), both sides
build the network of the same config (the reference's configs/cifar/*.yaml,
with overrides for the `small` size so the CPU finishes in minutes; `paper`
keeps the reference's sizes) on CIFAR-10 geometry (3x32x32, 10 classes) and
time, on one fixed random batch of B images:

* train: zero the gradients (in place), forward in training mode,
  cross-entropy, backward;
* eval: forward in eval mode without autograd;

W untimed steps, then N timed steps (CUDA synchronised before reading the
clock). imgclf runs `BIN throughput ... --json`; PyTorch runs in a fresh
worker process (this file with --worker) that builds the model with
tests/python/reference_models.py (the test suite's independent PyTorch
re-implementation of hysts/pytorch_image_classification's models/cifar/, with
the reference's custom autograd function for Shake-Shake) and uses the same
number of threads. Sides alternate (imgclf, torch, imgclf, torch, ...) R times;
the best of each is reported.

Prints a markdown table and writes JSON to ROOT/target/bench/models.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench import cpu_model  # noqa: E402

# (model, config file, overrides) per size. `small` keeps each architecture's
# distinctive structure at a size a 2-core CPU trains in seconds per step.
ARCHITECTURES = {
    "paper": [
        ("vgg", "configs/cifar/vgg.yaml", []),
        ("resnet", "configs/cifar/resnet.yaml", []),
        ("resnet_preact", "configs/cifar/resnet_preact.yaml", []),
        ("wrn", "configs/cifar/wrn.yaml", []),
        ("densenet", "configs/cifar/densenet.yaml", []),
        ("pyramidnet", "configs/cifar/pyramidnet.yaml", []),
        ("resnext", "configs/cifar/resnext.yaml", []),
        ("shake_shake", "configs/cifar/shake_shake.yaml", []),
        ("se_resnet_preact", "configs/cifar/se_resnet_preact.yaml", []),
    ],
    "small": [
        ("vgg", "configs/cifar/vgg.yaml",
         ["model.vgg.n_channels", "[32, 64, 128, 256, 256]"]),
        ("resnet", "configs/cifar/resnet.yaml", ["model.resnet.depth", "20"]),
        ("resnet_preact", "configs/cifar/resnet_preact.yaml",
         ["model.resnet_preact.depth", "20"]),
        ("wrn", "configs/cifar/wrn.yaml",
         ["model.wrn.depth", "16", "model.wrn.widening_factor", "2"]),
        ("densenet", "configs/cifar/densenet.yaml",
         ["model.densenet.depth", "40"]),
        ("pyramidnet", "configs/cifar/pyramidnet.yaml",
         ["model.pyramidnet.depth", "20", "model.pyramidnet.block_type",
          "basic", "model.pyramidnet.alpha", "48"]),
        ("resnext", "configs/cifar/resnext.yaml",
         ["model.resnext.depth", "11", "model.resnext.initial_channels", "32",
          "model.resnext.cardinality", "4", "model.resnext.base_channels",
          "8"]),
        ("shake_shake", "configs/cifar/shake_shake.yaml",
         ["model.shake_shake.depth", "14",
          "model.shake_shake.initial_channels", "32"]),
        ("se_resnet_preact", "configs/cifar/se_resnet_preact.yaml",
         ["model.se_resnet_preact.depth", "20"]),
    ],
}


# --------------------------------------------------------------------------
# PyTorch worker
# --------------------------------------------------------------------------


def worker(args) -> None:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, os.path.join(args.root, "tests", "python"))
    from check_reference_models import effective_config, model_of

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    overrides = json.loads(args.overrides)
    cfg = effective_config(os.path.join(args.root, args.config), overrides)
    torch.manual_seed(0)
    model = model_of(cfg).to(device)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    x = torch.randn(args.batch, cfg["n_channels"], cfg["image_size"],
                    cfg["image_size"], device=device)
    y = torch.randint(0, cfg["n_classes"], (args.batch,), device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def rate(step) -> float:
        for _ in range(args.warmup):
            step()
        sync()
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        return args.batch * args.steps / (time.perf_counter() - t)

    def train_step():
        model.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()

    model.train()
    train = rate(train_step)
    model.eval()
    with torch.no_grad():
        evaluate = rate(lambda: model(x))
    print(json.dumps({"parameters": params, "train_images_per_sec": train,
                      "eval_images_per_sec": evaluate,
                      "threads": torch.get_num_threads()}))


# --------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------


def run_json(cmd, env=None) -> dict:
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n"
                           f"{p.stdout}\n{p.stderr}")
    # imgclf prints pretty JSON; the worker one line: take from the first '{'.
    return json.loads(p.stdout[p.stdout.index("{"):])


def imgclf_side(args, model, config, overrides) -> dict:
    cmd = [args.imgclf, "throughput", "--config",
           os.path.join(args.root, config), "--batch-size", str(args.batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--json", *overrides, "device", args.device]
    return run_json(cmd)


def torch_side(args, model, config, overrides) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker",
           "--root", args.root, "--config", config, "--overrides",
           json.dumps(overrides), "--device", args.device, "--batch",
           str(args.batch), "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--threads", str(args.threads)]
    return run_json(cmd)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--imgclf")
    p.add_argument("--root", required=True)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--size", choices=["small", "paper"])
    p.add_argument("--batch", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--models", help="comma-separated subset")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--overrides", help=argparse.SUPPRESS)
    args = p.parse_args()
    gpu = args.device == "cuda"
    args.size = args.size or ("paper" if gpu else "small")
    args.batch = args.batch or (128 if gpu else 32)
    args.steps = args.steps or (30 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    if args.worker:
        worker(args)
        return 0

    chosen = args.models.split(",") if args.models else None
    rows, results = [], []
    for model, config, overrides in ARCHITECTURES[args.size]:
        if chosen and model not in chosen:
            continue
        best = {"imgclf": None, "torch": None}
        for _ in range(args.repeats):
            for side, fn in (("imgclf", imgclf_side), ("torch", torch_side)):
                r = fn(args, model, config, overrides)
                b = best[side]
                if b is None:
                    best[side] = r
                else:
                    for k in ("train_images_per_sec", "eval_images_per_sec"):
                        b[k] = max(b[k], r[k])
        a, t = best["imgclf"], best["torch"]
        if a["parameters"] != t["parameters"]:
            raise RuntimeError(f"{model}: imgclf has {a['parameters']} "
                               f"parameters, PyTorch {t['parameters']}")
        tr = a["train_images_per_sec"] / t["train_images_per_sec"]
        ev = a["eval_images_per_sec"] / t["eval_images_per_sec"]
        results.append({"model": model, "config": config,
                        "overrides": overrides, "summary": a["summary"],
                        "parameters": a["parameters"], "imgclf": a,
                        "torch": t, "train_ratio": tr, "eval_ratio": ev})
        rows.append(f"| {a['summary'].split(' (')[0]} | {a['parameters']:,} | "
                    f"{a['train_images_per_sec']:.1f} | "
                    f"{t['train_images_per_sec']:.1f} | {tr:.2f} | "
                    f"{a['eval_images_per_sec']:.1f} | "
                    f"{t['eval_images_per_sec']:.1f} | {ev:.2f} |")
        print(rows[-1], flush=True)
    if gpu:
        import torch
        where = torch.cuda.get_device_name()
    else:
        where = f"{cpu_model()}, {args.threads} threads"
    head = (f"Per-architecture throughput on {where} ({args.size} sizes, "
            f"batch {args.batch}, {args.steps} timed steps after "
            f"{args.warmup}, best of {args.repeats}; images/s)\n\n"
            "| model | parameters | imgclf train | PyTorch train | ratio | "
            "imgclf eval | PyTorch eval | ratio |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|")
    print()
    print(head)
    print("\n".join(rows))
    out = os.path.join(args.root, "target", "bench")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "models.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"device": where, "size": args.size, "batch": args.batch,
                   "steps": args.steps, "warmup": args.warmup,
                   "repeats": args.repeats, "results": results}, f, indent=2)
    os.replace(tmp, path)
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
