"""Save one PyTorch ResNet-preact's weights in every form `imgclf` accepts as a checkpoint.

Builds the reference architecture of tests/python/reference_models.py (seeded, with
non-trivial BatchNorm statistics so eval-mode BN matters), takes one SGD step so that the
optimizer state holds tensors, and writes into --out:
  bare.pth             torch.save(model.state_dict())
  reference.pth        the reference's checkpoint dict (fvcore Checkpointer layout):
                       {'model', 'optimizer', 'scheduler', 'epoch', 'global_step', 'config'}
  reference_legacy.pth the same in torch.save's legacy format
                       (_use_new_zipfile_serialization=False, the default before 1.6)
  data_parallel.pth    torch.save(nn.DataParallel(model).state_dict()) ('module.' keys)
  weights.safetensors  the same state dict as safetensors
  logits.npz           'logits': PyTorch's eval-mode logits on the test split of
                       --dataset-dir, normalised like the reference; 'floor': their
                       largest change when only float32 rounding changes (oneDNN off,
                       one thread, one-ulp perturbations of weights and images), from
                       which the test derives its tolerance

Usage:
  python tests/python/save_torch_checkpoints.py --out DIR --dataset-dir DATA --depth 8
"""

import argparse
import os
import sys

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_predictions import (  # noqa: E402
    load_split, measured_floor, normalise)
from reference_models import ResNetPreact, save_safetensors  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--dataset-dir", required=True)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--mean", type=float, default=0.2860)
    p.add_argument("--std", type=float, default=0.3530)
    a = p.parse_args()

    torch.manual_seed(0)
    model = ResNetPreact(depth=a.depth, n_channels=1, image_size=28,
                         n_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    optimizer.step()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    state = model.state_dict()

    os.makedirs(a.out, exist_ok=True)
    out = lambda name: os.path.join(a.out, name)  # noqa: E731
    torch.save(state, out("bare.pth"))
    checkpoint = {
        "model": state,
        "optimizer": optimizer.state_dict(),
        "scheduler": {"last_epoch": 1, "base_lrs": [0.1]},
        "epoch": 1,
        "global_step": 10,
        "config": {"model": {"name": "resnet_preact",
                             "resnet_preact": {"depth": a.depth}}},
    }
    torch.save(checkpoint, out("reference.pth"))
    torch.save(checkpoint, out("reference_legacy.pth"),
               _use_new_zipfile_serialization=False)
    torch.save(nn.DataParallel(model).state_dict(), out("data_parallel.pth"))
    save_safetensors(out("weights.safetensors"), state)

    model.eval()
    images, _ = load_split(a.dataset_dir, "t10k", 1)
    x = normalise(images, [a.mean], [a.std])
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
    floor, _ = measured_floor(model, x, len(x), logits)
    np.savez(out("logits.npz"), logits=logits.numpy().astype(np.float32),
             floor=np.float32(floor))


if __name__ == "__main__":
    main()
