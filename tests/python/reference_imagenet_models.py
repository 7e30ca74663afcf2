"""PyTorch ground truth for imgclf's ImageNet networks (``model.type imagenet``).

Independent PyTorch implementations of hysts/pytorch_image_classification's
models/imagenet/ (``resnet``, ``resnet_preact``, ``densenet``,
``pyramidnet``, ``resnext``, ``vgg``) with the reference's module names, built
from the blocks of reference_models.py (the ImageNet forms use the CIFAR
forms' blocks), the reference's initialisation and its feature-size probe
(one training-mode pass of a zero image while building).

The common stem: 7x7/2 conv (no bias) ``conv``, BN ``bn``, ReLU, 3x3/2
max-pool with padding 1; four stages ``stage1``..``stage4`` of ``n_blocks``
blocks, the first of stages 2-4 strided.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from reference_models import (
    DenseBasicBlock, DenseBottleneckBlock, DenseTransition,
    PreactBasicBlock, PreactBottleneckBlock, PyramidBasicBlock,
    PyramidBottleneckBlock, ResNetBasicBlock, ResNetBottleneckBlock,
    ResNeXtBlock, _kaiming_mode, add_vgg_stages, init_weights,
    pyramid_widths)

__all__ = ["IMAGENET_MODELS", "build_imagenet_model"]


class _ImageNetNet(nn.Module):
    """Stem + stages + head; ``_finish`` probes the feature size and
    initialises as the reference's ``Network.__init__`` does."""

    def _stem(self, n_channels: int, width: int) -> None:
        self.conv = nn.Conv2d(n_channels, width, 7, stride=2, padding=3,
                              bias=False)
        self.bn = nn.BatchNorm2d(width)

    def _stem_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, output_size=1)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._stem_forward(x)
        for i in range(1, 5):
            x = getattr(self, f"stage{i}")(x)
        return self._head(x)

    def _classifier(self, feature_size: int, n_classes: int) -> None:
        self.fc = nn.Linear(feature_size, n_classes)

    def _finish(self, n_channels: int, image_size: int, n_classes: int,
                init_mode: str) -> None:
        mode = _kaiming_mode(init_mode)
        self.init_fan = mode
        with torch.no_grad():
            probe = torch.zeros(1, n_channels, image_size, image_size)
            self.feature_size = int(self._features(probe).numel())
        self._classifier(self.feature_size, n_classes)
        self.apply(lambda m: init_weights(m, mode))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._features(x)
        return self.fc(x.reshape(x.size(0), -1))


def _stage(blocks: Sequence[nn.Module]) -> nn.Sequential:
    s = nn.Sequential()
    for i, b in enumerate(blocks):
        s.add_module(f"block{i + 1}", b)
    return s


class ResNet(_ImageNetNet):
    def __init__(self, n_blocks, block_type, initial_channels, n_channels,
                 image_size, n_classes, init_mode, **_):
        super().__init__()
        block = {"basic": ResNetBasicBlock,
                 "bottleneck": ResNetBottleneckBlock}[block_type]
        c0, e = initial_channels, block.expansion
        widths = [c0, 2 * c0 * e, 4 * c0 * e, 8 * c0 * e]
        self._stem(n_channels, c0)
        c = c0
        for i, (w, n) in enumerate(zip(widths, n_blocks)):
            stride = 1 if i == 0 else 2
            setattr(self, f"stage{i + 1}", _stage(
                [block(c if j == 0 else w, w, stride if j == 0 else 1)
                 for j in range(n)]))
            c = w
        self._finish(n_channels, image_size, n_classes, init_mode)


class ResNetPreact(_ImageNetNet):
    def __init__(self, n_blocks, block_type, initial_channels,
                 remove_first_relu, add_last_bn, preact_stage, n_channels,
                 image_size, n_classes, init_mode, **_):
        super().__init__()
        block = {"basic": PreactBasicBlock,
                 "bottleneck": PreactBottleneckBlock}[block_type]
        c0, e = initial_channels, block.expansion
        widths = [c0, 2 * c0 * e, 4 * c0 * e, 8 * c0 * e]
        self._stem(n_channels, c0)
        c = c0
        for i, (w, n) in enumerate(zip(widths, n_blocks)):
            stride = 1 if i == 0 else 2
            setattr(self, f"stage{i + 1}", _stage(
                [block(c if j == 0 else w, w, stride if j == 0 else 1,
                       remove_first_relu, add_last_bn,
                       preact=bool(preact_stage[i]) and j == 0)
                 for j in range(n)]))
            c = w
        self.bn_last = nn.BatchNorm2d(widths[3])
        self._finish(n_channels, image_size, n_classes, init_mode)

    def _head(self, x):
        return F.adaptive_avg_pool2d(F.relu(self.bn_last(x)), output_size=1)


class DenseNet(_ImageNetNet):
    """``relu_before_pool`` is imgclf's option (torchvision's DenseNet);
    the reference has no ReLU after ``bn_last``."""

    def __init__(self, n_blocks, block_type, growth_rate, drop_rate,
                 compression_rate, n_channels, image_size, n_classes,
                 init_mode, relu_before_pool=False, **_):
        super().__init__()
        block = {"basic": DenseBasicBlock,
                 "bottleneck": DenseBottleneckBlock}[block_type]
        g = growth_rate
        c = 2 * g
        self.relu_before_pool = relu_before_pool
        self._stem(n_channels, c)
        for i, n in enumerate(n_blocks):
            stage = _stage([block(c + j * g, g, drop_rate) for j in range(n)])
            c = int(c + n * g)
            if i < 3:
                out = int(c * compression_rate)
                stage.add_module("transition",
                                 DenseTransition(c, out, drop_rate))
                c = out
            setattr(self, f"stage{i + 1}", stage)
        self.bn_last = nn.BatchNorm2d(c)
        self._finish(n_channels, image_size, n_classes, init_mode)

    def _head(self, x):
        x = self.bn_last(x)
        if self.relu_before_pool:
            x = F.relu(x)
        return F.adaptive_avg_pool2d(x, output_size=1)


class PyramidNet(_ImageNetNet):
    def __init__(self, n_blocks, initial_channels, block_type, alpha,
                 n_channels, image_size, n_classes, init_mode, **_):
        super().__init__()
        block = {"basic": PyramidBasicBlock,
                 "bottleneck": PyramidBottleneckBlock}[block_type]
        widths = pyramid_widths(initial_channels, alpha, sum(n_blocks),
                                block.expansion)
        self._stem(n_channels, widths[0])
        k = 0
        for i, n in enumerate(n_blocks):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                blocks.append(block(widths[k], widths[k + 1],
                                    stride if j == 0 else 1))
                k += 1
            setattr(self, f"stage{i + 1}", _stage(blocks))
        self.bn_last = nn.BatchNorm2d(widths[k])
        self._finish(n_channels, image_size, n_classes, init_mode)

    def _head(self, x):
        return F.adaptive_avg_pool2d(F.relu(self.bn_last(x)), output_size=1)


class ResNeXt(_ImageNetNet):
    def __init__(self, n_blocks, initial_channels, cardinality,
                 base_channels, n_channels, image_size, n_classes, init_mode,
                 **_):
        super().__init__()
        c0 = initial_channels
        widths = [4 * c0, 8 * c0, 16 * c0, 32 * c0]
        self._stem(n_channels, c0)
        c = c0
        for i, (w, n) in enumerate(zip(widths, n_blocks)):
            stride = 1 if i == 0 else 2
            setattr(self, f"stage{i + 1}", _stage(
                [ResNeXtBlock(c if j == 0 else w, w, stride if j == 0 else 1,
                              i, base_channels, cardinality)
                 for j in range(n)]))
            c = w
        self._finish(n_channels, image_size, n_classes, init_mode)


class VGG(_ImageNetNet):
    """Five conv stages (no stem), flattened (not pooled) into fc1-fc2-fc3
    with ReLU and dropout 0.5 after fc1 and fc2."""

    def __init__(self, n_channels_per_stage, n_layers, use_bn, n_channels,
                 image_size, n_classes, init_mode, **_):
        super().__init__()
        add_vgg_stages(self, n_channels, n_channels_per_stage, n_layers, use_bn)
        self._finish(n_channels, image_size, n_classes, init_mode)

    def _features(self, x):
        for s in range(1, 6):
            x = getattr(self, f"stage{s}")(x)
        return x

    def _classifier(self, feature_size, n_classes):
        self.fc1 = nn.Linear(feature_size, 4096)
        self.fc2 = nn.Linear(4096, 4096)
        self.fc3 = nn.Linear(4096, n_classes)

    def forward(self, x):
        x = self._features(x).reshape(x.size(0), -1)
        x = F.dropout(F.relu(self.fc1(x)), training=self.training)
        x = F.dropout(F.relu(self.fc2(x)), training=self.training)
        return self.fc3(x)


IMAGENET_MODELS = {
    "resnet": ResNet, "resnet_preact": ResNetPreact, "densenet": DenseNet,
    "pyramidnet": PyramidNet, "resnext": ResNeXt, "vgg": VGG,
}


def build_imagenet_model(name: str, opts: Mapping[str, object],
                         n_channels: int, image_size: int, n_classes: int,
                         init_mode: str) -> nn.Module:
    """``opts``: the full ``model.<name>`` section (reference defaults
    merged with the config's values)."""
    if name not in IMAGENET_MODELS:
        raise ValueError(f"model.type imagenet has no {name!r}; known: "
                         f"{sorted(IMAGENET_MODELS)}")
    opts = dict(opts)
    if name == "vgg":
        opts["n_channels_per_stage"] = opts.pop("n_channels")
    return IMAGENET_MODELS[name](n_channels=n_channels,
                                 image_size=image_size, n_classes=n_classes,
                                 init_mode=init_mode, **opts)
