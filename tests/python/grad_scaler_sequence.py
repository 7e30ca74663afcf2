"""torch.amp.GradScaler's scale and skip sequence with overflow injected at chosen steps: the
ground truth tests/precision.rs compares imgclf's loss scaler with, step by step.

usage: grad_scaler_sequence.py  (reads one JSON object on stdin, writes one on stdout)
  in:  {"scenarios": [{"name", "steps", "inf": [step...], "nan": [step...],
                       "options": {init_scale, growth_factor, backoff_factor, growth_interval}}]}
  out: {"<name>": [{"scale": s, "stepped": b, "grads": [...], "scale_after": s,
                    "tracker_after": n}, ...]}

Each step: a float32 parameter p (3 values) and loss = sum(p * w); backward of scaler.scale(loss);
p.grad[1] set to inf / NaN on the chosen steps; unscale_, step (counted by a post-step hook),
update. `grads` are the unscaled gradients the optimizer saw (float32 values as floats).
"""
import json
import sys

import torch

W = [0.1, -2.5, 3e-3]


def run(scenario):
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    w = torch.tensor(W)
    opt = torch.optim.SGD([p], lr=0.0)
    taken = []
    opt.register_step_post_hook(lambda *_: taken.append(True))
    scaler = torch.amp.GradScaler("cpu", **scenario["options"])
    inf, nan = set(scenario["inf"]), set(scenario["nan"])
    out = []
    for step in range(scenario["steps"]):
        opt.zero_grad(set_to_none=True)
        scale = scaler.get_scale()
        scaler.scale((p * w).sum()).backward()
        if step in inf:
            p.grad[1] = float("inf")
        if step in nan:
            p.grad[1] = float("nan")
        scaler.unscale_(opt)
        grads = p.grad.tolist()
        before = len(taken)
        scaler.step(opt)
        scaler.update()
        out.append(
            {
                "scale": scale,
                "stepped": len(taken) > before,
                "grads": [g if g == g and abs(g) != float("inf") else str(g) for g in grads],
                "scale_after": scaler.get_scale(),
                "tracker_after": int(scaler._get_growth_tracker()),
            }
        )
    return out


def main():
    request = json.load(sys.stdin)
    json.dump({s["name"]: run(s) for s in request["scenarios"]}, sys.stdout)


if __name__ == "__main__":
    main()
