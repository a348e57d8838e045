"""The public operators of SPEC section 4: argument checks, then the ffi primitives or the
pure-jax.numpy reference.

Layouts are channels last. `rotation` holds kernel-space offsets, index
((g*Kh + a)*Kw + b)*2 + t (t = 0 row, 1 column); `offset` holds image-space offsets, index
(a*Kw + b)*2 + t; channel c uses rotation group c % rotation_groups.
"""

from __future__ import annotations

from typing import Any

import jax

from dk_jax import _checks, _ffi, reference
from dk_jax import primitives as prims

IntOrPair = int | tuple[int, int]



def _use_ffi(implementation: str | None, *arrays: Any) -> bool:
    _checks.implementation(implementation)
    if implementation == "xla":
        return False
    platform = _checks.platform_of(*arrays)
    if _ffi.available(platform):
        return True
    if implementation == "ffi":
        raise RuntimeError(
            f'implementation="ffi" was asked for, but dk_jax has no FFI library for platform '
            f"{platform!r}: {_ffi.why_unavailable(platform)}"
        )
    return False


def _depthwise_geometry(
    x, rotation, weight, offset, kernel_size, stride, padding, dilation, rotation_groups
):
    """Checks the arguments of the depthwise ops; returns normalised geometry."""
    arrays = {"x": x, "rotation": rotation, "weight": weight}
    if offset is not None:
        arrays = {"x": x, "offset": offset, "rotation": rotation, "weight": weight}
    _checks.float_arrays(**arrays)
    _checks.rank(x, "x", 4, "(N, H, W, C)")
    _checks.rank(weight, "weight", 3, "(Sh, Sw, C)")
    _checks.rank(rotation, "rotation", 4, "(N, Ho, Wo, G*Kh*Kw*2)")
    if offset is not None:
        _checks.rank(offset, "offset", 4, "(N, Ho, Wo, Kh*Kw*2)")
    kh, kw = _checks.pair(kernel_size, "kernel_size", minimum=1)
    sh, sw = _checks.pair(stride, "stride", minimum=1)
    ph, pw = _checks.pair(padding, "padding", minimum=0)
    dh, dw = _checks.pair(dilation, "dilation", minimum=1)
    groups = _checks.positive_int(rotation_groups, "rotation_groups")
    n, h, w, c = x.shape
    s_h, s_w, wc = weight.shape
    if wc != c:
        raise ValueError(f"weight has {wc} channels but x has {c}: weight must be (Sh, Sw, {c})")
    if s_h < kh or s_w < kw:
        raise ValueError(
            f"weight scope {(s_h, s_w)} is smaller than kernel_size {(kh, kw)}: "
            "the scope must be at least the kernel size"
        )
    if c % groups:
        raise ValueError(f"channels ({c}) must be divisible by rotation_groups ({groups})")
    ho = _checks.output_size(h, kh, sh, ph, dh)
    wo = _checks.output_size(w, kw, sw, pw, dw)
    if ho < 1 or wo < 1:
        raise ValueError(
            f"the output would be empty: input {(h, w)} with kernel_size {(kh, kw)}, "
            f"padding {(ph, pw)} and dilation {(dh, dw)} gives {(ho, wo)}"
        )
    expected = (n, ho, wo, groups * kh * kw * 2)
    if tuple(rotation.shape) != expected:
        raise ValueError(
            f"rotation must have shape (N, Ho, Wo, G*Kh*Kw*2) = {expected}, "
            f"got {tuple(rotation.shape)}"
        )
    if offset is not None and tuple(offset.shape) != (n, ho, wo, kh * kw * 2):
        raise ValueError(
            f"offset must have shape (N, Ho, Wo, Kh*Kw*2) = {(n, ho, wo, kh * kw * 2)}, "
            f"got {tuple(offset.shape)}"
        )
    return dict(
        kernel_size=(kh, kw),
        stride=(sh, sw),
        padding=(ph, pw),
        dilation=(dh, dw),
        rotation_groups=groups,
    )


def sample_depthwise(
    x: jax.Array,
    rotation: jax.Array,
    weight: jax.Array,
    *,
    kernel_size: IntOrPair,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    rotation_groups: int = 1,
    implementation: str | None = None,
) -> jax.Array:
    """Local deformable kernel: a depthwise convolution whose K x K taps resample a scope-sized
    kernel at rotated positions.

        y[n,i,j,c] = sum_{a,b} x[n, i*sh - ph + a*dh, j*sw - pw + b*dw, c]
                     * B(weight[:,:,c], a + r_y + (Sh-Kh)/2, b + r_x + (Sw-Kw)/2)

    with (r_y, r_x) = rotation[n,i,j, ((g*Kh + a)*Kw + b)*2 + (0, 1)], g = c % rotation_groups,
    B the zero-outside bilinear read and x zero outside the input.

    Args:
      x: (N, H, W, C) input.
      rotation: (N, Ho, Wo, G*Kh*Kw*2) kernel-space offsets.
      weight: (Sh, Sw, C) scope-sized depthwise kernel, Sh >= Kh, Sw >= Kw.
      kernel_size, stride, padding, dilation: an int or a pair.
      rotation_groups: G; C must be divisible by G.
      implementation: "ffi", "xla" or None (ffi where built for the platform, else xla).

    Returns:
      (N, Ho, Wo, C) in the dtype of x; float32 accumulation.
    """
    geo = _depthwise_geometry(
        x, rotation, weight, None, kernel_size, stride, padding, dilation, rotation_groups
    )
    if not _use_ffi(implementation, x, rotation, weight):
        return reference.sample_depthwise(x, rotation, weight, **geo)
    return prims.bind(
        "forward",
        deformable=False,
        geometry=_flat(geo),
        x=x,
        rotation=rotation,
        weight=weight[None],
    )


def deform_sample_depthwise(
    x: jax.Array,
    offset: jax.Array,
    rotation: jax.Array,
    weight: jax.Array,
    *,
    kernel_size: IntOrPair,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    rotation_groups: int = 1,
    implementation: str | None = None,
) -> jax.Array:
    """Deformable kernel + deformable convolution (DK + DCN): `sample_depthwise` whose image taps
    are also read bilinearly, at (i*sh - ph + a*dh + o_y, j*sw - pw + b*dw + o_x) with
    (o_y, o_x) = offset[n,i,j, (a*Kw + b)*2 + (0, 1)].

    With zero rotation and weight of the kernel's size this is torchvision's deform_conv2d with
    groups=C, one offset group and no mask.

    Args:
      x: (N, H, W, C); offset: (N, Ho, Wo, Kh*Kw*2); rotation: (N, Ho, Wo, G*Kh*Kw*2);
      weight: (Sh, Sw, C). Other arguments as in `sample_depthwise`.

    Returns:
      (N, Ho, Wo, C) in the dtype of x.
    """
    geo = _depthwise_geometry(
        x, rotation, weight, offset, kernel_size, stride, padding, dilation, rotation_groups
    )
    if not _use_ffi(implementation, x, offset, rotation, weight):
        return reference.deform_sample_depthwise(x, offset, rotation, weight, **geo)
    return prims.bind(
        "forward",
        deformable=True,
        geometry=_flat(geo),
        x=x,
        offset=offset,
        rotation=rotation,
        weight=weight[None],
    )


def nd_linear_sample(
    data: jax.Array, coord: jax.Array, *, implementation: str | None = None
) -> jax.Array:
    """Multilinear read of `data` at real positions (global deformable kernels).

        out[m, c] = sum over the 2^D corners of data[corner, c] * prod_d weight_d

    zero outside (a position p_d <= -1 or >= S_d reads nothing).

    Args:
      data: (*S, C) with D = len(S) >= 1 spatial dimensions.
      coord: (M, D) positions in index units.
      implementation: "ffi", "xla" or None.

    Returns:
      (M, C) in the dtype of data.
    """
    _checks.float_arrays(data=data, coord=coord)
    if data.ndim < 2:
        raise ValueError(f"data must have rank >= 2 (*S, C), got shape {tuple(data.shape)}")
    _checks.rank(coord, "coord", 2, "(M, D)")
    dims = data.ndim - 1
    if coord.shape[1] != dims:
        raise ValueError(
            f"coord must have shape (M, {dims}) for data of shape {tuple(data.shape)}, "
            f"got {tuple(coord.shape)}"
        )
    if not _use_ffi(implementation, data, coord):
        return reference.nd_linear_sample(data, coord)
    if dims > 6:
        if implementation == "ffi":
            raise ValueError(f"the ffi nd_linear_sample supports up to 6 dimensions, got {dims}")
        return reference.nd_linear_sample(data, coord)
    return prims.nd_bind("forward", data=data[None], coord=coord[None])[0]


def _flat(geo: dict) -> tuple[int, ...]:
    return (
        *geo["kernel_size"],
        *geo["stride"],
        *geo["padding"],
        *geo["dilation"],
        geo["rotation_groups"],
    )
