"""Receptive-field analysis: effective receptive fields (ERFs), theoretical receptive fields,
the radius that holds a share of an ERF's mass, and where a deformable layer samples.

Everything here returns arrays; plotting lives in `train/visualize.py`, so the core library
needs no plotting package.

The ERF of an output unit (Luo et al., NeurIPS 2016) is the magnitude of the gradient of that
unit with respect to every input pixel:

    erf[n, u, v] = sum_c | d (sum_{f in F} out[n, i, j, f]) / d x[n, u, v, c] |

for an output location (i, j) and a set F of output channels (all of them by default). A
deformable kernel claims to adapt this map to the content; a rigid network's ERF is fixed in
extent by its theoretical receptive field and shaped only by the weights and the ReLU gates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ReceptiveField",
    "effective_receptive_field",
    "erf_radius",
    "image_sample_positions",
    "kernel_sample_positions",
    "receptive_field_box",
    "theoretical_receptive_field",
]


def _positions_array(position, name: str = "position") -> tuple[np.ndarray, bool]:
    """(i, j) or (P, 2) integers -> (P, 2) int array and whether a single pair was given."""
    pos = np.asarray(position)
    if pos.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer output indices, got dtype {pos.dtype}")
    if pos.shape == (2,):
        return pos[None], True
    if pos.ndim != 2 or pos.shape[1] != 2:
        raise ValueError(f"{name} must be an (i, j) pair or a (P, 2) array, got shape {pos.shape}")
    return pos, False


def effective_receptive_field(
    fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    position,
    channel: int | Sequence[int] | None = None,
) -> jax.Array:
    """|d out[n, i, j, channel] / d x[n]|, summed over the input channels.

    Args:
      fn: maps an (N, H, W, C) batch to an (N, Ho, Wo, F) feature map and treats the samples
        independently (a model in eval mode). It is called on single-sample batches (1, H, W, C)
        under `jax.vmap`, so BatchNorm in training mode or any mixing across the batch does not
        leak into another sample's ERF.
      x: (N, H, W, C) inputs.
      position: an output location (i, j), or a (P, 2) integer array of locations; None for
        the spatial mean of the output (the ERF of a whole channel).
      channel: an output channel, a sequence of channels whose sum is differentiated, or None
        for the sum over all F channels.

    Returns:
      (N, H, W) float32 for one location or None, (P, N, H, W) for P locations.
    """
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"x must be (N, H, W, C), got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be floating point, got dtype {x.dtype}")
    out_shape = jax.eval_shape(fn, jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype)).shape
    if len(out_shape) != 4:
        raise ValueError(f"fn must return (N, Ho, Wo, F); it returned shape {out_shape}")
    _, ho, wo, f = out_shape
    if channel is None:
        channels = np.arange(f)
    else:
        channels = np.atleast_1d(np.asarray(channel))
        if channels.dtype.kind not in "iu" or channels.ndim != 1:
            raise TypeError(f"channel must be an int or a sequence of ints, got {channel!r}")
        if channels.size == 0 or channels.min() < -f or channels.max() >= f:
            raise ValueError(f"channel {channel!r} is out of range for an output with {f} channels")

    def erf_of(cotangent, sample):
        # One reverse pass per (sample, seed): the cotangent picks the units to differentiate.
        _, pullback = jax.vjp(fn, sample[None])
        (grad,) = pullback(cotangent.astype(sample.dtype)[None])
        return jnp.sum(jnp.abs(grad[0].astype(jnp.float32)), axis=-1)

    mask = np.zeros(f, np.float32)
    mask[channels] = 1.0
    if position is None:
        cot = jnp.broadcast_to(jnp.asarray(mask) / (ho * wo), (ho, wo, f))
        return jax.vmap(erf_of, in_axes=(None, 0))(cot, x)
    pos, single = _positions_array(position)
    if (pos < 0).any() or (pos[:, 0] >= ho).any() or (pos[:, 1] >= wo).any():
        raise ValueError(
            f"position {position!r} lies outside the {ho}x{wo} output of fn "
            f"(indices must be 0 <= i < {ho}, 0 <= j < {wo})"
        )
    cots = np.zeros((len(pos), ho, wo, f), np.float32)
    cots[np.arange(len(pos)), pos[:, 0], pos[:, 1]] = mask
    per_sample = jax.vmap(erf_of, in_axes=(None, 0))
    erfs = jax.vmap(per_sample, in_axes=(0, None))(jnp.asarray(cots), x)
    return erfs[0] if single else erfs


class ReceptiveField(NamedTuple):
    """The theoretical receptive field of a conv stack along one axis.

    Output unit i reads the inputs whose centre is `start + i * jump`, `size` of them wide
    (before clipping at the image border).
    """

    size: int
    jump: int
    start: float


def _pair(v, name: str) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int | np.integer) else tuple(v)
    if len(t) != 2 or not all(isinstance(a, int | np.integer) for a in t):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return int(t[0]), int(t[1])


def theoretical_receptive_field(
    layers: Sequence[tuple],
) -> tuple[ReceptiveField, ReceptiveField]:
    """Receptive field of a stack of convolutions (and pools), per axis (rows, columns).

    Args:
      layers: one tuple per layer, input first: `(kernel_size, stride, dilation, padding)`,
        each an int or a pair; `padding` is the low-side padding (the `p` of docs/OPERATORS.md:
        output i reads inputs `i*s - p + a*d`). Trailing items may be left out: stride,
        dilation default to 1 and padding to `(kernel_size - 1)//2 * dilation`.

    With jump J and start S in, a layer (k, s, d, p) gives size + (k-1)*d*J, jump J*s and start
    S + ((k-1)*d/2 - p)*J. A skip connection around a block does not change the result (the
    longest path bounds the field).
    """
    rows, cols = ReceptiveField(1, 1, 0.0), ReceptiveField(1, 1, 0.0)
    for n, layer in enumerate(layers):
        layer = tuple(layer) if isinstance(layer, tuple | list) else (layer,)
        if not 1 <= len(layer) <= 4:
            raise ValueError(
                f"layers[{n}] must be (kernel_size, stride, dilation, padding), got {layer!r}"
            )
        k = _pair(layer[0], f"layers[{n}] kernel_size")
        s = _pair(layer[1], f"layers[{n}] stride") if len(layer) > 1 else (1, 1)
        d = _pair(layer[2], f"layers[{n}] dilation") if len(layer) > 2 else (1, 1)
        if min(*k, *s, *d) < 1:
            raise ValueError(f"layers[{n}] needs positive kernel size, stride, dilation: {layer}")
        default_p = ((k[0] - 1) // 2 * d[0], (k[1] - 1) // 2 * d[1])
        p = _pair(layer[3], f"layers[{n}] padding") if len(layer) > 3 else default_p
        rows, cols = (
            ReceptiveField(
                rf.size + (kk - 1) * dd * rf.jump,
                rf.jump * ss,
                rf.start + ((kk - 1) * dd / 2 - pp) * rf.jump,
            )
            for rf, kk, ss, dd, pp in (
                (rows, k[0], s[0], d[0], p[0]),
                (cols, k[1], s[1], d[1], p[1]),
            )
        )
    return rows, cols


def receptive_field_box(
    rf: tuple[ReceptiveField, ReceptiveField], position, input_shape: tuple[int, int]
) -> tuple[int, int, int, int]:
    """(top, left, bottom, right), inclusive, of the input pixels inside the theoretical
    receptive field of output unit `position` = (i, j), clipped to an input of `input_shape`
    (H, W)."""
    pos, single = _positions_array(position)
    if not single:
        raise ValueError(f"position must be one (i, j) pair, got shape {pos.shape}")
    i, j = (int(v) for v in pos[0])
    h, w = input_shape
    lo_r = rf[0].start + i * rf[0].jump - (rf[0].size - 1) / 2
    lo_c = rf[1].start + j * rf[1].jump - (rf[1].size - 1) / 2
    top, left = max(int(np.ceil(lo_r)), 0), max(int(np.ceil(lo_c)), 0)
    bottom = min(int(np.floor(lo_r + rf[0].size - 1)), h - 1)
    right = min(int(np.floor(lo_c + rf[1].size - 1)), w - 1)
    return top, left, bottom, right


def erf_radius(erf: jax.Array, center, mass: float = 0.5) -> jax.Array:
    """The radius of the smallest disc about `center` that holds `mass` of the ERF's total.

    Args:
      erf: (..., H, W) non-negative maps (leading axes are batched).
      center: (row, col) in pixels, shared by every map, or an array (..., 2) with one centre
        per map.
      mass: the share of the total, in (0, 1].

    Returns:
      (...) float32 radii in pixels: the distances of the pixels to the centre are sorted and
      the radius is interpolated linearly inside the pixel at which the running sum reaches
      `mass * total` (so it varies smoothly with the map). NaN where a map sums to zero.
    """
    erf = jnp.asarray(erf, jnp.float32)
    if erf.ndim < 2:
        raise ValueError(f"erf must be (..., H, W), got shape {erf.shape}")
    if not 0.0 < float(mass) <= 1.0:
        raise ValueError(f"mass must lie in (0, 1], got {mass!r}")
    center = jnp.asarray(center, jnp.float32)
    if center.shape[-1:] != (2,):
        raise ValueError(f"center must be (row, col) or (..., 2), got shape {center.shape}")
    h, w = erf.shape[-2:]
    batch = erf.shape[:-2]
    center = jnp.broadcast_to(center, (*batch, 2))
    rows, cols = jnp.meshgrid(
        jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij"
    )
    dist = jnp.sqrt(
        (rows - center[..., 0, None, None]) ** 2 + (cols - center[..., 1, None, None]) ** 2
    ).reshape(*batch, h * w)
    weights = erf.reshape(*batch, h * w)
    order = jnp.argsort(dist, axis=-1)
    dist = jnp.take_along_axis(dist, order, axis=-1)
    weights = jnp.take_along_axis(weights, order, axis=-1)
    cum = jnp.cumsum(weights, axis=-1)
    total = cum[..., -1:]
    target = mass * total
    k = jnp.sum(cum < target, axis=-1, keepdims=True)
    k = jnp.minimum(k, h * w - 1)
    d_hi = jnp.take_along_axis(dist, k, axis=-1)
    d_lo = jnp.take_along_axis(dist, jnp.maximum(k - 1, 0), axis=-1)
    d_lo = jnp.where(k == 0, 0.0, d_lo)
    cum_lo = jnp.where(k == 0, 0.0, jnp.take_along_axis(cum, jnp.maximum(k - 1, 0), axis=-1))
    w_k = jnp.take_along_axis(weights, k, axis=-1)
    frac = jnp.clip((target - cum_lo) / jnp.where(w_k > 0, w_k, 1.0), 0.0, 1.0)
    radius = (d_lo + frac * (d_hi - d_lo))[..., 0]
    return jnp.where(total[..., 0] > 0, radius, jnp.nan)


def kernel_sample_positions(
    rotation: jax.Array,
    position,
    *,
    kernel_size,
    scope_size,
    rotation_groups: int = 1,
) -> jax.Array:
    """Where a local deformable kernel reads its scope kernel at chosen output locations.

    Tap (a, b) of group g at output (i, j) reads the (Sh, Sw) scope kernel bilinearly at
    `(a + r_y + (Sh-Kh)/2, b + r_x + (Sw-Kw)/2)` with
    `(r_y, r_x) = rotation[n, i, j, ((g*Kh + a)*Kw + b)*2 + (0, 1)]` (docs/OPERATORS.md).

    Args:
      rotation: (N, Ho, Wo, G*Kh*Kw*2) kernel-space offsets (a DK layer sows it as
        "intermediates"/"rotation").
      position: an output location (i, j) or a (P, 2) integer array of them.
      kernel_size, scope_size: ints or pairs (Kh, Kw) and (Sh, Sw).
      rotation_groups: G.

    Returns:
      (N, G, Kh, Kw, 2) (row, col) scope positions for one location, (N, P, G, Kh, Kw, 2) for
      P locations.
    """
    kh, kw = _pair(kernel_size, "kernel_size")
    sh, sw = _pair(scope_size, "scope_size")
    if sh < kh or sw < kw:
        raise ValueError(f"scope_size {(sh, sw)} must be at least kernel_size {(kh, kw)}")
    g = int(rotation_groups)
    rotation = jnp.asarray(rotation)
    if rotation.ndim != 4 or rotation.shape[-1] != g * kh * kw * 2:
        raise ValueError(
            f"rotation must be (N, Ho, Wo, G*Kh*Kw*2) = (N, Ho, Wo, {g * kh * kw * 2}) for "
            f"G={g}, kernel {(kh, kw)}; got shape {rotation.shape}"
        )
    pos, single = _check_positions(position, rotation.shape[1:3])
    r = rotation[:, pos[:, 0], pos[:, 1]].astype(jnp.float32)  # (N, P, G*Kh*Kw*2)
    r = r.reshape(*r.shape[:2], g, kh, kw, 2)
    a, b = np.meshgrid(np.arange(kh), np.arange(kw), indexing="ij")
    rigid = np.stack([a + (sh - kh) / 2, b + (sw - kw) / 2], axis=-1).astype(np.float32)
    out = r + rigid
    return out[:, 0] if single else out


def image_sample_positions(
    offset: jax.Array | None,
    position,
    *,
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    output_shape: tuple[int, int] | None = None,
) -> jax.Array:
    """Where a (deformable) convolution reads the image at chosen output locations.

    Tap (a, b) at output (i, j) reads `(i*sh - ph + a*dh + o_y, j*sw - pw + b*dw + o_x)` with
    `(o_y, o_x) = offset[n, i, j, (a*Kw + b)*2 + (0, 1)]` (docs/OPERATORS.md); offset None
    means the rigid grid.

    Args:
      offset: (N, Ho, Wo, Kh*Kw*2) image-space offsets, or None (then `output_shape` (Ho, Wo)
        bounds the positions and a batch of one is returned).
      position: an output location (i, j) or a (P, 2) integer array of them.
      kernel_size, stride, padding, dilation: ints or pairs, as for the ops.

    Returns:
      (N, Kh, Kw, 2) (row, col) input positions for one location, (N, P, Kh, Kw, 2) for P.
    """
    kh, kw = _pair(kernel_size, "kernel_size")
    sh, sw = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    dh, dw = _pair(dilation, "dilation")
    if offset is None:
        if output_shape is None:
            raise ValueError("output_shape (Ho, Wo) is required when offset is None")
        offset = jnp.zeros((1, *output_shape, kh * kw * 2), jnp.float32)
    offset = jnp.asarray(offset)
    if offset.ndim != 4 or offset.shape[-1] != kh * kw * 2:
        raise ValueError(
            f"offset must be (N, Ho, Wo, Kh*Kw*2) = (N, Ho, Wo, {kh * kw * 2}) for kernel "
            f"{(kh, kw)}; got shape {offset.shape}"
        )
    pos, single = _check_positions(position, offset.shape[1:3])
    o = (
        offset[:, pos[:, 0], pos[:, 1]]
        .astype(jnp.float32)
        .reshape(offset.shape[0], len(pos), kh, kw, 2)
    )
    a, b = np.meshgrid(np.arange(kh), np.arange(kw), indexing="ij")
    rigid = np.stack(
        [
            pos[:, 0, None, None] * sh - ph + a * dh,
            pos[:, 1, None, None] * sw - pw + b * dw,
        ],
        axis=-1,
    ).astype(np.float32)  # (P, Kh, Kw, 2)
    out = o + rigid
    return out[:, 0] if single else out


def _check_positions(position, out_hw) -> tuple[np.ndarray, bool]:
    pos, single = _positions_array(position)
    ho, wo = out_hw
    if (pos < 0).any() or (pos[:, 0] >= ho).any() or (pos[:, 1] >= wo).any():
        raise ValueError(
            f"position {np.asarray(position).tolist()!r} lies outside the {ho}x{wo} output grid"
        )
    return pos, single
