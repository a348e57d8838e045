"""Shared maths of the layers: geometry and padding, argument checks, scope-kernel
initialisation, rotation clipping, the offset-predicting conv and dense layers, and the
per-sample convolution of global DK and CondConv.

Every function takes a layer body (any object with the layer's fields: a linen module or the
configuration an NNX layer holds) or plain arrays, so both Flax APIs run this one copy.
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype
from flax.typing import Array, Initializer
from jax import lax

from dk_jax import _checks

Clip = tuple[float, float] | None


class ParamSpec(NamedTuple):
    """A parameter a layer declares: its shape, initializer and dtype."""

    shape: tuple[int, ...]
    init: Initializer
    dtype: Any


Sow = Callable[[str, Array], Any]
"""Where a body puts what it predicts: `self.sow` of the Flax module running it."""


def no_sow(name: str, value: Array) -> None:
    """The `sow` of a body called outside a Flax module: intermediates are dropped."""


def layer_name(layer: Any) -> str:
    return type(layer).__name__.removesuffix("Body")


# --- geometry -------------------------------------------------------------------------------


class Geometry(NamedTuple):
    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilation: tuple[int, int]
    pads: tuple[tuple[int, int], tuple[int, int]]  # (low, high) per spatial axis
    out_hw: tuple[int, int]


def check_rank(layer: Any, x: Array) -> None:
    if x.ndim != 4:
        raise ValueError(
            f"{layer_name(layer)}: x must have rank 4 (N, H, W, C), got shape {tuple(x.shape)}"
        )


def taps(layer: Any) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """kernel_size, strides and kernel_dilation as checked pairs; padding checked too."""
    kernel = _checks.pair(layer.kernel_size, "kernel_size", minimum=1)
    strides = _checks.pair(layer.strides, "strides", minimum=1)
    dilation = _checks.pair(layer.kernel_dilation, "kernel_dilation", minimum=1)
    explicit_padding(layer.padding, (1, 1), kernel, strides, dilation)
    return kernel, strides, dilation


def geometry(layer: Any, x: Array) -> Geometry:
    """Normalises the layer's kernel_size, strides, padding and kernel_dilation for input x."""
    check_rank(layer, x)
    kernel, strides, dilation = taps(layer)
    spatial = tuple(x.shape[1:3])
    pads = explicit_padding(layer.padding, spatial, kernel, strides, dilation)
    out_hw = tuple(
        (size + lo + hi - d * (k - 1) - 1) // s + 1
        for size, (lo, hi), k, s, d in zip(spatial, pads, kernel, strides, dilation, strict=True)
    )
    if min(out_hw) < 1:
        raise ValueError(
            f"{layer_name(layer)}: the output would be empty: input {spatial} with kernel_size "
            f"{kernel}, padding {pads} and kernel_dilation {dilation} gives {out_hw}"
        )
    return Geometry(kernel, strides, dilation, pads, out_hw)


def explicit_padding(padding, spatial, kernel, strides, dilation):
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


def pad_for_ops(x: Array, pads) -> tuple[Array, tuple[int, int]]:
    """The ops take symmetric padding; asymmetric padding ("SAME" with even windows or strides)
    is applied to x explicitly, which reads the same zeros, bilinear reads included."""
    (top, bottom), (left, right) = pads
    if top == bottom and left == right:
        return x, (top, left)
    return jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0))), (0, 0)


# --- checks ---------------------------------------------------------------------------------


def scope_pair(layer: Any, kernel: tuple[int, int]) -> tuple[int, int]:
    """The layer's scope_size as a pair, checked to be at least the kernel size."""
    scope = _checks.pair(layer.scope_size, "scope_size", minimum=1)
    if scope[0] < kernel[0] or scope[1] < kernel[1]:
        raise ValueError(
            f"{layer_name(layer)}: scope_size {scope} is smaller than kernel_size {kernel}; "
            "the scope must be at least the kernel size"
        )
    return scope


def check_depthwise(layer: Any, channels: int, source: str) -> None:
    """Checks that features (if given) equals C; `source` says where C came from."""
    if layer.features is not None and layer.features != channels:
        raise ValueError(
            f"{layer_name(layer)} is depthwise: features={layer.features} must equal the input "
            f"channels, but {source} (C={channels}); leave features=None to infer it"
        )


def check_rotation_groups(layer: Any, channels: int, source: str) -> int:
    groups = _checks.positive_int(layer.rotation_groups, "rotation_groups")
    if channels % groups:
        raise ValueError(
            f"{layer_name(layer)}: the input channels C={channels} ({source}) must be "
            f"divisible by rotation_groups={groups}"
        )
    return groups


def check_grouped(layer: Any, channels: int, source: str) -> int:
    """feature_group_count, checked to divide C and features."""
    groups = _checks.positive_int(layer.feature_group_count, "feature_group_count")
    if channels % groups or layer.features % groups:
        raise ValueError(
            f"{layer_name(layer)}: feature_group_count={groups} must divide the input channels "
            f"({source}, C={channels}) and features={layer.features}"
        )
    return groups


def check_clip(clip: Any, name: str, *, scope_allowed: bool) -> None:
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


# --- parameters -----------------------------------------------------------------------------


def scope_kernel_init(kernel_init: Initializer | None, kernel, fan_in_channels: int = 1):
    """kernel_init, else uniform in +-1/sqrt(fan_in) with fan_in = Kh*Kw*(C/groups)."""
    if kernel_init is not None:
        return kernel_init
    bound = 1.0 / np.sqrt(kernel[0] * kernel[1] * fan_in_channels)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def kernel_and_bias(layer: Any, kernel_shape, kernel_init: Initializer, features: int) -> dict:
    """The specs of a layer's `kernel` and, with use_bias, its (features,) `bias`."""
    specs = {"kernel": ParamSpec(tuple(kernel_shape), kernel_init, layer.param_dtype)}
    if layer.use_bias:
        specs["bias"] = ParamSpec((features,), layer.bias_init, layer.param_dtype)
    return specs


def predictor(layer: Any, kernel_shape) -> dict:
    """A zero-initialised kernel and bias: offset convs and routing / coordinate dense layers
    start at zero, so every adaptive layer starts as the rigid layer it generalises."""
    zeros = jax.nn.initializers.zeros
    return {
        "kernel": ParamSpec(tuple(kernel_shape), zeros, layer.param_dtype),
        "bias": ParamSpec((kernel_shape[-1],), zeros, layer.param_dtype),
    }


def add_bias(y: Array, bias: Array | None) -> Array:
    return y if bias is None else y + bias


# --- offset prediction ----------------------------------------------------------------------


def offset_conv(layer: Any, params: dict, x: Array, geo: Geometry) -> Array:
    """A K x K conv on the layer's output grid, as `nn.Conv` computes it (kernel (Kh, Kw, C, O))."""
    x, kernel, bias = promote_dtype(x, params["kernel"], params["bias"], dtype=layer.dtype)
    y = lax.conv_general_dilated(
        x,
        kernel,
        geo.strides,
        geo.pads,
        rhs_dilation=geo.dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=layer.precision,
    )
    return y + bias


def pooled_dense(layer: Any, params: dict, x: Array) -> Array:
    """`nn.Dense` (kernel (C, O)) on the global average pool of x: (N, H, W, C) -> (N, O)."""
    pooled = jnp.mean(x, axis=(1, 2))
    pooled, kernel, bias = promote_dtype(
        pooled, params["kernel"], params["bias"], dtype=layer.dtype
    )
    y = lax.dot_general(pooled, kernel, (((1,), (0,)), ((), ())), precision=layer.precision)
    return y + bias


def clip(value: Array, bounds: Clip) -> Array:
    return value if bounds is None else jnp.clip(value, bounds[0], bounds[1])


def clip_rotation(rotation: Array, bounds: Any, scope, kernel, groups: int) -> Array:
    """Applies rotation_clip. "scope" clamps each tap so that its sampled kernel position
    a + r_y + (Sh-Kh)/2 (and b + r_x + (Sw-Kw)/2) stays inside [0, S-1]."""
    if bounds != "scope":
        return clip(rotation, bounds)
    grid = kernel_grid(kernel, scope)
    low = np.tile(-grid.reshape(-1), groups)  # the layout ((g*Kh + a)*Kw + b)*2 + t
    high = np.tile((np.subtract(scope, 1) - grid).reshape(-1), groups)
    return jnp.clip(rotation, low.astype(rotation.dtype), high.astype(rotation.dtype))


def kernel_grid(kernel, scope) -> np.ndarray:
    """(Kh, Kw, 2): where tap (a, b) reads the scope at zero offset, (a, b) + (S - K)/2, which is
    the published `start + index` with start = (S - (K-1) - 1)/2. Last axis: row, column."""
    (kh, kw), (sh, sw) = kernel, scope
    rows, cols = np.meshgrid(
        np.arange(kh) + (sh - kh) / 2, np.arange(kw) + (sw - kw) / 2, indexing="ij"
    )
    return np.stack([rows, cols], axis=-1)


# --- per-sample convolution (global DK, CondConv) -------------------------------------------


def per_sample_conv(x: Array, kernels: Array, geo: Geometry, groups: int, precision) -> Array:
    """y[n] = conv(x[n], kernels[n]): x (N, H, W, C), kernels (N, Kh, Kw, C/groups, F).

    Written as a sum over the K*K taps of strided slices of the padded input, each contracted
    with that tap's per-sample kernel over the group's channels (an elementwise product in the
    depthwise case). `vmap` of `lax.conv_general_dilated` computes the same thing, but XLA's
    CPU gradient of that batched grouped convolution grows with the square of the batch: 4.4 s
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
