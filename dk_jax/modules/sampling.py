"""The sampling layers: a convolution whose taps read a scope-sized kernel at rotated
positions, with the rotation (and for the deformable one the image offset) as inputs. The
deformable-kernel layers predict those inputs and call these bodies as their `inner_conv`.
"""

from dataclasses import KW_ONLY
from typing import Any, ClassVar

import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from flax.typing import Array

from dk_jax import ops
from dk_jax.modules import _maths as m
from dk_jax.modules._fields import (
    DEPTHWISE_FEATURES,
    IntOrPair,
    OpsFields,
    RotationFields,
    body,
)


@body
class _SamplingBody(OpsFields, RotationFields):
    """The shared forward of the three sampling layers."""

    deform: ClassVar[bool] = False  # the image taps are read at `offset` too
    INPUTS: ClassVar[tuple[str, ...]]  # the call's arrays after x, in order

    def forward(self, params: dict, x: Array, *inputs: Array | None, sow: Any = None, **named):
        """`layer(x, *inputs)` with the inputs in the order INPUTS names them (None: zeros)."""
        if len(inputs) > len(self.INPUTS) or set(named) - set(self.INPUTS):
            raise TypeError(
                f"{m.layer_name(self)} is called as layer(x, {', '.join(self.INPUTS)}), got "
                f"{len(inputs)} more positional arrays and keywords {sorted(named)}"
            )
        given = dict(zip(self.INPUTS, inputs, strict=False)) | named
        return self.sample(params, x, given.get("offset"), given.get("rotation"))

    def sample(self, params: dict, x: Array, offset: Array | None, rotation: Array | None) -> Array:
        """The layer on x (N, H, W, C) with offset / rotation (None: zeros) -> (N, Ho, Wo, F)."""
        geo = m.geometry(self, x)
        n = x.shape[0]
        # The ops take one dtype for every argument: cast params and inputs to `dtype`.
        x, offset, rotation, kernel, bias = promote_dtype(
            x, offset, rotation, params["kernel"], params.get("bias"), dtype=self.dtype
        )
        taps = geo.kernel[0] * geo.kernel[1] * 2
        if rotation is None:
            rotation = jnp.zeros((n, *geo.out_hw, self.rotation_groups * taps), x.dtype)
        if offset is None and self.deform:
            offset = jnp.zeros((n, *geo.out_hw, taps), x.dtype)
        x, padding = m.pad_for_ops(x, geo.pads)
        common = dict(
            kernel_size=geo.kernel,
            stride=geo.strides,
            padding=padding,
            dilation=geo.dilation,
            rotation_groups=self.rotation_groups,
            implementation=self.implementation,
        )
        grouped = kernel.ndim == 4
        if grouped:
            common["feature_group_count"] = self.feature_group_count
        if offset is None:
            op = ops.sample_conv if grouped else ops.sample_depthwise
            y = op(x, rotation, kernel, **common)
        else:
            op = ops.deform_sample_conv if grouped else ops.deform_sample_depthwise
            y = op(x, offset, rotation, kernel, **common)
        return m.add_bias(y, bias)


@body
class _DepthwiseSamplingBody(_SamplingBody):
    scope_size: IntOrPair
    kernel_size: IntOrPair
    _: KW_ONLY
    features: int | None = None

    FIELD_NOTES: ClassVar[dict[str, str]] = {
        "features": DEPTHWISE_FEATURES,
        "kernel_init": "initializer of the scope kernel (default uniform +-1/sqrt(Kh*Kw)).",
    }

    def param_specs(self, channels: int, source: str) -> dict:
        kernel, _, _ = m.taps(self)
        scope = m.scope_pair(self, kernel)
        m.check_depthwise(self, channels, source)
        m.check_rotation_groups(self, channels, source)
        init = m.scope_kernel_init(self.kernel_init, kernel)
        return m.kernel_and_bias(self, (*scope, channels), init, channels)


@body
class SampleDepthwiseBody(_DepthwiseSamplingBody):
    """Depthwise convolution whose K x K taps read a scope-sized kernel at rotated positions
    (`dk_jax.sample_depthwise`); the rotation is an input.

        y[n,i,j,c] = sum_{a,b} x[n, i*sh - ph + a*dh, j*sw - pw + b*dw, c]
                     * B(kernel[:,:,c], a + r_y + (Sh-Kh)/2, b + r_x + (Sw-Kw)/2) + bias[c]

    Parameters::

        kernel  (Sh, Sw, C)
        bias    (C,)            if use_bias

    Call: `layer(x, rotation=None)`, x (N, H, W, C), rotation (N, Ho, Wo, G*Kh*Kw*2) or None
    (zero rotation: a depthwise conv with the centre of the scope) -> (N, Ho, Wo, C).
    """

    INPUTS: ClassVar[tuple[str, ...]] = ("rotation",)


@body
class DeformableSampleDepthwiseBody(_DepthwiseSamplingBody):
    """`SampleDepthwise` whose image taps are read bilinearly at offset positions as well
    (`dk_jax.deform_sample_depthwise`); offset and rotation are inputs.

        y[n,i,j,c] = sum_{a,b} B(x[n,:,:,c], i*sh - ph + a*dh + o_y, j*sw - pw + b*dw + o_x)
                     * B(kernel[:,:,c], a + r_y + (Sh-Kh)/2, b + r_x + (Sw-Kw)/2) + bias[c]

    Parameters::

        kernel  (Sh, Sw, C)
        bias    (C,)            if use_bias

    Call: `layer(x, offset=None, rotation=None)`, x (N, H, W, C), offset (N, Ho, Wo, Kh*Kw*2),
    rotation (N, Ho, Wo, G*Kh*Kw*2); None means zeros -> (N, Ho, Wo, C).
    """

    deform: ClassVar[bool] = True
    INPUTS: ClassVar[tuple[str, ...]] = ("offset", "rotation")


@body
class SampleConvBody(_SamplingBody):
    """Grouped or full local deformable convolution with the offsets as inputs
    (`dk_jax.sample_conv`, or `dk_jax.deform_sample_conv` when an image offset is given): the
    K x K taps of every (input channel, feature) kernel read a scope-sized kernel at rotated
    positions, computed as scope-space im2col and one matmul.

        y[n,i,j,f] = sum_{a,b} sum_{c in group(f)} X(n, tap (a, b), c)
                     * B(kernel[:,:,c mod C/groups,f], a + r_y + (Sh-Kh)/2, ...) + bias[f]

    Parameters::

        kernel  (Sh, Sw, C/feature_group_count, features)     as in `nn.Conv`
        bias    (features,)                                   if use_bias

    Call: `layer(x, rotation=None, offset=None)`, x (N, H, W, C), rotation
    (N, Ho, Wo, G*Kh*Kw*2), offset (N, Ho, Wo, Kh*Kw*2) or None -> (N, Ho, Wo, features).
    With zero rotation and scope_size == kernel_size this is `nn.Conv(features,
    feature_group_count=...)`.
    """

    features: int
    scope_size: IntOrPair
    kernel_size: IntOrPair
    _: KW_ONLY
    feature_group_count: int = 1

    INPUTS: ClassVar[tuple[str, ...]] = ("rotation", "offset")
    FIELD_NOTES: ClassVar[dict[str, str]] = {
        "feature_group_count": "groups of the convolution (1 = full); divides C and features.",
    }

    def param_specs(self, channels: int, source: str) -> dict:
        kernel, _, _ = m.taps(self)
        scope = m.scope_pair(self, kernel)
        groups = m.check_grouped(self, channels, source)
        m.check_rotation_groups(self, channels, source)
        init = m.scope_kernel_init(self.kernel_init, kernel, channels // groups)
        shape = (*scope, channels // groups, self.features)
        return m.kernel_and_bias(self, shape, init, self.features)
