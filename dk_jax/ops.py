"""The public operators (docs/OPERATORS.md): argument checks, then the ffi primitives or the
pure-jax.numpy reference.

Layouts are channels last. `rotation` holds kernel-space offsets, index
((g*Kh + a)*Kw + b)*2 + t (t = 0 row, 1 column); `offset` holds image-space offsets, index
(a*Kw + b)*2 + t; channel c uses rotation group c % rotation_groups.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from dk_jax import _checks, reference
from dk_jax import primitives as prims
from dk_jax._modes import Geometry
from dk_jax._sharding import batch_spec

IntOrPair = int | tuple[int, int]


def _traced_reference(implementation: str | None) -> bool:
    """Whether the op is the jax.numpy reference traced into the program ("xla"). Otherwise it
    binds the primitives, whose lowering is chosen per platform when the program is lowered:
    the custom call where dk_jax has a kernel for the platform, elsewhere the reference
    (implementation=None) or an error naming the platform ("ffi"; see `_kernel_only`)."""
    _checks.implementation(implementation)
    return implementation == "xla"


def _kernel_only(implementation: str | None) -> dict:
    return {"kernel_only": implementation == "ffi"}


def _depthwise_geometry(
    x, rotation, weight, offset, kernel_size, stride, padding, dilation, rotation_groups
):
    """Checks the arguments of the depthwise ops (dtypes made canonical by the caller);
    returns their Geometry (no scope: the weight has it)."""
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
    return Geometry(kh, kw, sh, sw, ph, pw, dh, dw, groups)


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
      implementation: None (the default): the custom call on every platform where dk_jax has a
        kernel (CPU; CUDA where built), the jax.numpy reference on any other (TPU, ROCm, ...),
        chosen per platform when the program is lowered, so one exported artifact serves them
        all. "ffi": the custom call, and an error when lowering for a platform without one.
        "xla": the reference on every platform.

    Returns:
      (N, Ho, Wo, C) in the dtype of x; float32 accumulation.
    """
    x, rotation, weight = _checks.float_arrays(x=x, rotation=rotation, weight=weight)
    geo = _depthwise_geometry(
        x, rotation, weight, None, kernel_size, stride, padding, dilation, rotation_groups
    )
    if _traced_reference(implementation):
        return reference.sample_depthwise(x, rotation, weight, **geo.kwargs())
    return prims.bind(
        "forward",
        deformable=False,
        geometry=geo,
        **_kernel_only(implementation),
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
    x, offset, rotation, weight = _checks.float_arrays(
        x=x, offset=offset, rotation=rotation, weight=weight
    )
    geo = _depthwise_geometry(
        x, rotation, weight, offset, kernel_size, stride, padding, dilation, rotation_groups
    )
    if _traced_reference(implementation):
        return reference.deform_sample_depthwise(x, offset, rotation, weight, **geo.kwargs())
    return prims.bind(
        "forward",
        deformable=True,
        geometry=geo,
        **_kernel_only(implementation),
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

    zero outside (a position p_d <= -1 or >= S_d reads nothing). Data with an empty spatial
    dimension reads zero everywhere, and its gradients are zero.

    Args:
      data: (*S, C) with D = len(S) >= 1 spatial dimensions.
      coord: (M, D) positions in index units.
      implementation: "ffi", "xla" or None.

    Returns:
      (M, C) in the dtype of data.
    """
    data, coord = _checks.float_arrays(data=data, coord=coord)
    if data.ndim < 2:
        raise ValueError(f"data must have rank >= 2 (*S, C), got shape {tuple(data.shape)}")
    _checks.rank(coord, "coord", 2, "(M, D)")
    dims = data.ndim - 1
    if coord.shape[1] != dims:
        raise ValueError(
            f"coord must have shape (M, {dims}) for data of shape {tuple(data.shape)}, "
            f"got {tuple(coord.shape)}"
        )
    if _traced_reference(implementation):
        return reference.nd_linear_sample(data, coord)
    if dims > 6:
        if implementation == "ffi":
            raise ValueError(f"the ffi nd_linear_sample supports up to 6 dimensions, got {dims}")
        return reference.nd_linear_sample(data, coord)
    return prims.nd_bind(
        "forward", data=data[None], coord=coord[None], **_kernel_only(implementation)
    )[0]


def _cols_geometry(
    x, rotation, offset, scope_size, kernel_size, stride, padding, dilation, rotation_groups
):
    """Checks the arguments of the columns ops; returns their Geometry (scope included)."""
    kh, kw = _checks.pair(kernel_size, "kernel_size", minimum=1)
    sh, sw = _checks.pair(scope_size, "scope_size", minimum=1)
    if sh < kh or sw < kw:
        raise ValueError(
            f"scope_size {(sh, sw)} is smaller than kernel_size {(kh, kw)}: "
            "the scope must be at least the kernel size"
        )
    _checks.rank(x, "x", 4, "(N, H, W, C)")
    # The columns play the weight's part: a scope-sized plane per channel.
    weight = jax.ShapeDtypeStruct((sh, sw, x.shape[-1]), x.dtype)
    geo = _depthwise_geometry(
        x, rotation, weight, offset, (kh, kw), stride, padding, dilation, rotation_groups
    )
    return geo._replace(scope_h=sh, scope_w=sw)


def scope_im2col(
    x: jax.Array,
    rotation: jax.Array,
    *,
    kernel_size: IntOrPair,
    scope_size: IntOrPair,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    rotation_groups: int = 1,
    implementation: str | None = None,
) -> jax.Array:
    """Scope-space im2col: per output location, each scope position's share of the image.

        cols[n,i,j,s,t,c] = sum_{a<Kh, b<Kw} X(n, i*sh - ph + a*dh, j*sw - pw + b*dw, c)
                            * beta_{s,t}(a + r_y + (Sh-Kh)/2, b + r_x + (Sw-Kw)/2)

    where beta_{s,t}(u, v) is the bilinear weight of scope position (s, t) in a read at (u, v)
    (the zero-outside rule of docs/OPERATORS.md) and (r_y, r_x) the rotation of tap (a, b), group
    c % rotation_groups. Any kernel W over the scope then gives the local deformable
    convolution as one matmul: y[n,i,j,f] = sum_{s,t,c} cols[n,i,j,s,t,c] * W[s,t,c,f]; with a
    depthwise W this is `sample_depthwise`.

    Args:
      x: (N, H, W, C); rotation: (N, Ho, Wo, G*Kh*Kw*2).
      scope_size: (Sh, Sw) >= kernel_size, an int or a pair.
      Other arguments as in `sample_depthwise`.

    Returns:
      (N, Ho, Wo, Sh, Sw, C) in the dtype of x.
    """
    x, rotation = _checks.float_arrays(x=x, rotation=rotation)
    geo = _cols_geometry(
        x, rotation, None, scope_size, kernel_size, stride, padding, dilation, rotation_groups
    )
    if _traced_reference(implementation):
        return reference.scope_im2col(x, rotation, scope_size=geo.scope(), **geo.kwargs())
    return prims.cols_bind(
        "forward",
        deformable=False,
        geometry=geo,
        x=x,
        rotation=rotation,
        **_kernel_only(implementation),
    )


def deform_scope_im2col(
    x: jax.Array,
    offset: jax.Array,
    rotation: jax.Array,
    *,
    kernel_size: IntOrPair,
    scope_size: IntOrPair,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    rotation_groups: int = 1,
    implementation: str | None = None,
) -> jax.Array:
    """`scope_im2col` whose image taps are read bilinearly at the offset positions, as in
    `deform_sample_depthwise`. offset: (N, Ho, Wo, Kh*Kw*2). Returns (N, Ho, Wo, Sh, Sw, C)."""
    x, offset, rotation = _checks.float_arrays(x=x, offset=offset, rotation=rotation)
    geo = _cols_geometry(
        x, rotation, offset, scope_size, kernel_size, stride, padding, dilation, rotation_groups
    )
    if _traced_reference(implementation):
        return reference.deform_scope_im2col(
            x, offset, rotation, scope_size=geo.scope(), **geo.kwargs()
        )
    return prims.cols_bind(
        "forward",
        deformable=True,
        geometry=geo,
        **_kernel_only(implementation),
        x=x,
        offset=offset,
        rotation=rotation,
    )


def _conv_groups(x, kernel, feature_group_count):
    """Checks a grouped scope kernel (Sh, Sw, C/groups, F) against x; returns groups."""
    _checks.rank(kernel, "kernel", 4, "(Sh, Sw, C/feature_group_count, F)")
    groups = _checks.positive_int(feature_group_count, "feature_group_count")
    c, (cg, f) = x.shape[-1], kernel.shape[2:]
    if c % groups or f % groups:
        raise ValueError(
            f"feature_group_count ({groups}) must divide the input channels ({c}) and the "
            f"output features ({f})"
        )
    if cg != c // groups:
        raise ValueError(
            f"kernel must have shape (Sh, Sw, C/feature_group_count, F) = "
            f"(Sh, Sw, {c // groups}, F), got {tuple(kernel.shape)}"
        )
    return groups


def _cols_matmul(cols, kernel, groups):
    """y[n,i,j,f] = sum over the scope and the group's channels of cols * kernel.

    One (N*Ho*Wo, Sh*Sw*C) x (Sh*Sw*C, F) matmul for a full convolution; for groups, a matmul
    batched over the group with the group axis moved first (XLA's CPU dot is several times
    slower with the batch axis inside the operands). The reshapes that merge the batch axis
    N into the rows name its sharding: on an Explicit mesh with N split over devices, the rows
    are split the same way (without it JAX cannot infer the merged axis' sharding)."""
    n, ho, wo, sh, sw, c = cols.shape
    f, m, s = kernel.shape[-1], n * ho * wo, sh * sw
    batch = batch_spec(cols)

    def sharded(*spec):
        return None if batch is None else P(*spec)

    # float32 accumulation for 16-bit inputs, float64 for float64.
    acc = jnp.promote_types(cols.dtype, jnp.float32)
    if groups == 1:
        y = lax.dot_general(
            cols.reshape(m, s * c, out_sharding=sharded(batch, None)),
            kernel.reshape(s * c, f),
            (((1,), (0,)), ((), ())),
            preferred_element_type=acc,
        )
        return y.reshape(n, ho, wo, f, out_sharding=sharded(batch, None, None, None)).astype(
            cols.dtype
        )
    cg, fg = c // groups, f // groups
    a = cols.reshape(m, s, groups, cg, out_sharding=sharded(batch, None, None, None))
    a = a.transpose(2, 0, 1, 3).reshape(groups, m, s * cg)
    b = kernel.reshape(s, cg, groups, fg).transpose(2, 0, 1, 3).reshape(groups, s * cg, fg)
    y = lax.dot_general(a, b, (((2,), (1,)), ((0,), (0,))), preferred_element_type=acc)
    y = y.transpose(1, 0, 2).reshape(n, ho, wo, f, out_sharding=sharded(batch, None, None, None))
    return y.astype(cols.dtype)


def sample_conv(
    x: jax.Array,
    rotation: jax.Array,
    kernel: jax.Array,
    *,
    kernel_size: IntOrPair,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    rotation_groups: int = 1,
    feature_group_count: int = 1,
    implementation: str | None = None,
) -> jax.Array:
    """Local deformable kernel for grouped and full convolutions.

        y[n,i,j,f] = sum_{a,b} sum_{c in group(f)} X(n, tap (a, b), c)
                     * B(kernel[:,:,c mod C/groups,f], a + r_y + (Sh-Kh)/2, b + r_x + (Sw-Kw)/2)

    with channel c's rotation from group c % rotation_groups. Computed as `scope_im2col`
    followed by one matmul over (scope, channels); with feature_group_count = C and F = C it
    is `sample_depthwise`, and uses its direct kernel.

    Args:
      x: (N, H, W, C); rotation: (N, Ho, Wo, G*Kh*Kw*2).
      kernel: (Sh, Sw, C/feature_group_count, F), as `flax.linen.Conv` lays out kernels.
      feature_group_count: 1 for a full convolution; it must divide C and F.
      Other arguments as in `sample_depthwise`.

    Returns:
      (N, Ho, Wo, F) in the dtype of x.
    """
    return _local_conv(
        x,
        None,
        rotation,
        kernel,
        feature_group_count,
        kernel_size=kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        rotation_groups=rotation_groups,
        implementation=implementation,
    )


def deform_sample_conv(
    x: jax.Array,
    offset: jax.Array,
    rotation: jax.Array,
    kernel: jax.Array,
    *,
    kernel_size: IntOrPair,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    rotation_groups: int = 1,
    feature_group_count: int = 1,
    implementation: str | None = None,
) -> jax.Array:
    """`sample_conv` with image taps read at offset positions (DK + DCN for grouped and full
    convolutions). offset: (N, Ho, Wo, Kh*Kw*2). Returns (N, Ho, Wo, F)."""
    return _local_conv(
        x,
        offset,
        rotation,
        kernel,
        feature_group_count,
        kernel_size=kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        rotation_groups=rotation_groups,
        implementation=implementation,
    )


def _local_conv(x, offset, rotation, kernel, feature_group_count, **geo):
    """sample_conv (offset None) and deform_sample_conv: the direct depthwise kernel when
    groups = F = C, else the columns and one matmul."""
    if offset is None:
        x, rotation, kernel = _checks.float_arrays(x=x, rotation=rotation, kernel=kernel)
    else:
        x, offset, rotation, kernel = _checks.float_arrays(
            x=x, offset=offset, rotation=rotation, kernel=kernel
        )
    offsets = () if offset is None else (offset,)
    _checks.rank(x, "x", 4, "(N, H, W, C)")
    groups = _conv_groups(x, kernel, feature_group_count)
    if groups == x.shape[-1] and kernel.shape[-1] == groups:
        depthwise = sample_depthwise if offset is None else deform_sample_depthwise
        return depthwise(x, *offsets, rotation, kernel[:, :, 0, :], **geo)
    columns = scope_im2col if offset is None else deform_scope_im2col
    cols = columns(x, *offsets, rotation, scope_size=kernel.shape[:2], **geo)
    return _cols_matmul(cols, kernel, groups)
