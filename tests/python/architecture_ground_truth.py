"""Reference weights and eval-mode logits for imgclf's architecture test.

One process (torch imports slowly) handles every case of a JSON manifest
written by tests/architectures.rs:

  {"cases": [{"id": "...", "config": "configs/cifar/pyramidnet.yaml",
              "overrides": ["model.pyramidnet.depth", "14",
                            "dataset.name", "FashionMNIST", ...],
              "dataset_dir": "...", "out_dir": "...", "seed": 7}, ...]}

For each case it reads the config file and the dotted overrides as the
reference does (YAML, then Python literals), builds that network with
tests/python/reference_models.py (an independent re-implementation of
hysts/pytorch_image_classification's models/cifar/), randomises every weight, BN affine parameter and BN running
statistic (so that no BN is the identity), and writes into out_dir:

  weights.safetensors   the state dict under the reference's names
  results (per case)    "floors": for every expected float tensor, its
                        largest change when only float32 rounding changes
                        (oneDNN off, another thread count, one-ulp
                        perturbations of the weights and the input): the
                        test's tolerance is a fixed multiple of it
  expected.safetensors  "logits": eval-mode logits on the dataset's test
                        split, normalised as the reference does
                        (float32 x/255, then (x - mean)/std in float64);
                        when training mode is deterministic (no dropout, no
                        shake), also one training step from these weights:
                        "train/input", "train/labels", "train/logits",
                        "train/loss", "grad/<parameter>", "after/<buffer>"

A case whose reference network cannot be built (VGG on 28x28: its fifth
max-pool meets a 1x1 map) gets no files; the reason is recorded instead.

Before the cases, the models are checked against the reference's parameter
counts and state-dict lists (tests/data/reference/state_dict, built on the
meta device so the 68M-parameter ResNeXt costs nothing); a mismatch there is
an error of this ground truth, not of imgclf.

Writes {"reference_check": [...], "cases": {id: {...}}} to --results and
exits 0 unless the reference check or the script itself failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_models import (  # noqa: E402
    find_idx, init_spec, read_idx, save_safetensors)
from check_reference_models import (  # noqa: E402
    check_all, effective_config, model_of)

# transforms/__init__.py of the reference: per-channel mean and std.
REFERENCE_STATS = {
    "CIFAR10": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
    "CIFAR100": ([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]),
    "MNIST": ([0.1307], [0.3081]),
    "FashionMNIST": ([0.2860], [0.3530]),
    "KMNIST": ([0.1904], [0.3475]),
    "ImageNet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
}


def read_cifar_binary_test(dataset_dir: str, name: str) -> np.ndarray:
    """Test images of the binary CIFAR release, N x 32 x 32 x 3 uint8."""
    if name == "CIFAR10":
        path, label_bytes = os.path.join(dataset_dir, "cifar-10-batches-bin",
                                         "test_batch.bin"), 1
    else:
        path, label_bytes = os.path.join(dataset_dir, "cifar-100-binary",
                                         "test.bin"), 2
    raw = np.fromfile(path, dtype=np.uint8)
    record = label_bytes + 3 * 32 * 32
    if raw.size % record:
        raise ValueError(f"{path}: {raw.size} bytes, not whole records")
    planes = raw.reshape(-1, record)[:, label_bytes:].reshape(-1, 3, 32, 32)
    return np.ascontiguousarray(planes.transpose(0, 2, 3, 1))


def read_image_folder(root: str) -> np.ndarray:
    """``root/<class>/<image>`` in torchvision ImageFolder's order (sorted
    classes, sorted files), N x H x W x 3 uint8; all images one size."""
    from PIL import Image
    images = []
    for cls in sorted(e.name for e in os.scandir(root) if e.is_dir()):
        for f in sorted(os.listdir(os.path.join(root, cls))):
            with Image.open(os.path.join(root, cls, f)) as im:
                images.append(np.asarray(im.convert("RGB")))
    return np.stack(images)


def read_test_images(name: str, dataset_dir: str) -> np.ndarray:
    """N x H x W x C uint8 test images (the reference's PIL-image layout)."""
    if name == "ImageNet":
        # The validation split; the tests' images already have the crop's
        # size, so the reference's Resize-free CenterCrop keeps them as is.
        return read_image_folder(os.path.join(dataset_dir, "val"))
    if name.startswith("CIFAR"):
        return read_cifar_binary_test(dataset_dir, name)
    images = read_idx(find_idx(dataset_dir, "t10k-images-idx3-ubyte"))
    return images[:, :, :, None]


def normalise(images_nhwc: np.ndarray, mean, std) -> torch.Tensor:
    """The reference's test transform (Normalize, then ToTensor)."""
    x = images_nhwc.astype(np.float32) / 255.0
    x = (x - np.asarray(mean)) / np.asarray(std)
    return torch.from_numpy(
        np.ascontiguousarray(x.transpose(0, 3, 1, 2).astype(np.float32)))


def randomise_(model: nn.Module, x: torch.Tensor, seed: int) -> None:
    """Random weights, BN affine parameters and BN running statistics.

    The running statistics start as the statistics of one training-mode pass
    over ``x`` (so activations stay O(1) through deep stacks) and are then
    perturbed, so that eval mode differs from both the identity and the
    batch statistics.
    """
    g = torch.Generator().manual_seed(seed)

    def rand(t, lo, hi):
        return torch.rand(t.shape, generator=g) * (hi - lo) + lo

    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(rand(m.bias, -0.2, 0.2))
        for bn in bns:
            bn.weight.copy_(rand(bn.weight, 0.5, 1.5))
            bn.bias.copy_(rand(bn.bias, -0.3, 0.3))
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: exactly this pass
        model.train()
        torch.manual_seed(seed)
        model(x)
        for bn in bns:
            std = bn.running_var.clamp_min(1e-4).sqrt()
            bn.running_mean.add_(rand(bn.running_mean, -0.2, 0.2) * std)
            bn.running_var.mul_(rand(bn.running_var, 0.7, 1.4))
            bn.num_batches_tracked.fill_(int(torch.randint(
                1, 10000, (1,), generator=g)))
            bn.momentum = 0.1
    model.eval()


def init_z(t: torch.Tensor, spec: list) -> float:
    """How many standard errors the mean square of ``t`` is from what its
    initial distribution gives (inf when a bound or constant is violated);
    the same statistic as tests/architectures.rs."""
    kind, v = (spec + [None])[:2]
    x = t.detach().double().flatten()
    if kind == "any":
        return 0.0
    if kind == "const":
        return 0.0 if bool((x == v).all()) else math.inf
    n = x.numel()
    ms = float((x * x).mean())
    if kind == "normal":
        return abs(ms / v ** 2 - 1) * (n / 2) ** 0.5
    if float(x.abs().max()) > v:
        return math.inf
    return abs(ms - v * v / 3) / ((4 * v ** 4 / 45 / n) ** 0.5)


def deterministic_in_training(cfg: dict) -> bool:
    """No dropout and no shake: training mode is a pure function too."""
    sec = cfg["section"]
    if cfg.get("model_type") == "imagenet" and cfg["model"] == "vgg":
        return False  # dropout after fc1 and fc2
    return not (float(sec.get("drop_rate", 0.0)) > 0
                or sec.get("shake_forward") or sec.get("shake_backward"))


def training_step(model: nn.Module, x: torch.Tensor,
                  n_classes: int) -> dict:
    """One training-mode forward and backward (mean cross-entropy on fixed
    labels): its logits, every parameter's gradient (``grad/<name>``) and
    every buffer after the step (``after/<name>``: BN running statistics
    updated with momentum 0.1 and the unbiased batch variance)."""
    labels = torch.arange(x.size(0)) % n_classes
    model.train()
    model.zero_grad(set_to_none=True)
    logits = model(x)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    out = {"train/input": x, "train/labels": labels,
           "train/logits": logits.detach(), "train/loss": loss.detach()}
    for name, p in model.named_parameters():
        out[f"grad/{name}"] = p.grad.detach().clone()
    for name, b in model.named_buffers():
        out[f"after/{name}"] = b.detach().clone()
    model.eval()
    return out


def one_ulp(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """`t` with every float element moved one ulp up or down (at random)."""
    if not t.is_floating_point():
        return t.clone()
    up = torch.randint(0, 2, t.shape, generator=gen).bool()
    return torch.where(up, torch.nextafter(t, torch.full_like(t, math.inf)),
                       torch.nextafter(t, torch.full_like(t, -math.inf)))


def rounding_floors(model: nn.Module, x: torch.Tensor, fn, base: dict,
                    seed: int) -> dict:
    """The floor of every float result of ``fn(model, x)``: its largest
    change from ``base`` when only float32 rounding changes (oneDNN off;
    another number of threads; one-ulp perturbations of every weight, buffer
    and input), at least one ulp of its largest value. The model's state is
    restored before each variant and after the last."""
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    threads = torch.get_num_threads()
    floors = {k: float(np.spacing(np.float32(v.abs().max().item())))
              for k, v in base.items() if v.is_floating_point() and v.numel()}

    def variant(mkldnn=True, n_threads=threads, perturb=False):
        gen = torch.Generator().manual_seed(seed)
        model.load_state_dict({k: one_ulp(v, gen) if perturb else v
                               for k, v in saved.items()})
        torch.backends.mkldnn.enabled = mkldnn
        torch.set_num_threads(n_threads)
        try:
            out = fn(model, one_ulp(x, gen) if perturb else x)
        finally:
            torch.backends.mkldnn.enabled = True
            torch.set_num_threads(threads)
        for k in floors:
            d = (out[k].double() - base[k].double()).abs().max().item()
            floors[k] = max(floors[k], d)

    variant(mkldnn=False)
    variant(n_threads=2 if threads == 1 else 1)
    variant(perturb=True)
    model.load_state_dict(saved)
    return floors


def eval_logits(model: nn.Module, x: torch.Tensor) -> dict:
    model.eval()
    with torch.no_grad():
        return {"logits": model(x)}


def run_case(case: dict, images_cache: dict) -> dict:
    cfg = effective_config(case["config"], case["overrides"])
    name = cfg["dataset"]
    key = (name, case["dataset_dir"])
    if key not in images_cache:
        images_cache[key] = read_test_images(name, case["dataset_dir"])
    images = images_cache[key]
    mean, std = REFERENCE_STATS[name]
    n, h, w, c = images.shape
    if (c, h, w) != (cfg["n_channels"], cfg["image_size"], cfg["image_size"]):
        raise ValueError(f"{name}: images are {c}x{h}x{w}, the config says "
                         f"{cfg['n_channels']}x{cfg['image_size']}")
    torch.manual_seed(case["seed"])
    try:
        model = model_of(cfg)
    except (RuntimeError, ValueError) as e:
        return {"status": "reference_error", "model": cfg["model"],
                "message": str(e).strip().splitlines()[0]}
    spec = init_spec(model)
    if sorted(spec) != sorted(model.state_dict()):
        raise ValueError("init_spec does not cover the state dict")
    for name, t in model.state_dict().items():
        z = init_z(t, spec[name])
        if z > 5:
            raise ValueError(f"{name}: initial values {z:.1f} sigma from "
                             f"{spec[name]}")
    x = normalise(images, mean, std)
    randomise_(model, x, case["seed"])
    logits = eval_logits(model, x)["logits"]
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("non-finite reference logits")
    out = case["out_dir"]
    os.makedirs(out, exist_ok=True)
    save_safetensors(os.path.join(out, "weights.safetensors"),
                     model.state_dict(), {"format": "pt"})
    expected = {"logits": logits}
    floors = rounding_floors(model, x, eval_logits, expected, case["seed"])
    train = deterministic_in_training(cfg)
    if train:
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        step = training_step(model, x, cfg["n_classes"])
        model.load_state_dict(weights)
        floors.update(rounding_floors(
            model, x, lambda m, xx: training_step(m, xx, cfg["n_classes"]),
            step, case["seed"]))
        expected.update(step)
    save_safetensors(os.path.join(out, "expected.safetensors"), expected)
    return {
        "status": "ok",
        "train_step": train,
        "init": spec,
        "model": cfg["model"],
        "section": cfg["section"],
        "images": n,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tensors": len(model.state_dict()),
        "feature_size": getattr(model, "feature_size", None),
        "floors": floors,
        "logit_absmax": float(logits.abs().max()),
        "logit_std": float(logits.std()),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", required=True)
    p.add_argument("--results", required=True)
    p.add_argument("--reference-dir",
                   help="tests/data/reference/state_dict, checked first")
    p.add_argument("--configs", help="configs/ of the repo (for the check)")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    with open(a.manifest) as f:
        manifest = json.load(f)
    results = {"reference_check": [], "cases": {}}
    ok = True
    if a.reference_dir:
        for line in check_all(a.reference_dir, a.configs):
            results["reference_check"].append(line)
            ok &= not line.startswith("FAIL")
    cache: dict = {}
    for case in manifest["cases"]:
        try:
            r = run_case(case, cache)
        except Exception:  # recorded per case; the others still run
            r = {"status": "script_error",
                 "message": traceback.format_exc(limit=4)}
            ok = False
        results["cases"][case["id"]] = r
    with open(a.results, "w") as f:
        json.dump(results, f, indent=1, default=lambda o: (
            None if isinstance(o, float) and math.isnan(o) else str(o)))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
