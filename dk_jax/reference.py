"""The pure `jax.numpy` reference of the dk-jax operators (the "xla" implementation).

This module is the test oracle: a direct, readable transcription of the formulas in
docs/OPERATORS.md, written independently of the C++/CUDA kernels in `xla_ffi/` and sharing no
code with them. JAX differentiates it by itself, so its gradients are the ones the ffi path
must match.

Layouts (channels last, docs/OPERATORS.md):

    x         (N, H, W, C)
    weight    (Sh, Sw, C)                 scope-sized depthwise kernel
    rotation  (N, Ho, Wo, G*Kh*Kw*2)      index ((g*Kh + a)*Kw + b)*2 + t, t=0 row, t=1 column
    offset    (N, Ho, Wo, Kh*Kw*2)        index (a*Kw + b)*2 + t
    data      (*S, C), coord (M, D)       D = len(S)

Channel c uses rotation group g = c % G. All geometry arguments arrive normalised: pairs of
python ints for `kernel_size`, `stride`, `padding`, `dilation`, an int for `rotation_groups`.
Argument checking is the caller's job; only shape mismatches that would make the maths
meaningless are rejected here.

The linear read `B` of an array at a real position is zero when any coordinate p has
p <= -1 or p >= size; otherwise it blends the `floor` and `floor + 1` corners, a corner
outside the array contributing zero. Weights are computed from `floor`, so at integer
positions JAX's derivative is the right derivative. Values are masked, not weights, so a NaN
position gives a NaN result; a position of +-inf is replaced by a safe out-of-range value
before any arithmetic, giving exact zeros in the value and in every gradient.

Arithmetic runs in float32 (float64 inputs stay float64); outputs have the input dtype.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

Pair = tuple[int, int]

# Any out-of-range position will do: -2 puts both corners outside, so the read is zero.
_SAFE_OUTSIDE = -2.0


def _compute_dtype(dtype):
    """float32 for float32 and narrower floats; float64 for float64 when x64 is enabled."""
    return jax.dtypes.canonicalize_dtype(jnp.promote_types(dtype, jnp.float32))


def _output_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _linear_corners(p, size):
    """The two corners of a 1-D linear read at real positions `p` on an axis of length `size`.

    Returns `[(index, inside, weight)]` for the `floor(p)` and `floor(p) + 1` corners: `index`
    is an int32 array that is always a legal index, `inside` says whether the corner lies in
    the axis, `weight` is the linear-interpolation weight. A position with p <= -1 or
    p >= size is moved to a safe outside value, so its corners are never inside and its
    weights (and their derivatives) are finite; NaN is left alone and gives NaN weights.
    """
    outside = (p <= -1) | (p >= size)
    p = jnp.where(outside, _SAFE_OUTSIDE, p)
    lo = jnp.floor(p)
    frac = p - lo  # derivative 1 everywhere: the right derivative at integers
    corners = []
    for corner, weight in ((lo, 1 - frac), (lo + 1, frac)):
        inside = (corner >= 0) & (corner <= size - 1)
        index = jnp.clip(jnp.where(inside, corner, 0), 0, size - 1).astype(jnp.int32)
        corners.append((index, inside, weight))
    return corners


def _bilinear(read, u, v, rows, cols):
    """B(P, u, v): bilinear read of a plane of `rows` x `cols` at positions (u, v).

    `read(iu, iv)` gathers the plane at legal int32 indices shaped like u and v; its result
    must broadcast against u (for example u of shape (..., 1) and a result of shape (..., C)).
    """
    out = 0
    for iu, inside_u, wu in _linear_corners(u, rows):
        for iv, inside_v, wv in _linear_corners(v, cols):
            value = jnp.where(inside_u & inside_v, read(iu, iv), 0)
            out = out + value * (wu * wv)
    return out


def _kernel_tap(weight, rotation_tap, a, b, kernel_size, rotation_groups):
    """Resampled kernel values of tap (a, b) at every output location: (N, Ho, Wo, C).

    value[n, i, j, c] = B(weight[:, :, c], a + r_y + (Sh - Kh)/2, b + r_x + (Sw - Kw)/2)
    with (r_y, r_x) = rotation_tap[n, i, j, c % G], rotation_tap of shape (N, Ho, Wo, G, 2).
    """
    scope_h, scope_w, channels = weight.shape
    kh, kw = kernel_size
    channel = jnp.arange(channels)
    per_channel = rotation_tap[:, :, :, channel % rotation_groups, :]  # (N, Ho, Wo, C, 2)
    u = a + per_channel[..., 0] + (scope_h - kh) / 2
    v = b + per_channel[..., 1] + (scope_w - kw) / 2
    return _bilinear(lambda iu, iv: weight[iu, iv, channel], u, v, scope_h, scope_w)


def _sum_over_taps(term, kernel_size, per_tap, init):
    """sum over a < Kh, b < Kw of term(a, b, *per_tap[a*Kw + b]), one tap at a time.

    `per_tap` holds arrays whose leading axis is the tap. The sum is a `lax.scan` rather than
    a python loop: unrolled taps make XLA's compile time grow much faster than the tap count
    (on a 2-core CPU the gradient of a 3x3 `deform_sample_depthwise` took about 50 s to
    compile unrolled, 3 s as a scan), and the scan still holds only one tap's
    (N, Ho, Wo, C) arrays at a time.
    """
    kh, kw = kernel_size
    taps = jnp.arange(kh * kw)

    def step(total, tap):
        index, arrays = tap
        return total + term(index // kw, index % kw, *arrays), None

    total, _ = jax.lax.scan(step, init, (taps, per_tap))
    return total


def _rotation_by_tap(rotation, kernel_size, rotation_groups):
    """(N, Ho, Wo, G*Kh*Kw*2) -> (Kh*Kw, N, Ho, Wo, G, 2), tap a*Kw + b first."""
    n, ho, wo, _ = rotation.shape
    kh, kw = kernel_size
    rotation = rotation.reshape(n, ho, wo, rotation_groups, kh * kw, 2)
    return jnp.moveaxis(rotation, 4, 0)


def _check_groups(weight, rotation, kernel_size, rotation_groups):
    kh, kw = kernel_size
    if rotation.shape[-1] != rotation_groups * kh * kw * 2:
        raise ValueError(
            f"rotation: expected last axis G*Kh*Kw*2 = {rotation_groups * kh * kw * 2}, "
            f"got shape {rotation.shape}"
        )
    if weight.shape[-1] % rotation_groups:
        raise ValueError(
            f"rotation_groups: {rotation_groups} does not divide C = {weight.shape[-1]}"
        )


def _jit_geometry(op):
    """Compile `op` as a whole, with its geometry static.

    Eager dispatch of the many small per-tap ops is slow for an oracle that tests call
    eagerly. Geometry is made hashable here (an int or any pair becomes a tuple of ints).
    """
    compiled = jax.jit(
        op, static_argnames=("kernel_size", "stride", "padding", "dilation", "rotation_groups")
    )

    def pair(value):
        return (int(value), int(value)) if np.ndim(value) == 0 else tuple(map(int, value))

    @functools.wraps(op)
    def wrapper(*arrays, kernel_size, stride, padding, dilation, rotation_groups):
        return compiled(
            *arrays,
            kernel_size=pair(kernel_size),
            stride=pair(stride),
            padding=pair(padding),
            dilation=pair(dilation),
            rotation_groups=int(rotation_groups),
        )

    return wrapper


@_jit_geometry
def sample_depthwise(
    x: jax.Array,
    rotation: jax.Array,
    weight: jax.Array,
    *,
    kernel_size: Pair,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    rotation_groups: int,
) -> jax.Array:
    """Depthwise convolution with per-location resampled kernels (local Deformable Kernels).

    Shapes: x (N, H, W, C), rotation (N, Ho, Wo, G*Kh*Kw*2), weight (Sh, Sw, C)
    -> y (N, Ho, Wo, C), with Ho = (H + 2*ph - dh*(Kh-1) - 1) // sh + 1, likewise Wo.

        y[n,i,j,c] = sum_{a<Kh, b<Kw} X(n, i*sh - ph + a*dh, j*sw - pw + b*dw, c)
                     * B(weight[:,:,c], a + r_y + (Sh-Kh)/2, b + r_x + (Sw-Kw)/2)

    where (r_y, r_x) = rotation[n,i,j, ((g*Kh + a)*Kw + b)*2 + (0, 1)], g = c % G, and X is
    zero outside the input.
    """
    _check_groups(weight, rotation, kernel_size, rotation_groups)
    out_dtype = x.dtype
    dtype = _compute_dtype(x.dtype)
    x, rotation, weight = (jnp.asarray(t).astype(dtype) for t in (x, rotation, weight))
    n, h, w, c = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    ho = _output_size(h, kh, sh, ph, dh)
    wo = _output_size(w, kw, sw, pw, dw)

    def tap(a, b, rotation_tap):
        rows = jnp.arange(ho) * sh - ph + a * dh
        cols = jnp.arange(wo) * sw - pw + b * dw
        inside = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]
        rows, cols = jnp.clip(rows, 0, h - 1), jnp.clip(cols, 0, w - 1)
        image = jnp.where(inside[None, :, :, None], x[:, rows[:, None], cols[None, :], :], 0)
        return image * _kernel_tap(weight, rotation_tap, a, b, kernel_size, rotation_groups)

    per_tap = (_rotation_by_tap(rotation, kernel_size, rotation_groups),)
    y = _sum_over_taps(tap, kernel_size, per_tap, jnp.zeros((n, ho, wo, c), dtype))
    return y.astype(out_dtype)


@_jit_geometry
def deform_sample_depthwise(
    x: jax.Array,
    offset: jax.Array,
    rotation: jax.Array,
    weight: jax.Array,
    *,
    kernel_size: Pair,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    rotation_groups: int,
) -> jax.Array:
    """Deformable Kernels with a deformed image grid as well (DK + DCN).

    Shapes: x (N, H, W, C), offset (N, Ho, Wo, Kh*Kw*2), rotation (N, Ho, Wo, G*Kh*Kw*2),
    weight (Sh, Sw, C) -> y (N, Ho, Wo, C).

        y[n,i,j,c] = sum_{a<Kh, b<Kw} B(x[n,:,:,c], i*sh - ph + a*dh + o_y,
                                                    j*sw - pw + b*dw + o_x)
                     * B(weight[:,:,c], a + r_y + (Sh-Kh)/2, b + r_x + (Sw-Kw)/2)

    where (o_y, o_x) = offset[n,i,j, (a*Kw + b)*2 + (0, 1)] (one offset group, shared by all
    channels) and (r_y, r_x) as in `sample_depthwise`.
    """
    _check_groups(weight, rotation, kernel_size, rotation_groups)
    out_dtype = x.dtype
    dtype = _compute_dtype(x.dtype)
    x, offset, rotation, weight = (
        jnp.asarray(t).astype(dtype) for t in (x, offset, rotation, weight)
    )
    n, h, w, c = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    ho = _output_size(h, kh, sh, ph, dh)
    wo = _output_size(w, kw, sw, pw, dw)
    batch = jnp.arange(n)[:, None, None]

    def read_image(iu, iv):
        # (N, Ho, Wo, 1) indices -> (N, Ho, Wo, C): one offset group, shared by all channels.
        return x[batch, iu[..., 0], iv[..., 0], :]

    def tap(a, b, offset_tap, rotation_tap):
        rows = (jnp.arange(ho) * sh - ph + a * dh).astype(dtype)[None, :, None]
        cols = (jnp.arange(wo) * sw - pw + b * dw).astype(dtype)[None, None, :]
        u = (rows + offset_tap[..., 0])[..., None]
        v = (cols + offset_tap[..., 1])[..., None]
        image = _bilinear(read_image, u, v, h, w)
        return image * _kernel_tap(weight, rotation_tap, a, b, kernel_size, rotation_groups)

    offset_by_tap = jnp.moveaxis(offset.reshape(n, ho, wo, kh * kw, 2), 3, 0)
    per_tap = (offset_by_tap, _rotation_by_tap(rotation, kernel_size, rotation_groups))
    y = _sum_over_taps(tap, kernel_size, per_tap, jnp.zeros((n, ho, wo, c), dtype))
    return y.astype(out_dtype)


@jax.jit
def nd_linear_sample(data: jax.Array, coord: jax.Array) -> jax.Array:
    """Multilinear read of a D-dimensional array of C-vectors at M real positions (global DK).

    Shapes: data (*S, C) with D = len(S) >= 1, coord (M, D) -> out (M, C).

        out[m, c] = sum over the 2^D corners k in {floor, floor+1}^D of coord[m]
                    of data[k, c] * prod_d (1 - |coord[m, d] - k_d|)

    A corner outside the array contributes zero, and the whole read is zero when any
    coordinate has coord[m, d] <= -1 or coord[m, d] >= S[d]. An array with an empty spatial
    dimension has nothing to read: every read is zero, whatever the coordinate (NaN included).
    """
    data, coord = jnp.asarray(data), jnp.asarray(coord)
    spatial = data.shape[:-1]
    if coord.ndim != 2 or coord.shape[-1] != len(spatial) or not spatial:
        raise ValueError(
            f"coord: expected shape (M, {len(spatial)}) for data of shape {data.shape}, "
            f"got {coord.shape}"
        )
    out_dtype = data.dtype
    if 0 in spatial:
        return jnp.zeros((coord.shape[0], data.shape[-1]), out_dtype)
    dtype = _compute_dtype(data.dtype)
    data, coord = data.astype(dtype), coord.astype(dtype)
    axes = [_linear_corners(coord[:, d], size) for d, size in enumerate(spatial)]

    out = 0
    for corner in itertools.product(*axes):
        index = tuple(i for i, _, _ in corner)
        inside = jnp.all(jnp.stack([ins for _, ins, _ in corner]), axis=0)
        weight = jnp.prod(jnp.stack([wt for _, _, wt in corner]), axis=0)
        out = out + jnp.where(inside[:, None], data[index], 0) * weight[:, None]
    return out.astype(out_dtype)


def _scope_basis(scope_size, channels, dtype):
    """(Sh*Sw, Sh, Sw, C): for each scope position, the kernel that is one there, zero elsewhere."""
    sh, sw = scope_size
    return jnp.broadcast_to(
        jnp.eye(sh * sw, dtype=dtype).reshape(sh * sw, sh, sw, 1), (sh * sw, sh, sw, channels)
    )


def _columns(op, x, arrays, scope_size, geometry):
    """cols[..., s, t, c] = op(..., weight = e_(s,t)): a depthwise DK is linear in its weight,
    so its response to the one-hot kernel of scope position (s, t) is that position's column."""
    n, h, w, c = x.shape
    basis = _scope_basis(scope_size, c, _compute_dtype(x.dtype))
    per_position = jax.vmap(lambda e: op(x, *arrays, e.astype(x.dtype), **geometry))(basis)
    cols = jnp.moveaxis(per_position, 0, 3)  # (N, Ho, Wo, Sh*Sw, C)
    return cols.reshape(*cols.shape[:3], *scope_size, c)


def scope_im2col(x, rotation, *, scope_size, **geometry):
    """Scope-space columns (N, Ho, Wo, Sh, Sw, C) of `sample_depthwise`: see dk_jax.ops."""
    return _columns(sample_depthwise, x, (rotation,), tuple(scope_size), geometry)


def deform_scope_im2col(x, offset, rotation, *, scope_size, **geometry):
    """Scope-space columns of `deform_sample_depthwise`: see dk_jax.ops."""
    return _columns(deform_sample_depthwise, x, (offset, rotation), tuple(scope_size), geometry)


def naive_sample_conv(
    x,
    rotation,
    kernel,
    offset=None,
    *,
    kernel_size,
    stride,
    padding,
    dilation,
    rotation_groups,
    feature_group_count,
):
    """Grouped / full local DK the slow way: resample the whole kernel at every location.

    kernel (Sh, Sw, C/groups, F). For each tap (a, b) and location, every (c, f) kernel entry
    of f's group is read bilinearly at (a + r_y + (Sh-Kh)/2, b + r_x + (Sw-Kw)/2) with the
    rotation of group c % rotation_groups, then contracted with the image tap. Memory is
    N*Ho*Wo*C*F per tap: a test oracle only.
    """
    out_dtype = x.dtype
    dtype = _compute_dtype(x.dtype)
    x, rotation, kernel = (jnp.asarray(t).astype(dtype) for t in (x, rotation, kernel))
    n, h, w, c = x.shape
    sh_, sw_, cg, f = kernel.shape
    groups = feature_group_count
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    ho = _output_size(h, kh, sh, ph, dh)
    wo = _output_size(w, kw, sw, pw, dw)
    # Block-diagonal (Sh, Sw, C, F): channel c feeds only the features of its group.
    same_group = (jnp.arange(c)[:, None] // cg) == (jnp.arange(f)[None, :] // (f // groups))
    full = jnp.where(same_group, kernel[:, :, jnp.arange(c) % cg, :], 0)
    rot = rotation.reshape(n, ho, wo, rotation_groups, kh * kw, 2)
    channel = jnp.arange(c)
    y = jnp.zeros((n, ho, wo, f), dtype)
    batch = jnp.arange(n)[:, None, None]
    for a in range(kh):
        for b in range(kw):
            r = rot[:, :, :, channel % rotation_groups, a * kw + b, :]  # (N, Ho, Wo, C, 2)
            u = a + r[..., 0] + (sh_ - kh) / 2
            v = b + r[..., 1] + (sw_ - kw) / 2
            resampled = _bilinear(
                lambda iu, iv: full[iu[..., 0], iv[..., 0], channel, :],
                u[..., None],
                v[..., None],
                sh_,
                sw_,
            )  # (N, Ho, Wo, C, F)
            rows = jnp.arange(ho) * sh - ph + a * dh
            cols = jnp.arange(wo) * sw - pw + b * dw
            if offset is None:
                inside = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None]
                ri, ci = jnp.clip(rows, 0, h - 1), jnp.clip(cols, 0, w - 1)
                image = jnp.where(inside[None, :, :, None], x[:, ri[:, None], ci[None, :], :], 0)
            else:
                o = offset.astype(dtype).reshape(n, ho, wo, kh * kw, 2)[:, :, :, a * kw + b]
                uu = (rows[None, :, None] + o[..., 0])[..., None]
                vv = (cols[None, None, :] + o[..., 1])[..., None]
                image = _bilinear(lambda iu, iv: x[batch, iu[..., 0], iv[..., 0], :], uu, vv, h, w)
            y = y + jnp.einsum("nijc,nijcf->nijf", image, resampled)
    return y.astype(out_dtype)
