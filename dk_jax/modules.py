"""Flax linen layers for Deformable Kernels and their rivals (SPEC section 6).

Channels last (NHWC), like `flax.linen.Conv`: each layer infers C from its input, takes
`strides`, `padding` ("SAME", "VALID", an int, a pair, or a pair of (low, high) pairs),
`kernel_dilation`, `use_bias`, `dtype` (the computation dtype: parameters and inputs are cast to
it), `param_dtype` and `implementation` (passed to the ops: "ffi", "xla" or None).

    SampleDepthwise, DeformableSampleDepthwise   inner layers; offsets arrive as inputs
    GlobalDeformKernel2d                         one resampled kernel per sample
    LocalDeformKernel2d (= DeformKernel2d)       one resampled kernel per output location
    DeformKernelConv2d                           kernel offsets and image offsets (DK + DCN)
    DeformConv2d, CondConv2d                     the rivals: depthwise DCN, mixture of experts

Every offset-predicting conv or dense layer is zero-initialised, so at init a DK layer is a
depthwise convolution with the centre of its scope kernel. Adaptive layers `sow` what they
predict into the "intermediates" collection ("rotation", "offset", "coords", "routing").

Data flows modules -> ops: this file calls only the public ops of `dk_jax.ops` and Flax/lax.
"""

from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.typing import Array, Dtype, Initializer, PaddingLike, PrecisionLike
from jax import lax
from jax.sharding import PartitionSpec as P

from dk_jax import _checks, ops

__all__ = [
    "CondConv2d",
    "DeformConv2d",
    "DeformKernel2d",
    "DeformKernelConv2d",
    "DeformableSampleDepthwise",
    "GlobalDeformKernel2d",
    "LocalDeformKernel2d",
    "SampleConv",
    "SampleDepthwise",
]

IntOrPair = int | Sequence[int]
Clip = tuple[float, float] | None
_zeros = nn.initializers.zeros_init()


# --- geometry ------------------------------------------------------------------------------


class _Geometry(NamedTuple):
    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilation: tuple[int, int]
    pads: tuple[tuple[int, int], tuple[int, int]]  # (low, high) per spatial axis
    out_hw: tuple[int, int]


def _geometry(layer: nn.Module, x: Array) -> _Geometry:
    """Normalises the layer's kernel_size, strides, padding and kernel_dilation for input x."""
    name = type(layer).__name__
    if x.ndim != 4:
        raise ValueError(f"{name}: x must have rank 4 (N, H, W, C), got shape {tuple(x.shape)}")
    kernel = _checks.pair(layer.kernel_size, "kernel_size", minimum=1)
    strides = _checks.pair(layer.strides, "strides", minimum=1)
    dilation = _checks.pair(layer.kernel_dilation, "kernel_dilation", minimum=1)
    spatial = tuple(x.shape[1:3])
    pads = _explicit_padding(layer.padding, spatial, kernel, strides, dilation)
    out_hw = tuple(
        (size + lo + hi - d * (k - 1) - 1) // s + 1
        for size, (lo, hi), k, s, d in zip(spatial, pads, kernel, strides, dilation, strict=True)
    )
    if min(out_hw) < 1:
        raise ValueError(
            f"{name}: the output would be empty: input {spatial} with kernel_size {kernel}, "
            f"padding {pads} and kernel_dilation {dilation} gives {out_hw}"
        )
    return _Geometry(kernel, strides, dilation, pads, out_hw)


def _explicit_padding(padding, spatial, kernel, strides, dilation):
    """`padding` as nn.Conv reads it, as explicit ((top, bottom), (left, right)) zero pads."""
    if isinstance(padding, str):
        if padding.upper() == "VALID":
            return ((0, 0), (0, 0))
        if padding.upper() == "SAME":
            window = [d * (k - 1) + 1 for k, d in zip(kernel, dilation, strict=True)]
            pads = lax.padtype_to_pads(spatial, window, strides, "SAME")
            return tuple((int(lo), int(hi)) for lo, hi in pads)
    elif _is_int(padding):
        if padding >= 0:
            return ((int(padding),) * 2,) * 2
    elif isinstance(padding, Sequence) and len(padding) == 2:
        pads = []
        for p in padding:
            if _is_int(p):
                pads.append((int(p), int(p)))
            elif isinstance(p, Sequence) and len(p) == 2 and all(map(_is_int, p)):
                pads.append((int(p[0]), int(p[1])))
        if len(pads) == 2 and min(min(p) for p in pads) >= 0:
            return tuple(pads)
    raise ValueError(
        'padding must be "SAME", "VALID", a non-negative int, a pair of them, or a pair of '
        f"(low, high) pairs (zero padding only), got {padding!r}"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _pad_for_ops(x: Array, pads) -> tuple[Array, tuple[int, int]]:
    """The ops take symmetric padding; asymmetric padding ("SAME" with even windows or strides)
    is applied to x explicitly, which reads the same zeros, bilinear reads included."""
    (top, bottom), (left, right) = pads
    if top == bottom and left == right:
        return x, (top, left)
    return jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0))), (0, 0)


def _scope_pair(layer: nn.Module, geo: _Geometry) -> tuple[int, int]:
    """The layer's scope_size as a pair, checked to be at least the kernel size."""
    scope = _checks.pair(layer.scope_size, "scope_size", minimum=1)
    if scope[0] < geo.kernel[0] or scope[1] < geo.kernel[1]:
        raise ValueError(
            f"{type(layer).__name__}: scope_size {scope} is smaller than kernel_size "
            f"{geo.kernel}; the scope must be at least the kernel size"
        )
    return scope


def _check_depthwise(layer: nn.Module, x: Array, rotation_groups: int) -> None:
    """Checks that features (if given) equals C and that rotation_groups divides C."""
    name = type(layer).__name__
    channels = x.shape[-1]
    if layer.features is not None and layer.features != channels:
        raise ValueError(
            f"{name} is depthwise: features={layer.features} must equal the input channels, but "
            f"x has shape {tuple(x.shape)} (C={channels}); leave features=None to infer it"
        )
    groups = _checks.positive_int(rotation_groups, "rotation_groups")
    if channels % groups:
        raise ValueError(
            f"{name}: the input channels C={channels} (x shape {tuple(x.shape)}) must be "
            f"divisible by rotation_groups={groups}"
        )


def _scope_kernel_init(kernel_init: Initializer | None, kernel, fan_in_channels: int = 1):
    """kernel_init, else uniform in +-1/sqrt(fan_in) with fan_in = Kh*Kw*(C/groups)."""
    if kernel_init is not None:
        return kernel_init
    bound = 1.0 / np.sqrt(kernel[0] * kernel[1] * fan_in_channels)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# --- clipping ------------------------------------------------------------------------------


def _check_clip(clip: Any, name: str, *, scope_allowed: bool) -> None:
    if clip is None or (scope_allowed and clip == "scope"):
        return
    if (
        isinstance(clip, Sequence)
        and not isinstance(clip, str)
        and len(clip) == 2
        and all(isinstance(v, (int, float, np.number)) for v in clip)
        and clip[0] <= clip[1]
    ):
        return
    allowed = 'None, "scope" or a (min, max) pair' if scope_allowed else "None or a (min, max) pair"
    raise ValueError(f"{name} must be {allowed} with min <= max, got {clip!r}")


def _clip(value: Array, clip: Clip) -> Array:
    return value if clip is None else jnp.clip(value, clip[0], clip[1])


def _clip_rotation(rotation: Array, clip: Any, scope, kernel, groups: int) -> Array:
    """Applies rotation_clip. "scope" clamps each tap so that its sampled kernel position
    a + r_y + (Sh-Kh)/2 (and b + r_x + (Sw-Kw)/2) stays inside [0, S-1]."""
    if clip != "scope":
        return _clip(rotation, clip)
    grid = _kernel_grid(kernel, scope)
    low = np.tile(-grid.reshape(-1), groups)  # the layout ((g*Kh + a)*Kw + b)*2 + t
    high = np.tile((np.subtract(scope, 1) - grid).reshape(-1), groups)
    return jnp.clip(rotation, low.astype(rotation.dtype), high.astype(rotation.dtype))


def _kernel_grid(kernel, scope) -> np.ndarray:
    """(Kh, Kw, 2): where tap (a, b) reads the scope at zero offset, (a, b) + (S - K)/2, which is
    the published `start + index` with start = (S - (K-1) - 1)/2. Last axis: row, column."""
    (kh, kw), (sh, sw) = kernel, scope
    rows, cols = np.meshgrid(
        np.arange(kh) + (sh - kh) / 2, np.arange(kw) + (sw - kw) / 2, indexing="ij"
    )
    return np.stack([rows, cols], axis=-1)


# --- per-sample convolution (global DK, CondConv) ------------------------------------------


def _per_sample_conv(x: Array, kernels: Array, geo: _Geometry, groups: int, precision) -> Array:
    """y[n] = conv(x[n], kernels[n]): x (N, H, W, C), kernels (N, Kh, Kw, C/groups, F).

    Written as a sum over the K*K taps of strided slices of the padded input, each contracted
    with that tap's per-sample kernel over the group's channels (an elementwise product in the
    depthwise case). `vmap` of `lax.conv_general_dilated` computes the same thing, but XLA's
    CPU gradient of that batched grouped convolution grew with the square of the batch: 4.4 s
    and 4.7 GB of temporaries per step of the small ResNet at batch 128."""
    n, _, _, c = x.shape
    (kh, kw), (sh, sw), (dh, dw) = geo.kernel, geo.strides, geo.dilation
    ho, wo = geo.out_hw
    cg, f = c // groups, kernels.shape[-1]
    fg = f // groups
    xp = jnp.pad(x, ((0, 0), *geo.pads, (0, 0)))
    y = None
    for a in range(kh):
        for b in range(kw):
            start = (0, a * dh, b * dw, 0)
            stop = (n, a * dh + (ho - 1) * sh + 1, b * dw + (wo - 1) * sw + 1, c)
            tap = lax.slice(xp, start, stop, (1, sh, sw, 1))
            k = kernels[:, a, b]  # (N, C/groups, F)
            if cg == 1 and fg == 1:
                term = tap * k[:, None, None, 0, :]
            else:
                k = k.reshape(n, cg, groups, fg).transpose(0, 2, 1, 3)  # (N, G, Cg, Fg)
                term = jnp.einsum(
                    "nhwgc,ngcf->nhwgf",
                    tap.reshape(n, ho, wo, groups, cg),
                    k,
                    precision=precision,
                ).reshape(n, ho, wo, f)
            y = term if y is None else y + term
    return y


def _check_grouped(layer: nn.Module, x: Array) -> tuple[int, int]:
    """(C, groups) after checking that groups divide C and features."""
    name = type(layer).__name__
    channels, groups, features = x.shape[-1], layer.feature_group_count, layer.features
    groups = _checks.positive_int(groups, "feature_group_count")
    if channels % groups or features % groups:
        raise ValueError(
            f"{name}: feature_group_count={groups} must divide the input channels "
            f"(x shape {tuple(x.shape)}, C={channels}) and features={features}"
        )
    return channels, groups


def _offset_conv(layer: nn.Module, x: Array, geo: _Geometry, features: int, name: str):
    """A zero-initialised K x K conv on the layer's output grid, predicting offsets."""
    return nn.Conv(
        features,
        geo.kernel,
        strides=geo.strides,
        padding=geo.pads,
        kernel_dilation=geo.dilation,
        use_bias=True,
        dtype=layer.dtype,
        param_dtype=layer.param_dtype,
        precision=layer.precision,
        kernel_init=_zeros,
        bias_init=_zeros,
        name=name,
    )(x)


# --- inner layers: offsets as inputs --------------------------------------------------------


class SampleDepthwise(nn.Module):
    """Depthwise convolution whose K x K taps read a scope-sized kernel at rotated positions
    (`dk_jax.sample_depthwise`); the rotation is an input.

        y[n,i,j,c] = sum_{a,b} x[n, i*sh - ph + a*dh, j*sw - pw + b*dw, c]
                     * B(kernel[:,:,c], a + r_y + (Sh-Kh)/2, b + r_x + (Sw-Kw)/2) + bias[c]

    Parameters::

        kernel  (Sh, Sw, C)
        bias    (C,)            if use_bias

    Call: `layer(x, rotation=None)`, x (N, H, W, C), rotation (N, Ho, Wo, G*Kh*Kw*2) or None
    (zero rotation: a depthwise conv with the centre of the scope) -> (N, Ho, Wo, C).

    Attributes:
      scope_size: (Sh, Sw) of the stored kernel, >= kernel_size; an int or a pair.
      kernel_size: (Kh, Kw) taps of the convolution; an int or a pair.
      strides: an int or a pair (default 1).
      padding: "SAME" (default), "VALID", an int, a pair, or a pair of (low, high) pairs.
      kernel_dilation: dilation of the image taps; an int or a pair (default 1).
      rotation_groups: G; channel c uses the rotation of group c % G; C % G == 0.
      features: optional; if given it must equal C (the layer is depthwise).
      use_bias: whether to add a bias (default True).
      dtype: computation dtype (default: inferred from input and params).
      param_dtype: dtype of the parameters (default float32).
      kernel_init: initializer of the scope kernel (default uniform +-1/sqrt(Kh*Kw)).
      bias_init: initializer of the bias (default zeros).
      implementation: "ffi", "xla" or None (the ops' choice).
    """

    scope_size: IntOrPair
    kernel_size: IntOrPair
    strides: IntOrPair = 1
    padding: PaddingLike = "SAME"
    kernel_dilation: IntOrPair = 1
    rotation_groups: int = 1
    features: int | None = None
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer | None = None
    bias_init: Initializer = _zeros
    implementation: str | None = None

    @nn.compact
    def __call__(self, x: Array, rotation: Array | None = None) -> Array:
        geo = _geometry(self, x)
        scope = _scope_pair(self, geo)
        _check_depthwise(self, x, self.rotation_groups)
        n, channels = x.shape[0], x.shape[-1]
        kernel = self.param(
            "kernel",
            _scope_kernel_init(self.kernel_init, geo.kernel),
            (*scope, channels),
            self.param_dtype,
        )
        bias = (
            self.param("bias", self.bias_init, (channels,), self.param_dtype)
            if self.use_bias
            else None
        )
        # The ops take one dtype for every argument: cast params and inputs to `dtype`.
        x, rotation, kernel, bias = nn.dtypes.promote_dtype(
            x, rotation, kernel, bias, dtype=self.dtype
        )
        if rotation is None:
            taps = self.rotation_groups * geo.kernel[0] * geo.kernel[1] * 2
            rotation = jnp.zeros((n, *geo.out_hw, taps), x.dtype)
        x, padding = _pad_for_ops(x, geo.pads)
        y = ops.sample_depthwise(
            x,
            rotation,
            kernel,
            kernel_size=geo.kernel,
            stride=geo.strides,
            padding=padding,
            dilation=geo.dilation,
            rotation_groups=self.rotation_groups,
            implementation=self.implementation,
        )
        return y if bias is None else y + bias


class DeformableSampleDepthwise(nn.Module):
    """`SampleDepthwise` whose image taps are read bilinearly at offset positions as well
    (`dk_jax.deform_sample_depthwise`); offset and rotation are inputs.

        y[n,i,j,c] = sum_{a,b} B(x[n,:,:,c], i*sh - ph + a*dh + o_y, j*sw - pw + b*dw + o_x)
                     * B(kernel[:,:,c], a + r_y + (Sh-Kh)/2, b + r_x + (Sw-Kw)/2) + bias[c]

    Parameters::

        kernel  (Sh, Sw, C)
        bias    (C,)            if use_bias

    Call: `layer(x, offset=None, rotation=None)`, x (N, H, W, C), offset (N, Ho, Wo, Kh*Kw*2),
    rotation (N, Ho, Wo, G*Kh*Kw*2); None means zeros -> (N, Ho, Wo, C).

    Attributes:
      scope_size: (Sh, Sw) of the stored kernel, >= kernel_size; an int or a pair.
      kernel_size: (Kh, Kw) taps of the convolution; an int or a pair.
      strides: an int or a pair (default 1).
      padding: "SAME" (default), "VALID", an int, a pair, or a pair of (low, high) pairs.
      kernel_dilation: dilation of the image taps; an int or a pair (default 1).
      rotation_groups: G; channel c uses the rotation of group c % G; C % G == 0.
      features: optional; if given it must equal C (the layer is depthwise).
      use_bias: whether to add a bias (default True).
      dtype: computation dtype (default: inferred from input and params).
      param_dtype: dtype of the parameters (default float32).
      kernel_init: initializer of the scope kernel (default uniform +-1/sqrt(Kh*Kw)).
      bias_init: initializer of the bias (default zeros).
      implementation: "ffi", "xla" or None (the ops' choice).
    """

    scope_size: IntOrPair
    kernel_size: IntOrPair
    strides: IntOrPair = 1
    padding: PaddingLike = "SAME"
    kernel_dilation: IntOrPair = 1
    rotation_groups: int = 1
    features: int | None = None
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer | None = None
    bias_init: Initializer = _zeros
    implementation: str | None = None

    @nn.compact
    def __call__(
        self, x: Array, offset: Array | None = None, rotation: Array | None = None
    ) -> Array:
        geo = _geometry(self, x)
        scope = _scope_pair(self, geo)
        _check_depthwise(self, x, self.rotation_groups)
        n, channels = x.shape[0], x.shape[-1]
        kernel = self.param(
            "kernel",
            _scope_kernel_init(self.kernel_init, geo.kernel),
            (*scope, channels),
            self.param_dtype,
        )
        bias = (
            self.param("bias", self.bias_init, (channels,), self.param_dtype)
            if self.use_bias
            else None
        )
        # The ops take one dtype for every argument: cast params and inputs to `dtype`.
        x, offset, rotation, kernel, bias = nn.dtypes.promote_dtype(
            x, offset, rotation, kernel, bias, dtype=self.dtype
        )
        taps = geo.kernel[0] * geo.kernel[1] * 2
        if offset is None:
            offset = jnp.zeros((n, *geo.out_hw, taps), x.dtype)
        if rotation is None:
            rotation = jnp.zeros((n, *geo.out_hw, self.rotation_groups * taps), x.dtype)
        x, padding = _pad_for_ops(x, geo.pads)
        y = ops.deform_sample_depthwise(
            x,
            offset,
            rotation,
            kernel,
            kernel_size=geo.kernel,
            stride=geo.strides,
            padding=padding,
            dilation=geo.dilation,
            rotation_groups=self.rotation_groups,
            implementation=self.implementation,
        )
        return y if bias is None else y + bias


class SampleConv(nn.Module):
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

    Attributes:
      features: number of output channels.
      scope_size: (Sh, Sw) of the stored kernel, >= kernel_size; an int or a pair.
      kernel_size: (Kh, Kw) taps of the convolution; an int or a pair.
      strides: an int or a pair (default 1).
      padding: "SAME" (default), "VALID", an int, a pair, or a pair of (low, high) pairs.
      kernel_dilation: dilation of the image taps; an int or a pair (default 1).
      rotation_groups: G; input channel c uses the rotation of group c % G; C % G == 0.
      feature_group_count: groups of the convolution (1 = full); divides C and features.
      use_bias: whether to add a bias (default True).
      dtype: computation dtype (default: inferred from input and params).
      param_dtype: dtype of the parameters (default float32).
      kernel_init: initializer of the scope kernel (default uniform +-1/sqrt(Kh*Kw*C/groups)).
      bias_init: initializer of the bias (default zeros).
      implementation: "ffi", "xla" or None (the ops' choice).
    """

    features: int
    scope_size: IntOrPair
    kernel_size: IntOrPair
    strides: IntOrPair = 1
    padding: PaddingLike = "SAME"
    kernel_dilation: IntOrPair = 1
    rotation_groups: int = 1
    feature_group_count: int = 1
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer | None = None
    bias_init: Initializer = _zeros
    implementation: str | None = None

    @nn.compact
    def __call__(
        self, x: Array, rotation: Array | None = None, offset: Array | None = None
    ) -> Array:
        geo = _geometry(self, x)
        scope = _scope_pair(self, geo)
        channels, groups = _check_grouped(self, x)
        rotation_groups = _checks.positive_int(self.rotation_groups, "rotation_groups")
        if channels % rotation_groups:
            raise ValueError(
                f"SampleConv: the input channels C={channels} must be divisible by "
                f"rotation_groups={rotation_groups}"
            )
        n = x.shape[0]
        kernel = self.param(
            "kernel",
            _scope_kernel_init(self.kernel_init, geo.kernel, channels // groups),
            (*scope, channels // groups, self.features),
            self.param_dtype,
        )
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        x, offset, rotation, kernel, bias = nn.dtypes.promote_dtype(
            x, offset, rotation, kernel, bias, dtype=self.dtype
        )
        taps = geo.kernel[0] * geo.kernel[1] * 2
        if rotation is None:
            rotation = jnp.zeros((n, *geo.out_hw, rotation_groups * taps), x.dtype)
        x, padding = _pad_for_ops(x, geo.pads)
        common = dict(
            kernel_size=geo.kernel,
            stride=geo.strides,
            padding=padding,
            dilation=geo.dilation,
            rotation_groups=rotation_groups,
            feature_group_count=groups,
            implementation=self.implementation,
        )
        if offset is None:
            y = ops.sample_conv(x, rotation, kernel, **common)
        else:
            y = ops.deform_sample_conv(x, offset, rotation, kernel, **common)
        return y if bias is None else y + bias


def _is_depthwise(layer: nn.Module, x: Array) -> bool:
    """Whether a DK layer with optional features / feature_group_count is depthwise: groups
    unset (the default), or groups = features = C."""
    groups, channels = layer.feature_group_count, x.shape[-1]
    return groups is None or (groups == channels and layer.features in (None, channels))


# --- deformable kernels ---------------------------------------------------------------------


class GlobalDeformKernel2d(nn.Module):
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

    Attributes:
      features: number of output channels.
      scope_size: (Sh, Sw) of the stored kernel, >= kernel_size; an int or a pair.
      kernel_size: (Kh, Kw) taps of the convolution; an int or a pair.
      strides: an int or a pair (default 1).
      padding: "SAME" (default), "VALID", an int, a pair, or a pair of (low, high) pairs.
      kernel_dilation: dilation of the image taps; an int or a pair (default 1).
      feature_group_count: groups of the convolution; divides C and features (C = depthwise).
      use_bias: whether to add a bias (default True).
      dtype: computation dtype (default: inferred from input and params).
      param_dtype: dtype of the parameters (default float32).
      precision: precision of the dense layer and the convolution (see `jax.lax.Precision`).
      kernel_init: initializer of the scope kernel (default uniform +-1/sqrt(Kh*Kw*C/groups)).
      bias_init: initializer of the bias (default zeros).
      implementation: "ffi", "xla" or None (the ops' choice).
    """

    features: int
    scope_size: IntOrPair
    kernel_size: IntOrPair
    strides: IntOrPair = 1
    padding: PaddingLike = "SAME"
    kernel_dilation: IntOrPair = 1
    feature_group_count: int = 1
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    kernel_init: Initializer | None = None
    bias_init: Initializer = _zeros
    implementation: str | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        geo = _geometry(self, x)
        channels, groups = _check_grouped(self, x)
        scope = _scope_pair(self, geo)
        (kh, kw), (sh, sw) = geo.kernel, scope
        kernel = self.param(
            "kernel",
            _scope_kernel_init(self.kernel_init, geo.kernel, channels // groups),
            (sh, sw, channels // groups, self.features),
            self.param_dtype,
        )
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)

        shift = nn.Dense(
            kh * kw * 2,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernel_init=_zeros,
            bias_init=_zeros,
            name="fc",
        )(jnp.mean(x, axis=(1, 2)))
        grid = _kernel_grid(geo.kernel, scope).astype(shift.dtype)
        coords = shift.reshape(-1, kh, kw, 2) + grid
        coords = jnp.clip(coords, 0, np.array([sh - 1, sw - 1], shift.dtype))
        self.sow("intermediates", "coords", coords)

        # vmapped over the batch (one shared table) rather than one call on N*Kh*Kw points,
        # so that a batch split over devices stays split.
        sampled = jax.vmap(
            partial(ops.nd_linear_sample, implementation=self.implementation), in_axes=(None, 0)
        )(kernel.reshape(sh, sw, -1), coords.reshape(coords.shape[0], -1, 2))
        batch = ops._batch_spec(sampled)  # named, as JAX cannot infer it on an Explicit mesh
        kernels = sampled.reshape(
            sampled.shape[0],
            kh,
            kw,
            channels // groups,
            self.features,
            out_sharding=None if batch is None else P(batch, None, None, None, None),
        )
        y = _per_sample_conv(x, kernels, geo, groups, self.precision)
        return y if bias is None else y + bias


def _grouped_inner(layer: nn.Module, x: Array, geo: _Geometry, scope) -> "SampleConv":
    """The grouped / full inner conv of a DK layer (features defaults to C)."""
    return SampleConv(
        layer.features if layer.features is not None else x.shape[-1],
        scope,
        geo.kernel,
        geo.strides,
        geo.pads,
        geo.dilation,
        layer.rotation_groups,
        feature_group_count=layer.feature_group_count,
        use_bias=layer.use_bias,
        dtype=layer.dtype,
        param_dtype=layer.param_dtype,
        kernel_init=layer.kernel_init,
        bias_init=layer.bias_init,
        implementation=layer.implementation,
        name="inner_conv",
    )


class LocalDeformKernel2d(nn.Module):
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

    Attributes:
      scope_size: (Sh, Sw) of the stored kernel, >= kernel_size; an int or a pair.
      kernel_size: (Kh, Kw) taps of the convolution; an int or a pair.
      strides: an int or a pair (default 1).
      padding: "SAME" (default), "VALID", an int, a pair, or a pair of (low, high) pairs.
      kernel_dilation: dilation of the image taps; an int or a pair (default 1).
      rotation_groups: G; channel c uses the rotation of group c % G; C % G == 0.
      rotation_clip: None, a (min, max) pair, or "scope" (clamp each sampled kernel position
        a + r + (S-K)/2 into [0, S-1]).
      features: output channels; with feature_group_count unset it must be C or None
        (depthwise); with feature_group_count set it defaults to C.
      feature_group_count: None (default: depthwise, the direct kernel) or the groups of a
        grouped (1 = full) convolution computed by `SampleConv`'s im2col path; groups = C
        with features = C stays depthwise.
      use_bias: whether the inner convolution adds a bias (default True).
      dtype: computation dtype (default: inferred from input and params).
      param_dtype: dtype of the parameters (default float32).
      precision: precision of `rotation_conv` (see `jax.lax.Precision`).
      kernel_init: initializer of the scope kernel (default uniform +-1/sqrt(Kh*Kw)).
      bias_init: initializer of the bias (default zeros).
      implementation: "ffi", "xla" or None (the ops' choice).
    """

    scope_size: IntOrPair
    kernel_size: IntOrPair
    strides: IntOrPair = 1
    padding: PaddingLike = "SAME"
    kernel_dilation: IntOrPair = 1
    rotation_groups: int = 1
    rotation_clip: Clip | str = None
    features: int | None = None
    feature_group_count: int | None = None
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    kernel_init: Initializer | None = None
    bias_init: Initializer = _zeros
    implementation: str | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        geo = _geometry(self, x)
        scope = _scope_pair(self, geo)
        depthwise = _is_depthwise(self, x)
        if depthwise:
            _check_depthwise(self, x, self.rotation_groups)
        _check_clip(self.rotation_clip, "rotation_clip", scope_allowed=True)
        taps = geo.kernel[0] * geo.kernel[1] * 2

        rotation = _offset_conv(self, x, geo, self.rotation_groups * taps, "rotation_conv")
        rotation = _clip_rotation(
            rotation, self.rotation_clip, scope, geo.kernel, self.rotation_groups
        )
        self.sow("intermediates", "rotation", rotation)

        if not depthwise:
            return _grouped_inner(self, x, geo, scope)(x, rotation)
        return SampleDepthwise(
            scope,
            geo.kernel,
            geo.strides,
            geo.pads,
            geo.dilation,
            self.rotation_groups,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
            implementation=self.implementation,
            name="inner_conv",
        )(x, rotation)


DeformKernel2d = LocalDeformKernel2d
"""The default deformable kernel is the local one (as in the published code)."""


class DeformKernelConv2d(nn.Module):
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

    Attributes:
      scope_size: (Sh, Sw) of the stored kernel, >= kernel_size; an int or a pair.
      kernel_size: (Kh, Kw) taps of the convolution; an int or a pair.
      strides: an int or a pair (default 1).
      padding: "SAME" (default), "VALID", an int, a pair, or a pair of (low, high) pairs.
      kernel_dilation: dilation of the image taps; an int or a pair (default 1).
      rotation_groups: G; channel c uses the rotation of group c % G; C % G == 0.
      offset_clip: None or a (min, max) pair, applied before the dilation factor.
      rotation_clip: None, a (min, max) pair, or "scope" (as in `LocalDeformKernel2d`).
      features: output channels; with feature_group_count unset it must be C or None
        (depthwise); with feature_group_count set it defaults to C.
      feature_group_count: None (default: depthwise, the direct kernel) or the groups of a
        grouped (1 = full) convolution computed by `SampleConv`'s im2col path; groups = C
        with features = C stays depthwise.
      use_bias: whether the inner convolution adds a bias (default True).
      dtype: computation dtype (default: inferred from input and params).
      param_dtype: dtype of the parameters (default float32).
      precision: precision of `offset_conv` and `rotation_conv` (see `jax.lax.Precision`).
      kernel_init: initializer of the scope kernel (default uniform +-1/sqrt(Kh*Kw)).
      bias_init: initializer of the bias (default zeros).
      implementation: "ffi", "xla" or None (the ops' choice).
    """

    scope_size: IntOrPair
    kernel_size: IntOrPair
    strides: IntOrPair = 1
    padding: PaddingLike = "SAME"
    kernel_dilation: IntOrPair = 1
    rotation_groups: int = 1
    offset_clip: Clip = None
    rotation_clip: Clip | str = None
    features: int | None = None
    feature_group_count: int | None = None
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    kernel_init: Initializer | None = None
    bias_init: Initializer = _zeros
    implementation: str | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        geo = _geometry(self, x)
        scope = _scope_pair(self, geo)
        depthwise = _is_depthwise(self, x)
        if depthwise:
            _check_depthwise(self, x, self.rotation_groups)
        _check_clip(self.offset_clip, "offset_clip", scope_allowed=False)
        _check_clip(self.rotation_clip, "rotation_clip", scope_allowed=True)
        taps = geo.kernel[0] * geo.kernel[1] * 2

        offset = _offset_conv(self, x, geo, taps, "offset_conv")
        offset = _clip(offset, self.offset_clip)
        offset = offset * np.tile(geo.dilation, taps // 2).astype(offset.dtype)
        rotation = _offset_conv(self, x, geo, self.rotation_groups * taps, "rotation_conv")
        rotation = _clip_rotation(
            rotation, self.rotation_clip, scope, geo.kernel, self.rotation_groups
        )
        self.sow("intermediates", "offset", offset)
        self.sow("intermediates", "rotation", rotation)

        if not depthwise:
            return _grouped_inner(self, x, geo, scope)(x, rotation, offset)
        return DeformableSampleDepthwise(
            scope,
            geo.kernel,
            geo.strides,
            geo.pads,
            geo.dilation,
            self.rotation_groups,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
            implementation=self.implementation,
            name="inner_conv",
        )(x, offset, rotation)


# --- rivals ---------------------------------------------------------------------------------


class DeformConv2d(nn.Module):
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

    Attributes:
      kernel_size: (Kh, Kw) taps of the convolution; an int or a pair.
      strides: an int or a pair (default 1).
      padding: "SAME" (default), "VALID", an int, a pair, or a pair of (low, high) pairs.
      kernel_dilation: dilation of the image taps; an int or a pair (default 1).
      offset_clip: None or a (min, max) pair, applied before the dilation factor.
      features: optional; if given it must equal C (the layer is depthwise).
      use_bias: whether the inner convolution adds a bias (default True).
      dtype: computation dtype (default: inferred from input and params).
      param_dtype: dtype of the parameters (default float32).
      precision: precision of `offset_conv` (see `jax.lax.Precision`).
      kernel_init: initializer of the kernel (default uniform +-1/sqrt(Kh*Kw)).
      bias_init: initializer of the bias (default zeros).
      implementation: "ffi", "xla" or None (the ops' choice).
    """

    kernel_size: IntOrPair
    strides: IntOrPair = 1
    padding: PaddingLike = "SAME"
    kernel_dilation: IntOrPair = 1
    offset_clip: Clip = None
    features: int | None = None
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    kernel_init: Initializer | None = None
    bias_init: Initializer = _zeros
    implementation: str | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        geo = _geometry(self, x)
        _check_depthwise(self, x, 1)
        _check_clip(self.offset_clip, "offset_clip", scope_allowed=False)
        taps = geo.kernel[0] * geo.kernel[1] * 2

        offset = _offset_conv(self, x, geo, taps, "offset_conv")
        offset = _clip(offset, self.offset_clip)
        offset = offset * np.tile(geo.dilation, taps // 2).astype(offset.dtype)
        self.sow("intermediates", "offset", offset)

        return DeformableSampleDepthwise(
            geo.kernel,
            geo.kernel,
            geo.strides,
            geo.pads,
            geo.dilation,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
            implementation=self.implementation,
            name="inner_conv",
        )(x, offset)


class CondConv2d(nn.Module):
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

    Attributes:
      features: number of output channels.
      num_experts: E, the number of expert kernels.
      kernel_size: (Kh, Kw); an int or a pair.
      strides: an int or a pair (default 1).
      padding: "SAME" (default), "VALID", an int, a pair, or a pair of (low, high) pairs.
      kernel_dilation: dilation of the image taps; an int or a pair (default 1).
      feature_group_count: groups of the convolution; divides C and features (C = depthwise).
      use_bias: whether to add a bias (default True).
      dtype: computation dtype (default: inferred from input and params).
      param_dtype: dtype of the parameters (default float32).
      precision: precision of the routing, the mixture and the convolution.
      kernel_init: initializer of the expert kernels (default LeCun normal per expert).
      bias_init: initializer of the bias (default zeros).
    """

    features: int
    num_experts: int
    kernel_size: IntOrPair
    strides: IntOrPair = 1
    padding: PaddingLike = "SAME"
    kernel_dilation: IntOrPair = 1
    feature_group_count: int = 1
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    kernel_init: Initializer = nn.initializers.lecun_normal(batch_axis=0)
    bias_init: Initializer = _zeros

    @nn.compact
    def __call__(self, x: Array) -> Array:
        geo = _geometry(self, x)
        channels, groups = _check_grouped(self, x)
        experts = _checks.positive_int(self.num_experts, "num_experts")
        kernel = self.param(
            "kernel",
            self.kernel_init,
            (experts, *geo.kernel, channels // groups, self.features),
            self.param_dtype,
        )
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)

        routing = nn.Dense(
            experts,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernel_init=_zeros,
            bias_init=_zeros,
            name="fc",
        )(jnp.mean(x, axis=(1, 2)))
        routing = nn.sigmoid(routing)
        self.sow("intermediates", "routing", routing)

        kernels = jnp.einsum("ne,ehwio->nhwio", routing, kernel, precision=self.precision)
        y = _per_sample_conv(x, kernels, geo, groups, self.precision)
        return y if bias is None else y + bias
