"""The model zoo: an MLP for tabular data, a small CNN and a CIFAR-style ResNet.

Every ``__call__`` takes ``train`` so BatchNorm uses batch statistics (and
updates its running averages) in training and the running averages in
evaluation, with no hidden mode flag.
"""
from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling with stride 2 (NHWC).

    Written as a reshape + max so that its gradient is a cheap compare-and-select:
    XLA's CPU gradient of ``reduce_window`` max pooling builds large index arrays
    and a serial scatter, about a third of a CNN training step (see
    benchmarks/README.md). Odd sizes fall back to ``nnx.max_pool`` (floor).
    """
    n, h, w, c = x.shape
    if h % 2 or w % 2:
        return nnx.max_pool(x, (2, 2), strides=(2, 2))
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class MLP(nnx.Module):
    """Fully connected ReLU network for tabular features."""

    def __init__(self, in_features: int, num_classes: int, *, hidden: Sequence[int] = (256, 128),
                 rngs: nnx.Rngs):
        dims = [in_features, *hidden]
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
        self.head = nnx.Linear(dims[-1], num_classes, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for layer in self.layers:
            x = nnx.relu(layer(x))
        return self.head(x)


class CNN(nnx.Module):
    """Small VGG-like CNN: conv-BN-ReLU blocks with max pooling, then a linear head."""

    def __init__(self, in_channels: int, num_classes: int, *, channels: Sequence[int] = (32, 64, 128),
                 hidden: int = 128, rngs: nnx.Rngs):
        chans = [in_channels, *channels]
        self.convs = nnx.List([nnx.Conv(a, b, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
                               for a, b in zip(chans[:-1], chans[1:])])
        self.norms = nnx.List([nnx.BatchNorm(b, momentum=0.9, rngs=rngs) for b in chans[1:]])
        self.fc = nnx.Linear(chans[-1], hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = nnx.relu(norm(conv(x), use_running_average=not train))
            if i < len(self.convs) - 1 and min(x.shape[1], x.shape[2]) >= 4:
                x = max_pool_2x2(x)
        x = x.mean(axis=(1, 2))  # global average pooling keeps the head independent of image size
        x = nnx.relu(self.fc(x))
        return self.head(x)


class BasicBlock(nnx.Module):
    """Two 3x3 conv-BN layers with an identity or 1x1-conv shortcut.

    ``cmid`` is the inner width (conv1's outputs; default ``cout``): a
    compacted block keeps fewer inner channels than its residual width.
    """

    def __init__(self, cin: int, cout: int, stride: int, *, cmid: int | None = None, rngs: nnx.Rngs):
        cmid = cout if cmid is None else int(cmid)
        self.conv1 = nnx.Conv(cin, cmid, (3, 3), strides=stride, padding="SAME", use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(cmid, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(cmid, cout, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
        if stride != 1 or cin != cout:
            self.proj = nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=False, rngs=rngs)
            self.proj_bn = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
        else:
            self.proj = None
            self.proj_bn = None

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        ura = not train
        y = nnx.relu(self.bn1(self.conv1(x), use_running_average=ura))
        y = self.bn2(self.conv2(y), use_running_average=ura)
        short = x if self.proj is None else self.proj_bn(self.proj(x), use_running_average=ura)
        return nnx.relu(y + short)


class ResNet(nnx.Module):
    """CIFAR-style ResNet (He et al. 2016): depth = 6n + 2, three stages of widths w, 2w, 4w.

    ``mids`` optionally gives every block's inner width (compacted models).
    """

    def __init__(self, in_channels: int, num_classes: int, *, depth: int = 20, width: int = 16,
                 mids: Sequence[int] | None = None, rngs: nnx.Rngs):
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, 32, 56, ...); got {depth}")
        n = (depth - 2) // 6
        if mids is not None and len(mids) != 3 * n:
            raise ValueError(f"ResNet depth {depth} has {3 * n} blocks; got {len(mids)} inner widths")
        self.stem = nnx.Conv(in_channels, width, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)
        blocks = []
        cin = width
        for stage, mult in enumerate((1, 2, 4)):
            cout = width * mult
            for b in range(n):
                stride = 2 if (stage > 0 and b == 0) else 1
                cmid = None if mids is None else mids[len(blocks)]
                blocks.append(BasicBlock(cin, cout, stride, cmid=cmid, rngs=rngs))
                cin = cout
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(cin, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nnx.relu(self.stem_bn(self.stem(x), use_running_average=not train))
        for block in self.blocks:
            x = block(x, train)
        return self.head(x.mean(axis=(1, 2)))
