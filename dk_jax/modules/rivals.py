"""The rivals the paper compares with: depthwise deformable convolution (DCN), which moves
the image taps instead of the kernel's, and CondConv, a per-sample mixture of expert kernels."""

from dataclasses import KW_ONLY
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from flax.typing import Array, Initializer

from dk_jax import _checks
from dk_jax.modules import _maths as m
from dk_jax.modules._fields import DEPTHWISE_FEATURES, Clip, IntOrPair, PrecisionFields, body
from dk_jax.modules.deformable import AdaptiveBody


@body
class DeformConv2dBody(AdaptiveBody):
    """Depthwise deformable convolution (DCN): `DeformKernelConv2d` with scope = kernel and no
    kernel offsets. The image taps move by offsets predicted by a zero-initialised conv.

        offset = clip(offset_conv(x), offset_clip) * (dh, dw)     (N, Ho, Wo, Kh*Kw*2)
        y = inner_conv(x, offset)                                 zero rotation

    At init this is `nn.Conv(feature_group_count=C)`.

    Parameters::

        inner_conv/kernel       (Kh, Kw, C)
        inner_conv/bias         (C,)                      if use_bias
        offset_conv/kernel      (Kh, Kw, C, Kh*Kw*2)      zeros at init
        offset_conv/bias        (Kh*Kw*2,)                zeros at init

    Sows "offset" (after clipping and the dilation factor).
    """

    kernel_size: IntOrPair
    _: KW_ONLY
    offset_clip: Clip = None
    features: int | None = None

    predicts_offset: ClassVar[bool] = True
    predicts_rotation: ClassVar[bool] = False
    rotation_groups: ClassVar[int] = 1
    feature_group_count: ClassVar[None] = None
    FIELD_NOTES: ClassVar[dict[str, str]] = {
        "features": DEPTHWISE_FEATURES,
        "use_bias": "whether the inner convolution adds a bias (default True).",
        "kernel_init": "initializer of the kernel (default uniform +-1/sqrt(Kh*Kw)).",
    }

    def scope_of(self, kernel: tuple[int, int]) -> tuple[int, int]:
        return kernel


@body
class CondConv2dBody(PrecisionFields):
    """Conditionally parameterised convolution (CondConv): a per-sample mixture of E expert
    kernels with sigmoid routing on the global average pool.

        routing[n] = sigmoid(fc(mean_hw x[n]))                              (N, E)
        y[n] = conv(x[n], sum_e routing[n, e] * kernel[e], feature_group_count) + bias

    `fc` is zero-initialised (as in the published code): at init every expert weighs 1/2.

    Parameters::

        kernel          (E, Kh, Kw, C/groups, features)
        bias            (features,)       if use_bias
        fc/kernel       (C, E)            zeros at init
        fc/bias         (E,)              zeros at init

    Sows "routing" (N, E), the sigmoid weights.
    """

    features: int
    num_experts: int
    kernel_size: IntOrPair
    _: KW_ONLY
    feature_group_count: int = 1
    kernel_init: Initializer = jax.nn.initializers.lecun_normal(batch_axis=0)

    FIELD_NOTES: ClassVar[dict[str, str]] = {
        "precision": "precision of the routing, the mixture and the convolution.",
        "kernel_init": "initializer of the expert kernels (default LeCun normal per expert).",
    }

    def param_specs(self, channels: int, source: str) -> dict:
        kernel, _, _ = m.taps(self)
        groups = m.check_grouped(self, channels, source)
        if channels == 0:  # the expert kernels' fan-in would be zero
            raise ValueError(
                f"{m.layer_name(self)} needs input channels ({source}, C=0): its routing pools "
                "them and its expert kernels are initialised by their fan-in"
            )
        experts = _checks.positive_int(self.num_experts, "num_experts")
        shape = (experts, *kernel, channels // groups, self.features)
        specs = m.kernel_and_bias(self, shape, self.kernel_init, self.features)
        specs["fc"] = m.predictor(self, (channels, experts))
        return specs

    def forward(self, params: dict, x: Array, *, sow: m.Sow = m.no_sow) -> Array:
        geo = m.geometry(self, x)
        x, kernel, bias = promote_dtype(x, params["kernel"], params.get("bias"), dtype=self.dtype)
        routing = jax.nn.sigmoid(m.pooled_dense(self, params["fc"], x))
        sow("routing", routing)
        kernels = jnp.einsum("ne,ehwio->nhwio", routing, kernel, precision=self.precision)
        y = m.per_sample_conv(x, kernels, geo, self.feature_group_count, self.precision)
        return m.add_bias(y, bias)
