"""torchvision's tensor implementation of the RandAugment / TrivialAugment operations against
imgclf's (plugin-api `image` module), driven by tests/augment_ops.rs.

    python check_augment_ops.py DIR

DIR holds what the Rust test wrote: `cases.json` (the images' shapes and byte offsets, the
cases: operation, signed magnitude, interpolation, fill; imgclf's magnitude tables),
`inputs.bin` (the uint8 C x H x W images) and `outputs.bin` (imgclf's result of every case on
every image, in order). For each case this runs torchvision 0.26's
`transforms.autoaugment._apply_op` on the same uint8 tensor and counts the differing pixel
values; it also rebuilds the magnitude tables with torchvision's own `_augmentation_space`.
Prints one JSON object: {"tables": [...mismatches...], "cases": [{..., "differing",
"max_abs", "values"}]}.
"""

import json
import os
import sys

import torch
import torchvision
from torchvision.transforms import InterpolationMode
from torchvision.transforms.autoaugment import RandAugment, TrivialAugmentWide, _apply_op


def tables(spec):
    """Mismatches between imgclf's tables and torchvision's augmentation spaces."""
    bad = []
    for t in spec:
        bins = t["bins"]
        if t["method"] == "randaugment":
            space = RandAugment(num_magnitude_bins=bins)._augmentation_space(
                bins, (t["height"], t["width"]))
        else:
            space = TrivialAugmentWide(num_magnitude_bins=bins)._augmentation_space(bins)
        if list(space.keys()) != [o["op"] for o in t["ops"]]:
            bad.append({"table": t["method"], "order": list(space.keys())})
            continue
        for o in t["ops"]:
            mags, signed = space[o["op"]]
            want = [float(v) for v in mags.reshape(-1).tolist()] if mags.ndim > 0 else []
            if want != o["magnitudes"] or signed != o["signed"]:
                bad.append({"table": t["method"], "bins": bins, "op": o["op"],
                            "torchvision": want, "imgclf": o["magnitudes"],
                            "signed": [signed, o["signed"]]})
    return bad


def main() -> int:
    d = sys.argv[1]
    with open(os.path.join(d, "cases.json")) as f:
        spec = json.load(f)
    inputs = open(os.path.join(d, "inputs.bin"), "rb").read()
    outputs = open(os.path.join(d, "outputs.bin"), "rb").read()
    torch.set_num_threads(1)
    images = []
    for im in spec["images"]:
        c, h, w = im["shape"]
        buf = bytearray(inputs[im["offset"]:im["offset"] + c * h * w])
        images.append(torch.frombuffer(buf, dtype=torch.uint8).reshape(c, h, w).clone())
    at = 0
    report = []
    for case in spec["cases"]:
        differing = values = max_abs = 0
        for i in case["images"]:
            img = images[i]
            fill = case["fill"]
            if fill is not None and len(fill) == 1:
                fill = fill * img.shape[0]
            mode = InterpolationMode(case["interpolation"])
            want = _apply_op(img.clone(), case["op"], case["magnitude"], mode, fill)
            n = img.numel()
            got = torch.frombuffer(bytearray(outputs[at:at + n]), dtype=torch.uint8).reshape(img.shape)
            at += n
            diff = (got.to(torch.int32) - want.to(torch.int32)).abs()
            differing += int((diff != 0).sum())
            max_abs = max(max_abs, int(diff.max()))
            values += n
        report.append({**case, "differing": differing, "max_abs": max_abs, "values": values})
    if at != len(outputs):
        raise SystemExit(f"read {at} of {len(outputs)} output bytes: the case list is off")
    print(json.dumps({"torchvision": torchvision.__version__, "tables": tables(spec["tables"]),
                      "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                      "cases": report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
