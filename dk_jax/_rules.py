"""The primitives' rules, one set for every family (dk_jax/_modes.py declares what they read):
binding, abstract evaluation, JVP, transpose, batching, and each mode on the jax.numpy
reference (for the derivatives no kernel computes, and for lowering where no kernel exists).

Every primitive takes its operands in its family's fixed order and static params: `kernel_only`
(implementation="ffi"), for the depthwise and columns families `deformable` and `geometry` (a
`_modes.Geometry`),
and, where no operand has the output's shape, `image_shape`, `weight_shape` or `data_shape`.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, xla
from jax.sharding import ManualAxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from dk_jax import reference
from dk_jax._modes import COLS, DK, FAMILIES, Family


def _new_primitive(name: str) -> Primitive:
    p = Primitive(name)
    p.def_impl(partial(xla.apply_primitive, p))
    return p


PRIMITIVES = {f.name: {m: _new_primitive(f.primitive_name(m)) for m in f.modes} for f in FAMILIES}


def _shapes(params: dict) -> dict:
    return {k: v for k, v in params.items() if k.endswith("_shape")}


def _static(params: dict) -> dict:
    return {k: v for k, v in params.items() if not k.endswith("_shape")}


def _roles(family: Family, mode: str, params: dict) -> tuple:
    return family.roles(mode, params.get("deformable", True))


# --- binding -------------------------------------------------------------------------------


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


def bind(family: Family, mode: str, static: dict, **operands):
    """Binds `mode` with operands by role name; shape params may come among them."""
    params = dict(static, **{k: operands.pop(k) for k in list(operands) if k.endswith("_shape")})
    args = _cast_to_common_varying([operands[r] for r in _roles(family, mode, params)])
    return PRIMITIVES[family.name][mode].bind(*args, **params)


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


def _out_aval(family: Family, mode: str, *args, **params):
    a = dict(zip(_roles(family, mode, params), args, strict=True))
    pos = a[family.batch]
    output = family.output(mode)
    if output == "y":
        if family is DK:
            shape = (*pos.shape[:3], a["weight"].shape[-1])
        elif family is COLS:
            g = params["geometry"]
            shape = (*pos.shape[:3], g.scope_h, g.scope_w, a["x"].shape[-1])
        else:
            shape = (*pos.shape[:2], a["data"].shape[-1])
    elif output == "cross":
        shape = (*pos.shape[:3], pos.shape[3] // 2)
    elif output in a:  # a position: its gradient has its shape
        shape = a[output].shape
    else:
        shape = tuple(params[family.shape_param(output)])
    batched = output != family.shared or shape[0] == pos.shape[0]
    return _result_aval(shape, pos.dtype, args, batched)


# --- reference versions of the modes -------------------------------------------------------
# The higher-order terms no custom call computes are these functions' derivatives and
# transposes, taken by JAX.


def _reference_op(family: Family, named: dict, static: dict):
    """The forward on the jax.numpy reference, operands by role, batched as the primitives
    are: a weight or table of leading axis 1 is shared by the batch."""
    if family.name == "nd":
        data, coord = named["data"], named["coord"]
        if data.shape[0] == 1 and coord.shape[0] != 1:
            return jax.vmap(reference.nd_linear_sample, in_axes=(None, 0))(data[0], coord)
        return jax.vmap(reference.nd_linear_sample)(data, coord)
    geometry, deformable = static["geometry"], static["deformable"]
    geo = geometry.kwargs()
    x, rotation = named["x"], named["rotation"]
    offsets = (named["offset"],) if deformable else ()
    if family is COLS:
        op = reference.deform_scope_im2col if deformable else reference.scope_im2col
        return op(x, *offsets, rotation, scope_size=(geometry.scope_h, geometry.scope_w), **geo)
    op = reference.deform_sample_depthwise if deformable else reference.sample_depthwise
    weight = named["weight"]
    if weight.shape[0] == 1:
        return op(x, *offsets, rotation, weight[0], **geo)

    def one_sample(*args):  # per-sample kernels: the reference takes one shared kernel
        *per_n, w = args
        return op(*(a[None] for a in per_n), w, **geo)[0]

    return jax.vmap(one_sample)(x, *offsets, rotation, weight)


def reference_mode(family: Family, mode: str, params: dict, named: dict):
    """`mode` computed on the reference from operands by role (`named`)."""
    how = family.as_derivative(mode)
    if how is None:
        return _reference_op(family, named, _static(params))
    how, role, of, shape_param = how

    def inner(v, **more):
        return reference_mode(family, of, params, dict(named, **more, **{role: v}))

    pos = named[family.batch]
    if how == "jvp":
        return jax.jvp(inner, (named[role],), (named["tangent"],))[1]
    if how == "cross":
        # The cross tangent c is that of t = (c, 0) with s = (0, 1) in every group and tap.
        c = named["tangent"]
        t = jnp.stack([c, jnp.zeros_like(c)], axis=-1).reshape(pos.shape)
        s = jnp.stack([jnp.zeros_like(c), jnp.ones_like(c)], axis=-1).reshape(pos.shape)
        return jax.jvp(partial(inner, tangent=t), (pos,), (s,))[1]
    # Linear in the linear operands and the tangent: the pullback at a zero primal is exact.
    if shape_param is None:
        primal = named[role]
    elif shape_param == "cross":
        primal = jnp.zeros((*pos.shape[:3], pos.shape[3] // 2), pos.dtype)
    else:
        primal = jnp.zeros(params[shape_param], pos.dtype)
    _, pullback = jax.vjp(inner, primal)
    return pullback(named["cot"])[0]


def reference_primitive(family: Family, mode: str, *args, **params):
    """A mode on the reference, operands in the primitive's order (the fallback lowering)."""
    return reference_mode(
        family, mode, params, dict(zip(_roles(family, mode, params), args, strict=True))
    )


def _reference_jvp(family, mode, role, named, tangent, params):
    """The derivative of `mode` in `role` along `tangent`, on the reference."""

    def f(v):
        return reference_mode(family, mode, params, dict(named, **{role: v}))

    return jax.jvp(f, (named[role],), (tangent,))[1]


def _reference_transpose(family, mode, role, ct, known, aval, params):
    """The transpose of `mode` in its linear role `role`, on the reference."""

    def f(v):
        return reference_mode(family, mode, params, dict(known, **{role: v}))

    _, pullback = jax.vjp(f, jnp.zeros(aval.shape, aval.dtype))
    return pullback(ct)[0]


# --- JVP -----------------------------------------------------------------------------------
# Each primitive is multilinear in its linear roles (the JVP there is the same primitive with
# the tangent in its place); in a position it is the same slot of the form's derivative
# (`Family.derivative`), or on the reference (`_reference_jvp`) where no kernel computes it.


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


def _position_jvp(family, named, s, target, how, params):
    """The derivative of a mode in a position along s, computed by the mode `target`."""
    static = _static(params)
    ops = {r: named[r] for r in _roles(family, target, params) if r in named}
    if how == "tangent":
        ops["tangent"] = s
    elif how == "cross":
        ops["tangent"] = _cross(named["tangent"], s)
    out = bind(family, target, static, **ops, **_shapes(params))
    return _cross_grad(out, s) if how == "cross_grad" else out


def _jvp(family: Family, mode: str, primals, tangents, **params):
    roles = _roles(family, mode, params)
    named = dict(zip(roles, primals, strict=True))
    out = PRIMITIVES[family.name][mode].bind(*primals, **params)
    static, shapes = _static(params), _shapes(params)
    terms = []
    for role, t in zip(roles, tangents, strict=True):
        if _is_zero(t):
            continue
        if role in family.linear(mode):
            terms.append(bind(family, mode, static, **dict(named, **{role: t}), **shapes))
            continue
        derivative = family.derivative(mode, role)
        if derivative == "reference":
            terms.append(_reference_jvp(family, mode, role, named, t, params))
        elif derivative is not None:  # None: a derivative that vanishes
            terms.append(_position_jvp(family, named, t, *derivative, params))
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


def _transpose(family: Family, mode: str, ct, *args, **params):
    name = family.primitive_name(mode)
    roles = _roles(family, mode, params)
    undefined = [r for r, a in zip(roles, args, strict=True) if ad.is_undefined_primal(a)]
    if len(undefined) != 1:
        # Multilinear: in two operands at once it is not linear, so it has no transpose.
        raise TypeError(f"dk_jax: {name} is linear in one operand at a time")
    role = undefined[0]
    index = roles.index(role)
    aval = args[index].aval
    if role not in family.linear(mode):
        raise TypeError(f"dk_jax: {name} is not linear in {role}")
    known = {r: a for r, a in zip(roles, args, strict=True) if r != role}
    transpose = family.transpose(mode, role)
    if _is_zero(ct):
        result = ad.Zero(aval)
    elif transpose is None:
        # A position's derivative mode in a linear operand: no custom call computes it.
        result = _reference_transpose(family, mode, role, ct, known, aval, params)
    else:
        target, ct_role, shape_param = transpose
        ops = {r: known[r] for r in _roles(family, target, params) if r in known}
        ops[ct_role] = jnp.asarray(ct)
        if shape_param is not None:
            ops[shape_param] = aval.shape
        result = _with_sharding_of(aval, bind(family, target, _static(params), **ops))
    return [result if i == index else None for i in range(len(roles))]


# --- batching ------------------------------------------------------------------------------
# A vmapped axis of size B is folded into the sample axis: every operand with a sample axis
# becomes (B*N, ...); a shared operand (weight or table) stays (1, ...) when unbatched and
# becomes one per folded sample when batched. Its gradient then returns one per folded
# sample, summed back per b.


def _fold(a, bdim, size):
    """(..., with batch dim bdim or not mapped) -> (size, *a.shape_without_batch)."""
    if bdim is None:
        return jnp.broadcast_to(a, (size, *a.shape))
    return jnp.moveaxis(a, bdim, 0)


def _batch(family: Family, mode: str, args, dims, **params):
    roles = _roles(family, mode, params)
    size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
    shared = family.shared
    named, kept = {}, {}
    for role, a, d in zip(roles, args, dims, strict=True):
        if role == shared and d is None and a.shape[0] == 1:
            kept[role] = a  # an unbatched shared operand stays shared
        else:
            named[role] = _fold(a, d, size)
    n = named[family.batch].shape[1]
    for role, a in named.items():
        if role == shared:  # (B, Nw, ...): one per folded sample
            a = jnp.broadcast_to(a, (size, n, *a.shape[2:]))
        named[role] = a.reshape(size * n, *a.shape[2:])
    named.update(kept)
    shapes = {k: (size * n, *v[1:]) for k, v in _shapes(params).items()}
    out = bind(family, mode, _static(params), **named, **shapes)
    out = out.reshape(size, n, *out.shape[1:])
    shared_shape = family.shape_param(shared) if shared else None
    if shared_shape in params and params[shared_shape][0] == 1:
        out = out.sum(axis=1, keepdims=True)
    return out, 0


for _family in FAMILIES:
    for _mode, _p in PRIMITIVES[_family.name].items():
        _p.def_abstract_eval(partial(_out_aval, _family, _mode))
        ad.primitive_jvps[_p] = partial(_jvp, _family, _mode)
        ad.primitive_transposes[_p] = partial(_transpose, _family, _mode)
        batching.primitive_batchers[_p] = partial(_batch, _family, _mode)
