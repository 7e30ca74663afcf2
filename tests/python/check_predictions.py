"""Check imgclf's `evaluate` output against an independent PyTorch forward pass.

Loads imgclf's model_final.safetensors into the reference ResNet-preact of
tests/python/reference_models.py with load_state_dict(strict=True), evaluates
it in eval mode on the test split of an MNIST-format (IDX, plain or .gz)
dataset directory, normalised exactly like hysts/pytorch_image_classification
(float32 x/255, then (x - mean)/std in numpy float64, then float32), and
compares the logits with predictions.npz's `preds`, the argmax with its
`labels` (predicted labels, as in the reference's evaluate.py), and `acc` /
`loss` with the ground truth.

Usage:
  python tests/python/check_predictions.py --weights OUT/model_final.safetensors \
      --dataset-dir DIR --predictions EVAL/predictions.npz --depth 20 \
      [--n-channels 1 --image-size 28 --n-classes 10 --mean 0.2860 --std 0.3530]

The logit tolerance is measured on the machine that runs the check: --multiple
(10) times the largest change of PyTorch's own logits when only float32
rounding changes (oneDNN off, one thread, one-ulp perturbations of every
weight and image). Exit status 0 when max |logit diff| is within it and the
predicted labels agree; 1 otherwise (with a message); 2 on bad input.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_models import (  # noqa: E402
    ResNetPreact, find_idx, load_safetensors, read_idx)


def _bools(text: str):
    vals = [v.strip().lower() for v in text.split(",") if v.strip()]
    out = []
    for v in vals:
        if v in ("1", "true", "t", "yes", "y"):
            out.append(True)
        elif v in ("0", "false", "f", "no", "n"):
            out.append(False)
        else:
            raise argparse.ArgumentTypeError(f"not a boolean: {v!r}")
    return out


def _floats(text: str):
    return [float(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True,
                   help="imgclf model_final.safetensors (PyTorch state dict)")
    p.add_argument("--dataset-dir", required=True,
                   help="folder with t10k-images-idx3-ubyte[.gz] and "
                        "t10k-labels-idx1-ubyte[.gz]")
    p.add_argument("--predictions", required=True,
                   help="predictions.npz written by `imgclf evaluate`")
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--block-type", default="basic",
                   choices=["basic", "bottleneck"])
    p.add_argument("--initial-channels", type=int, default=16)
    p.add_argument("--remove-first-relu", action="store_true")
    p.add_argument("--add-last-bn", action="store_true")
    p.add_argument("--preact-stage", type=_bools, default=[True, True, True],
                   help="three comma-separated booleans (default true,true,true)")
    p.add_argument("--n-channels", type=int, default=1)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--n-classes", type=int, default=10)
    p.add_argument("--mean", type=_floats, default=[0.2860],
                   help="per-channel mean, comma-separated (default 0.2860)")
    p.add_argument("--std", type=_floats, default=[0.3530],
                   help="per-channel std, comma-separated (default 0.3530)")
    p.add_argument("--split-prefix", default="t10k",
                   help="IDX file prefix of the evaluated split (default t10k)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--multiple", type=float, default=10.0,
                   help="the logit tolerance in multiples of the measured "
                        "floor (default 10)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0 = torch default)")
    return p.parse_args(argv)


def load_split(dataset_dir: str, prefix: str, n_channels: int):
    images = read_idx(find_idx(dataset_dir, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(find_idx(dataset_dir, f"{prefix}-labels-idx1-ubyte"))
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    if images.ndim == 3:  # N x H x W (grayscale)
        images = images[:, :, :, None]
    if images.shape[-1] != n_channels:
        raise ValueError(
            f"images have {images.shape[-1]} channels, expected {n_channels}")
    if len(labels) != len(images):
        raise ValueError(
            f"{len(images)} images but {len(labels)} labels")
    return images, labels.astype(np.int64)


def normalise(images_nhwc: np.ndarray, mean, std) -> np.ndarray:
    """The reference's Normalize + ToTensor: returns float32 NCHW."""
    x = images_nhwc.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, dtype=np.float64)) / np.asarray(
        std, dtype=np.float64)
    return np.ascontiguousarray(x.astype(np.float32).transpose(0, 3, 1, 2))


def forward(model, x: np.ndarray, batch_size: int) -> torch.Tensor:
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            outs.append(model(torch.from_numpy(x[i:i + batch_size])))
    return torch.cat(outs)


def one_ulp(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """`t` with every float element moved one ulp up or down (at random)."""
    if not t.is_floating_point():
        return t.clone()
    up = torch.randint(0, 2, t.shape, generator=gen).bool()
    return torch.where(up, torch.nextafter(t, torch.full_like(t, np.inf)),
                       torch.nextafter(t, torch.full_like(t, -np.inf)))


def measured_floor(model, x: np.ndarray, batch_size: int,
                   ref: torch.Tensor):
    """The largest |logit| change from `ref` with oneDNN off, with one
    thread, and with one-ulp perturbations of every weight and image (at
    least one ulp of the largest |logit|), and which of them gave it."""
    diffs = {"one ulp": float(np.spacing(np.float32(ref.abs().max().item())))}
    threads = torch.get_num_threads()
    torch.backends.mkldnn.enabled = False
    try:
        diffs["oneDNN off"] = (forward(model, x, batch_size) - ref).abs().max().item()
    finally:
        torch.backends.mkldnn.enabled = True
    torch.set_num_threads(1)
    try:
        diffs["one thread"] = (forward(model, x, batch_size) - ref).abs().max().item()
    finally:
        torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(1)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        model.load_state_dict({k: one_ulp(v, gen) for k, v in saved.items()})
        xp = one_ulp(torch.from_numpy(x), gen).numpy()
        diffs["one-ulp weights and images"] = (
            forward(model, xp, batch_size) - ref).abs().max().item()
    finally:
        model.load_state_dict(saved)
    why = max(diffs, key=diffs.get)
    return diffs[why], why


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    try:
        if len(a.mean) not in (1, a.n_channels) or len(a.std) not in (
                1, a.n_channels):
            raise ValueError("--mean/--std need 1 or n-channels values")
        if len(a.preact_stage) != 3:
            raise ValueError("--preact-stage needs three values")
        mean = a.mean * a.n_channels if len(a.mean) == 1 else a.mean
        std = a.std * a.n_channels if len(a.std) == 1 else a.std
        model = ResNetPreact(depth=a.depth, block_type=a.block_type,
                             initial_channels=a.initial_channels,
                             remove_first_relu=a.remove_first_relu,
                             add_last_bn=a.add_last_bn,
                             preact_stage=a.preact_stage,
                             n_channels=a.n_channels,
                             image_size=a.image_size,
                             n_classes=a.n_classes)
        state = load_safetensors(a.weights)
        expected = model.state_dict()
        # imgclf training checkpoints (checkpoint_*.safetensors) nest the
        # model under "model." next to optimizer/scheduler state
        if set(state) != set(expected) and any(
                k.startswith("model.") for k in state):
            nested = {k[len("model."):]: v for k, v in state.items()
                      if k.startswith("model.")}
            if set(nested) == set(expected):
                print(f"note: using the model.* entries of {a.weights}")
                state = nested
        missing = sorted(set(expected) - set(state))
        extra = sorted(set(state) - set(expected))
        if missing or extra:
            print(f"FAIL: state-dict keys differ: missing {missing[:10]}"
                  f"{'...' if len(missing) > 10 else ''}, unexpected "
                  f"{extra[:10]}{'...' if len(extra) > 10 else ''}")
            return 1
        for k, v in expected.items():
            if state[k].dtype != v.dtype:
                print(f"FAIL: {k} has dtype {state[k].dtype}, "
                      f"expected {v.dtype}")
                return 1
        model.load_state_dict(state, strict=True)
        model.eval()

        images, truth = load_split(a.dataset_dir, a.split_prefix,
                                   a.n_channels)
        if images.shape[1] != a.image_size or images.shape[2] != a.image_size:
            raise ValueError(f"images are {images.shape[1]}x{images.shape[2]},"
                             f" expected {a.image_size}")
        npz = np.load(a.predictions)
        for key in ("preds", "labels"):
            if key not in npz.files:
                raise ValueError(f"{a.predictions} lacks {key!r}")
        got_logits = np.asarray(npz["preds"])
        got_labels = np.asarray(npz["labels"]).astype(np.int64).ravel()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        print(f"ERROR: {e}")
        return 2

    x = normalise(images, mean, std)
    logits_t = forward(model, x, a.batch_size)
    ref_logits = logits_t.numpy()
    # The tolerance is measured: how far the logits move when only float32
    # rounding changes (oneDNN off, one thread, one-ulp perturbations of the
    # weights and the images), times --multiple.
    floor, why = measured_floor(model, x, a.batch_size, logits_t)
    a.tol = a.multiple * floor
    print(f"tolerance {a.tol:.3e}: {a.multiple:g} times the floor "
          f"{floor:.3e} ({why})")
    ref_labels = ref_logits.argmax(axis=1)
    ref_acc = float((ref_labels == truth).mean())
    ref_loss = float(F.cross_entropy(logits_t, torch.from_numpy(truth)))
    ref_probs = F.softmax(logits_t, dim=1).numpy()

    ok = True
    msgs = []
    if got_logits.shape != ref_logits.shape:
        print(f"FAIL: preds shape {got_logits.shape}, expected "
              f"{ref_logits.shape}")
        return 1
    if got_logits.dtype != np.float32:
        msgs.append(f"note: preds dtype is {got_logits.dtype}, "
                    "reference writes float32")
    diff = np.abs(got_logits.astype(np.float64) - ref_logits.astype(
        np.float64))
    max_diff = float(diff.max()) if diff.size else 0.0
    worst = np.unravel_index(int(diff.argmax()), diff.shape) if diff.size \
        else None
    print(f"images: {len(x)}; logits max abs diff {max_diff:.3e} "
          f"(mean {float(diff.mean()) if diff.size else 0.0:.3e}"
          f"{f', at {tuple(int(i) for i in worst)}' if worst else ''})")
    if not np.isfinite(max_diff) or max_diff > a.tol:
        ok = False
        msgs.append(f"FAIL: max abs logit diff {max_diff:.3e} > {a.tol:g}")

    if got_labels.shape != ref_labels.shape:
        ok = False
        msgs.append(f"FAIL: labels shape {got_labels.shape}, expected "
                    f"{ref_labels.shape}")
    else:
        differ = got_labels != ref_labels
        # A differing argmax is only a disagreement when the reference does not
        # score both classes within the tolerance (a near tie may go either way).
        rows = np.nonzero(differ)[0]
        margin = np.abs(ref_logits[rows, ref_labels[rows]].astype(np.float64)
                        - ref_logits[rows, got_labels[rows]].astype(np.float64))
        ties = int((margin <= 2 * a.tol).sum())
        n_bad = int(differ.sum()) - ties
        print(f"predicted labels: {len(ref_labels) - int(differ.sum())}/"
              f"{len(ref_labels)} agree ({ties} near ties)")
        if n_bad:
            ok = False
            idx = np.nonzero(got_labels != ref_labels)[0][:10].tolist()
            msgs.append(f"FAIL: {n_bad} predicted labels differ "
                        f"(first at {idx})")

    if "probs" in npz.files:
        pdiff = float(np.abs(np.asarray(npz["probs"], dtype=np.float64)
                             - ref_probs).max())
        print(f"probs max abs diff {pdiff:.3e}")
        if pdiff > a.tol:
            ok = False
            msgs.append(f"FAIL: probs max abs diff {pdiff:.3e} > {a.tol:g}")
    if "acc" in npz.files:
        got_acc = float(npz["acc"])
        print(f"acc: imgclf {got_acc:.6f}, reference {ref_acc:.6f}")
        n_ties = ties if got_labels.shape == ref_labels.shape else 0
        if abs(got_acc - ref_acc) > (n_ties + 0.5) / max(len(truth), 1):
            ok = False
            msgs.append(f"FAIL: acc {got_acc} != reference {ref_acc}")
    if "loss" in npz.files:
        got_loss = float(npz["loss"])
        print(f"loss: imgclf {got_loss:.6f}, reference {ref_loss:.6f}")
        if abs(got_loss - ref_loss) > max(1e-4, 1e-4 * abs(ref_loss)):
            ok = False
            msgs.append(f"FAIL: loss {got_loss} != reference {ref_loss}")

    for m in msgs:
        print(m)
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
