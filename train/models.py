"""ResNet-50-DW, MobileNet-V2 and a small ResNet, with one swappable spatial conv.

After flax's examples/imagenet/models.py. Every 3x3 convolution in these networks is depthwise
(C in, C out); `spatial_conv(kind, ...)` builds it. In the stages listed in `adaptive_stages`
it is the `conv` choice of the config, elsewhere the rigid depthwise conv:

    depthwise   nn.Conv(feature_group_count=C)          the rigid baseline
    dcn         dk_jax.modules.DeformConv2d             depthwise deformable convolution
    global_dk   dk_jax.modules.GlobalDeformKernel2d     one resampled kernel per sample
    local_dk    dk_jax.modules.LocalDeformKernel2d      one resampled kernel per location
    dk_dcn      dk_jax.modules.DeformKernelConv2d       kernel offsets + image offsets
    condconv    dk_jax.modules.CondConv2d               mixture of experts (depthwise)

Padding is symmetric, (K-1)//2 * dilation on every side, as in the published PyTorch models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from dk_jax import modules as dkm

ModuleDef = Any
CONVS = ("depthwise", "dcn", "global_dk", "local_dk", "dk_dcn", "condconv")
ARCHS = ("resnet50dw", "mobilenetv2", "small_resnet")


def spatial_conv(
    kind: str,
    *,
    scope_size: int = 4,
    rotation_groups: int = 1,
    rotation_clip: Any = "scope",
    offset_clip: Any = None,
    num_experts: int = 4,
    dtype: Any = jnp.float32,
    implementation: str | None = None,
) -> Callable[..., nn.Module]:
    """The conv factory: returns `make(features, kernel_size, strides, name=None)`, which builds
    a depthwise layer (features == input channels C, no bias: a norm follows) of type `kind`.
    """
    if kind not in CONVS:
        raise ValueError(f"unknown conv {kind!r}; choose one of {', '.join(CONVS)}")
    if isinstance(rotation_clip, list):
        rotation_clip = tuple(rotation_clip)
    if isinstance(offset_clip, list):
        offset_clip = tuple(offset_clip)
    common = dict(use_bias=False, dtype=dtype)
    dk = dict(common, implementation=implementation)

    def make(
        features: int,
        kernel_size: int = 3,
        strides: int = 1,
        dilation: int = 1,
        name: str | None = None,
    ) -> nn.Module:
        geo = dict(
            kernel_size=(kernel_size, kernel_size),
            strides=(strides, strides),
            padding=(kernel_size - 1) // 2 * dilation,
            kernel_dilation=(dilation, dilation),
            name=name,
        )
        scope = max(scope_size, kernel_size)
        if kind == "depthwise":
            return nn.Conv(features, feature_group_count=features, **geo, **common)
        if kind == "dcn":
            return dkm.DeformConv2d(features=features, offset_clip=offset_clip, **geo, **dk)
        if kind == "global_dk":
            return dkm.GlobalDeformKernel2d(
                features, scope, feature_group_count=features, **geo, **dk
            )
        if kind == "local_dk":
            return dkm.LocalDeformKernel2d(
                scope,
                features=features,
                rotation_groups=rotation_groups,
                rotation_clip=rotation_clip,
                **geo,
                **dk,
            )
        if kind == "dk_dcn":
            return dkm.DeformKernelConv2d(
                scope,
                features=features,
                rotation_groups=rotation_groups,
                rotation_clip=rotation_clip,
                offset_clip=offset_clip,
                **geo,
                **dk,
            )
        return dkm.CondConv2d(features, num_experts, feature_group_count=features, **geo, **common)

    return make


def _norm(train: bool, dtype: Any, **kw) -> ModuleDef:
    return partial(
        nn.BatchNorm,
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        axis_name="data" if train else None,
        **kw,
    )


class Bottleneck(nn.Module):
    """1x1 (C_in -> F), 3x3 depthwise spatial conv (F, stride), 1x1 (F -> 4F), residual."""

    filters: int
    spatial: Callable[..., nn.Module]
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1

    @nn.compact
    def __call__(self, x):
        residual = x
        y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
        y = self.spatial(self.filters, 3, self.strides, name="spatial_conv")(y)
        y = nn.relu(self.norm()(y))
        y = self.conv(self.filters * 4, (1, 1))(y)
        # Zero-initialised last scale: each block starts as the identity (Goyal et al. 2017).
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)
        if residual.shape != y.shape:
            residual = self.conv(
                self.filters * 4, (1, 1), (self.strides, self.strides), name="conv_proj"
            )(residual)
            residual = self.norm(name="norm_proj")(residual)
        return nn.relu(residual + y)


class ResNet(nn.Module):
    """Bottleneck ResNet whose 3x3 convs are depthwise. `stem="imagenet"`: 7x7/2 conv and 3x3/2
    max-pool; `stem="small"`: one 3x3 conv of stride `stem_stride` (for 32x32 inputs). Stage i
    has `stage_sizes[i]`
    blocks of width num_filters * 2**i, stride 2 at its first block (except stage 0)."""

    stage_sizes: Sequence[int]
    num_classes: int
    conv_kind: str = "depthwise"
    adaptive_stages: Sequence[int] = ()
    num_filters: int = 64
    stem: str = "imagenet"
    stem_stride: int = 1
    dtype: Any = jnp.float32
    conv_options: dict | None = None

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = partial(nn.Conv, use_bias=False, dtype=self.dtype)
        norm = _norm(train, self.dtype)
        opts = dict(self.conv_options or {}, dtype=self.dtype)
        rigid = spatial_conv("depthwise", **opts)
        adaptive = spatial_conv(self.conv_kind, **opts)
        if self.stem == "imagenet":
            x = conv(self.num_filters, (7, 7), (2, 2), padding=((3, 3), (3, 3)), name="conv_init")(
                x
            )
            x = nn.relu(norm(name="bn_init")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:
            x = conv(
                self.num_filters,
                (3, 3),
                (self.stem_stride,) * 2,
                padding=((1, 1), (1, 1)),
                name="conv_init",
            )(x)
            x = nn.relu(norm(name="bn_init")(x))
        for i, blocks in enumerate(self.stage_sizes):
            spatial = adaptive if i in self.adaptive_stages else rigid
            for j in range(blocks):
                x = Bottleneck(
                    self.num_filters * 2**i,
                    spatial,
                    conv,
                    norm,
                    strides=2 if i > 0 and j == 0 else 1,
                )(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        return jnp.asarray(x, jnp.float32)


class InvertedResidual(nn.Module):
    """MobileNet-V2 block: 1x1 expand (x t), 3x3 depthwise spatial conv, 1x1 linear project."""

    features: int
    expansion: int
    strides: int
    spatial: Callable[..., nn.Module]
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x):
        hidden = x.shape[-1] * self.expansion
        y = x
        if self.expansion != 1:
            y = nn.relu6(self.norm()(self.conv(hidden, (1, 1))(y)))
        y = self.spatial(hidden, 3, self.strides, name="spatial_conv")(y)
        y = nn.relu6(self.norm()(y))
        y = self.norm()(self.conv(self.features, (1, 1))(y))
        if self.strides == 1 and x.shape[-1] == self.features:
            y = x + y
        return y


def _divisible(v: float, divisor: int = 8) -> int:
    """Channel counts rounded as in the reference MobileNet-V2 (never down by more than 10%)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class MobileNetV2(nn.Module):
    """MobileNet-V2 (Sandler et al. 2018). Groups of blocks (expansion t, channels c, repeats
    n, stride s); group i's depthwise convs are adaptive when i is in `adaptive_stages`."""

    num_classes: int
    conv_kind: str = "depthwise"
    adaptive_stages: Sequence[int] = ()
    width_multiplier: float = 1.0
    dropout: float = 0.2
    dtype: Any = jnp.float32
    conv_options: dict | None = None
    settings: Sequence[tuple[int, int, int, int]] = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = partial(nn.Conv, use_bias=False, dtype=self.dtype)
        norm = _norm(train, self.dtype)
        opts = dict(self.conv_options or {}, dtype=self.dtype)
        rigid = spatial_conv("depthwise", **opts)
        adaptive = spatial_conv(self.conv_kind, **opts)
        m = self.width_multiplier
        x = conv(_divisible(32 * m), (3, 3), (2, 2), padding=((1, 1), (1, 1)), name="conv_init")(x)
        x = nn.relu6(norm(name="bn_init")(x))
        for i, (t, c, n, s) in enumerate(self.settings):
            spatial = adaptive if i in self.adaptive_stages else rigid
            for j in range(n):
                x = InvertedResidual(_divisible(c * m), t, s if j == 0 else 1, spatial, conv, norm)(
                    x
                )
        x = conv(_divisible(1280 * max(1.0, m)), (1, 1), name="conv_last")(x)
        x = nn.relu6(norm(name="bn_last")(x))
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        return jnp.asarray(x, jnp.float32)


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def check_model_config(model_config) -> None:
    """Rejects a `config.model` group naming an unknown architecture, conv or dtype (ValueError
    naming the key); the one check of these keys, made by train.check_config before any work
    and by create_model."""
    mc = model_config
    if mc.arch not in ARCHS:
        raise ValueError(f"model.arch={mc.arch!r} is not one of {', '.join(ARCHS)}")
    if mc.conv not in CONVS:
        raise ValueError(f"model.conv={mc.conv!r} is not one of {', '.join(CONVS)}")
    if mc.dtype not in DTYPES:
        raise ValueError(f"model.dtype={mc.dtype!r} must be 'float32' or 'bfloat16'")


def create_model(model_config, num_classes: int) -> nn.Module:
    """The network a `config.model` group describes."""
    mc = model_config
    check_model_config(mc)
    dtype = DTYPES[mc.dtype]
    opts = dict(
        scope_size=mc.scope_size,
        rotation_groups=mc.rotation_groups,
        rotation_clip=mc.rotation_clip,
        offset_clip=mc.offset_clip,
        num_experts=mc.num_experts,
        implementation=mc.implementation,
    )
    common = dict(
        num_classes=num_classes,
        conv_kind=mc.conv,
        adaptive_stages=tuple(mc.adaptive_stages),
        dtype=dtype,
        conv_options=opts,
    )
    if mc.arch == "resnet50dw":
        return ResNet(stage_sizes=(3, 4, 6, 3), num_filters=64, stem="imagenet", **common)
    if mc.arch == "small_resnet":
        return ResNet(
            stage_sizes=tuple(mc.stage_sizes),
            num_filters=mc.width,
            stem="small",
            stem_stride=mc.stem_stride,
            **common,
        )
    assert mc.arch == "mobilenetv2", mc.arch  # check_model_config knows no other
    return MobileNetV2(width_multiplier=mc.width_multiplier, **common)


def count_parameters(model: nn.Module, image_shape=(224, 224, 3)) -> int:
    """Number of trainable parameters, from shapes only (nothing is computed)."""
    import jax

    variables = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)), train=False)
    )
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(variables["params"])))


def main() -> None:
    """`python -m train.models`: parameter counts of the ImageNet models for every conv, as a
    Markdown table (1000 classes, 224x224, the imagenet_* configs' adaptive stages)."""
    from train.config import load_config

    rows = []
    for name in ("imagenet_resnet50dw", "imagenet_mobilenetv2"):
        config = load_config(name)
        counts = []
        for kind in CONVS:
            config.model.conv = kind
            counts.append(count_parameters(create_model(config.model, 1000)))
        rows.append((config.model.arch, tuple(config.model.adaptive_stages), counts))
    print("| model | adaptive stages | " + " | ".join(CONVS) + " |")
    print("|---|---|" + "---|" * len(CONVS))
    for arch, stages, counts in rows:
        cells = " | ".join(f"{c / 1e6:.3f}M" for c in counts)
        print(f"| {arch} | {', '.join(map(str, stages))} | {cells} |")


if __name__ == "__main__":
    main()
