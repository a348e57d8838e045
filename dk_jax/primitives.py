"""JAX primitives backed by the XLA FFI handlers, with their JVP, transpose and batching rules.

Depthwise family (`sample_depthwise`, `deform_sample_depthwise`). Every primitive takes its
operands in the fixed order (cot, x, offset, rotation, weight, tangent), each one only where it
applies, and the static params `deformable` (whether `offset` is present), `geometry` =
(kh, kw, sh, sw, ph, pw, dh, dw, groups) and `kernel_only` (below). `weight` is (Nw, Sh, Sw, C)
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
plus the version suffix, e.g. `dk_sample_forward_v1`), so first derivatives, forward and
reverse, never fall back to jax.numpy.

Higher derivatives. Every mode is a multilinear form in the roles of its `linear` table, so
its derivative there is itself with the tangent in place, and its transposes (`transposes`) are
modes too; derivatives in rotation follow `_ROTATION_JVP`. So derivatives of every order in x,
weight and rotation, forward and reverse, are custom calls. What involves a derivative in
offset beyond the first (the image read's second derivative, and offset mixed with rotation)
is written once, generically, on the jax.numpy reference (`_reference_mode`: the mode computed
from the reference op by jax.jvp / jax.vjp), whose derivatives JAX takes to any order:
  - the derivative in offset of every mode but forward, and in rotation of the offset modes,
  - the transpose of jvp_offset / grad_offset in x or weight.
Those terms hold gathers; the nd family's second derivatives are on the reference too.

Scope-space im2col (`scope_im2col`, `deform_scope_im2col`): the same operand order without
weight; geometry ends with the scope (Sh, Sw); columns are (N, Ho, Wo, Sh, Sw, C).

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

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.extend.mlir import ir
from jax.extend.mlir.dialects import sdy
from jax.interpreters import ad, batching, mlir, xla
from jax.sharding import ManualAxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from dk_jax import _ffi, reference

ROLES = ("cot", "x", "offset", "rotation", "weight", "tangent")


@dataclass(frozen=True)
class _Family:
    """One family of primitives sharing operand roles and rules.

    roles: the roles each mode takes (offset only when deformable).
    linear: the roles each mode is linear in (its JVP there is the mode itself).
    transposes: (mode, linear role) -> (mode computing that role's cotangent, the role the
      output cotangent takes there, the static shape param it needs or None).
    """

    name: str
    roles: dict
    linear: dict
    transposes: dict

    def target(self, mode: str, deformable: bool) -> str:
        """The custom-call target: a versioned interface (xla_ffi/dk_targets.h)."""
        kind = "deform" if deformable else "sample"
        name = f"dk_{kind}_{mode}" if self.name == "dk" else f"dk_{kind}_{self.name}_{mode}"
        return name + _ffi.target_suffix()


DK = _Family(
    name="dk",
    roles={
        "forward": ("x", "offset", "rotation", "weight"),
        "grad_image": ("cot", "offset", "rotation", "weight"),
        "grad_weight": ("cot", "x", "offset", "rotation"),
        "jvp_rotation": ("x", "offset", "rotation", "weight", "tangent"),
        "grad_rotation": ("cot", "x", "offset", "rotation", "weight"),
        "jvp_offset": ("x", "offset", "rotation", "weight", "tangent"),
        "grad_offset": ("cot", "x", "offset", "rotation", "weight"),
        "jvp_rotation_grad_image": ("cot", "offset", "rotation", "weight", "tangent"),
        "jvp_rotation_grad_weight": ("cot", "x", "offset", "rotation", "tangent"),
        "hvp_rotation": ("x", "offset", "rotation", "weight", "tangent"),
        "hvp_rotation_grad_image": ("cot", "offset", "rotation", "weight", "tangent"),
        "hvp_rotation_grad_weight": ("cot", "x", "offset", "rotation", "tangent"),
        "grad_cross_rotation": ("cot", "x", "offset", "rotation", "weight"),
    },
    linear={
        "forward": ("x", "weight"),
        "grad_image": ("cot", "weight"),
        "grad_weight": ("cot", "x"),
        "jvp_rotation": ("x", "weight", "tangent"),
        "grad_rotation": ("cot", "x", "weight"),
        "jvp_offset": ("x", "weight", "tangent"),
        "grad_offset": ("cot", "x", "weight"),
        "jvp_rotation_grad_image": ("cot", "weight", "tangent"),
        "jvp_rotation_grad_weight": ("cot", "x", "tangent"),
        "hvp_rotation": ("x", "weight", "tangent"),
        "hvp_rotation_grad_image": ("cot", "weight", "tangent"),
        "hvp_rotation_grad_weight": ("cot", "x", "tangent"),
        "grad_cross_rotation": ("cot", "x", "weight"),
    },
    transposes={
        ("forward", "x"): ("grad_image", "cot", "image_shape"),
        ("forward", "weight"): ("grad_weight", "cot", "weight_shape"),
        ("grad_image", "cot"): ("forward", "x", None),
        ("grad_image", "weight"): ("grad_weight", "x", "weight_shape"),
        ("grad_weight", "cot"): ("forward", "weight", None),
        ("grad_weight", "x"): ("grad_image", "weight", "image_shape"),
        ("jvp_rotation", "tangent"): ("grad_rotation", "cot", None),
        ("grad_rotation", "cot"): ("jvp_rotation", "tangent", None),
        ("jvp_offset", "tangent"): ("grad_offset", "cot", None),
        ("grad_offset", "cot"): ("jvp_offset", "tangent", None),
        # <cot, jvp_rotation(x, weight, t)> is trilinear; each mode is its gradient in one
        # role, so transposing one in another role gives the gradient in that role.
        ("jvp_rotation", "x"): ("jvp_rotation_grad_image", "cot", "image_shape"),
        ("jvp_rotation", "weight"): ("jvp_rotation_grad_weight", "cot", "weight_shape"),
        ("grad_rotation", "x"): ("jvp_rotation_grad_image", "tangent", "image_shape"),
        ("grad_rotation", "weight"): ("jvp_rotation_grad_weight", "tangent", "weight_shape"),
        ("jvp_rotation_grad_image", "cot"): ("jvp_rotation", "x", None),
        ("jvp_rotation_grad_image", "weight"): ("jvp_rotation_grad_weight", "x", "weight_shape"),
        ("jvp_rotation_grad_image", "tangent"): ("grad_rotation", "x", None),
        ("jvp_rotation_grad_weight", "cot"): ("jvp_rotation", "weight", None),
        ("jvp_rotation_grad_weight", "x"): ("jvp_rotation_grad_image", "weight", "image_shape"),
        ("jvp_rotation_grad_weight", "tangent"): ("grad_rotation", "weight", None),
        # The same for <cot, hvp_rotation(x, weight, cross)>.
        ("hvp_rotation", "x"): ("hvp_rotation_grad_image", "cot", "image_shape"),
        ("hvp_rotation", "weight"): ("hvp_rotation_grad_weight", "cot", "weight_shape"),
        ("hvp_rotation", "tangent"): ("grad_cross_rotation", "cot", None),
        ("grad_cross_rotation", "cot"): ("hvp_rotation", "tangent", None),
        ("grad_cross_rotation", "x"): ("hvp_rotation_grad_image", "tangent", "image_shape"),
        ("grad_cross_rotation", "weight"): ("hvp_rotation_grad_weight", "tangent", "weight_shape"),
        ("hvp_rotation_grad_image", "cot"): ("hvp_rotation", "x", None),
        ("hvp_rotation_grad_image", "weight"): ("hvp_rotation_grad_weight", "x", "weight_shape"),
        ("hvp_rotation_grad_image", "tangent"): ("grad_cross_rotation", "x", None),
        ("hvp_rotation_grad_weight", "cot"): ("hvp_rotation", "weight", None),
        ("hvp_rotation_grad_weight", "x"): ("hvp_rotation_grad_image", "weight", "image_shape"),
        ("hvp_rotation_grad_weight", "tangent"): ("grad_cross_rotation", "weight", None),
    },
)

# Scope-space im2col: columns (N, Ho, Wo, Sh, Sw, C), linear in x; geometry carries (Sh, Sw).
COLS = _Family(
    name="cols",
    roles={
        "forward": ("x", "offset", "rotation"),
        "grad_image": ("cot", "offset", "rotation"),
        "jvp_rotation": ("x", "offset", "rotation", "tangent"),
        "grad_rotation": ("cot", "x", "offset", "rotation"),
        "jvp_offset": ("x", "offset", "rotation", "tangent"),
        "grad_offset": ("cot", "x", "offset", "rotation"),
        "jvp_rotation_grad_image": ("cot", "offset", "rotation", "tangent"),
        "hvp_rotation": ("x", "offset", "rotation", "tangent"),
        "hvp_rotation_grad_image": ("cot", "offset", "rotation", "tangent"),
        "grad_cross_rotation": ("cot", "x", "offset", "rotation"),
    },
    linear={
        "forward": ("x",),
        "grad_image": ("cot",),
        "jvp_rotation": ("x", "tangent"),
        "grad_rotation": ("cot", "x"),
        "jvp_offset": ("x", "tangent"),
        "grad_offset": ("cot", "x"),
        "jvp_rotation_grad_image": ("cot", "tangent"),
        "hvp_rotation": ("x", "tangent"),
        "hvp_rotation_grad_image": ("cot", "tangent"),
        "grad_cross_rotation": ("cot", "x"),
    },
    transposes={
        ("forward", "x"): ("grad_image", "cot", "image_shape"),
        ("grad_image", "cot"): ("forward", "x", None),
        ("jvp_rotation", "tangent"): ("grad_rotation", "cot", None),
        ("grad_rotation", "cot"): ("jvp_rotation", "tangent", None),
        ("jvp_offset", "tangent"): ("grad_offset", "cot", None),
        ("grad_offset", "cot"): ("jvp_offset", "tangent", None),
        ("jvp_rotation", "x"): ("jvp_rotation_grad_image", "cot", "image_shape"),
        ("grad_rotation", "x"): ("jvp_rotation_grad_image", "tangent", "image_shape"),
        ("jvp_rotation_grad_image", "cot"): ("jvp_rotation", "x", None),
        ("jvp_rotation_grad_image", "tangent"): ("grad_rotation", "x", None),
        ("hvp_rotation", "x"): ("hvp_rotation_grad_image", "cot", "image_shape"),
        ("hvp_rotation", "tangent"): ("grad_cross_rotation", "cot", None),
        ("grad_cross_rotation", "cot"): ("hvp_rotation", "tangent", None),
        ("grad_cross_rotation", "x"): ("hvp_rotation_grad_image", "tangent", "image_shape"),
        ("hvp_rotation_grad_image", "cot"): ("hvp_rotation", "x", None),
        ("hvp_rotation_grad_image", "tangent"): ("grad_cross_rotation", "x", None),
    },
)

# Forward is nonlinear in rotation and offset: its JVP there is a primitive of its own.
_JVP_MODES = {"rotation": "jvp_rotation", "offset": "jvp_offset"}

# The derivative of a mode in rotation along s: (the mode computing it, how s enters), or None
# where it is zero (third derivatives of the read vanish within a cell). "tangent": s is that
# mode's tangent; "cross": its tangent is the cross of the mode's tangent t with s; "cross_grad":
# it computes the gradient g of the cross tangent, and the derivative is g * d(cross)/dt.
_ROTATION_JVP = {
    "grad_image": ("jvp_rotation_grad_image", "tangent"),
    "grad_weight": ("jvp_rotation_grad_weight", "tangent"),
    "jvp_rotation": ("hvp_rotation", "cross"),
    "grad_rotation": ("grad_cross_rotation", "cross_grad"),
    "jvp_rotation_grad_image": ("hvp_rotation_grad_image", "cross"),
    "jvp_rotation_grad_weight": ("hvp_rotation_grad_weight", "cross"),
    "hvp_rotation": None,
    "hvp_rotation_grad_image": None,
    "hvp_rotation_grad_weight": None,
    "grad_cross_rotation": None,
}

# What each mode returns, for abstract evaluation.
_OUTPUTS = {
    "forward": "y",
    "jvp_rotation": "y",
    "jvp_offset": "y",
    "hvp_rotation": "y",
    "grad_image": "image",
    "jvp_rotation_grad_image": "image",
    "hvp_rotation_grad_image": "image",
    "grad_weight": "weight",
    "jvp_rotation_grad_weight": "weight",
    "hvp_rotation_grad_weight": "weight",
    "grad_rotation": "rotation",
    "grad_offset": "offset",
    "grad_cross_rotation": "cross",
}

# Each mode as a transformation of another: ("jvp" or "vjp" or "cross", the role it
# differentiates in, the mode it differentiates, the static shape param of that role's zero
# primal where the mode does not take it, or "cross"). The reference versions of the modes
# (`_reference_mode`) are built from this table.
_MODE_AS_DERIVATIVE = {
    "grad_image": ("vjp", "x", "forward", "image_shape"),
    "grad_weight": ("vjp", "weight", "forward", "weight_shape"),
    "jvp_rotation": ("jvp", "rotation", "forward", None),
    "grad_rotation": ("vjp", "rotation", "forward", None),
    "jvp_offset": ("jvp", "offset", "forward", None),
    "grad_offset": ("vjp", "offset", "forward", None),
    "jvp_rotation_grad_image": ("vjp", "x", "jvp_rotation", "image_shape"),
    "jvp_rotation_grad_weight": ("vjp", "weight", "jvp_rotation", "weight_shape"),
    "hvp_rotation": ("cross", "rotation", "jvp_rotation", None),
    "hvp_rotation_grad_image": ("vjp", "x", "hvp_rotation", "image_shape"),
    "hvp_rotation_grad_weight": ("vjp", "weight", "hvp_rotation", "weight_shape"),
    "grad_cross_rotation": ("vjp", "tangent", "hvp_rotation", "cross"),
}


def _pairs(t):
    """(..., G*taps*2) -> (..., G*taps, 2): (u, v) per group and tap."""
    return t.reshape(*t.shape[:-1], -1, 2)


def _cross(t, s):
    """The cross tangent t_u s_v + t_v s_u per group and tap: (..., G*taps)."""
    t, s = _pairs(t), _pairs(s)
    return t[..., 0] * s[..., 1] + t[..., 1] * s[..., 0]


def _cross_grad(g, s):
    """g * d(cross)/dt for the gradient g (..., G*taps) of the cross of t with s."""
    s = _pairs(s)
    return jnp.stack([g * s[..., 1], g * s[..., 0]], axis=-1).reshape(*g.shape[:-1], -1)


def _roles(family: _Family, mode: str, deformable: bool) -> tuple[str, ...]:
    return tuple(r for r in family.roles[mode] if deformable or r != "offset")


def _new_primitive(name: str) -> Primitive:
    p = Primitive(name)
    p.def_impl(partial(xla.apply_primitive, p))
    return p


_prims = {
    family.name: {
        mode: _new_primitive(f"dk_{'' if family is DK else 'cols_'}{mode}") for mode in family.roles
    }
    for family in (DK, COLS)
}
dk_p = _prims["dk"]
cols_p = _prims["cols"]


def _varying(aval) -> frozenset:
    """The mesh axes over which a value varies inside shard_map (empty elsewhere)."""
    mat = getattr(aval, "manual_axis_type", None)
    return frozenset() if mat is None else mat.varying


def _cast_to_common_varying(args):
    """Casts every operand to the union of the operands' varying manual axes, as JAX's own
    multi-operand primitives do; the transpose of the cast sums cotangents over devices."""
    vmas = [_varying(jax.typeof(a)) for a in args]
    common = frozenset().union(*vmas)
    return [
        a if v == common else jax.lax.pcast(a, tuple(common - v), to="varying")
        for a, v in zip(args, vmas, strict=True)
    ]


def _bind(family: _Family, mode: str, *, deformable: bool, geometry, kernel_only=False, **operands):
    params = {k: operands.pop(k) for k in ("image_shape", "weight_shape") if k in operands}
    args = _cast_to_common_varying([operands[r] for r in _roles(family, mode, deformable)])
    return _prims[family.name][mode].bind(
        *args, deformable=deformable, geometry=tuple(geometry), kernel_only=kernel_only, **params
    )


def bind(mode: str, *, deformable: bool, geometry: tuple[int, ...], **operands):
    """Binds a depthwise-family primitive with operands given by role name."""
    return _bind(DK, mode, deformable=deformable, geometry=geometry, **operands)


def cols_bind(mode: str, *, deformable: bool, geometry: tuple[int, ...], **operands):
    """Binds a columns (scope-space im2col) primitive; geometry ends with (Sh, Sw)."""
    return _bind(COLS, mode, deformable=deformable, geometry=geometry, **operands)


# --- abstract evaluation -------------------------------------------------------------------


def _result_aval(shape, dtype, operands, batched: bool = True):
    """The output's ShapedArray: varying over the operands' varying axes, and (under a mesh)
    sharded along its leading axis like the operands' leading axis when `batched`, else
    replicated (a shared weight's gradient)."""
    mesh = next((a.sharding.mesh for a in operands if not a.sharding.mesh.empty), None)
    if mesh is None:
        return jax.core.ShapedArray(shape, dtype)
    batch = None
    if batched:
        specs = [a.sharding.spec for a in operands if a.ndim and a.shape[0] == shape[0]]
        batch = next((s[0] for s in specs if len(s) and s[0] is not None), None)
    return jax.core.ShapedArray(
        shape,
        dtype,
        sharding=NamedSharding(mesh, P(batch, *[None] * (len(shape) - 1))),
        manual_axis_type=ManualAxisType(varying=frozenset().union(*map(_varying, operands))),
    )


def _out_aval(
    family, mode, *args, deformable, geometry, kernel_only, image_shape=None, weight_shape=None
):
    a = dict(zip(_roles(family, mode, deformable), args, strict=True))
    rot = a["rotation"]
    n, ho, wo = rot.shape[:3]
    output = _OUTPUTS[mode]
    if output == "y":
        if family is DK:
            shape = (n, ho, wo, a["weight"].shape[-1])
        else:
            shape = (n, ho, wo, geometry[9], geometry[10], a["x"].shape[-1])
    elif output == "image":
        shape = tuple(image_shape)
    elif output == "weight":
        shape = tuple(weight_shape)
    elif output == "rotation":
        shape = rot.shape
    elif output == "cross":
        shape = (*rot.shape[:3], rot.shape[3] // 2)
    else:  # offset
        shape = a["offset"].shape
    batched = mode != "grad_weight" or shape[0] == n
    return _result_aval(shape, rot.dtype, args, batched)


# --- lowering ------------------------------------------------------------------------------


def _batch_partitionable_attributes(avals_in, avals_out) -> dict:
    """Marks a custom call as split along the leading axis of every operand and result.

    `num_batch_dims` is read by XLA's partitioner of batch-partitionable targets; the Shardy
    rule tells sharding propagation the same (one factor for the leading axis of all, every
    other axis a factor of its own that must be replicated)."""
    sizes, mappings = [avals_in[0].shape[0]], []
    for aval in (*avals_in, *avals_out):
        dims = [sdy.DimMappingAttr.get(factor_indices=[0])]
        for d in aval.shape[1:]:
            dims.append(sdy.DimMappingAttr.get(factor_indices=[len(sizes)]))
            sizes.append(d)
        mappings.append(sdy.TensorMappingAttr.get(dim_mappings=dims))
    rule = sdy.OpShardingRuleAttr.get(
        factor_sizes=sizes,
        operand_mappings=mappings[: len(avals_in)],
        result_mappings=mappings[len(avals_in) :],
        is_custom=True,
        need_replication_factors=list(range(1, len(sizes))),
    )
    return {
        "mhlo.frontend_attributes": ir.DictAttr.get({"num_batch_dims": ir.StringAttr.get("1")}),
        "sdy.sharding_rule": rule,
    }


def _lower_jnp(fun, ctx, aval_in, aval_out, operand):
    (out,) = mlir.lower_fun(fun, multiple_results=False)(
        ctx.replace(avals_in=[aval_in], avals_out=[aval_out]), operand
    )
    return out


def _may_be_split(ctx) -> bool:
    """Whether XLA may split this call over devices: in a program over several devices, outside
    a shard_map body that is manual over every axis of size > 1. A one-device program or such a
    body calls the target as it is: a shared weight stays shared (no per-sample copies, and
    one device's accumulation order, bit for bit)."""
    axis_context = ctx.module_context.axis_context
    mesh = getattr(axis_context, "mesh", None)
    if mesh is not None:  # inside shard_map: only the axes left automatic can split the call
        manual = getattr(axis_context, "manual_axes", frozenset())
        return any(size > 1 for name, size in mesh.shape.items() if name not in manual)
    return getattr(axis_context, "num_devices", 2) != 1


def _batch_partitioned_call(ctx, target: str, args, n: int, *, shares: bool, **attributes):
    """The custom call `target` with every operand and the result carrying the batch axis n:
    an operand with leading axis 1 (a shared weight or table) is broadcast to n, and a result
    with leading axis 1 (its gradient) is computed per sample and summed in float32 (float64 for
    float64 operands); the call
    is marked batch-partitionable where it may be split (`_may_be_split`). A target that
    `shares` (takes a leading axis of 1 itself) is called as it is where it cannot be split."""
    split = _may_be_split(ctx)
    if shares and not split:
        return jax.ffi.ffi_lowering(target)(ctx, *args, **attributes)
    avals_in, operands = [], []
    for aval, op in zip(ctx.avals_in, args, strict=True):
        if aval.shape[0] != n:
            full = aval.update(shape=(n, *aval.shape[1:]))
            op = _lower_jnp(partial(jnp.broadcast_to, shape=full.shape), ctx, aval, full, op)
            aval = full
        avals_in.append(aval)
        operands.append(op)
    (out,) = ctx.avals_out
    full = out if out.shape[0] == n else out.update(shape=(n, *out.shape[1:]))
    extra = _batch_partitionable_attributes(avals_in, [full]) if split else None
    rule = jax.ffi.ffi_lowering(target, extra_attributes=extra)
    (result,) = rule(ctx.replace(avals_in=avals_in, avals_out=[full]), *operands, **attributes)
    if full is not out:
        result = _lower_jnp(
            lambda g: jnp.sum(
                g, axis=0, keepdims=True, dtype=jnp.promote_types(g.dtype, jnp.float32)
            ).astype(g.dtype),
            ctx,
            full,
            out,
            result,
        )
    return [result]


def _dk_lowering(family, mode, ctx, *args, deformable, geometry, **_):
    n = ctx.avals_in[_roles(family, mode, deformable).index("rotation")].shape[0]
    return _batch_partitioned_call(
        ctx,
        family.target(mode, deformable),
        args,
        n,
        shares=family is DK,  # the depthwise targets take a shared (1, Sh, Sw, C) weight
        geometry=np.asarray(geometry, dtype=np.int64),
    )


def _reference_lowering(name, reference, ctx, *args, kernel_only, **params):
    """The lowering on a platform without a kernel: the mode's jax.numpy reference, lowered in
    place (the same operands, shapes and sharding), or with `implementation="ffi"` an error."""
    if kernel_only:
        missing = [p for p in ctx.module_context.platforms if p not in _ffi.lowering_platforms()]
        reasons = "; ".join(f"{p}: {_ffi.why_unavailable(p)}" for p in missing)
        raise RuntimeError(
            f'implementation="ffi" was asked for, but dk_jax has no kernel for platform(s) '
            f"{', '.join(map(repr, missing))} ({reasons}); with implementation=None the "
            f"{name} lowers to its jax.numpy reference there (and to the kernel where there is "
            'one), with implementation="xla" to the reference everywhere'
        )
    n, out_rows = max(a.shape[0] for a in ctx.avals_in), ctx.avals_out[0].shape[0]
    fun = partial(_per_sample, reference, out_rows, params)
    mesh, batch_axes = _explicit_batch_axes(ctx.avals_in, n)
    if batch_axes:
        fun = _on_each_device(reference, ctx.avals_in, ctx.avals_out[0], mesh, batch_axes, params)
    # Traced on plain avals (but for an Explicit mesh's sharding): the operands' shard_map types
    # have done their work (the primitive's rules checked them), and the reference's own
    # constants would otherwise be typed as not varying.
    ctx = ctx.replace(
        avals_in=[_plain(a, batch_axes) for a in ctx.avals_in],
        avals_out=[_plain(a, batch_axes) for a in ctx.avals_out],
    )
    return mlir.lower_fun(fun, multiple_results=False)(ctx, *args)


def _plain(aval, keep_sharding):
    sharding = aval.sharding if keep_sharding else None
    return jax.core.ShapedArray(aval.shape, aval.dtype, sharding=sharding)


def _explicit_batch_axes(avals, n) -> tuple:
    """(mesh, the Explicit mesh axes the operands' leading axis n is split over), or (None, ())."""
    for a in avals:
        mesh = a.sharding.mesh
        if mesh.empty or not a.ndim or a.shape[0] != n or not a.sharding.spec:
            continue
        axes = a.sharding.spec[0]
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
        if axes and all(types[x] == jax.sharding.AxisType.Explicit for x in axes):
            return mesh, axes
    return None, ()


def _on_each_device(reference, avals_in, aval_out, mesh, batch_axes, params):
    """`_per_sample(reference)` run on each device's samples of a batch split over Explicit
    mesh axes (shard_map, manual over those axes), as the batch-partitioned custom call is; a
    shared result (a weight's gradient) is summed over them. Any other split of an operand (a
    sharded weight, a spatial axis) is gathered first."""
    n = max(a.shape[0] for a in avals_in)
    devices = int(np.prod([mesh.shape[a] for a in batch_axes]))
    local = {
        k: (v[0] // devices if v[0] == n else v[0], *v[1:])
        for k, v in params.items()
        if k.endswith("_shape")
    }
    split = P(batch_axes)
    specs = tuple(split if a.shape[0] == n else P() for a in avals_in)
    shared_out = aval_out.shape[0] != n

    def body(*operands):
        rows = 1 if shared_out else n // devices
        out = _per_sample(reference, rows, dict(params, **local), *operands)
        return jax.lax.psum(out, batch_axes) if shared_out else out

    per_device = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=specs,
        out_specs=P() if shared_out else split,
        axis_names=set(batch_axes),
        check_vma=False,
    )

    def run(*operands):
        operands = [jax.sharding.reshard(o, s) for o, s in zip(operands, specs, strict=True)]
        return jax.sharding.reshard(per_device(*operands), aval_out.sharding.spec)

    return run


def _per_sample(reference, out_rows, params, *args):
    """reference(*args, **params) computed one sample at a time (vmapped over the leading axis
    n, shared operands of leading axis 1 unmapped), as the kernels are: its gathers then carry
    the batch as a batching dimension, so XLA splits them along a sharded batch instead of
    gathering the operands. A result of leading axis 1 beside n > 1 (a shared weight's or
    table's gradient) is the per-sample results' sum, in float32 (float64 for float64)."""
    n = max(a.shape[0] for a in args)
    if n == 1:
        return reference(*args, **params)
    one = {k: (1, *v[1:]) for k, v in params.items() if k.endswith("_shape")}

    def sample(*operands):
        return reference(*operands, **dict(params, **one))[0]

    mapped = [a.shape[0] == n for a in args]
    out = jax.vmap(sample, in_axes=[0 if m else None for m in mapped])(
        *[a[:, None] if m else a for a, m in zip(args, mapped, strict=True)]
    )
    if out_rows == 1:
        total = jnp.promote_types(out.dtype, jnp.float32)
        out = jnp.sum(out, axis=0, keepdims=True, dtype=total).astype(out.dtype)
    return out


def _register_lowerings(prims, lowering, reference):
    """Each primitive lowers to its custom call on every platform with a kernel library, and to
    its jax.numpy reference on every other platform (the default rule): a program exported for
    several platforms holds one branch per platform."""
    for mode, p in prims.items():
        _REFERENCE_LOWERINGS[p] = partial(_reference_lowering, p.name, partial(reference, mode))
        mlir.register_lowering(p, _REFERENCE_LOWERINGS[p])
        for platform in _ffi.lowering_platforms():
            mlir.register_lowering(p, partial(lowering, mode), platform=platform)


_REFERENCE_LOWERINGS: dict = {}


def _lower_to_reference_on(platform: str) -> None:
    """Makes `platform` lower every primitive as a platform without a kernel does (for tests:
    the branch TPU gets, run on CPU). For the rest of the process."""
    for p, rule in _REFERENCE_LOWERINGS.items():
        mlir.register_lowering(p, rule, platform=platform)


# --- reference versions of the modes -------------------------------------------------------
# The higher-order terms no custom call computes (see the module docstring) are these functions'
# derivatives and transposes, taken by JAX.


def _reference_op(family, deformable, geometry, x, offset, rotation, weight):
    """The op on the jax.numpy reference; weight (Nw, Sh, Sw, C), Nw = 1 or N."""
    kh, kw, sh, sw, ph, pw, dh, dw, groups = geometry[:9]
    geo = dict(
        kernel_size=(kh, kw),
        stride=(sh, sw),
        padding=(ph, pw),
        dilation=(dh, dw),
        rotation_groups=groups,
    )
    offsets = (offset,) if deformable else ()
    if family is COLS:
        op = reference.deform_scope_im2col if deformable else reference.scope_im2col
        return op(x, *offsets, rotation, scope_size=tuple(geometry[9:11]), **geo)
    op = reference.deform_sample_depthwise if deformable else reference.sample_depthwise
    if weight.shape[0] == 1:
        return op(x, *offsets, rotation, weight[0], **geo)

    def one_sample(*args):  # per-sample kernels: the reference takes one shared kernel
        *per_n, w = args
        return op(*(a[None] for a in per_n), w, **geo)[0]

    return jax.vmap(one_sample)(x, *offsets, rotation, weight)


def _reference_mode(family, mode, deformable, geometry, params, named):
    """`mode` computed on the reference from operands by role (`named`)."""
    if mode == "forward":
        args = {r: named.get(r) for r in ("x", "offset", "rotation", "weight")}
        return _reference_op(family, deformable, geometry, **args)
    how, role, of, shape_param = _MODE_AS_DERIVATIVE[mode]

    def inner(v, **more):
        return _reference_mode(
            family, of, deformable, geometry, params, dict(named, **more, **{role: v})
        )

    rot = named["rotation"]
    if how == "jvp":
        return jax.jvp(inner, (named[role],), (named["tangent"],))[1]
    if how == "cross":
        # The cross tangent c is that of t = (c, 0) with s = (0, 1) in every group and tap.
        c = named["tangent"]
        t = jnp.stack([c, jnp.zeros_like(c)], axis=-1).reshape(rot.shape)
        s = jnp.stack([jnp.zeros_like(c), jnp.ones_like(c)], axis=-1).reshape(rot.shape)
        return jax.jvp(partial(inner, tangent=t), (rot,), (s,))[1]
    # Linear in x, weight and the tangent: the pullback at a zero primal is exact.
    if shape_param is None:
        primal = named[role]
    elif shape_param == "cross":
        primal = jnp.zeros((*rot.shape[:3], rot.shape[3] // 2), rot.dtype)
    else:
        primal = jnp.zeros(params[shape_param], rot.dtype)
    _, pullback = jax.vjp(inner, primal)
    return pullback(named["cot"])[0]


def _dk_reference(family, mode, *args, deformable, geometry, **params):
    """A mode on the reference, operands in the primitive's order (the fallback lowering)."""
    named = dict(zip(_roles(family, mode, deformable), args, strict=True))
    return _reference_mode(family, mode, deformable, geometry, params, named)


def _reference_jvp(family, mode, role, named, tangent, *, deformable, geometry, **params):
    """The derivative of `mode` in `role` along `tangent`, on the reference."""

    def f(v):
        return _reference_mode(family, mode, deformable, geometry, params, dict(named, **{role: v}))

    return jax.jvp(f, (named[role],), (tangent,))[1]


def _reference_transpose(family, mode, role, ct, known, aval, *, deformable, geometry, **params):
    """The transpose of `mode` in its linear role `role`, on the reference."""

    def f(v):
        return _reference_mode(family, mode, deformable, geometry, params, dict(known, **{role: v}))

    _, pullback = jax.vjp(f, jnp.zeros(aval.shape, aval.dtype))
    return pullback(ct)[0]


# --- JVP -----------------------------------------------------------------------------------
# Each primitive is multilinear in some roles (the JVP in such a role is the same primitive
# with the tangent in its place); forward is nonlinear in rotation and offset, which have their
# own JVP primitives. The derivatives of the other modes in rotation are the second-order
# modes (`_ROTATION_JVP`); in offset they come from the reference (`_reference_jvp`).


def _is_zero(t) -> bool:
    return type(t) is ad.Zero


def _sum_tangents(out, terms):
    """The output tangent: the sum of the per-argument terms, or a symbolic zero."""
    if not terms:
        return ad.Zero.from_primal_value(out)
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def _rotation_jvp(family, mode, named, s, kw, params):
    """The derivative of `mode` in rotation along s, by the second-order modes."""
    target, how = _ROTATION_JVP[mode]
    ops = {r: named[r] for r in _roles(family, target, kw["deformable"]) if r in named}
    if how == "tangent":
        ops["tangent"] = s
    elif how == "cross":
        ops["tangent"] = _cross(named["tangent"], s)
    out = _bind(family, target, **kw, **ops, **params)
    return _cross_grad(out, s) if how == "cross_grad" else out


def _dk_jvp(family, mode, primals, tangents, *, deformable, geometry, kernel_only, **params):
    roles = _roles(family, mode, deformable)
    named = dict(zip(roles, primals, strict=True))
    kw = dict(deformable=deformable, geometry=geometry, kernel_only=kernel_only)
    out = _prims[family.name][mode].bind(*primals, **kw, **params)
    terms = []
    for role, t in zip(roles, tangents, strict=True):
        if _is_zero(t):
            continue
        if role in family.linear[mode]:
            terms.append(_bind(family, mode, **kw, **dict(named, **{role: t}), **params))
        elif mode == "forward" and role in _JVP_MODES:
            terms.append(_bind(family, _JVP_MODES[role], **kw, **named, tangent=t))
        elif role == "rotation" and mode in _ROTATION_JVP:
            if _ROTATION_JVP[mode] is not None:
                terms.append(_rotation_jvp(family, mode, named, t, kw, params))
        else:
            # A derivative mode in offset, or an offset mode in rotation: on the reference.
            terms.append(_reference_jvp(family, mode, role, named, t, **kw, **params))
    return out, _sum_tangents(out, terms)


# --- transpose -----------------------------------------------------------------------------


def _with_sharding_of(aval, ct):
    """The cotangent resharded like its primal where they differ: only on an Explicit mesh,
    where a replicated operand broadcast along a sharded batch (vmap of a shared table) has a
    replicated primal but a batch-sharded cotangent."""
    want = aval.sharding.spec
    if aval.sharding.mesh.empty or jax.typeof(ct).sharding.spec == want:
        return ct
    return jax.sharding.reshard(ct, want)


def _dk_transpose(family, mode, ct, *args, deformable, geometry, kernel_only, **params):
    roles = _roles(family, mode, deformable)
    undefined = [r for r, a in zip(roles, args, strict=True) if ad.is_undefined_primal(a)]
    if len(undefined) != 1:
        # Multilinear: in two operands at once it is not linear, so it has no transpose.
        raise TypeError(f"dk_jax: {family.name}_{mode} is linear in one operand at a time")
    role = undefined[0]
    index = roles.index(role)
    aval = args[index].aval
    if role not in family.linear[mode]:
        raise TypeError(f"dk_jax: {family.name}_{mode} is not linear in {role}")
    if _is_zero(ct):
        result = ad.Zero(aval)
    elif (mode, role) not in family.transposes:
        # An offset mode in x or weight: no custom call computes it.
        known = {r: a for r, a in zip(roles, args, strict=True) if r != role}
        kw = dict(deformable=deformable, geometry=geometry)
        result = _reference_transpose(family, mode, role, ct, known, aval, **kw, **params)
    else:
        target, ct_role, shape_param = family.transposes[(mode, role)]
        known = {r: a for r, a in zip(roles, args, strict=True) if r != role}
        ops = {r: known[r] for r in _roles(family, target, deformable) if r in known}
        ops[ct_role] = jnp.asarray(ct)
        if shape_param is not None:
            ops[shape_param] = aval.shape
        kw = dict(deformable=deformable, geometry=geometry, kernel_only=kernel_only)
        result = _with_sharding_of(aval, _bind(family, target, **kw, **ops))
    return [result if i == index else None for i in range(len(roles))]


# --- batching ------------------------------------------------------------------------------
# A vmapped axis of size B is folded into the sample axis: every operand with a sample axis
# becomes (B*N, ...), a shared weight stays (1, ...) when unbatched and becomes one kernel per
# folded sample when batched. grad_weight then returns per-sample kernels, summed back per b.


def _fold(a, bdim, size):
    """(..., with batch dim bdim or not mapped) -> (size, *a.shape_without_batch)."""
    if bdim is None:
        return jnp.broadcast_to(a, (size, *a.shape))
    return jnp.moveaxis(a, bdim, 0)


def _dk_batch(family, mode, args, dims, *, deformable, geometry, **params):
    roles = _roles(family, mode, deformable)
    size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
    named = {r: _fold(a, d, size) for r, a, d in zip(roles, args, dims, strict=True)}
    n = named["rotation"].shape[1]
    out_params = dict(params)
    for role, a in named.items():
        if role != "weight":
            named[role] = a.reshape(size * n, *a.shape[2:])
    weight_batched = "weight" in named and dims[roles.index("weight")] is not None
    if "weight" in named:
        w = named["weight"]  # (B, Nw, Sh, Sw, C)
        if weight_batched or w.shape[1] != 1:
            w = jnp.broadcast_to(w, (size, n, *w.shape[2:])).reshape(size * n, *w.shape[2:])
        else:
            w = w[0]
        named["weight"] = w
    if "image_shape" in params:
        out_params["image_shape"] = (size * n, *params["image_shape"][1:])
    if "weight_shape" in params:
        out_params["weight_shape"] = (size * n, *params["weight_shape"][1:])
    out = _bind(family, mode, deformable=deformable, geometry=geometry, **named, **out_params)
    out = out.reshape(size, -1, *out.shape[1:])
    if "weight_shape" in params and params["weight_shape"][0] == 1:
        out = out.sum(axis=1, keepdims=True)
    return out, 0


for _family in (DK, COLS):
    for _mode, _p in _prims[_family.name].items():
        _p.def_abstract_eval(partial(_out_aval, _family, _mode))
        ad.primitive_jvps[_p] = partial(_dk_jvp, _family, _mode)
        ad.primitive_transposes[_p] = partial(_dk_transpose, _family, _mode)
        batching.primitive_batchers[_p] = partial(_dk_batch, _family, _mode)
    _register_lowerings(
        _prims[_family.name],
        partial(_dk_lowering, _family),
        partial(_dk_reference, _family),
    )


# ===========================================================================================
# nd_linear_sample

ND_ROLES = {
    "forward": ("data", "coord"),
    "grad_data": ("cot", "coord"),
    "jvp_coord": ("data", "coord", "tangent"),
    "grad_coord": ("cot", "data", "coord"),
}
ND_LINEAR = {
    "forward": ("data",),
    "grad_data": ("cot",),
    "jvp_coord": ("data", "tangent"),
    "grad_coord": ("cot", "data"),
}

nd_p = {mode: _new_primitive(f"dk_nd_{mode}") for mode in ND_ROLES}


def nd_bind(mode: str, *, kernel_only=False, **operands):
    params = {k: operands.pop(k) for k in ("data_shape",) if k in operands}
    return nd_p[mode].bind(
        *_cast_to_common_varying([operands[r] for r in ND_ROLES[mode]]),
        kernel_only=kernel_only,
        **params,
    )


def _nd_out_aval(mode, *args, kernel_only, data_shape=None):
    a = dict(zip(ND_ROLES[mode], args, strict=True))
    coord = a["coord"]
    if mode == "forward" or mode == "jvp_coord":
        shape = (*coord.shape[:2], a["data"].shape[-1])
    elif mode == "grad_data":
        shape = tuple(data_shape)
    else:
        shape = coord.shape
    return _result_aval(shape, coord.dtype, args)


def _nd_lowering(mode, ctx, *args, **_):
    n = ctx.avals_in[ND_ROLES[mode].index("coord")].shape[0]
    return _batch_partitioned_call(
        ctx, f"dk_nd_{mode}{_ffi.target_suffix()}", args, n, shares=False
    )


def _nd_reference_mode(mode, named, data_shape=None, **_):
    """`mode` computed on the reference (batched over Nb) from operands by role."""

    def op(data, coord):  # data (1, *S, C) is one table shared by every sample's coordinates
        if data.shape[0] == 1 and coord.shape[0] != 1:
            return jax.vmap(reference.nd_linear_sample, in_axes=(None, 0))(data[0], coord)
        return jax.vmap(reference.nd_linear_sample)(data, coord)

    coord = named["coord"]
    if mode == "forward":
        return op(named["data"], coord)
    if mode == "jvp_coord":
        return jax.jvp(lambda c: op(named["data"], c), (coord,), (named["tangent"],))[1]
    if mode == "grad_coord":
        _, pullback = jax.vjp(lambda c: op(named["data"], c), coord)
    else:  # grad_data: linear in data, so the pullback at zero data is exact
        _, pullback = jax.vjp(lambda d: op(d, coord), jnp.zeros(data_shape, coord.dtype))
    return pullback(named["cot"])[0]


def _nd_jvp(mode, primals, tangents, **params):
    named = dict(zip(ND_ROLES[mode], primals, strict=True))
    kernel_only = params["kernel_only"]
    out = nd_p[mode].bind(*primals, **params)
    terms = []
    for role, t in zip(ND_ROLES[mode], tangents, strict=True):
        if _is_zero(t):
            continue
        if role in ND_LINEAR[mode]:
            terms.append(nd_bind(mode, **dict(named, **{role: t}), **params))
        elif mode == "forward" and role == "coord":
            terms.append(nd_bind("jvp_coord", **named, tangent=t, kernel_only=kernel_only))
        else:
            # jvp_coord / grad_coord / grad_data in coord: second derivatives, on the reference.
            def f(c):
                return _nd_reference_mode(mode, dict(named, coord=c), **params)

            terms.append(jax.jvp(f, (named["coord"],), (t,))[1])
    return out, _sum_tangents(out, terms)


def _nd_transpose(mode, ct, *args, **params):
    roles = ND_ROLES[mode]
    undefined = [r for r, a in zip(roles, args, strict=True) if ad.is_undefined_primal(a)]
    if len(undefined) != 1:
        raise TypeError(f"dk_jax: dk_nd_{mode} is linear in one operand at a time")
    role = undefined[0]
    index = roles.index(role)
    aval = args[index].aval
    g = {r: a for r, a in zip(roles, args, strict=True) if r != role}
    kw = dict(kernel_only=params["kernel_only"])
    if _is_zero(ct):
        result = ad.Zero(aval)
    elif (mode, role) == ("forward", "data"):
        result = nd_bind("grad_data", cot=ct, coord=g["coord"], data_shape=aval.shape, **kw)
    elif (mode, role) == ("grad_data", "cot"):
        result = nd_bind("forward", data=ct, coord=g["coord"], **kw)
    elif (mode, role) == ("jvp_coord", "tangent"):
        result = nd_bind("grad_coord", cot=ct, data=g["data"], coord=g["coord"], **kw)
    elif (mode, role) == ("grad_coord", "cot"):
        result = nd_bind("jvp_coord", data=g["data"], coord=g["coord"], tangent=ct, **kw)
    elif role in ND_LINEAR[mode]:
        # jvp_coord / grad_coord in data: no custom call computes it; on the reference.
        def f(v):
            return _nd_reference_mode(mode, dict(g, **{role: v}), **params)

        _, pullback = jax.vjp(f, jnp.zeros(aval.shape, aval.dtype))
        result = pullback(ct)[0]
    else:
        raise TypeError(f"dk_jax: dk_nd_{mode} is not linear in {role}")
    if not _is_zero(ct):
        result = _with_sharding_of(aval, result)
    return [result if i == index else None for i in range(len(roles))]


def _nd_batch(mode, args, dims, **params):
    roles = ND_ROLES[mode]
    size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
    # An unbatched table of one (Nb = 1) stays shared: the lowering hands it to every sample.
    shared = {
        r: a
        for r, a, d in zip(roles, args, dims, strict=True)
        if r == "data" and d is None and a.shape[0] == 1
    }
    named = {
        r: _fold(a, d, size) for r, a, d in zip(roles, args, dims, strict=True) if r not in shared
    }
    nb = named["coord"].shape[1]
    named = {r: a.reshape(size * nb, *a.shape[2:]) for r, a in named.items()}
    named.update(shared)
    out_params = dict(params)
    if mode == "grad_data":
        out_params["data_shape"] = (size * nb, *params["data_shape"][1:])
    out = nd_bind(mode, **named, **out_params)
    return out.reshape(size, nb, *out.shape[1:]), 0


for _mode, _p in nd_p.items():
    _p.def_abstract_eval(partial(_nd_out_aval, _mode))
    ad.primitive_jvps[_p] = partial(_nd_jvp, _mode)
    ad.primitive_transposes[_p] = partial(_nd_transpose, _mode)
    batching.primitive_batchers[_p] = partial(_nd_batch, _mode)


def _nd_reference(mode, *args, **params):
    """A mode on the reference, operands in the primitive's order (the fallback lowering)."""
    return _nd_reference_mode(mode, dict(zip(ND_ROLES[mode], args, strict=True)), **params)


_register_lowerings(nd_p, _nd_lowering, _nd_reference)
