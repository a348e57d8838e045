"""The deformable-kernel layers: the kernel is resampled from a scope-sized kernel at
positions the layer predicts, once per sample (global) or at every output location (local,
and DK + DCN, which moves the image taps as well)."""

from dataclasses import KW_ONLY
from functools import partial
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype
from flax.typing import Array
from jax.sharding import PartitionSpec as P

from dk_jax import ops
from dk_jax._sharding import batch_spec
from dk_jax.modules import _maths as m
from dk_jax.modules._fields import (
    Clip,
    IntOrPair,
    OpsFields,
    PrecisionFields,
    RotationFields,
    body,
)
from dk_jax.modules.sampling import (
    DeformableSampleDepthwiseBody,
    SampleConvBody,
    SampleDepthwiseBody,
)


@body
class GlobalDeformKernel2dBody(OpsFields, PrecisionFields):
    """Global deformable kernel: one K x K kernel per sample, resampled from a scope-sized kernel
    at coordinates predicted from the global average pool.

        coords[n, a, b] = clip(fc(mean_hw x[n])[a, b] + (start_h + a, start_w + b), 0, S - 1)
        start = (S - (K-1) - 1) / 2
        k_n[a, b] = multilinear read of kernel at coords[n, a, b]    (`dk_jax.nd_linear_sample`)
        y[n] = conv(x[n], k_n, feature_group_count) + bias

    `fc` is zero-initialised, so at init every sample uses the centre of the scope kernel.

    Parameters::

        kernel      (Sh, Sw, C/groups, features)
        bias        (features,)               if use_bias
        fc/kernel   (C, Kh*Kw*2)              zeros at init; index (a*Kw + b)*2 + t
        fc/bias     (Kh*Kw*2,)                zeros at init

    Sows "coords" (N, Kh, Kw, 2), the clipped kernel coordinates (t = 0 row, 1 column).
    """

    features: int
    scope_size: IntOrPair
    kernel_size: IntOrPair
    _: KW_ONLY
    feature_group_count: int = 1

    def param_specs(self, channels: int, source: str) -> dict:
        kernel, _, _ = m.taps(self)
        scope = m.scope_pair(self, kernel)
        groups = m.check_grouped(self, channels, source)
        init = m.scope_kernel_init(self.kernel_init, kernel, channels // groups)
        shape = (*scope, channels // groups, self.features)
        specs = m.kernel_and_bias(self, shape, init, self.features)
        specs["fc"] = m.predictor(self, (channels, kernel[0] * kernel[1] * 2))
        return specs

    def forward(self, params: dict, x: Array, *, sow: m.Sow = m.no_sow) -> Array:
        geo = m.geometry(self, x)
        (kh, kw), (sh, sw) = geo.kernel, m.scope_pair(self, geo.kernel)
        x, kernel, bias = promote_dtype(x, params["kernel"], params.get("bias"), dtype=self.dtype)
        shift = m.pooled_dense(self, params["fc"], x)
        grid = m.kernel_grid(geo.kernel, (sh, sw)).astype(shift.dtype)
        coords = shift.reshape(shift.shape[0], kh, kw, 2) + grid
        coords = jnp.clip(coords, 0, np.array([sh - 1, sw - 1], shift.dtype))
        sow("coords", coords)

        # vmapped over the batch with one shared table, rather than one call on N*Kh*Kw
        # points, so that a batch split over devices stays split.
        sampled = jax.vmap(
            partial(ops.nd_linear_sample, implementation=self.implementation), in_axes=(None, 0)
        )(kernel.reshape(sh, sw, -1), coords.reshape(coords.shape[0], kh * kw, 2))
        batch = batch_spec(sampled)  # named: JAX cannot infer it on an Explicit mesh
        kernels = sampled.reshape(
            sampled.shape[0],
            kh,
            kw,
            *kernel.shape[2:],
            out_sharding=None if batch is None else P(batch, None, None, None, None),
        )
        y = m.per_sample_conv(x, kernels, geo, self.feature_group_count, self.precision)
        return m.add_bias(y, bias)


@body
class AdaptiveBody(OpsFields, PrecisionFields):
    """The local layers that predict their offsets with zero-initialised K x K convs (on the
    output grid: same kernel, stride, padding and dilation) and hand them to a sampling body,
    `inner_conv`. Subclasses say which offsets they predict."""

    predicts_offset: ClassVar[bool] = False
    predicts_rotation: ClassVar[bool] = True

    def scope_of(self, kernel: tuple[int, int]) -> tuple[int, int]:
        return m.scope_pair(self, kernel)

    def inner(self, channels: int):
        """The sampling body computing the convolution: depthwise (the direct kernel) when
        feature_group_count is unset or groups = features = C, else `SampleConv`."""
        kernel, _, _ = m.taps(self)
        shared = dict(
            strides=self.strides,
            padding=self.padding,
            kernel_dilation=self.kernel_dilation,
            rotation_groups=self.rotation_groups,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
            implementation=self.implementation,
        )
        groups = self.feature_group_count
        if groups is None or (groups == channels and self.features in (None, channels)):
            cls = DeformableSampleDepthwiseBody if self.predicts_offset else SampleDepthwiseBody
            return cls(self.scope_of(kernel), kernel, **shared)
        features = self.features if self.features is not None else channels
        return SampleConvBody(
            features, self.scope_of(kernel), kernel, feature_group_count=groups, **shared
        )

    def param_specs(self, channels: int, source: str) -> dict:
        kernel, _, _ = m.taps(self)
        inner = self.inner(channels)
        if not isinstance(inner, SampleConvBody):
            m.check_depthwise(self, channels, source)
            m.check_rotation_groups(self, channels, source)
        specs = {"inner_conv": inner.param_specs(channels, source)}
        taps = kernel[0] * kernel[1] * 2
        if self.predicts_offset:
            m.check_clip(self.offset_clip, "offset_clip", scope_allowed=False)
            specs["offset_conv"] = m.predictor(self, (*kernel, channels, taps))
        if self.predicts_rotation:
            m.check_clip(self.rotation_clip, "rotation_clip", scope_allowed=True)
            groups = self.rotation_groups
            specs["rotation_conv"] = m.predictor(self, (*kernel, channels, groups * taps))
        return specs

    def forward(self, params: dict, x: Array, *, sow: m.Sow = m.no_sow) -> Array:
        geo = m.geometry(self, x)
        offset = rotation = None
        if self.predicts_offset:
            offset = m.clip(m.offset_conv(self, params["offset_conv"], x, geo), self.offset_clip)
            offset = offset * np.tile(geo.dilation, offset.shape[-1] // 2).astype(offset.dtype)
            sow("offset", offset)
        if self.predicts_rotation:
            rotation = m.offset_conv(self, params["rotation_conv"], x, geo)
            scope = self.scope_of(geo.kernel)
            rotation = m.clip_rotation(
                rotation, self.rotation_clip, scope, geo.kernel, self.rotation_groups
            )
            sow("rotation", rotation)
        return self.inner(x.shape[-1]).sample(params["inner_conv"], x, offset, rotation)


_GROUPED_NOTES = {
    "features": "output channels; with feature_group_count unset it must be C or None "
    "(depthwise); with feature_group_count set it defaults to C.",
    "feature_group_count": "None (default: depthwise, the direct kernel) or the groups of a "
    "grouped (1 = full) convolution computed by `SampleConv`'s im2col path; groups = C with "
    "features = C stays depthwise.",
    "use_bias": "whether the inner convolution adds a bias (default True).",
    "kernel_init": "initializer of the scope kernel (default uniform +-1/sqrt(Kh*Kw), or "
    "+-1/sqrt(Kh*Kw*C/groups) with feature_group_count set).",
}


@body
class LocalDeformKernel2dBody(AdaptiveBody, RotationFields):
    """Local deformable kernel (the default DK): a depthwise convolution whose kernel is
    resampled from a scope-sized kernel at every output location, at kernel-space offsets
    (`rotation`) predicted by a K x K conv with the same stride, padding and dilation.

        rotation = clip(rotation_conv(x))                     (N, Ho, Wo, G*Kh*Kw*2)
        y = inner_conv(x, rotation)                           see `SampleDepthwise`

    `rotation_conv` is zero-initialised, so at init this is a depthwise conv with the
    (bilinearly resampled) centre of the scope kernel: exactly `nn.Conv(feature_group_count=C)`
    when scope_size == kernel_size.

    Parameters::

        inner_conv/kernel       (Sh, Sw, C)               depthwise, or with
                                (Sh, Sw, C/groups, F)     feature_group_count set
        inner_conv/bias         (C,) or (F,)              if use_bias
        rotation_conv/kernel    (Kh, Kw, C, G*Kh*Kw*2)    zeros at init
        rotation_conv/bias      (G*Kh*Kw*2,)              zeros at init

    Sows "rotation" (N, Ho, Wo, G*Kh*Kw*2), after clipping: what the kernel is sampled with.
    """

    scope_size: IntOrPair
    kernel_size: IntOrPair
    _: KW_ONLY
    rotation_clip: Clip | str = None
    features: int | None = None
    feature_group_count: int | None = None

    FIELD_NOTES: ClassVar[dict[str, str]] = _GROUPED_NOTES


@body
class DeformKernelConv2dBody(LocalDeformKernel2dBody):
    """Deformable kernel + deformable convolution (DK + DCN): the image taps move by `offset`
    and the kernel taps by `rotation`, predicted by two separate zero-initialised K x K convs.

        offset = clip(offset_conv(x), offset_clip) * (dh, dw)     (N, Ho, Wo, Kh*Kw*2)
        rotation = clip(rotation_conv(x), rotation_clip)          (N, Ho, Wo, G*Kh*Kw*2)
        y = inner_conv(x, offset, rotation)                       see `DeformableSampleDepthwise`

    Image offsets are multiplied by the dilation, as in the published code. At init this is a
    depthwise conv with the centre of the scope kernel.

    Parameters::

        inner_conv/kernel       (Sh, Sw, C)               depthwise, or with
                                (Sh, Sw, C/groups, F)     feature_group_count set
        inner_conv/bias         (C,) or (F,)              if use_bias
        offset_conv/kernel      (Kh, Kw, C, Kh*Kw*2)      zeros at init
        offset_conv/bias        (Kh*Kw*2,)                zeros at init
        rotation_conv/kernel    (Kh, Kw, C, G*Kh*Kw*2)    zeros at init
        rotation_conv/bias      (G*Kh*Kw*2,)              zeros at init

    Sows "offset" (after clipping and the dilation factor) and "rotation" (after clipping).
    """

    _: KW_ONLY
    offset_clip: Clip = None

    predicts_offset: ClassVar[bool] = True
