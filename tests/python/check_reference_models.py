"""Self-check of tests/python/reference_models.py against the reference.

Every case of tests/data/reference/state_dict/*.txt (dumped from
hysts/pytorch_image_classification: header with model, config file and
overrides, the trainable parameter count, then ``name [shape] dtype`` lines
in module order) is rebuilt from the same config file and overrides, on the
meta device (no memory, no time), and compared: parameter count, and every
key, shape and dtype in order.

Usage:  python tests/python/check_reference_models.py [STATE_DICT_DIR [CONFIGS_DIR]]
Exit status 0 when every case matches.
"""

from __future__ import annotations

import ast
import os
import sys
from typing import Dict, Iterator, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_models import build_model  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DATASETS = {"CIFAR10": (3, 32, 10), "CIFAR100": (3, 32, 100),
            "MNIST": (1, 28, 10), "FashionMNIST": (1, 28, 10),
            "KMNIST": (1, 28, 10), "ImageNet": (3, 224, 1000)}


def literal(text: str):
    """A value as yacs decodes it: a Python literal, else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def read_yaml_maps(path: str) -> Dict[str, object]:
    """Flat ``a.b.c: value`` view of a block-style YAML file of nested maps
    with scalar or flow-list values (all the configs/ files use)."""
    flat: Dict[str, object] = {}
    stack: List[Tuple[int, str]] = []
    with open(path) as f:
        for raw in f:
            line = raw.split(" #")[0].rstrip()
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            indent = len(line) - len(line.lstrip())
            key, _, value = line.strip().partition(":")
            while stack and stack[-1][0] >= indent:
                stack.pop()
            dotted = ".".join([k for _, k in stack] + [key.strip()])
            if value.strip():
                flat[dotted] = literal(value.strip())
            else:
                stack.append((indent, key.strip()))
    return flat


def split_outside_brackets(text: str) -> List[str]:
    out, cur, depth = [], "", 0
    for ch in text:
        depth += ch in "[(" and 1 or 0
        depth -= ch in "])" and 1 or 0
        if ch.isspace() and depth == 0:
            if cur:
                out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        out.append(cur)
    return out


def parse_case(path: str):
    with open(path) as f:
        lines = [ln.rstrip("\n") for ln in f if ln.strip()]
    head = lines[0].lstrip("#").strip()
    model, rest = head.split("config:", 1)
    config, _, overrides = rest.partition("overrides:")
    params = int(lines[1].rsplit(":", 1)[1])
    return (model.strip(), config.strip(), split_outside_brackets(overrides),
            params, [ln.strip() for ln in lines[2:]])


def effective_config(config_file: str, overrides: List[str]) -> dict:
    """What the reference builds for ``--config FILE k v k v ...``: model
    name, its ``model.<name>.*`` section, init mode and dataset geometry."""
    flat = read_yaml_maps(config_file)
    words = list(overrides)
    if len(words) % 2:
        raise ValueError(f"odd override list {overrides}")
    for k, v in zip(words[::2], words[1::2]):
        flat[k] = literal(v)
    name = flat.get("model.name", "resnet_preact")  # the reference default
    dataset = flat.get("dataset.name", "CIFAR10")
    c, size, k = DATASETS[dataset]
    prefix = f"model.{name}."
    return {
        "model": name,
        "model_type": flat.get("model.type", "cifar"),
        "section": {key[len(prefix):]: v for key, v in flat.items()
                    if key.startswith(prefix)},
        "init_mode": flat.get("model.init_mode", "kaiming_fan_out"),
        "dataset": dataset,
        "n_channels": flat.get("dataset.n_channels", c),
        "image_size": flat.get("dataset.image_size", size),
        "n_classes": flat.get("dataset.n_classes", k),
    }


def model_of(cfg: dict):
    return build_model(cfg["model"], cfg["section"],
                       n_channels=cfg["n_channels"],
                       image_size=cfg["image_size"],
                       n_classes=cfg["n_classes"], init_mode=cfg["init_mode"],
                       model_type=cfg["model_type"])


def case_model(model: str, config_file: str, overrides: List[str]):
    cfg = effective_config(config_file, overrides)
    if cfg["model"] != model:
        raise ValueError(f"config builds {cfg['model']}, case says {model}")
    with torch.device("meta"):
        return model_of(cfg)


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def check_all(state_dict_dir: Optional[str] = None,
              configs_root: Optional[str] = None) -> Iterator[str]:
    """One line per case: ``ok <case> <params>`` or ``FAIL <case>: why``."""
    state_dict_dir = state_dict_dir or os.path.join(
        REPO, "tests", "data", "reference", "state_dict")
    configs_root = configs_root or REPO
    for fname in sorted(os.listdir(state_dict_dir)):
        if not fname.endswith(".txt"):
            continue
        case = fname[:-4]
        try:
            model, config, overrides, params, expected = parse_case(
                os.path.join(state_dict_dir, fname))
            m = case_model(model, os.path.join(configs_root, config),
                           overrides)
            n = sum(p.numel() for p in m.parameters())
            ours = [f"{k} {list(v.shape)} {dtype_name(v)}"
                    for k, v in m.state_dict().items()]
        except Exception as e:  # one broken case must not hide the others
            yield f"FAIL {case}: {type(e).__name__}: {e}"
            continue
        if n != params:
            yield f"FAIL {case}: {n} parameters, reference {params}"
        elif ours != expected:
            first = next(i for i in range(max(len(ours), len(expected)))
                         if i >= len(ours) or i >= len(expected)
                         or ours[i] != expected[i])
            yield (f"FAIL {case}: state dict differs at entry {first}: "
                   f"ours {ours[first] if first < len(ours) else None!r}, "
                   f"reference "
                   f"{expected[first] if first < len(expected) else None!r}"
                   f" ({len(ours)} vs {len(expected)} entries)")
        else:
            yield f"ok {case} {n}"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    failed = 0
    for line in check_all(*argv[:2]):
        print(line)
        failed += line.startswith("FAIL")
    print("all cases match" if not failed else f"{failed} case(s) differ")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
