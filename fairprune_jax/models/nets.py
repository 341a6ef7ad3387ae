"""The model zoo: an MLP for tabular data, a small CNN, CIFAR and ImageNet ResNets, MobileNet-V2 and a small ViT.

Every ``__call__`` takes ``train`` so BatchNorm uses batch statistics (and
updates its running averages) in training and the running averages in
evaluation, with no hidden mode flag.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
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


def shifted_depthwise_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                           dimension_numbers=None, feature_group_count=1, **kwargs):
    """A depthwise convolution (NHWC input, HWIO kernel with I = 1, one group per channel) as a sum of
    ``kh * kw`` shifted, per-channel-scaled copies of the padded input; ``lax.conv_general_dilated`` for
    anything else (dilation, channel multipliers, other layouts). The signature is ``nnx.Conv``'s
    ``conv_general_dilated``, so the kernel keeps its shape and name (pruning, tracing and checkpoints see the
    same parameter).

    Why: XLA:CPU runs grouped convolutions with one group per channel slowly; on MobileNet-V2 at width 0.35,
    64 px, batch 128 a training step takes 1.87 s with ``feature_group_count`` and 0.40 s this way, the forward
    pass 0.45 s and 0.06 s (2 CPU cores; ``benchmarks/README.md``). Outputs agree to float rounding (tested).
    """
    channels = lhs.shape[-1]
    plain = dimension_numbers is None or tuple(getattr(dimension_numbers, "lhs_spec", ())) in ((), (0, 3, 1, 2))
    if (lhs.ndim != 4 or rhs.ndim != 4 or rhs.shape[2] != 1 or feature_group_count != channels
            or rhs.shape[3] != channels or any(d != 1 for d in (lhs_dilation or (1, 1)))
            or any(d != 1 for d in (rhs_dilation or (1, 1))) or not plain):
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                            dimension_numbers, feature_group_count, **kwargs)
    kh, kw = rhs.shape[:2]
    sh, sw = window_strides
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), window_strides, padding)
    x = jnp.pad(lhs, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    out_h, out_w = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            patch = jax.lax.slice(x, (0, i, j, 0), (x.shape[0], i + (out_h - 1) * sh + 1,
                                                      j + (out_w - 1) * sw + 1, channels), (1, sh, sw, 1))
            term = patch * rhs[i, j, 0]
            out = term if out is None else out + term
    return out


def depthwise_impl(depthwise: str):
    """The ``conv_general_dilated`` a depthwise layer uses: ``"grouped"`` (XLA's grouped convolution),
    ``"shifted"`` (:func:`shifted_depthwise_conv`), or ``"auto"``: shifted on CPU, grouped on GPU / TPU, whose
    libraries run depthwise convolutions natively."""
    if depthwise not in ("auto", "grouped", "shifted"):
        raise ValueError(f"depthwise must be 'auto', 'grouped' or 'shifted'; got {depthwise!r}")
    if depthwise == "auto":
        depthwise = "shifted" if jax.default_backend() == "cpu" else "grouped"
    return shifted_depthwise_conv if depthwise == "shifted" else jax.lax.conv_general_dilated


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


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor``, never more than 10% below ``v`` (MobileNet's rule)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


#: MobileNet-V2's inverted-residual stages (Sandler et al. 2018, Table 2): expansion t, channels c, repeats n,
#: first stride s.
MOBILENET_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                       (6, 320, 1, 1))


class InvertedResidual(nnx.Module):
    """1x1 expansion (when t > 1), 3x3 depthwise, 1x1 projection, each with BatchNorm (ReLU6 after the first two);
    the input is added back when the stride is 1 and the widths match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, *, depthwise: str = "auto",
                 rngs: nnx.Rngs):
        hidden = int(round(cin * expand))
        self.expand = (nnx.Conv(cin, hidden, (1, 1), use_bias=False, rngs=rngs) if expand != 1 else None)
        self.expand_bn = nnx.BatchNorm(hidden, momentum=0.9, rngs=rngs) if expand != 1 else None
        self.depthwise = nnx.Conv(hidden, hidden, (3, 3), strides=stride, padding="SAME", feature_group_count=hidden,
                                  use_bias=False, conv_general_dilated=depthwise_impl(depthwise), rngs=rngs)
        self.depthwise_bn = nnx.BatchNorm(hidden, momentum=0.9, rngs=rngs)
        self.project = nnx.Conv(hidden, cout, (1, 1), use_bias=False, rngs=rngs)
        self.project_bn = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
        self.residual = stride == 1 and cin == cout

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        ura = not train
        y = x
        if self.expand is not None:
            y = jax.nn.relu6(self.expand_bn(self.expand(y), use_running_average=ura))
        y = jax.nn.relu6(self.depthwise_bn(self.depthwise(y), use_running_average=ura))
        y = self.project_bn(self.project(y), use_running_average=ura)
        return x + y if self.residual else y


#: Basic blocks per stage of the ImageNet ResNets (He et al. 2016, Table 1).
IMAGENET_RESNET_STAGES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


class ImageNetResNet(nnx.Module):
    """ResNet-18 / 34 with basic blocks, four stages of widths w, 2w, 4w, 8w (He et al. 2016, Table 1).

    ``stem="imagenet"``: a 7x7 stride-2 convolution and a 3x3 stride-2 max-pool (224 px inputs, the
    FairFace / FairGRAPE setting); ``stem="cifar"``: one 3x3 stride-1 convolution and no pooling (32-64 px).
    At width 64 and 1000 classes ResNet-18 has 11,689,512 parameters and ResNet-34 21,797,672, as
    torchvision's (tested).
    """

    def __init__(self, in_channels: int, num_classes: int, *, depth: int = 18, width: int = 64,
                 stem: str = "imagenet", rngs: nnx.Rngs):
        if depth not in IMAGENET_RESNET_STAGES:
            raise ValueError(f"ImageNet ResNet depth must be one of {sorted(IMAGENET_RESNET_STAGES)}; got {depth}")
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"ResNet stem must be 'imagenet' or 'cifar'; got {stem!r}")
        big = stem == "imagenet"
        self.pool = big
        self.stem = nnx.Conv(in_channels, width, (7, 7) if big else (3, 3), strides=2 if big else 1,
                             padding="SAME", use_bias=False, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)
        blocks, cin = [], width
        for stage, n in enumerate(IMAGENET_RESNET_STAGES[depth]):
            cout = width * 2 ** stage
            for b in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if (stage > 0 and b == 0) else 1, rngs=rngs))
                cin = cout
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(cin, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nnx.relu(self.stem_bn(self.stem(x), use_running_average=not train))
        if self.pool:
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for block in self.blocks:
            x = block(x, train)
        return self.head(x.mean(axis=(1, 2)))


class ResNet18(ImageNetResNet):
    """:class:`ImageNetResNet` at depth 18 (``--model resnet18``)."""

    def __init__(self, in_channels: int, num_classes: int, *, width: int = 64, stem: str = "imagenet",
                 rngs: nnx.Rngs):
        super().__init__(in_channels, num_classes, depth=18, width=width, stem=stem, rngs=rngs)


class ResNet34(ImageNetResNet):
    """:class:`ImageNetResNet` at depth 34 (``--model resnet34``)."""

    def __init__(self, in_channels: int, num_classes: int, *, width: int = 64, stem: str = "imagenet",
                 rngs: nnx.Rngs):
        super().__init__(in_channels, num_classes, depth=34, width=width, stem=stem, rngs=rngs)


class MobileNetV2(nnx.Module):
    """MobileNet-V2 (Sandler et al. 2018), Balancing Act's UTKFace model (their src/models/mobilenet/mobilenet.py
    follows torchvision's). ``width`` scales every stage's channels (rounded to multiples of 8); ``last`` is
    the final 1x1 conv's width before the linear head (1280, scaled up for width > 1, as in the paper).
    ``stem_stride`` 2 as in the paper; 1 keeps small images (32-64 px) from shrinking to 1x1 too early.
    ``depthwise``: how the 3x3 depthwise convolutions run (:func:`depthwise_impl`; the default ``"auto"`` is
    4-5x faster on CPU than XLA's grouped convolution, same parameters)."""

    def __init__(self, in_channels: int, num_classes: int, *, width: float = 1.0, last: int = 1280,
                 stem_stride: int = 2, depthwise: str = "auto", rngs: nnx.Rngs):
        if width <= 0:
            raise ValueError(f"mobilenet_v2: width must be > 0; got {width}")
        cin = make_divisible(32 * width)
        self.stem = nnx.Conv(in_channels, cin, (3, 3), strides=stem_stride, padding="SAME", use_bias=False,
                             rngs=rngs)
        self.stem_bn = nnx.BatchNorm(cin, momentum=0.9, rngs=rngs)
        blocks = []
        for t, c, n, s in MOBILENET_V2_STAGES:
            cout = make_divisible(c * width)
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, s if i == 0 else 1, t, depthwise=depthwise, rngs=rngs))
                cin = cout
        self.blocks = nnx.List(blocks)
        last = make_divisible(last * max(1.0, width))
        self.last = nnx.Conv(cin, last, (1, 1), use_bias=False, rngs=rngs)
        self.last_bn = nnx.BatchNorm(last, momentum=0.9, rngs=rngs)
        self.head = nnx.Linear(last, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        ura = not train
        x = jax.nn.relu6(self.stem_bn(self.stem(x), use_running_average=ura))
        for block in self.blocks:
            x = block(x, train)
        x = jax.nn.relu6(self.last_bn(self.last(x), use_running_average=ura)).mean(axis=(1, 2))
        return self.head(x)


class ViTBlock(nnx.Module):
    """Pre-norm transformer block: multi-head self-attention (separate query / key / value / output projections,
    so each is an ordinary prunable kernel) and a GELU MLP, each with a residual."""

    def __init__(self, dim: int, heads: int, mlp: int, *, rngs: nnx.Rngs):
        if dim % heads:
            raise ValueError(f"ViT width {dim} must be a multiple of its heads ({heads})")
        self.heads = heads
        self.head_dim = dim // heads      # the reshapes below read the head count off the projections, so a
                                          # model with pruned heads (compact.slice_groups) runs as it is
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.query = nnx.Linear(dim, dim, rngs=rngs)
        self.key = nnx.Linear(dim, dim, rngs=rngs)
        self.value = nnx.Linear(dim, dim, rngs=rngs)
        self.out = nnx.Linear(dim, dim, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.fc1 = nnx.Linear(dim, mlp, rngs=rngs)
        self.fc2 = nnx.Linear(mlp, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        n, t, d = x.shape
        h = self.norm1(x)
        split = lambda a: a.reshape(n, t, -1, self.head_dim)  # noqa: E731
        q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
        att = jax.nn.softmax(jax.numpy.einsum("nqhd,nkhd->nhqk", q, k) / self.head_dim ** 0.5, axis=-1)
        x = x + self.out(jax.numpy.einsum("nhqk,nkhd->nqhd", att, v).reshape(n, t, -1))
        return x + self.fc2(nnx.gelu(self.fc1(self.norm2(x))))


class ViT(nnx.Module):
    """A small vision transformer (Dosovitskiy et al. 2021): non-overlapping ``patch`` x ``patch`` patches
    embedded by a strided convolution, learned position embeddings, ``depth`` pre-norm blocks, mean-pooled
    tokens and a linear head (no class token, which keeps every image size the same code)."""

    def __init__(self, in_channels: int, num_classes: int, *, patch: int = 4, dim: int = 64, depth: int = 4,
                 heads: int = 4, mlp: int = 128, max_tokens: int = 256, rngs: nnx.Rngs):
        self.embed = nnx.Conv(in_channels, dim, (patch, patch), strides=patch, padding="VALID", rngs=rngs)
        self.position = nnx.Param(0.02 * jax.random.normal(rngs.params(), (max_tokens, dim)))
        self.blocks = nnx.List([ViTBlock(dim, heads, mlp, rngs=rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = self.embed(x)
        n, h, w, d = x.shape
        if h * w > self.position.value.shape[0]:
            raise ValueError(f"ViT: {h * w} patches exceed max_tokens={self.position.value.shape[0]}; raise "
                             "max_tokens or the patch size")
        x = x.reshape(n, h * w, d) + self.position.value[: h * w]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(axis=1))
