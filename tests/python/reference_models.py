"""PyTorch ground truth for imgclf's conformance checks.

Holds independent PyTorch implementations of every CIFAR-style network of
hysts/pytorch_image_classification (models/cifar/: ``vgg``, ``resnet``,
``resnet_preact``, ``wrn``, ``densenet``, ``pyramidnet``, ``resnext``,
``shake_shake``, ``se_resnet_preact``; see :func:`build_model`) with the same
module names, hence the same state-dict keys (``conv.weight``,
``stage1.block1.bn1.running_mean``, ``stage2.block1.shortcut.conv.weight``,
``bn.num_batches_tracked``, ``fc.bias`` ...), the same eval-mode forward and
the same weight initialisation, plus a minimal safetensors reader/writer
built on json + numpy so that imgclf checkpoints can be loaded without the
``safetensors`` package.
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
    "SELayer",
    "SEResNetPreact",
    "VGG",
    "ResNet",
    "WRN",
    "DenseNet",
    "PyramidNet",
    "pyramid_widths",
    "ResNeXt",
    "ShakeShake",
    "REFERENCE_DEFAULTS",
    "build_model",
    "init_spec",
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
                 preact: bool = False,
                 se_reduction: Optional[int] = None) -> None:
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
        self.se = None if se_reduction is None else SELayer(out_ch,
                                                            se_reduction)
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
        if self.se is not None:
            y = self.se(y)
        return y + self.shortcut(x)


class PreactBottleneckBlock(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand (x4), each preceded by BN-ReLU."""

    expansion = 4

    def __init__(self, in_ch: int, out_ch: int, stride: int,
                 remove_first_relu: bool, add_last_bn: bool,
                 preact: bool = False,
                 se_reduction: Optional[int] = None) -> None:
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
        self.se = None if se_reduction is None else SELayer(out_ch,
                                                            se_reduction)
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
        if self.se is not None:
            y = self.se(y)
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


def init_spec(model: nn.Module) -> Dict[str, list]:
    """How the reference initialises each state-dict entry of a freshly
    built ``model``: ``["normal", std]`` (kaiming normal, ReLU gain, with the
    model's fan mode), ``["uniform", bound]`` (PyTorch's default for conv
    biases, which the reference's initializer leaves alone),
    ``["const", value]``, or ``["any"]``.

    BN buffers are not at their defaults: the reference measures its feature
    size with a forward pass of one zero image in training mode, which
    updates every BN once (``num_batches_tracked`` 1, ``running_var``
    0.9 * 1 + 0.1 * 0 where the input is all zero, as in every network
    without conv biases). They are taken from ``model`` as built, constant
    or (VGG: conv biases make them depend on the random weights) ``any``.
    """
    fan_mode = model.init_fan
    spec: Dict[str, list] = {}
    # With conv biases (VGG) the statistics depend on the random draw: one
    # draw may leave them all equal and the next not (seen on ImageNet VGG).
    biased = any(isinstance(m, nn.Conv2d) and m.bias is not None
                 for m in model.modules())
    for name, b in model.named_buffers():
        flat = b.flatten()
        same = flat.numel() > 0 and bool((flat == flat[0]).all())
        if biased and not name.endswith("num_batches_tracked"):
            same = False
        spec[name] = ["const", flat[0].item()] if same else ["any"]
    for prefix, m in model.named_modules():
        p = prefix + "." if prefix else ""
        if isinstance(m, nn.Conv2d):
            field = m.kernel_size[0] * m.kernel_size[1]
            fan_in = m.in_channels // m.groups * field
            fan = m.out_channels * field if fan_mode == "fan_out" else fan_in
            spec[p + "weight"] = ["normal", (2.0 / fan) ** 0.5]
            if m.bias is not None:
                spec[p + "bias"] = ["uniform", fan_in ** -0.5]
        elif isinstance(m, nn.Linear):
            fan = m.out_features if fan_mode == "fan_out" else m.in_features
            spec[p + "weight"] = ["normal", (2.0 / fan) ** 0.5]
            spec[p + "bias"] = ["const", 0.0]
        elif isinstance(m, nn.BatchNorm2d):
            spec[p + "weight"] = ["const", 1.0]
            spec[p + "bias"] = ["const", 0.0]
    return spec


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
                 init_mode: str = "kaiming_fan_out",
                 se_reduction: Optional[int] = None) -> None:
        super().__init__()
        self.se_reduction = se_reduction
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
        self.init_fan = mode
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
                      preact=preact if first else False,
                      se_reduction=self.se_reduction))
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


class SELayer(nn.Module):
    """Squeeze-and-excitation: channel gates from the global average."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        hidden = channels // reduction
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[0], x.shape[1]
        g = F.adaptive_avg_pool2d(x, output_size=1).reshape(n, c)
        g = torch.sigmoid(self.fc2(F.relu(self.fc1(g))))
        return x * g.reshape(n, c, 1, 1)


class SEResNetPreact(ResNetPreact):
    """Pre-activation ResNet with an SE layer on every residual branch.

    The reference always initialises it kaiming fan-out (it ignores
    ``model.init_mode``), which ``init_mode`` here defaults to.
    """

    def __init__(self, se_reduction: int = 16, **kwargs) -> None:
        super().__init__(se_reduction=se_reduction, **kwargs)


# --------------------------------------------------------------------------
# The other CIFAR architectures of the reference (models/cifar/*.py)
# --------------------------------------------------------------------------


def _kaiming_mode(init_mode: str) -> str:
    if init_mode not in ("kaiming_fan_out", "kaiming_fan_in"):
        raise ValueError(f"unknown init_mode {init_mode!r}")
    return init_mode[len("kaiming_"):]


def _blocks_per_stage(depth: int, per: int, offset: int, what: str) -> int:
    n = (depth - offset) // per
    if n < 1 or n * per + offset != depth:
        raise ValueError(f"depth {depth} invalid for {what} "
                         f"(need {per}n+{offset})")
    return n


class _CifarNet(nn.Module):
    """Shared tail: flatten the conv features into ``fc``, reference init."""

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _finish(self, n_channels: int, image_size: int, n_classes: int,
                init_mode: str) -> None:
        mode = _kaiming_mode(init_mode)
        self.init_fan = mode
        with torch.no_grad():
            probe = torch.zeros(1, n_channels, image_size, image_size)
            self.feature_size = int(self._features(probe).numel())
        self.fc = nn.Linear(self.feature_size, n_classes)
        self.apply(lambda m: init_weights(m, mode))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._features(x)
        return self.fc(x.reshape(x.size(0), -1))


def add_vgg_stages(net: nn.Module, c_in: int, widths: Sequence[int],
                   counts: Sequence[int], use_bn: bool) -> None:
    """VGG's stages ``stage1``, ``stage2``, ... on ``net`` (the CIFAR and ImageNet
    forms alike): ``counts[s]`` 3x3 convs ``conv{j}`` (bias, padding 1), each
    followed by ``bn{j}`` when ``use_bn`` and ``relu{j}``, then a 2x2 max-pool."""
    for s, (width, count) in enumerate(zip(widths, counts)):
        stage = nn.Sequential()
        for j in range(count):
            stage.add_module(f"conv{j}", nn.Conv2d(
                c_in if j == 0 else width, width, 3, stride=1, padding=1))
            if use_bn:
                stage.add_module(f"bn{j}", nn.BatchNorm2d(width))
            stage.add_module(f"relu{j}", nn.ReLU())
        stage.add_module("pool", nn.MaxPool2d(kernel_size=2, stride=2))
        setattr(net, f"stage{s + 1}", stage)
        c_in = width


class VGG(_CifarNet):
    """Five stages of [conv3x3(+bias) (-BN) -ReLU] x n, each closed by 2x2 max-pool.

    The flattened last feature map (not pooled to 1x1) feeds ``fc``; on 28x28
    inputs the fifth pool meets a 1x1 map and PyTorch refuses it.
    """

    def __init__(self,
                 stage_channels: Sequence[int] = (64, 128, 256, 512, 512),
                 n_layers: Sequence[int] = (2, 2, 3, 3, 3),
                 use_bn: bool = True,
                 n_channels: int = 3,
                 image_size: int = 32,
                 n_classes: int = 10,
                 init_mode: str = "kaiming_fan_out") -> None:
        super().__init__()
        if len(stage_channels) != 5 or len(n_layers) != 5:
            raise ValueError("VGG needs five stage widths and layer counts")
        add_vgg_stages(self, n_channels, stage_channels, n_layers, use_bn)
        self._finish(n_channels, image_size, n_classes, init_mode)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        for s in range(1, 6):
            x = getattr(self, f"stage{s}")(x)
        return x


def _projection(c_in: int, c_out: int, stride: int,
                with_bn: bool) -> nn.Sequential:
    """Empty (identity) when the widths agree, else 1x1 conv (+ BN)."""
    sc = nn.Sequential()
    if c_in != c_out:
        sc.add_module("conv", nn.Conv2d(c_in, c_out, 1, stride=stride,
                                        padding=0, bias=False))
        if with_bn:
            sc.add_module("bn", nn.BatchNorm2d(c_out))
    return sc


class ResNetBasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, add, ReLU (post-activation)."""

    expansion = 1

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = _projection(c_in, c_out, stride, with_bn=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ResNetBottleneckBlock(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand, each conv-BN; add, ReLU."""

    expansion = 4

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        mid = c_out // self.expansion
        self.conv1 = nn.Conv2d(c_in, mid, 1, stride=1, padding=0, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, c_out, 1, stride=1, padding=0, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = _projection(c_in, c_out, stride, with_bn=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + self.shortcut(x))


def _sequential_stage(make, widths: Sequence[int], stride: int
                      ) -> nn.Sequential:
    """block1..blockN; block i maps widths[i] -> widths[i+1], only block1 strides."""
    stage = nn.Sequential()
    for i in range(len(widths) - 1):
        stage.add_module(f"block{i + 1}",
                         make(widths[i], widths[i + 1],
                              stride if i == 0 else 1))
    return stage


class ResNet(_CifarNet):
    """CIFAR ResNet (He et al. 2015): stem conv-BN-ReLU, three stages."""

    def __init__(self,
                 depth: int = 110,
                 block_type: str = "basic",
                 initial_channels: int = 16,
                 n_channels: int = 3,
                 image_size: int = 32,
                 n_classes: int = 10,
                 init_mode: str = "kaiming_fan_out") -> None:
        super().__init__()
        if block_type == "basic":
            block, n = ResNetBasicBlock, _blocks_per_stage(depth, 6, 2,
                                                           "basic blocks")
        elif block_type == "bottleneck":
            block, n = ResNetBottleneckBlock, _blocks_per_stage(
                depth, 9, 2, "bottleneck blocks")
        else:
            raise ValueError(f"unknown block_type {block_type!r}")
        w0 = initial_channels
        w1 = initial_channels * 2 * block.expansion
        w2 = initial_channels * 4 * block.expansion
        self.conv = nn.Conv2d(n_channels, w0, 3, stride=1, padding=1,
                              bias=False)
        self.bn = nn.BatchNorm2d(w0)
        self.stage1 = _sequential_stage(block, [w0] * (n + 1), 1)
        self.stage2 = _sequential_stage(block, [w0] + [w1] * n, 2)
        self.stage3 = _sequential_stage(block, [w1] + [w2] * n, 2)
        self._finish(n_channels, image_size, n_classes, init_mode)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = self.stage3(self.stage2(self.stage1(x)))
        return F.adaptive_avg_pool2d(x, output_size=1)


class WRNBlock(nn.Module):
    """Pre-activation basic block with dropout between the convolutions.

    When the widths differ, BN-ReLU is applied to the input of both paths;
    otherwise only to the residual path (identity shortcut sees the raw x).
    """

    def __init__(self, c_in: int, c_out: int, stride: int,
                 drop_rate: float) -> None:
        super().__init__()
        self.drop_rate = drop_rate
        self.both = c_in != c_out
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1,
                               bias=False)
        self.shortcut = _projection(c_in, c_out, stride, with_bn=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))
        if self.both:
            x = a
        y = self.conv1(a)
        if self.drop_rate > 0:
            y = F.dropout(y, p=self.drop_rate, training=self.training)
        y = self.conv2(F.relu(self.bn2(y)))
        return y + self.shortcut(x)


class WRN(_CifarNet):
    """Wide ResNet (Zagoruyko & Komodakis 2016), depth 6n+4."""

    def __init__(self,
                 depth: int = 28,
                 initial_channels: int = 16,
                 widening_factor: int = 10,
                 drop_rate: float = 0.0,
                 n_channels: int = 3,
                 image_size: int = 32,
                 n_classes: int = 10,
                 init_mode: str = "kaiming_fan_out") -> None:
        super().__init__()
        n = _blocks_per_stage(depth, 6, 4, "WRN")
        k = widening_factor
        w = [initial_channels, initial_channels * k,
             initial_channels * 2 * k, initial_channels * 4 * k]

        def make(a, b, s):
            return WRNBlock(a, b, s, drop_rate)

        self.conv = nn.Conv2d(n_channels, w[0], 3, stride=1, padding=1,
                              bias=False)
        self.stage1 = _sequential_stage(make, [w[0]] + [w[1]] * n, 1)
        self.stage2 = _sequential_stage(make, [w[1]] + [w[2]] * n, 2)
        self.stage3 = _sequential_stage(make, [w[2]] + [w[3]] * n, 2)
        self.bn = nn.BatchNorm2d(w[3])
        self._finish(n_channels, image_size, n_classes, init_mode)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.conv(x))))
        return F.adaptive_avg_pool2d(F.relu(self.bn(x)), output_size=1)


class DenseBasicBlock(nn.Module):
    """BN-ReLU-conv3x3 to ``growth`` maps, concatenated after the input."""

    def __init__(self, c_in: int, growth: int, drop_rate: float) -> None:
        super().__init__()
        self.drop_rate = drop_rate
        self.bn = nn.BatchNorm2d(c_in)
        self.conv = nn.Conv2d(c_in, growth, 3, stride=1, padding=1,
                              bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(F.relu(self.bn(x)))
        if self.drop_rate > 0:
            y = F.dropout(y, p=self.drop_rate, training=self.training)
        return torch.cat([x, y], dim=1)


class DenseBottleneckBlock(nn.Module):
    """BN-ReLU-conv1x1 to 4*growth, BN-ReLU-conv3x3 to growth; concat."""

    def __init__(self, c_in: int, growth: int, drop_rate: float) -> None:
        super().__init__()
        self.drop_rate = drop_rate
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, 4 * growth, 1, stride=1, padding=0,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, stride=1, padding=1,
                               bias=False)

    def _drop(self, y: torch.Tensor) -> torch.Tensor:
        if self.drop_rate > 0:
            y = F.dropout(y, p=self.drop_rate, training=self.training)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._drop(self.conv1(F.relu(self.bn1(x))))
        y = self._drop(self.conv2(F.relu(self.bn2(y))))
        return torch.cat([x, y], dim=1)


class DenseTransition(nn.Module):
    """BN-ReLU-conv1x1 (compression), dropout, 2x2 average pool."""

    def __init__(self, c_in: int, c_out: int, drop_rate: float) -> None:
        super().__init__()
        self.drop_rate = drop_rate
        self.bn = nn.BatchNorm2d(c_in)
        self.conv = nn.Conv2d(c_in, c_out, 1, stride=1, padding=0,
                              bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(F.relu(self.bn(x)))
        if self.drop_rate > 0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class DenseNet(_CifarNet):
    """DenseNet(-BC) for CIFAR: three dense stages, transitions after two."""

    def __init__(self,
                 depth: int = 100,
                 block_type: str = "bottleneck",
                 growth_rate: int = 12,
                 drop_rate: float = 0.0,
                 compression_rate: float = 0.5,
                 n_channels: int = 3,
                 image_size: int = 32,
                 n_classes: int = 10,
                 init_mode: str = "kaiming_fan_out") -> None:
        super().__init__()
        if block_type == "basic":
            block, n = DenseBasicBlock, _blocks_per_stage(depth, 3, 4,
                                                          "basic blocks")
        elif block_type == "bottleneck":
            block, n = DenseBottleneckBlock, _blocks_per_stage(
                depth, 6, 4, "bottleneck blocks")
        else:
            raise ValueError(f"unknown block_type {block_type!r}")
        g = growth_rate
        c = 2 * g
        self.conv = nn.Conv2d(n_channels, c, 3, stride=1, padding=1,
                              bias=False)
        for s in range(3):
            stage = nn.Sequential()
            for j in range(n):
                stage.add_module(f"block{j + 1}",
                                 block(c + j * g, g, drop_rate))
            c = int(c + n * g)
            if s < 2:
                c_out = int(c * compression_rate)
                stage.add_module("transition",
                                 DenseTransition(c, c_out, drop_rate))
                c = c_out
            setattr(self, f"stage{s + 1}", stage)
        self.bn = nn.BatchNorm2d(c)
        self._finish(n_channels, image_size, n_classes, init_mode)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.conv(x))))
        return F.adaptive_avg_pool2d(F.relu(self.bn(x)), output_size=1)


def _zero_pad_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    extra = channels - x.size(1)
    if extra == 0:
        return x
    zeros = x.new_zeros(x.size(0), extra, x.size(2), x.size(3))
    return torch.cat([x, zeros], dim=1)


class PyramidBasicBlock(nn.Module):
    """BN-conv-BN-ReLU-conv-BN; shortcut: 2x2 avg-pool when strided, zero-padded channels."""

    expansion = 1

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1,
                               bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.stride = stride

    def _shortcut(self, x: torch.Tensor, channels: int) -> torch.Tensor:
        if self.stride > 1:
            x = F.avg_pool2d(x, kernel_size=2, stride=2)
        return _zero_pad_channels(x, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(y)))
        y = self.bn3(y)
        return y + self._shortcut(x, y.size(1))


class PyramidBottleneckBlock(PyramidBasicBlock):
    """BN-conv1x1-BN-ReLU-conv3x3(strided)-BN-ReLU-conv1x1-BN; same shortcut."""

    expansion = 4

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        nn.Module.__init__(self)
        mid = c_out // self.expansion
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, mid, 1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1,
                               bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, c_out, 1, stride=1, padding=0, bias=False)
        self.bn4 = nn.BatchNorm2d(c_out)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(y)))
        y = self.conv3(F.relu(self.bn3(y)))
        y = self.bn4(y)
        return y + self._shortcut(x, y.size(1))


def pyramid_widths(initial_channels: int, alpha, n_blocks_total: int,
                   expansion: int) -> list:
    """Per-block widths of PyramidNet: the running sum of alpha/N, rounded
    half-to-even (numpy's rounding), times the expansion (the stem's not)."""
    w = [float(initial_channels)]
    step = alpha / n_blocks_total
    for _ in range(n_blocks_total):
        w.append(w[-1] + step)
    out = [int(np.round(v)) * expansion for v in w]
    out[0] //= expansion
    return out


class PyramidNet(_CifarNet):
    """PyramidNet (Han et al. 2016): widths grow by alpha/N per block."""

    def __init__(self,
                 depth: int = 272,
                 initial_channels: int = 16,
                 block_type: str = "bottleneck",
                 alpha=200,
                 n_channels: int = 3,
                 image_size: int = 32,
                 n_classes: int = 10,
                 init_mode: str = "kaiming_fan_out") -> None:
        super().__init__()
        if block_type == "basic":
            block, n = PyramidBasicBlock, _blocks_per_stage(depth, 6, 2,
                                                            "basic blocks")
        elif block_type == "bottleneck":
            block, n = PyramidBottleneckBlock, _blocks_per_stage(
                depth, 9, 2, "bottleneck blocks")
        else:
            raise ValueError(f"unknown block_type {block_type!r}")
        w = pyramid_widths(initial_channels, alpha, 3 * n, block.expansion)
        self.widths = w
        self.conv = nn.Conv2d(n_channels, w[0], 3, stride=1, padding=1,
                              bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        self.stage1 = _sequential_stage(block, w[0:n + 1], 1)
        self.stage2 = _sequential_stage(block, w[n:2 * n + 1], 2)
        self.stage3 = _sequential_stage(block, w[2 * n:3 * n + 1], 2)
        self.bn2 = nn.BatchNorm2d(w[-1])
        self._finish(n_channels, image_size, n_classes, init_mode)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv(x))  # no ReLU after the stem
        x = self.stage3(self.stage2(self.stage1(x)))
        return F.adaptive_avg_pool2d(F.relu(self.bn2(x)), output_size=1)


class ResNeXtBlock(nn.Module):
    """Bottleneck with a grouped 3x3 conv: cardinality x base*2^stage wide."""

    def __init__(self, c_in: int, c_out: int, stride: int, stage_index: int,
                 base_channels: int, cardinality: int) -> None:
        super().__init__()
        mid = cardinality * base_channels * 2 ** stage_index
        self.conv1 = nn.Conv2d(c_in, mid, 1, stride=1, padding=0, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1,
                               groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, c_out, 1, stride=1, padding=0, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = _projection(c_in, c_out, stride, with_bn=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + self.shortcut(x))


class ResNeXt(_CifarNet):
    """ResNeXt (Xie et al. 2016) for CIFAR, depth 9n+2."""

    def __init__(self,
                 depth: int = 29,
                 initial_channels: int = 64,
                 cardinality: int = 8,
                 base_channels: int = 4,
                 n_channels: int = 3,
                 image_size: int = 32,
                 n_classes: int = 10,
                 init_mode: str = "kaiming_fan_out") -> None:
        super().__init__()
        n = _blocks_per_stage(depth, 9, 2, "ResNeXt")
        w = [initial_channels, initial_channels * 4, initial_channels * 8,
             initial_channels * 16]
        self.conv = nn.Conv2d(n_channels, w[0], 3, stride=1, padding=1,
                              bias=False)
        self.bn = nn.BatchNorm2d(w[0])
        for s in range(3):
            def make(a, b, stride, s=s):
                return ResNeXtBlock(a, b, stride, s, base_channels,
                                    cardinality)
            setattr(self, f"stage{s + 1}", _sequential_stage(
                make, [w[s]] + [w[s + 1]] * n, 1 if s == 0 else 2))
        self._finish(n_channels, image_size, n_classes, init_mode)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = self.stage3(self.stage2(self.stage1(x)))
        return F.adaptive_avg_pool2d(x, output_size=1)


class _Shake(torch.autograd.Function):
    """y = a*x1 + (1-a)*x2 forward; the gradient mixes with b instead of a."""

    @staticmethod
    def forward(ctx, x1, x2, a, b):
        ctx.save_for_backward(b)
        return x1 * a + x2 * (1 - a)

    @staticmethod
    def backward(ctx, g):
        (b,) = ctx.saved_tensors
        return g * b, g * (1 - b), None, None


def shake_coefficients(batch: int, per_image: bool, random: bool,
                       device) -> torch.Tensor:
    """0.5 unless random; one U(0,1) per batch or (per_image) per sample."""
    if not random:
        return torch.full((1,), 0.5, device=device)
    if per_image:
        return torch.rand(batch, device=device).reshape(batch, 1, 1, 1)
    return torch.rand(1, device=device)


class ShakeResidualPath(nn.Module):
    """ReLU-conv3x3(strided)-BN-ReLU-conv3x3-BN."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(F.relu(x))))
        return self.bn2(self.conv2(x))


class ShakeSkip(nn.Module):
    """ReLU, then two strided 1x1 convs to half the width each, the second
    on the input shifted one pixel up-left (zero-filled); concat, BN."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out // 2, 1, stride=1, padding=0,
                               bias=False)
        self.conv2 = nn.Conv2d(c_in, c_out // 2, 1, stride=1, padding=0,
                               bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        s = self.stride
        a = self.conv1(x[:, :, ::s, ::s])
        shifted = torch.zeros_like(x)
        shifted[:, :, :-1, :-1] = x[:, :, 1:, 1:]
        b = self.conv2(shifted[:, :, ::s, ::s])
        return self.bn(torch.cat([a, b], dim=1))


class ShakeBlock(nn.Module):
    """Two residual paths mixed by shake-shake; identity or skip shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int,
                 shake_forward: bool, shake_backward: bool,
                 shake_image: bool) -> None:
        super().__init__()
        self.shake = (shake_forward, shake_backward, shake_image)
        self.residual_path1 = ShakeResidualPath(c_in, c_out, stride)
        self.residual_path2 = ShakeResidualPath(c_in, c_out, stride)
        self.shortcut = nn.Sequential()
        if c_in != c_out:
            self.shortcut.add_module("skip", ShakeSkip(c_in, c_out, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y1 = self.residual_path1(x)
        y2 = self.residual_path2(x)
        fwd, bwd, per_image = self.shake if self.training else (False,) * 3
        a = shake_coefficients(x.size(0), per_image, fwd, x.device)
        b = shake_coefficients(x.size(0), per_image, bwd, x.device)
        return self.shortcut(x) + _Shake.apply(y1, y2, a, b)


class ShakeShake(_CifarNet):
    """Shake-Shake (Gastaldi 2017) 2-branch ResNet; stem is 16 wide."""

    def __init__(self,
                 depth: int = 26,
                 initial_channels: int = 96,
                 shake_forward: bool = True,
                 shake_backward: bool = True,
                 shake_image: bool = True,
                 n_channels: int = 3,
                 image_size: int = 32,
                 n_classes: int = 10,
                 init_mode: str = "kaiming_fan_out") -> None:
        super().__init__()
        n = _blocks_per_stage(depth, 6, 2, "shake-shake")
        w = [16, initial_channels, initial_channels * 2,
             initial_channels * 4]

        def make(a, b, s):
            return ShakeBlock(a, b, s, shake_forward, shake_backward,
                              shake_image)

        self.conv = nn.Conv2d(n_channels, 16, 3, stride=1, padding=1,
                              bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.stage1 = _sequential_stage(make, [w[0]] + [w[1]] * n, 1)
        self.stage2 = _sequential_stage(make, [w[1]] + [w[2]] * n, 2)
        self.stage3 = _sequential_stage(make, [w[2]] + [w[3]] * n, 2)
        self._finish(n_channels, image_size, n_classes, init_mode)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))  # no ReLU: each path starts with one
        x = self.stage3(self.stage2(self.stage1(x)))
        return F.adaptive_avg_pool2d(F.relu(x), output_size=1)


# --------------------------------------------------------------------------
# Config-driven construction (the reference's `model.<name>` sections)
# --------------------------------------------------------------------------

# `model.<name>.*` defaults of the reference (config/defaults.py); `n_blocks`
# only serves the ImageNet variants and is accepted and ignored here.
REFERENCE_DEFAULTS: Dict[str, Dict[str, object]] = {
    "vgg": {"n_channels": [64, 128, 256, 512, 512],
            "n_layers": [2, 2, 3, 3, 3], "use_bn": True},
    "resnet": {"depth": 110, "n_blocks": [2, 2, 2, 2],
               "block_type": "basic", "initial_channels": 16},
    "resnet_preact": {"depth": 110, "n_blocks": [2, 2, 2, 2],
                      "block_type": "basic", "initial_channels": 16,
                      "remove_first_relu": False, "add_last_bn": False,
                      "preact_stage": [True, True, True]},
    "wrn": {"depth": 28, "initial_channels": 16, "widening_factor": 10,
            "drop_rate": 0.0},
    "densenet": {"depth": 100, "n_blocks": [6, 12, 24, 16],
                 "block_type": "bottleneck", "growth_rate": 12,
                 "drop_rate": 0.0, "compression_rate": 0.5},
    "pyramidnet": {"depth": 272, "n_blocks": [3, 24, 36, 3],
                   "initial_channels": 16, "block_type": "bottleneck",
                   "alpha": 200},
    "resnext": {"depth": 29, "n_blocks": [3, 4, 6, 3],
                "initial_channels": 64, "cardinality": 8,
                "base_channels": 4},
    "shake_shake": {"depth": 26, "initial_channels": 96,
                    "shake_forward": True, "shake_backward": True,
                    "shake_image": True},
    "se_resnet_preact": {"depth": 110, "initial_channels": 16,
                         "se_reduction": 16, "block_type": "basic",
                         "remove_first_relu": False, "add_last_bn": False,
                         "preact_stage": [True, True, True]},
}

_CLASSES = {
    "vgg": VGG, "resnet": ResNet, "resnet_preact": ResNetPreact,
    "wrn": WRN, "densenet": DenseNet, "pyramidnet": PyramidNet,
    "resnext": ResNeXt, "shake_shake": ShakeShake,
    "se_resnet_preact": SEResNetPreact,
}


def build_model(name: str, section: Optional[Mapping[str, object]] = None,
                n_channels: int = 3, image_size: int = 32,
                n_classes: int = 10,
                init_mode: str = "kaiming_fan_out",
                model_type: str = "cifar") -> nn.Module:
    """The reference's ``models/<model_type>/<name>.py`` network for a
    config (ImageNet forms: reference_imagenet_models.py).

    ``section`` holds ``model.<name>.*`` values (the rest keep the reference
    defaults); ``init_mode`` is ``model.init_mode`` (ignored by
    se_resnet_preact, which the reference always initialises fan-out).
    """
    if name not in _CLASSES:
        raise ValueError(f"unknown model {name!r}; known: {sorted(_CLASSES)}")
    opts = dict(REFERENCE_DEFAULTS[name])
    # imgclf's own option (torchvision's DenseNet), off in the reference.
    extra = {"relu_before_pool"} if name == "densenet" else set()
    for k, v in (section or {}).items():
        if k not in opts and k not in extra:
            raise ValueError(f"model.{name}.{k} is not a reference key")
        opts[k] = v
    if model_type == "imagenet":
        from reference_imagenet_models import build_imagenet_model
        return build_imagenet_model(name, opts, n_channels, image_size,
                                    n_classes, init_mode)
    if model_type != "cifar":
        raise ValueError(f"unknown model.type {model_type!r}")
    opts.pop("relu_before_pool", None)
    opts.pop("n_blocks", None)
    if name == "vgg":
        opts["stage_channels"] = opts.pop("n_channels")
    if name == "se_resnet_preact":
        init_mode = "kaiming_fan_out"
    return _CLASSES[name](n_channels=n_channels, image_size=image_size,
                          n_classes=n_classes, init_mode=init_mode, **opts)


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
