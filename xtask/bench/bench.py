"""Training-throughput benchmark: imgclf against PyTorch eager, same machine, same run.

Called by `cargo xtask bench` as

    python xtask/bench/bench.py --imgclf BIN --root ROOT [--steps N] [--batch B]
                                [--threads T] [--repeats R] [--eval]
                                [--device {cpu,cuda}]

Both sides train ResNet-preact-20 on the first B*N real Fashion-MNIST training
images (1x28x28, 10 classes) for one epoch of N steps with batch B:
uint8 batch -> float -> random crop (pad 4, zeros) + horizontal flip (p=0.5)
on the batch -> (x/255 - 0.2860)/0.3530 -> forward -> cross-entropy ->
backward -> SGD (momentum 0.9, nesterov, weight decay 5e-4) with the cosine
learning rate set every iteration, plus the per-step loss/top-1/top-5 meters.

* imgclf: `BIN train --config configs/fashion_mnist/resnet_preact.yaml ...
  train.val_period 0 train.log_period 1000000 scheduler.epochs 1
  train.batch_size B`; the number is `images_per_sec` of the last train
  record of metrics.jsonl (images of the epoch / epoch wall time, data
  preparation included).
* PyTorch: this file run as a fresh worker process (`--worker torch-train`)
  with torch.set_num_threads(T), timing the whole epoch the same way.

The sides run alternately (imgclf, torch, imgclf, torch, ...) and the best
of each is reported. imgclf always uses all the cores it may run on, so with
--threads T below the core count both sides are pinned (taskset /
sched_setaffinity) to the first T cores. With --eval, eval-mode forward
throughput is compared too: `imgclf evaluate` over the test split (timed
as the whole process, and as the marginal rate against a tiny test split to
remove start-up cost) against a no_grad forward loop in PyTorch.

With --device cuda (default cpu) imgclf gets the override `device cuda`
(the config says `device: cpu`; imgclf enables cudnn benchmark by default)
and the PyTorch worker moves the model and each uint8 batch to the GPU, does
the same batched augmentation there, sets torch.backends.cudnn.benchmark =
True, and calls torch.cuda.synchronize() before reading the clock. The GPU
name (torch.cuda.get_device_name()) is recorded in the results and table.

Prints a markdown table and writes JSON to ROOT/target/bench/results.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))

MEAN = 0.2860
STD = 0.3530
CONFIG = "configs/fashion_mnist/resnet_preact.yaml"
BASE_LR = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
LR_MIN_FACTOR = 0.0
PAD = 4


# --------------------------------------------------------------------------
# helpers shared by driver and workers
# --------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def find_idx(d: str, stem: str) -> str:
    for name in (stem, stem + ".gz"):
        p = os.path.join(d, name)
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"neither {stem} nor {stem}.gz in {d}")


def read_idx_raw(path: str) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


def write_idx_subset(src: str, dst: str, n: int) -> int:
    """Write the first n records of IDX file src to dst (plain); returns n used."""
    raw = read_idx_raw(src)
    ndim = raw[3]
    dims = list(struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim]))
    per = 1
    for d in dims[1:]:
        per *= d
    size = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}[raw[2]]
    n = min(n, dims[0])
    dims[0] = n
    start = 4 + 4 * ndim
    with open(dst, "wb") as f:
        f.write(raw[:4])
        f.write(struct.pack(f">{ndim}I", *dims))
        f.write(raw[start:start + n * per * size])
    return n


def make_dataset(src: str, dst: str, n_train: int, n_test: int) -> None:
    os.makedirs(dst, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind, tail in (("images", "idx3-ubyte"), ("labels", "idx1-ubyte")):
            stem = f"{prefix}-{kind}-{tail}"
            got = write_idx_subset(find_idx(src, stem), os.path.join(dst, stem), n)
            if got < n:
                raise SystemExit(f"bench: {src} has only {got} {prefix} images, need {n}")


def pin(threads: int) -> List[str]:
    """taskset prefix (and own affinity) restricting to the first `threads` cores."""
    cores = sorted(os.sched_getaffinity(0))
    if threads >= len(cores):
        return []
    chosen = cores[:threads]
    if shutil.which("taskset") is None:
        raise SystemExit("bench: --threads below the core count needs `taskset` to restrict imgclf")
    return ["taskset", "-c", ",".join(str(c) for c in chosen)]


# --------------------------------------------------------------------------
# PyTorch workers (run as fresh processes)
# --------------------------------------------------------------------------


def _load_split(torch, root: str, d: str, prefix: str):
    import numpy as np

    sys.path.insert(0, os.path.join(root, "tests", "python"))
    from reference_models import read_idx  # noqa: E402

    images = read_idx(find_idx(d, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(find_idx(d, f"{prefix}-labels-idx1-ubyte"))
    images = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)  # N,1,H,W uint8
    labels = torch.from_numpy(labels.astype(np.int64))
    return images, labels


def _model(torch, root: str):
    sys.path.insert(0, os.path.join(root, "tests", "python"))
    from reference_models import ResNetPreact  # noqa: E402

    return ResNetPreact(depth=20, n_channels=1, image_size=28, n_classes=10)


def _torch_device(torch, name: str):
    if name == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("bench: --device cuda but torch.cuda.is_available() is False")
        torch.backends.cudnn.benchmark = True
    return torch.device(name)


def _sync(torch, dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _gpu_name(torch, dev) -> Optional[str]:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else None


def worker_torch_train(a) -> Dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev = _torch_device(torch, a.device)
    images, labels = _load_split(torch, a.root, a.data, "train")
    n, c, h, w = images.shape
    b = a.batch
    steps = n // b  # drop_last
    model = _model(torch, a.root).to(dev)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=BASE_LR, momentum=MOMENTUM,
                          nesterov=True, weight_decay=WEIGHT_DECAY)
    total_steps = steps  # one epoch

    def lr_at(step: int) -> float:
        return BASE_LR * (LR_MIN_FACTOR + (1 - LR_MIN_FACTOR) * 0.5 *
                          (1 + math.cos(step / total_steps * math.pi)))

    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    ar_c = torch.arange(c, device=dev)
    ar_b = torch.arange(b, device=dev)
    seen = 0.0
    loss_sum = correct1 = correct5 = 0.0

    _sync(torch, dev)
    t0 = time.perf_counter()
    order = torch.randperm(n)
    for step in range(steps):
        idx = order[step * b:(step + 1) * b]
        x = images[idx].to(dev).float()  # B,C,H,W (uint8 copied, then float on dev)
        y = labels[idx].to(dev)
        # random crop, pad 4 with zeros, one offset per image
        xp = F.pad(x, (PAD, PAD, PAD, PAD))
        oy = torch.randint(0, 2 * PAD + 1, (b,), device=dev)
        ox = torch.randint(0, 2 * PAD + 1, (b,), device=dev)
        rows = (oy[:, None] + ar_h[None, :])[:, None, :, None]
        cols = (ox[:, None] + ar_w[None, :])[:, None, None, :]
        x = xp[ar_b[:, None, None, None], ar_c[None, :, None, None], rows, cols]
        # horizontal flip with p = 0.5
        flip = torch.rand(b, device=dev) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        x = (x / 255.0 - MEAN) / STD

        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

        with torch.no_grad():
            top5 = out.topk(5, dim=1).indices
            hit = top5.eq(y[:, None])
            correct1 += float(hit[:, 0].sum())
            correct5 += float(hit.any(dim=1).sum())
            loss_sum += float(loss) * b
        seen += b
    _sync(torch, dev)
    secs = time.perf_counter() - t0
    return {
        "images_per_sec": seen / secs,
        "elapsed_s": secs,
        "steps": steps,
        "images": int(seen),
        "loss": loss_sum / seen,
        "acc1": correct1 / seen,
        "acc5": correct5 / seen,
        "threads": torch.get_num_threads(),
        "device": a.device,
        "gpu": _gpu_name(torch, dev),
    }


def worker_torch_eval(a) -> Dict:
    import torch

    torch.set_num_threads(a.threads)
    dev = _torch_device(torch, a.device)
    images, _labels = _load_split(torch, a.root, a.data, "t10k")
    model = _model(torch, a.root)
    if a.weights:
        sys.path.insert(0, os.path.join(a.root, "tests", "python"))
        from reference_models import load_safetensors  # noqa: E402

        model.load_state_dict(load_safetensors(a.weights), strict=True)
    model = model.to(dev)
    model.eval()
    n = images.shape[0]
    b = a.batch
    _sync(torch, dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, n, b):
            x = (images[i:i + b].to(dev).float() / 255.0 - MEAN) / STD
            out = model(x)
            out.softmax(dim=1)
            out.argmax(dim=1)
    _sync(torch, dev)
    secs = time.perf_counter() - t0
    return {"images_per_sec": n / secs, "elapsed_s": secs, "images": n,
            "threads": torch.get_num_threads(), "device": a.device,
            "gpu": _gpu_name(torch, dev)}


# --------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------


def run_checked(cmd: List[str], cwd: str, log: str, env=None) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env)
    secs = time.perf_counter() - t0
    if p.returncode != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"bench: command failed ({p.returncode}): {' '.join(cmd)}\n{tail}")
    return secs


def run_worker(kind: str, a, data: str, log: str, prefix: List[str], weights: str = "") -> Dict:
    cmd = prefix + [sys.executable, os.path.abspath(__file__), "--worker", kind,
                    "--root", a.root, "--data", data, "--batch", str(a.batch),
                    "--threads", str(a.threads), "--device", a.device]
    if weights:
        cmd += ["--weights", weights]
    with open(log, "w") as f:
        p = subprocess.run(cmd, cwd=a.root, stdout=subprocess.PIPE, stderr=f, text=True)
    if p.returncode != 0:
        with open(log) as f:
            raise SystemExit(f"bench: torch worker failed ({p.returncode})\n{f.read()[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def device_override(a) -> List[str]:
    # the config says `device: cpu`; on cpu leave the command exactly as before
    return ["device", "cuda"] if a.device == "cuda" else []


def imgclf_train(a, data: str, out: str, log: str, prefix: List[str]) -> Dict:
    if os.path.exists(out):
        shutil.rmtree(out)
    cmd = prefix + [a.imgclf, "train", "--config", CONFIG,
                    "dataset.dataset_dir", data, "train.output_dir", out,
                    "train.val_period", "0", "train.log_period", "1000000",
                    "scheduler.epochs", "1", "train.batch_size", str(a.batch)]
    cmd += device_override(a)
    wall = run_checked(cmd, a.root, log)
    recs = []
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            line = line.strip()
            if line:
                r = json.loads(line)
                if r.get("split") == "train":
                    recs.append(r)
    if not recs:
        raise SystemExit(f"bench: no train record in {out}/metrics.jsonl")
    last = recs[-1]
    if int(last["step"]) != a.steps:
        raise SystemExit(f"bench: imgclf ran {last['step']} steps, expected {a.steps}")
    return {"images_per_sec": float(last["images_per_sec"]), "steps": int(last["step"]),
            "loss": last.get("loss"), "acc1": last.get("acc1"), "acc5": last.get("acc5"),
            "process_wall_s": wall}


def imgclf_eval(a, data: str, ckpt: str, out: str, log: str, prefix: List[str]) -> float:
    cmd = prefix + [a.imgclf, "evaluate", "--config", CONFIG,
                    "dataset.dataset_dir", data, "test.checkpoint", ckpt,
                    "test.output_dir", out, "test.batch_size", str(a.batch)]
    cmd += device_override(a)
    return run_checked(cmd, a.root, log)


def version_of(binary: str) -> str:
    try:
        p = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
        return (p.stdout or p.stderr).strip().splitlines()[0]
    except Exception:  # noqa: BLE001 - informative only
        return "unknown"


def fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:,.1f}"


def driver(a) -> int:
    import torch

    a.root = os.path.abspath(a.root)
    a.imgclf = os.path.abspath(a.imgclf)
    if not os.access(a.imgclf, os.X_OK):
        raise SystemExit(f"bench: {a.imgclf} is not an executable")
    gpu = None
    if a.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("bench: --device cuda but torch.cuda.is_available() is False")
        gpu = torch.cuda.get_device_name()
    cores = usable_cores()
    if a.threads is None:
        a.threads = os.cpu_count() or cores
    if a.threads < 1:
        raise SystemExit("bench: --threads must be >= 1")
    if a.threads > cores:
        print(f"bench: note: --threads {a.threads} > usable cores {cores}; imgclf uses {cores}")
    prefix = pin(a.threads)
    imgclf_threads = min(a.threads, cores) if prefix else cores

    bench_dir = os.path.join(a.root, "target", "bench")
    os.makedirs(bench_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="run-", dir=bench_dir)
    data = os.path.join(work, "data")
    n_test = a.eval_images if a.eval else min(a.batch, 10000)
    make_dataset(a.dataset_src, data, a.batch * a.steps, n_test)

    runs: Dict[str, List[Dict]] = {"imgclf": [], "torch": []}
    print(f"bench: {a.steps} steps x batch {a.batch} = {a.batch * a.steps} images, "
          f"{a.threads} threads, {a.repeats} run(s) each, alternating"
          + (f", device cuda ({gpu})" if gpu else ""), flush=True)
    for r in range(a.repeats):
        out = os.path.join(work, f"imgclf-{r}")
        res = imgclf_train(a, data, out, os.path.join(work, f"imgclf-{r}.log"), prefix)
        runs["imgclf"].append(res)
        print(f"  imgclf run {r + 1}: {res['images_per_sec']:.1f} img/s", flush=True)
        res = run_worker("torch-train", a, data, os.path.join(work, f"torch-{r}.log"), prefix)
        runs["torch"].append(res)
        print(f"  torch  run {r + 1}: {res['images_per_sec']:.1f} img/s", flush=True)
    best = {k: max(x["images_per_sec"] for x in v) for k, v in runs.items()}
    ratio = best["imgclf"] / best["torch"]

    evaluation = None
    if a.eval:
        ckpt = os.path.join(work, "imgclf-0", "model_final.safetensors")
        tiny = os.path.join(work, "data-tiny")
        make_dataset(a.dataset_src, tiny, a.batch, 1)
        ev: Dict[str, List[float]] = {"imgclf_wall": [], "imgclf_marginal": [], "torch": []}
        for r in range(a.repeats):
            t_full = imgclf_eval(a, data, ckpt, os.path.join(work, f"eval-{r}"),
                                 os.path.join(work, f"eval-{r}.log"), prefix)
            t_tiny = imgclf_eval(a, tiny, ckpt, os.path.join(work, f"eval-tiny-{r}"),
                                 os.path.join(work, f"eval-tiny-{r}.log"), prefix)
            ev["imgclf_wall"].append(n_test / t_full)
            ev["imgclf_marginal"].append((n_test - 1) / max(t_full - t_tiny, 1e-9))
            tr = run_worker("torch-eval", a, data, os.path.join(work, f"torch-eval-{r}.log"),
                            prefix, weights=ckpt)
            ev["torch"].append(tr["images_per_sec"])
            print(f"  eval run {r + 1}: imgclf {n_test / t_full:.1f} img/s (process), "
                  f"{ev['imgclf_marginal'][-1]:.1f} (marginal); torch {tr['images_per_sec']:.1f}",
                  flush=True)
        evaluation = {
            "images": n_test,
            "batch_size": a.batch,
            "runs": ev,
            "best": {k: max(v) for k, v in ev.items()},
            "ratio_marginal": max(ev["imgclf_marginal"]) / max(ev["torch"]),
            "ratio_wall": max(ev["imgclf_wall"]) / max(ev["torch"]),
        }

    debug = "/debug/" in a.imgclf.replace(os.sep, "/")
    result = {
        "benchmark": "train throughput, ResNet-preact-20, Fashion-MNIST 1x28x28",
        "device": cpu_model(),
        "compute_device": a.device,
        "gpu": gpu,
        "cores": cores,
        "threads": a.threads,
        "imgclf_threads": imgclf_threads,
        "batch_size": a.batch,
        "steps": a.steps,
        "images": a.batch * a.steps,
        "imgclf": {"binary": a.imgclf, "version": version_of(a.imgclf), "debug_build": debug,
                   "runs": runs["imgclf"], "best_images_per_sec": best["imgclf"]},
        "torch": {"version": torch.__version__, "python": sys.executable,
                  "runs": runs["torch"], "best_images_per_sec": best["torch"]},
        "ratio_imgclf_over_torch": ratio,
        "eval": evaluation,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "platform": platform.platform(),
    }
    path = os.path.join(bench_dir, "results.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")

    print()
    print(f"Device: {result['device']} ({cores} usable cores); threads: {a.threads}; "
          f"batch {a.batch}; {a.steps} steps; torch {torch.__version__}")
    if gpu:
        print(f"GPU: {gpu} (--device cuda; both sides train on the GPU)")
    print()
    head = "| side | " + " | ".join(f"run {i + 1} img/s" for i in range(a.repeats)) + " | best img/s |"
    print(head)
    print("|" + "---|" * (a.repeats + 2))
    for k, label in (("imgclf", "imgclf train"), ("torch", "PyTorch eager train")):
        vals = " | ".join(fmt(x["images_per_sec"]) for x in runs[k])
        print(f"| {label} | {vals} | {fmt(best[k])} |")
    if evaluation:
        for k, label in (("imgclf_wall", "imgclf evaluate (whole process)"),
                         ("imgclf_marginal", "imgclf evaluate (marginal)"),
                         ("torch", "PyTorch eager no_grad forward")):
            vals = " | ".join(fmt(x) for x in evaluation["runs"][k])
            print(f"| {label} | {vals} | {fmt(evaluation['best'][k])} |")
    print()
    print(f"train ratio imgclf/torch: {ratio:.3f}")
    if evaluation:
        print(f"eval ratio imgclf/torch: {evaluation['ratio_marginal']:.3f} (marginal), "
              f"{evaluation['ratio_wall']:.3f} (whole process)")
    if debug:
        print("note: debug build of imgclf; use the release binary for meaningful numbers")
    print(f"wrote {path}")
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept {work}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--imgclf", help="imgclf binary")
    p.add_argument("--root", default=os.path.dirname(os.path.dirname(HERE)),
                   help="imgclf repository root (configs/ lives here)")
    p.add_argument("--steps", type=int, default=100, help="training steps (one epoch)")
    p.add_argument("--batch", type=int, default=128, help="batch size")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default os.cpu_count())")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs per side")
    p.add_argument("--eval", action="store_true", help="also compare eval-mode forward")
    p.add_argument("--eval-images", type=int, default=10000,
                   help="test images for --eval (default 10000)")
    p.add_argument("--dataset-src", default="/usr/share/datasets/fashion-mnist",
                   help="Fashion-MNIST IDX files (plain or .gz)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where both sides train (default cpu); cuda appends the imgclf "
                        "override `device cuda` and runs the PyTorch side on the GPU")
    # internal: worker processes
    p.add_argument("--worker", choices=["torch-train", "torch-eval"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--weights", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:
        a.root = os.path.abspath(a.root)
        fn = worker_torch_train if a.worker == "torch-train" else worker_torch_eval
        print(json.dumps(fn(a)), flush=True)
        return 0
    if not a.imgclf:
        p.error("--imgclf is required")
    if a.steps < 1 or a.batch < 1 or a.repeats < 1:
        p.error("--steps, --batch and --repeats must be >= 1")
    return driver(a)


if __name__ == "__main__":
    sys.exit(main())
