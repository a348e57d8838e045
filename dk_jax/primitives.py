"""JAX primitives backed by the XLA FFI handlers, with their JVP, transpose and batching rules.

Depthwise family (`sample_depthwise`, `deform_sample_depthwise`). Every primitive takes its
operands in the fixed order (cot, x, offset, rotation, weight, tangent), each one only where it
applies, and the static params `deformable` (whether `offset` is present) and `geometry` =
(kh, kw, sh, sw, ph, pw, dh, dw, groups). `weight` is (Nw, Sh, Sw, C) with Nw = 1 (shared) or
Nw = N (one kernel per sample); batching folds any vmapped axis into N that way.

    forward        (x, [offset], rotation, weight)            -> y          (N, Ho, Wo, C)
    grad_image     (cot, [offset], rotation, weight)          -> gx         (N, H, W, C)
    grad_weight    (cot, x, [offset], rotation)               -> gw         (Nw, Sh, Sw, C)
    jvp_rotation   (x, [offset], rotation, weight, tangent)   -> dy
    grad_rotation  (cot, x, [offset], rotation, weight)       -> grotation
    jvp_offset     (x, offset, rotation, weight, tangent)     -> dy
    grad_offset    (cot, x, offset, rotation, weight)         -> goffset

y is linear in x and in weight, so forward transposes to grad_image / grad_weight; the JVP in
rotation (offset) is its own primitive, linear in the tangent, transposing to grad_rotation
(grad_offset) and back. All of them lower to custom calls, so reverse mode never falls back to
jax.numpy.

Scope-space im2col (`scope_im2col`, `deform_scope_im2col`): the same operand order without
weight; geometry ends with the scope (Sh, Sw); columns are (N, Ho, Wo, Sh, Sw, C).

    cols forward       (x, [offset], rotation)            -> cols
    cols grad_image    (cot, [offset], rotation)          -> gx
    cols jvp_rotation  (x, [offset], rotation, tangent)   -> dcols
    cols grad_rotation (cot, x, [offset], rotation)       -> grotation
    cols jvp_offset    (x, offset, rotation, tangent)     -> dcols
    cols grad_offset   (cot, x, offset, rotation)         -> goffset

nd_linear_sample: data (Nb, *S, C), coord (Nb, M, D).

    nd_forward     (data, coord)            -> out      (Nb, M, C)
    nd_grad_data   (cot, coord)             -> gdata    (Nb, *S, C)
    nd_jvp_coord   (data, coord, tangent)   -> dout
    nd_grad_coord  (cot, data, coord)       -> gcoord   (Nb, M, D)

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

from dk_jax import _ffi

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
        kind = "deform" if deformable else "sample"
        return f"dk_{kind}_{mode}" if self.name == "dk" else f"dk_{kind}_{self.name}_{mode}"


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
    },
    linear={
        "forward": ("x", "weight"),
        "grad_image": ("cot", "weight"),
        "grad_weight": ("cot", "x"),
        "jvp_rotation": ("x", "weight", "tangent"),
        "grad_rotation": ("cot", "x", "weight"),
        "jvp_offset": ("x", "weight", "tangent"),
        "grad_offset": ("cot", "x", "weight"),
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
    },
    linear={
        "forward": ("x",),
        "grad_image": ("cot",),
        "jvp_rotation": ("x", "tangent"),
        "grad_rotation": ("cot", "x"),
        "jvp_offset": ("x", "tangent"),
        "grad_offset": ("cot", "x"),
    },
    transposes={
        ("forward", "x"): ("grad_image", "cot", "image_shape"),
        ("grad_image", "cot"): ("forward", "x", None),
        ("jvp_rotation", "tangent"): ("grad_rotation", "cot", None),
        ("grad_rotation", "cot"): ("jvp_rotation", "tangent", None),
        ("jvp_offset", "tangent"): ("grad_offset", "cot", None),
        ("grad_offset", "cot"): ("jvp_offset", "tangent", None),
    },
)

# Forward is nonlinear in rotation and offset: its JVP there is a primitive of its own.
_JVP_MODES = {"rotation": "jvp_rotation", "offset": "jvp_offset"}


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


def _bind(family: _Family, mode: str, *, deformable: bool, geometry, **operands):
    params = {k: operands.pop(k) for k in ("image_shape", "weight_shape") if k in operands}
    args = _cast_to_common_varying([operands[r] for r in _roles(family, mode, deformable)])
    return _prims[family.name][mode].bind(
        *args, deformable=deformable, geometry=tuple(geometry), **params
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


def _out_aval(family, mode, *args, deformable, geometry, image_shape=None, weight_shape=None):
    a = dict(zip(_roles(family, mode, deformable), args, strict=True))
    rot = a["rotation"]
    n, ho, wo = rot.shape[:3]
    if mode in ("forward", "jvp_rotation", "jvp_offset"):
        if family is DK:
            shape = (n, ho, wo, a["weight"].shape[-1])
        else:
            shape = (n, ho, wo, geometry[9], geometry[10], a["x"].shape[-1])
    elif mode == "grad_image":
        shape = tuple(image_shape)
    elif mode == "grad_weight":
        shape = tuple(weight_shape)
    elif mode == "grad_rotation":
        shape = rot.shape
    else:  # grad_offset
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
    with leading axis 1 (its gradient) is computed per sample and summed in float32; the call
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
            lambda g: jnp.sum(g, axis=0, keepdims=True, dtype=jnp.float32).astype(g.dtype),
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


def _register_lowerings(prims, lowering):
    for platform in _ffi.lowering_platforms():
        for mode, p in prims.items():
            mlir.register_lowering(p, partial(lowering, mode), platform=platform)


# --- JVP -----------------------------------------------------------------------------------
# Each primitive is multilinear in some roles (the JVP in such a role is the same primitive
# with the tangent in its place); forward is nonlinear in rotation and offset, which have their
# own JVP primitives. Other second-order terms (e.g. the Hessian in rotation) are not provided.


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


def _dk_jvp(family, mode, primals, tangents, *, deformable, geometry, **params):
    roles = _roles(family, mode, deformable)
    named = dict(zip(roles, primals, strict=True))
    out = _prims[family.name][mode].bind(
        *primals, deformable=deformable, geometry=geometry, **params
    )
    kw = dict(deformable=deformable, geometry=geometry)
    terms = []
    for role, t in zip(roles, tangents, strict=True):
        if _is_zero(t):
            continue
        if role in family.linear[mode]:
            terms.append(_bind(family, mode, **kw, **dict(named, **{role: t}), **params))
        elif mode == "forward" and role in _JVP_MODES:
            terms.append(_bind(family, _JVP_MODES[role], **kw, **named, tangent=t))
        else:
            raise NotImplementedError(
                f"dk_jax: the derivative of {family.name}_{mode} with respect to {role} is not "
                "implemented (second derivatives in rotation/offset)"
            )
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


def _dk_transpose(family, mode, ct, *args, deformable, geometry, **params):
    roles = _roles(family, mode, deformable)
    undefined = [r for r, a in zip(roles, args, strict=True) if ad.is_undefined_primal(a)]
    if len(undefined) != 1:
        raise NotImplementedError(
            f"dk_jax: {family.name}_{mode} is transposable in one operand at a time"
        )
    role = undefined[0]
    index = roles.index(role)
    aval = args[index].aval
    if (mode, role) not in family.transposes:
        raise NotImplementedError(f"dk_jax: {family.name}_{mode} cannot be transposed in {role}")
    if _is_zero(ct):
        result = ad.Zero(aval)
    else:
        target, ct_role, shape_param = family.transposes[(mode, role)]
        known = {r: a for r, a in zip(roles, args, strict=True) if r != role}
        ops = {r: known[r] for r in _roles(family, target, deformable) if r in known}
        ops[ct_role] = jnp.asarray(ct)
        if shape_param is not None:
            ops[shape_param] = aval.shape
        result = _with_sharding_of(
            aval, _bind(family, target, deformable=deformable, geometry=geometry, **ops)
        )
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
    if mode == "grad_image":
        out_params["image_shape"] = (size * n, *params["image_shape"][1:])
    if mode == "grad_weight":
        out_params["weight_shape"] = (size * n, *params["weight_shape"][1:])
    out = _bind(family, mode, deformable=deformable, geometry=geometry, **named, **out_params)
    out = out.reshape(size, -1, *out.shape[1:])
    if mode == "grad_weight" and params["weight_shape"][0] == 1:
        out = out.sum(axis=1, keepdims=True)
    return out, 0


for _family in (DK, COLS):
    for _mode, _p in _prims[_family.name].items():
        _p.def_abstract_eval(partial(_out_aval, _family, _mode))
        ad.primitive_jvps[_p] = partial(_dk_jvp, _family, _mode)
        ad.primitive_transposes[_p] = partial(_dk_transpose, _family, _mode)
        batching.primitive_batchers[_p] = partial(_dk_batch, _family, _mode)
    _register_lowerings(_prims[_family.name], partial(_dk_lowering, _family))


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


def nd_bind(mode: str, **operands):
    params = {k: operands.pop(k) for k in ("data_shape",) if k in operands}
    return nd_p[mode].bind(
        *_cast_to_common_varying([operands[r] for r in ND_ROLES[mode]]), **params
    )


def _nd_out_aval(mode, *args, data_shape=None):
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
    return _batch_partitioned_call(ctx, f"dk_nd_{mode}", args, n, shares=False)


def _nd_jvp(mode, primals, tangents, **params):
    named = dict(zip(ND_ROLES[mode], primals, strict=True))
    out = nd_p[mode].bind(*primals, **params)
    terms = []
    for role, t in zip(ND_ROLES[mode], tangents, strict=True):
        if _is_zero(t):
            continue
        if role in ND_LINEAR[mode]:
            terms.append(nd_bind(mode, **dict(named, **{role: t}), **params))
        elif mode == "forward" and role == "coord":
            terms.append(nd_bind("jvp_coord", **named, tangent=t))
        else:
            raise NotImplementedError(
                f"dk_jax: the derivative of dk_nd_{mode} with respect to {role} is not implemented"
            )
    return out, _sum_tangents(out, terms)


def _nd_transpose(mode, ct, *args, **params):
    roles = ND_ROLES[mode]
    undefined = [r for r, a in zip(roles, args, strict=True) if ad.is_undefined_primal(a)]
    if len(undefined) != 1:
        raise NotImplementedError(f"dk_jax: dk_nd_{mode} is transposable in one operand at a time")
    role = undefined[0]
    index = roles.index(role)
    aval = args[index].aval
    g = {r: a for r, a in zip(roles, args, strict=True) if r != role}
    if _is_zero(ct):
        result = ad.Zero(aval)
    elif (mode, role) == ("forward", "data"):
        result = nd_bind("grad_data", cot=ct, coord=g["coord"], data_shape=aval.shape)
    elif (mode, role) == ("grad_data", "cot"):
        result = nd_bind("forward", data=ct, coord=g["coord"])
    elif (mode, role) == ("jvp_coord", "tangent"):
        result = nd_bind("grad_coord", cot=ct, data=g["data"], coord=g["coord"])
    elif (mode, role) == ("grad_coord", "cot"):
        result = nd_bind("jvp_coord", data=g["data"], coord=g["coord"], tangent=ct)
    else:
        raise NotImplementedError(f"dk_jax: dk_nd_{mode} cannot be transposed in {role}")
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

_register_lowerings(nd_p, _nd_lowering)
