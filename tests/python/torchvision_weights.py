"""torchvision models and their state dicts for tests/torchvision_weights.rs.

For every case of --cases (a JSON list of {"id", "model", "kwargs", "size"}),
builds ``torchvision.models.<model>(**kwargs)`` (seeded; model "VGG": the VGG
class on ``make_layers(kwargs.cfg, kwargs.batch_norm)``), gives every BN
random affine parameters and running statistics (so that eval-mode BN is not
the identity), and writes into --out:

  <id>.pth               torch.save(model.state_dict()) (zip format)
  <id>.safetensors       "input": 2 x 3 x size x size, "logits": its
                         eval-mode logits; "floor": the largest change of
                         the logits when only float32 rounding changes
                         (oneDNN off, another thread count)

--shapes also writes, for every name of --full (torchvision constructors
with their default arguments, built on the meta device: no memory, no time),
its state dict as {"<model>": [[key, shape], ...]}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn as nn
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_models import save_safetensors  # noqa: E402


def randomise_bn_(model: nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.4 - 0.2)
                m.running_mean.copy_(
                    torch.rand(m.running_mean.shape, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(
                    torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.num_batches_tracked.fill_(7)


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--shapes")
    p.add_argument("--full", nargs="*", default=[])
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    with open(a.cases) as f:
        cases = json.load(f)
    for i, case in enumerate(cases):
        torch.manual_seed(100 + i)
        g = torch.Generator().manual_seed(200 + i)
        if case["model"] == "VGG":
            # torchvision's VGG class with a smaller feature stack (its
            # classifier is fixed: 512 x 7 x 7 -> 4096 -> 4096 -> classes).
            kw = dict(case["kwargs"])
            features = torchvision.models.vgg.make_layers(
                kw.pop("cfg"), batch_norm=kw.pop("batch_norm"))
            model = torchvision.models.VGG(features, **kw)
        else:
            model = getattr(torchvision.models, case["model"])(
                **case["kwargs"])
        randomise_bn_(model, g)
        model.eval()
        size = case["size"]
        x = torch.randn(2, 3, size, size, generator=g)
        logits = logits_of(model, x)
        torch.backends.mkldnn.enabled = False
        floor = (logits_of(model, x) - logits).abs().max().item()
        torch.backends.mkldnn.enabled = True
        torch.set_num_threads(2 if a.threads == 1 else 1)
        floor = max(floor, (logits_of(model, x) - logits).abs().max().item())
        torch.set_num_threads(a.threads)
        torch.save(model.state_dict(), os.path.join(a.out, case["id"] + ".pth"))
        save_safetensors(os.path.join(a.out, case["id"] + ".safetensors"),
                         {"input": x, "logits": logits,
                          "floor": torch.tensor([floor], dtype=torch.float64)})
        del model
    if a.shapes:
        shapes = {}
        for name in a.full:
            with torch.device("meta"):
                m = getattr(torchvision.models, name)()
            shapes[name] = [[k, list(v.shape)] for k, v in m.state_dict().items()]
        with open(a.shapes, "w") as f:
            json.dump(shapes, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
