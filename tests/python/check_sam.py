"""PyTorch ground truth for imgclf's SAM step hook (plugins/sam) and weight EMA.

  python tests/python/check_sam.py --cases CASES.json
      CASES.json: the format of check_optimizers.py's `check` mode (dataset_dir,
      init, depth, initial_channels, mean, std, multiple, far, orders, threads,
      cases with name, result, config and mutations).

For each case trains the reference ResNet-preact from INIT on the whole
training split as one batch for scheduler.epochs steps, as check_optimizers.py
does, with the step of davda54/sam (https://github.com/davda54/sam, sam.py)
when the config says train.step sam:

  first forward/backward; e_w = rho * g / (||g||_2 + 1e-12), with
  sam.adaptive (ASAM) rho * w^2 * g / (||w * g||_2 + 1e-12); w += e_w;
  zero_grad; second forward/backward with BatchNorm's running statistics
  frozen by davda54's disable_running_stats (momentum 0; its
  num_batches_tracked is kept too); w restored; then clipping, the division by
  train.subdivision and the base optimizer's step (torch.optim.SGD / Adam).

With train.ema.enabled the result compared is timm's ModelEmaV2 average
(ema = decay * ema + (1 - decay) * w over the state dict after every
optimizer step; integer buffers copied), starting from INIT.

The tolerance is measured as in check_optimizers.py (oneDNN off, one thread,
one-ulp perturbations; at least one ulp), imgclf within K times it, every
mutation at least F times away. A mutation's config may set the script-only
key `sam.bn_second_pass` True (BatchNorm statistics updated by both passes).

Exit status 0 when every case agrees and every mutation is told apart; 1
otherwise; 2 on bad input.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_optimizers import (  # noqa: E402
    check_cases, lr_factor_fn, make_optimizer)
from reference_models import ResNetPreact, load_safetensors  # noqa: E402


def set_bn_momentum(model, momentum):
    """davda54/sam's disable_running_stats (momentum 0) and back."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum


def forward_backward(model, xs, ys):
    for x, y in zip(xs, ys):
        F.cross_entropy(model(x), y).backward()


def sam_step(model, opt, xs, ys, c):
    rho = c.get("sam.rho", 0.05)
    adaptive = c.get("sam.adaptive", False)
    forward_backward(model, xs, ys)
    with torch.no_grad():
        params = [p for p in model.parameters() if p.grad is not None]
        grad_norm = torch.norm(torch.stack([
            ((torch.abs(p) if adaptive else 1.0) * p.grad).norm(p=2)
            for p in params]), p=2)
        scale = rho / (grad_norm + 1e-12)
        old = {}
        for p in params:
            old[p] = p.data.clone()
            e_w = (torch.pow(p, 2) if adaptive else 1.0) * p.grad * scale.to(p)
            p.add_(e_w)
    opt.zero_grad()
    if c.get("sam.bn_second_pass", False):
        forward_backward(model, xs, ys)
    else:
        counts = {m: m.num_batches_tracked.clone() for m in model.modules()
                  if isinstance(m, nn.BatchNorm2d)}
        set_bn_momentum(model, 0.0)
        forward_backward(model, xs, ys)
        set_bn_momentum(model, 0.1)
        for m, n in counts.items():
            m.num_batches_tracked.copy_(n)
    with torch.no_grad():
        for p in params:
            p.data = old[p]


def train(spec, c, init, images, labels, threads, mkldnn=True):
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
        use_ema = c.get("train.ema.enabled", False)
        decay = c.get("train.ema.decay", 0.9998)
        ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for epoch in range(c["scheduler.epochs"]):
            order = torch.tensor(spec["orders"][epoch])
            xs, ys = images[order].chunk(sub), labels[order].chunk(sub)
            opt.zero_grad()
            if c.get("train.step", "plain") == "sam":
                sam_step(model, opt, xs, ys, c)
            else:
                forward_backward(model, xs, ys)
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            if sub > 1:
                for p in model.parameters():
                    p.grad.div_(sub)
            opt.step()
            sched.step()
            if use_ema:
                with torch.no_grad():
                    for k, m in model.state_dict().items():
                        if ema[k].is_floating_point():
                            ema[k].copy_(decay * ema[k] + (1. - decay) * m)
                        else:
                            ema[k].copy_(m)
        if use_ema:
            return ema
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    finally:
        torch.backends.mkldnn.enabled = True


def check(args):
    return check_cases(args, train)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", required=True)
    args = p.parse_args(argv)
    try:
        return check(args)
    except (OSError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
