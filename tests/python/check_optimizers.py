"""PyTorch ground truth for imgclf's optimizers, schedules and large-batch options.

Two modes:

  python tests/python/check_optimizers.py init --out INIT.safetensors \
      --depth 8 --initial-channels 4 [--dataset-dir DIR --steps 40 --lr 0.05]
      Writes seeded initial weights of the reference ResNet-preact (1 input
      channel, 28x28, 10 classes) as a PyTorch state dict in safetensors,
      first trained --steps full-batch SGD steps on DIR's training split, so
      that the compared steps start from a moderate loss, where a step is
      stable, instead of from random weights.

  python tests/python/check_optimizers.py check --cases CASES.json
      CASES.json: {"dataset_dir": ..., "init": ..., "depth": ..., "initial_channels": ...,
      "mean": ..., "std": ..., "multiple": K, "far": F,
      "orders": [imgclf's training order of each epoch, ...], "threads": imgclf's
      torch threads,
      "cases": [{"name": ..., "result": imgclf's model_final.safetensors,
                 "config": {dotted key: value, ...},
                 "mutations": [{"label": ..., "config": {...}}, ...]}, ...]}
      For each case trains the same network from INIT on the whole training
      split as one batch for scheduler.epochs steps, as the reference's
      train.py does (hysts/pytorch_image_classification): parameter groups
      (with the intended no_weight_decay_on_bn: BatchNorm's weight and bias
      exempt), torch.optim.SGD / torch.optim.Adam where the reference uses them
      and this file's own AdaBound, AdaBoundW and LARS after the reference's
      semantics, LambdaLR stepped per iteration over the reference's combined
      warmup + main schedule (with the intended exponential warmup, which the
      reference multiplies by base_lr twice), Ghost BN by train.subdivision
      (chunks of the batch, gradients accumulated, clipped, then divided), and
      gradient clipping with clip_grad_norm_.

      The tolerance is measured, per case and tensor, on this machine: the
      same training rerun with oneDNN off, with one thread, and from one-ulp
      perturbations of the initial weights and the images moves each tensor
      by at most its floor (at least one ulp of its largest value); imgclf's
      result must lie within K times the floor of every tensor. Each mutation
      (the case with one detail changed: Nesterov off, a milestone moved,
      decay on BatchNorm) must land at least F times the tolerance away, which
      shows that the tolerance tells the semantics apart.

Exit status 0 when every case agrees and every mutation is told apart; 1
otherwise (each failure is printed); 2 on bad input.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_models import (  # noqa: E402
    ResNetPreact, find_idx, load_safetensors, read_idx, save_safetensors)


# ----------------------------------------------------------------- optimizers

class AdaBound(torch.optim.Optimizer):
    """The reference's optim/adabound.py semantics: Adam moments, the step
    size clipped into bounds converging to final_lr * lr / base_lr; L2 weight
    decay, or (decoupled=True, AdaBoundW) p -= weight_decay * p after the
    update, with p taken before it and not scaled by the rate."""

    def __init__(self, params, lr, betas, final_lr, gamma, eps=1e-8,
                 decoupled=False):
        super().__init__(params, dict(lr=lr, betas=betas, final_lr=final_lr,
                                      gamma=gamma, eps=eps, weight_decay=0.0))
        self.base_lr = lr
        self.decoupled = decoupled

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["m"] = torch.zeros_like(p)
                    st["v"] = torch.zeros_like(p)
                st["step"] += 1
                t = st["step"]
                if wd != 0 and not self.decoupled:
                    g = g + wd * p
                st["m"].mul_(b1).add_(g, alpha=1 - b1)
                st["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = st["v"].sqrt() + group["eps"]
                eta = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
                final = group["final_lr"] * lr / self.base_lr
                lower = final * (1 - 1 / (group["gamma"] * t + 1))
                upper = final * (1 + 1 / (group["gamma"] * t))
                rate = torch.full_like(denom, eta) / denom
                update = rate.clamp(lower, upper) * st["m"]
                if wd != 0 and self.decoupled:
                    decay = p * wd
                    p.sub_(update)
                    p.sub_(decay)
                else:
                    p.sub_(update)


class LARS(torch.optim.Optimizer):
    """The reference's optim/lars.py: per-tensor rate ||w|| / (eps + ||g|| +
    wd ||w||) (1 below the weight-norm threshold), no LARS coefficient, the
    rate inside the momentum buffer."""

    def __init__(self, params, lr, momentum, eps, threshold):
        super().__init__(params, dict(lr=lr, momentum=momentum, eps=eps,
                                      threshold=threshold, weight_decay=0.0))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                wn = torch.linalg.vector_norm(p)
                gn = torch.linalg.vector_norm(g)
                local = wn / (group["eps"] + gn + wd * wn)
                if wn.item() < group["threshold"]:
                    local = torch.ones_like(local)
                d = g + wd * p if wd != 0 else g
                st = self.state[p]
                if "buf" not in st:
                    st["buf"] = torch.zeros_like(p)
                st["buf"].mul_(mom).add_(lr * local * d)
                p.sub_(st["buf"])


# ----------------------------------------------------------------- schedule

def lr_factor_fn(c, steps_per_epoch):
    """Factor of base_lr at iteration k (from 0): segments [warmup], main
    segments (multistep and sgdr are several), an iteration on a boundary in
    the earlier segment, past the end the last segment continues."""
    epochs = c["scheduler.epochs"]
    wtype = c.get("scheduler.warmup.type", "none")
    wep = c.get("scheduler.warmup.epochs", 0) if wtype != "none" else 0
    start = c.get("scheduler.warmup.start_factor", 1e-3)
    expo = c.get("scheduler.warmup.exponent", 4.0)
    lr_min = c.get("scheduler.lr_min_factor", 1e-3)
    main = epochs - wep
    segs = []  # (length in epochs, function of (step, length in steps))
    if wep > 0:
        if wtype == "linear":
            segs.append((wep, lambda s, n: start + (1 - start) * s / n))
        else:
            segs.append((wep, lambda s, n: start + (1 - start) * (s / n) ** expo))
    kind = c["scheduler.type"]
    cos = (lambda s, n: lr_min + (1 - lr_min) * 0.5 * (1 + math.cos(s / n * math.pi)))
    if kind == "constant":
        segs.append((main, lambda s, n: 1.0))
    elif kind == "linear":
        segs.append((main, lambda s, n: 1 + (lr_min - 1) * s / n))
    elif kind == "cosine":
        segs.append((main, cos))
    elif kind == "multistep":
        ms = c.get("scheduler.milestones", [80, 120])
        decay = c.get("scheduler.lr_decay", 0.1)
        bounds = [0] + list(ms) + [main]
        for i in range(len(bounds) - 1):
            segs.append((bounds[i + 1] - bounds[i],
                         (lambda f: lambda s, n: f)(decay ** i)))
    elif kind == "sgdr":
        cyc = [c.get("scheduler.T0", 10)]
        while sum(cyc) < main:
            cyc.append(int(cyc[-1] * c.get("scheduler.T_mul", 1.0)))
        assert sum(cyc) == main, (cyc, main)
        segs += [(n, cos) for n in cyc]
    else:
        raise ValueError(kind)
    lengths = [n * steps_per_epoch for n, _ in segs]
    offsets = np.cumsum([0] + lengths).tolist()

    def factor(k):
        i = max(0, min(bisect.bisect_left(offsets, k) - 1, len(segs) - 1))
        return segs[i][1](k - offsets[i], lengths[i])

    return factor


# ----------------------------------------------------------------- training

def param_groups(model, c):
    wd = c.get("train.weight_decay", 1e-4)
    if not c.get("train.no_weight_decay_on_bn", False):
        return [{"params": list(model.parameters()), "weight_decay": wd}]
    bn = set()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            bn.update(id(p) for p in m.parameters(recurse=False))
    rest = [p for p in model.parameters() if id(p) not in bn]
    norm = [p for p in model.parameters() if id(p) in bn]
    return [{"params": rest, "weight_decay": wd},
            {"params": norm, "weight_decay": 0.0}]


def make_optimizer(model, c):
    groups = param_groups(model, c)
    lr = c.get("train.base_lr", 0.1)
    name = c.get("train.optimizer", "sgd")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr,
                               momentum=c.get("train.momentum", 0.9),
                               nesterov=c.get("train.nesterov", True))
    if name in ("adam", "amsgrad"):
        return torch.optim.Adam(groups, lr=lr,
                                betas=tuple(c.get("optim.adam.betas", [0.9, 0.999])),
                                amsgrad=name == "amsgrad")
    if name in ("adabound", "adaboundw"):
        return AdaBound(groups, lr=lr,
                        betas=tuple(c.get("optim.adabound.betas", [0.9, 0.999])),
                        final_lr=c.get("optim.adabound.final_lr", 0.1),
                        gamma=c.get("optim.adabound.gamma", 1e-3),
                        decoupled=name == "adaboundw")
    if name == "lars":
        return LARS(groups, lr=lr, momentum=c.get("train.momentum", 0.9),
                    eps=c.get("optim.lars.eps", 1e-9),
                    threshold=c.get("optim.lars.threshold", 1e-2))
    raise ValueError(name)


def train(spec, c, init, images, labels, threads, mkldnn=True):
    """The reference's training loop for case config `c`, from state dict
    `init`, with `threads` intra-op threads and oneDNN on or off."""
    torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = mkldnn
    try:
        torch.manual_seed(0)
        model = ResNetPreact(depth=spec["depth"],
                             initial_channels=spec["initial_channels"],
                             n_channels=1, image_size=28, n_classes=10)
        model.load_state_dict(init, strict=True)
        model.train()
        opt = make_optimizer(model, c)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor_fn(c, 1))
        sub = c.get("train.subdivision", 1)
        clip = c.get("train.gradient_clip", 0.0)
        for epoch in range(c["scheduler.epochs"]):
            order = torch.tensor(spec["orders"][epoch])
            opt.zero_grad()
            for x, y in zip(images[order].chunk(sub), labels[order].chunk(sub)):
                F.cross_entropy(model(x), y).backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            if sub > 1:
                for p in model.parameters():
                    p.grad.div_(sub)
            opt.step()
            sched.step()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    finally:
        torch.backends.mkldnn.enabled = True


def load_images(d, mean, std):
    x = read_idx(find_idx(d, "train-images-idx3-ubyte")).astype(np.float32)
    y = read_idx(find_idx(d, "train-labels-idx1-ubyte")).astype(np.int64)
    # imgclf's normalisation, x * (1 / (255 std)) + (-mean / std) in float32,
    # so that the inputs are bit-identical and only the training is compared.
    scale = np.float32(1.0 / (255.0 * std))
    shift = np.float32(-mean / std)
    x = x.reshape(-1, 1, 28, 28) * scale + shift
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y)


def one_ulp(t, gen):
    """`t` with every float element moved one ulp up or down (at random)."""
    if not t.is_floating_point():
        return t.clone()
    up = torch.randint(0, 2, t.shape, generator=gen).bool()
    return torch.where(up, torch.nextafter(t, torch.full_like(t, math.inf)),
                       torch.nextafter(t, torch.full_like(t, -math.inf)))


def float_keys(sd):
    return [k for k, v in sd.items() if v.is_floating_point()]


def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def floor_of(train_fn, spec, c, init, images, labels, base):
    """The measured floor of each tensor: the largest difference from `base`
    when `train_fn` runs with only float32 rounding changed (oneDNN off; one
    thread; one-ulp perturbations of the initial weights and the images), at
    least one ulp of the tensor's largest value."""
    gen = torch.Generator().manual_seed(1)
    variants = {
        "oneDNN off": train_fn(spec, c, init, images, labels, spec["threads"],
                               mkldnn=False),
        "one thread": train_fn(spec, c, init, images, labels, 1),
        "one-ulp inputs and weights": train_fn(
            spec, c, {k: one_ulp(v, gen) for k, v in init.items()},
            one_ulp(images, gen), labels, spec["threads"]),
    }
    floor, why = {}, {}
    for k in float_keys(base):
        scale = base[k].abs().max().item() if base[k].numel() else 0.0
        floor[k] = float(np.spacing(np.float32(scale)))
        why[k] = "one ulp"
        for name, v in variants.items():
            d = max_diff(v[k], base[k])
            if d > floor[k]:
                floor[k], why[k] = d, name
    return floor, why


def distance(sd, base, floor, multiple):
    """Largest |sd - base| per tensor in units of the tolerance (`multiple`
    times the tensor's floor), and that tensor."""
    worst, at = 0.0, next(iter(floor), "")  # an exact match is distance 0 at any tensor
    for k, f in floor.items():
        r = max_diff(sd[k].to(base[k].dtype), base[k]) / (multiple * f)
        if not r <= worst:  # NaN counts as the worst
            worst, at = r, k
    return worst, at


def check(args):
    return check_cases(args, train)


def check_cases(args, train_fn):
    """Runs the cases of `args.cases` (JSON): each case's imgclf result must lie
    within the tolerance (measured by `floor_of`) of the weights `train_fn`
    computes in PyTorch, each one-detail mutation far outside it.
    Prints one verdict per case and mutation; returns the exit status."""
    with open(args.cases) as f:
        spec = json.load(f)
    images, labels = load_images(spec["dataset_dir"], spec["mean"], spec["std"])
    init = load_safetensors(spec["init"])
    multiple, far = spec["multiple"], spec["far"]
    failures = 0
    for case in spec["cases"]:
        c = case["config"]
        # The same intra-op threads as imgclf.
        base = train_fn(spec, c, init, images, labels, spec["threads"])
        floor, why = floor_of(train_fn, spec, c, init, images, labels, base)
        got = load_safetensors(case["result"])
        missing = [k for k in base if k not in got]
        if missing:
            failures += 1
            print(f"{case['name']}: DISAGREES: missing in imgclf's result: "
                  f"{', '.join(missing[:10])}")
            continue
        ints = [k for k in base if k not in floor and not got[k].equal(base[k])]
        rel, at = distance(got, base, floor, multiple)
        moved = max(max_diff(base[k], init[k]) for k in floor)
        worst_floor = max(floor, key=floor.get)
        print(f"{case['name']}: imgclf at {rel:.3f} of tolerance at {at} "
              f"(tolerance {multiple}x the floor {floor[at]:.2g}, from "
              f"{why[at]}); largest floor {floor[worst_floor]:.2g} at "
              f"{worst_floor}; weights moved up to {moved:.3g}")
        if not rel <= 1.0 or ints:
            failures += 1
            print(f"  DISAGREES with PyTorch: {at}: max |diff| "
                  f"{max_diff(got[at].to(base[at].dtype), base[at]):.3g}"
                  + (f"; integer tensors differ: {', '.join(ints)}" if ints else ""))
        for m in case.get("mutations", []):
            mc = dict(c)
            mc.update(m["config"])
            mrel, mat = distance(
                train_fn(spec, mc, init, images, labels, spec["threads"]),
                base, floor, multiple)
            print(f"  mutation {m['label']}: {mrel:.0f} times the tolerance "
                  f"at {mat}")
            if not mrel >= far:
                failures += 1
                print(f"  INSENSITIVE: {m['label']} lands within {far} times "
                      f"the tolerance")
    if failures:
        print(f"{failures} failure(s)")
        return 1
    return 0


def init(args):
    """Seeded initial weights, then `--steps` full-batch SGD steps on the
    training split (when given), so that the checked steps start from a
    moderate loss instead of from random weights."""
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    model = ResNetPreact(depth=args.depth,
                         initial_channels=args.initial_channels,
                         n_channels=1, image_size=28, n_classes=10)
    # Non-trivial BatchNorm affine parameters, so that decay on them shows.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    if args.dataset_dir:
        images, labels = load_images(args.dataset_dir, args.mean, args.std)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        first = None
        for _ in range(args.steps):
            opt.zero_grad()
            loss = F.cross_entropy(model(images), labels)
            first = loss.item() if first is None else first
            loss.backward()
            opt.step()
        with torch.no_grad():
            loss = F.cross_entropy(model(images), labels).item()
        print(f"pretrained {args.steps} steps: training loss {first:.3f} -> "
              f"{loss:.3f}")
    save_safetensors(args.out, model.state_dict())
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    i = sub.add_parser("init")
    i.add_argument("--out", required=True)
    i.add_argument("--depth", type=int, default=8)
    i.add_argument("--initial-channels", type=int, default=4)
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--dataset-dir", help="pretrain on its training split")
    i.add_argument("--mean", type=float, default=0.2860)
    i.add_argument("--std", type=float, default=0.3530)
    i.add_argument("--steps", type=int, default=40)
    i.add_argument("--lr", type=float, default=0.05)
    c = sub.add_parser("check")
    c.add_argument("--cases", required=True)
    args = p.parse_args(argv)
    try:
        return init(args) if args.mode == "init" else check(args)
    except (OSError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
