"""PyTorch ground truth for imgclf's conformance checks.

Holds an independent PyTorch implementation of the CIFAR-style pre-activation
ResNet of hysts/pytorch_image_classification (``resnet_preact``) with the same
module names, hence the same state-dict keys (``conv.weight``,
``stage1.block1.bn1.running_mean``, ``stage2.block1.shortcut.conv.weight``,
``bn.num_batches_tracked``, ``fc.bias`` ...), and the same weight
initialisation, plus a minimal safetensors reader/writer built on json + numpy
so that imgclf checkpoints can be loaded without the ``safetensors`` package.
"""

from __future__ import annotations

import json
import struct
from collections import OrderedDict
from typing import Dict, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "PreactBasicBlock",
    "PreactBottleneckBlock",
    "ResNetPreact",
    "init_weights",
    "load_safetensors",
    "save_safetensors",
    "read_idx",
]


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------


class PreactBasicBlock(nn.Module):
    """Two 3x3 convolutions, BN-ReLU before each; optional 1x1 projection."""

    expansion = 1

    def __init__(self, in_ch: int, out_ch: int, stride: int,
                 remove_first_relu: bool, add_last_bn: bool,
                 preact: bool = False) -> None:
        super().__init__()
        self.remove_first_relu = remove_first_relu
        self.add_last_bn = add_last_bn
        self.preact = preact

        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1,
                               bias=False)
        if add_last_bn:
            self.bn3 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Sequential()
        if in_ch != out_ch:
            self.shortcut.add_module(
                "conv",
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, padding=0,
                          bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.preact:
            # the shortcut also sees the pre-activated input
            x = F.relu(self.bn1(x))
            y = self.conv1(x)
        else:
            y = self.bn1(x)
            if not self.remove_first_relu:
                y = F.relu(y)
            y = self.conv1(y)
        y = self.conv2(F.relu(self.bn2(y)))
        if self.add_last_bn:
            y = self.bn3(y)
        return y + self.shortcut(x)


class PreactBottleneckBlock(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand (x4), each preceded by BN-ReLU."""

    expansion = 4

    def __init__(self, in_ch: int, out_ch: int, stride: int,
                 remove_first_relu: bool, add_last_bn: bool,
                 preact: bool = False) -> None:
        super().__init__()
        self.remove_first_relu = remove_first_relu
        self.add_last_bn = add_last_bn
        self.preact = preact
        mid = out_ch // self.expansion

        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, mid, 1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1,
                               bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_ch, 1, stride=1, padding=0,
                               bias=False)
        if add_last_bn:
            self.bn4 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Sequential()
        if in_ch != out_ch:
            self.shortcut.add_module(
                "conv",
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, padding=0,
                          bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.preact:
            x = F.relu(self.bn1(x))
            y = self.conv1(x)
        else:
            y = self.bn1(x)
            if not self.remove_first_relu:
                y = F.relu(y)
            y = self.conv1(y)
        y = self.conv2(F.relu(self.bn2(y)))
        y = self.conv3(F.relu(self.bn3(y)))
        if self.add_last_bn:
            y = self.bn4(y)
        return y + self.shortcut(x)


def init_weights(module: nn.Module, mode: str = "fan_out") -> None:
    """The reference initialiser (``kaiming_fan_out`` / ``kaiming_fan_in``)."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight.data, mode=mode,
                                nonlinearity="relu")
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight.data)
        nn.init.zeros_(module.bias.data)
    elif isinstance(module, nn.Linear):
        nn.init.kaiming_normal_(module.weight.data, mode=mode,
                                nonlinearity="relu")
        nn.init.zeros_(module.bias.data)


class ResNetPreact(nn.Module):
    """CIFAR-type pre-activation ResNet (three stages, 16/32/64 x expansion)."""

    def __init__(self,
                 depth: int = 20,
                 block_type: str = "basic",
                 initial_channels: int = 16,
                 remove_first_relu: bool = False,
                 add_last_bn: bool = False,
                 preact_stage: Sequence[bool] = (True, True, True),
                 n_channels: int = 3,
                 image_size: int = 32,
                 n_classes: int = 10,
                 init_mode: str = "kaiming_fan_out") -> None:
        super().__init__()
        if block_type == "basic":
            block, per = PreactBasicBlock, 6
        elif block_type == "bottleneck":
            block, per = PreactBottleneckBlock, 9
        else:
            raise ValueError(f"unknown block_type {block_type!r}")
        n_blocks = (depth - 2) // per
        if n_blocks * per + 2 != depth:
            raise ValueError(
                f"depth {depth} invalid for {block_type} blocks "
                f"(need {per}n+2)")
        if len(preact_stage) != 3:
            raise ValueError("preact_stage needs three entries")
        self.remove_first_relu = bool(remove_first_relu)
        self.add_last_bn = bool(add_last_bn)

        widths = [
            initial_channels,
            initial_channels * 2 * block.expansion,
            initial_channels * 4 * block.expansion,
        ]
        self.conv = nn.Conv2d(n_channels, widths[0], kernel_size=(3, 3),
                              stride=1, padding=1, bias=False)
        self.stage1 = self._stage(widths[0], widths[0], n_blocks, block, 1,
                                  bool(preact_stage[0]))
        self.stage2 = self._stage(widths[0], widths[1], n_blocks, block, 2,
                                  bool(preact_stage[1]))
        self.stage3 = self._stage(widths[1], widths[2], n_blocks, block, 2,
                                  bool(preact_stage[2]))
        self.bn = nn.BatchNorm2d(widths[2])

        with torch.no_grad():
            probe = torch.zeros(1, n_channels, image_size, image_size)
            self.feature_size = int(self._features(probe).numel())
        self.fc = nn.Linear(self.feature_size, n_classes)

        if init_mode not in ("kaiming_fan_out", "kaiming_fan_in"):
            raise ValueError(f"unknown init_mode {init_mode!r}")
        mode = init_mode[len("kaiming_"):]
        self.apply(lambda m: init_weights(m, mode))

    def _stage(self, in_ch: int, out_ch: int, n: int, block, stride: int,
               preact: bool) -> nn.Sequential:
        stage = nn.Sequential()
        for i in range(n):
            first = i == 0
            stage.add_module(
                f"block{i + 1}",
                block(in_ch if first else out_ch, out_ch,
                      stride=stride if first else 1,
                      remove_first_relu=self.remove_first_relu,
                      add_last_bn=self.add_last_bn,
                      preact=preact if first else False))
        return stage

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = self.stage1(x)
        x = self.stage2(x)
        x = self.stage3(x)
        x = F.relu(self.bn(x))
        return F.adaptive_avg_pool2d(x, output_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._features(x)
        return self.fc(x.view(x.size(0), -1))


# --------------------------------------------------------------------------
# safetensors (json + numpy, no external package)
# --------------------------------------------------------------------------

_ST_TO_NP = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "U16": np.uint16,
    "U32": np.uint32,
    "U64": np.uint64,
    "BOOL": np.bool_,
}
_NP_TO_ST = {np.dtype(v).str: k for k, v in _ST_TO_NP.items()}


def load_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """Read a .safetensors file into an ordered {name: CPU tensor} dict.

    BF16 tensors are widened through their raw 16-bit patterns.
    """
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError(f"{path}: too short for a safetensors file")
    (hlen,) = struct.unpack("<Q", raw[:8])
    if 8 + hlen > len(raw):
        raise ValueError(f"{path}: header length {hlen} beyond file end")
    header = json.loads(raw[8:8 + hlen].decode("utf-8"))
    body = memoryview(raw)[8 + hlen:]
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
    entries.sort(key=lambda kv: kv[1]["data_offsets"][0])
    for name, info in entries:
        dtype = info["dtype"]
        shape = [int(s) for s in info["shape"]]
        begin, end = (int(o) for o in info["data_offsets"])
        if not 0 <= begin <= end <= len(body):
            raise ValueError(f"{path}: bad data_offsets for {name}")
        chunk = body[begin:end]
        if dtype == "BF16":
            bits = np.frombuffer(chunk, dtype="<u2").astype(np.uint32) << 16
            arr = bits.view(np.float32)
        elif dtype in _ST_TO_NP:
            arr = np.frombuffer(chunk, dtype=np.dtype(_ST_TO_NP[dtype])
                                .newbyteorder("<"))
        else:
            raise ValueError(f"{path}: unsupported dtype {dtype} ({name})")
        n = int(np.prod(shape)) if shape else 1
        if arr.size != n:
            raise ValueError(
                f"{path}: {name} holds {arr.size} elements, shape {shape}")
        arr = arr.astype(arr.dtype.newbyteorder("="), copy=True)
        out[name] = torch.from_numpy(arr.reshape(shape))
    return out


def save_safetensors(path: str, tensors: Mapping[str, torch.Tensor],
                     metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write {name: tensor} as a .safetensors file (keys in sorted order)."""
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        arr = t.detach().cpu().contiguous().numpy() if isinstance(
            t, torch.Tensor) else np.ascontiguousarray(t)
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        key = np.dtype(arr.dtype).newbyteorder("<").str
        key = key if key in _NP_TO_ST else np.dtype(arr.dtype).str
        if key not in _NP_TO_ST:
            raise ValueError(f"unsupported dtype {arr.dtype} for {name}")
        data = arr.tobytes()
        header[name] = {
            "dtype": _NP_TO_ST[key],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    hbytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hbytes += b" " * ((8 - len(hbytes) % 8) % 8)  # keep data 8-aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for b in blobs:
            f.write(b)


# --------------------------------------------------------------------------
# IDX (MNIST format) reader
# --------------------------------------------------------------------------


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (plain, or gzip if it starts with the gzip magic)."""
    import gzip

    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file")
    code, ndim = raw[2], raw[3]
    types = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4",
             0x0D: ">f4", 0x0E: ">f8"}
    if code not in types:
        raise ValueError(f"{path}: unknown IDX type code {code:#x}")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dt = np.dtype(types[code])
    n = int(np.prod(dims)) if ndim else 1
    start = 4 + 4 * ndim
    arr = np.frombuffer(raw, dtype=dt, count=n, offset=start)
    return arr.astype(dt.newbyteorder("="), copy=True).reshape(dims)


def find_idx(dataset_dir: str, stem: str) -> str:
    """Path of ``stem`` or ``stem.gz`` inside dataset_dir."""
    import os

    for name in (stem, stem + ".gz"):
        p = os.path.join(dataset_dir, name)
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"neither {stem} nor {stem}.gz in {dataset_dir}")


def _selftest(argv: Optional[Iterable[str]] = None) -> None:
    """Quick consistency check: key names, param counts, safetensors round trip."""
    import tempfile
    import os

    m = ResNetPreact(depth=20, n_channels=1, image_size=28, n_classes=10)
    sd = m.state_dict()
    assert "stage2.block1.shortcut.conv.weight" in sd
    assert sd["bn.num_batches_tracked"].dtype == torch.int64
    n = sum(p.numel() for p in m.parameters())
    print(f"resnet_preact-20 (1x28x28): {len(sd)} tensors, {n} parameters")
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "m.safetensors")
        save_safetensors(p, sd, {"format": "pt"})
        back = load_safetensors(p)
        assert set(back) == set(sd)
        for k in sd:
            assert back[k].dtype == sd[k].dtype, k
            assert torch.equal(back[k], sd[k]), k
        m2 = ResNetPreact(depth=20, n_channels=1, image_size=28, n_classes=10)
        m2.load_state_dict(back, strict=True)
    b = ResNetPreact(depth=29, block_type="bottleneck", remove_first_relu=True,
                     add_last_bn=True, preact_stage=(True, False, True))
    y = b(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 10)
    print("selftest ok")


if __name__ == "__main__":
    _selftest()
