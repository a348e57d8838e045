"""JAX primitives backed by the XLA FFI handlers, with their JVP, transpose and batching rules.

Depthwise family (`sample_depthwise`, `deform_sample_depthwise`). Every primitive takes its
operands in the fixed order (cot, x, offset, rotation, weight, tangent), each one only where it
applies, and the static params `deformable` (whether `offset` is present), `geometry` (a
`_modes.Geometry`: kernel, stride, padding, dilation, rotation groups and, for the columns, the
scope, each a named field) and `kernel_only` (below). `weight` is (Nw, Sh, Sw, C)
with Nw = 1 (shared) or Nw = N (one kernel per sample); batching folds any vmapped axis into N
that way.

    forward        (x, [offset], rotation, weight)            -> y          (N, Ho, Wo, C)
    grad_image     (cot, [offset], rotation, weight)          -> gx         (N, H, W, C)
    grad_weight    (cot, x, [offset], rotation)               -> gw         (Nw, Sh, Sw, C)
    jvp_rotation   (x, [offset], rotation, weight, tangent)   -> dy
    grad_rotation  (cot, x, [offset], rotation, weight)       -> grotation
    jvp_offset     (x, offset, rotation, weight, tangent)     -> dy
    grad_offset    (cot, x, offset, rotation, weight)         -> goffset

Second order in rotation. Within a cell the kernel's bilinear read B is linear in each
coordinate, so its second derivative is the cross term d2B/du dv (+-1 per corner) and its third
vanishes. The derivative of jvp_rotation (tangent t) in rotation along s is jvp_rotation with
dB[t] replaced by d2B/du dv * cross, cross = t_u s_v + t_v s_u: one number per group and tap,
a "cross tangent" (N, Ho, Wo, G*Kh*Kw). These modes close the rotation derivatives of every
order under JVP and transposition:

    jvp_rotation_grad_image   (cot, [offset], rotation, weight, tangent)   -> gx
    jvp_rotation_grad_weight  (cot, x, [offset], rotation, tangent)        -> gw
    hvp_rotation              (x, [offset], rotation, weight, cross)       -> dy
    hvp_rotation_grad_image   (cot, [offset], rotation, weight, cross)     -> gx
    hvp_rotation_grad_weight  (cot, x, [offset], rotation, cross)          -> gw
    grad_cross_rotation       (cot, x, [offset], rotation, weight)         -> gcross

y is linear in x and in weight, so forward transposes to grad_image / grad_weight; the JVP in
rotation (offset) is its own primitive, linear in the tangent, transposing to grad_rotation
(grad_offset) and back. All of them lower to custom calls (target `dk_{sample,deform}_<mode>`
plus the version suffix, e.g. `dk_sample_forward_v2`), so first derivatives, forward and
reverse, never fall back to jax.numpy.

Higher derivatives. Every mode is one slot of a multilinear form (dk_jax/_modes.py), so its
derivative in a linear role is itself with the tangent in place, its transposes are the modes
computing the other slots, and its derivative in rotation is the same slot of the form's
derivative. So derivatives of every order in x, weight and rotation, forward and reverse, are
custom calls. What involves a derivative in offset beyond the first (the image read's second
derivative, and offset mixed with rotation) is written once, generically, on the jax.numpy
reference (`_rules.reference_mode`: the mode computed from the reference op by jax.jvp /
jax.vjp), whose derivatives JAX takes to any order:
  - the derivative in offset of every mode but forward, and in rotation of the offset modes,
  - the transpose of jvp_offset / grad_offset in x or weight.
Those terms hold gathers; the nd family's second derivatives are on the reference too.

Files: `_modes.py` declares the modes of the three families (depthwise, columns, nd), from which
`_rules.py` derives binding, abstract evaluation, JVP, transpose and batching, and
`_lowering.py` the lowering per platform; this module is the entry point of `ops.py`.

Scope-space im2col (`scope_im2col`, `deform_scope_im2col`): the same operand order without
weight; geometry holds the scope (Sh, Sw); columns are (N, Ho, Wo, Sh, Sw, C).

    cols forward       (x, [offset], rotation)            -> cols
    cols grad_image    (cot, [offset], rotation)          -> gx
    cols jvp_rotation  (x, [offset], rotation, tangent)   -> dcols
    cols grad_rotation (cot, x, [offset], rotation)       -> grotation
    cols jvp_offset    (x, offset, rotation, tangent)     -> dcols
    cols grad_offset   (cot, x, offset, rotation)         -> goffset
    cols jvp_rotation_grad_image, hvp_rotation, hvp_rotation_grad_image, grad_cross_rotation:
                       as in the depthwise family, without weight

nd_linear_sample: data (Nb, *S, C), coord (Nb, M, D).

    nd_forward     (data, coord)            -> out      (Nb, M, C)
    nd_grad_data   (cot, coord)             -> gdata    (Nb, *S, C)
    nd_jvp_coord   (data, coord, tangent)   -> dout
    nd_grad_coord  (cot, data, coord)       -> gcoord   (Nb, M, D)

Platforms. Each primitive lowers to its custom call on every platform with a kernel library
(CPU; CUDA where built) and to its mode on the jax.numpy reference on any other (the default
lowering rule: TPU, ROCm, ...), so a program exported for several platforms holds one branch per
platform. The reference is run one sample at a time (vmapped), so its gathers split along a
sharded batch as the custom call does; over an Explicit mesh it runs under shard_map. With
`kernel_only` (implementation="ffi") lowering for a platform without a kernel is an error.

Parallelism. Under `jax.shard_map` (check_vma=True) each output is typed as varying over the
union of its operands' varying manual axes, and `bind` first casts every operand to that union
with `jax.lax.pcast`; JAX's transpose of that cast is what sums a replicated weight's gradient
over devices. Under `jax.jit` over several devices every custom call is batch-partitionable
along its leading axis (N, or Nb): XLA runs it on each device's slice of a batch-sharded input.
For that the lowering gives every operand and result that axis: a shared (1, Sh, Sw, C) weight
(or nd table) is broadcast to (N, ...), and its gradient is computed per sample and summed (an
all-reduce of a weight-sized array when the batch is split). Any other sharded axis (a spatial
axis, a sharded weight) is gathered before the call. A one-device program, or a shard_map body
manual over every axis, calls the depthwise targets with the shared weight as it is.
"""

from __future__ import annotations

from dk_jax import _lowering, _rules
from dk_jax._modes import COLS, DK, ND, Geometry

# The primitives by mode (their rules in dk_jax/_rules.py, their lowering in _lowering.py).
dk_p = _rules.PRIMITIVES[DK.name]
cols_p = _rules.PRIMITIVES[COLS.name]
nd_p = _rules.PRIMITIVES[ND.name]


def bind(mode: str, *, deformable: bool, geometry: Geometry, kernel_only=False, **operands):
    """Binds a depthwise-family primitive with operands given by role name."""
    static = dict(deformable=deformable, geometry=geometry, kernel_only=kernel_only)
    return _rules.bind(DK, mode, static, **operands)


def cols_bind(mode: str, *, deformable: bool, geometry: Geometry, kernel_only=False, **operands):
    """Binds a columns (scope-space im2col) primitive; geometry holds the scope."""
    static = dict(deformable=deformable, geometry=geometry, kernel_only=kernel_only)
    return _rules.bind(COLS, mode, static, **operands)


def nd_bind(mode: str, *, kernel_only=False, **operands):
    """Binds an nd_linear_sample primitive: data (Nb, *S, C), coord (Nb, M, D)."""
    return _rules.bind(ND, mode, dict(kernel_only=kernel_only), **operands)


_lower_to_reference_on = _lowering.lower_to_reference_on
