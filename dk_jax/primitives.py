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

nd_linear_sample: data (Nb, *S, C), coord (Nb, M, D).

    nd_forward     (data, coord)            -> out      (Nb, M, C)
    nd_grad_data   (cot, coord)             -> gdata    (Nb, *S, C)
    nd_jvp_coord   (data, coord, tangent)   -> dout
    nd_grad_coord  (cot, data, coord)       -> gcoord   (Nb, M, D)
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir, xla

from dk_jax import _ffi

ROLES = ("cot", "x", "offset", "rotation", "weight", "tangent")

# Which roles each depthwise-family primitive takes (offset only when deformable).
DK_ROLES = {
    "forward": ("x", "offset", "rotation", "weight"),
    "grad_image": ("cot", "offset", "rotation", "weight"),
    "grad_weight": ("cot", "x", "offset", "rotation"),
    "jvp_rotation": ("x", "offset", "rotation", "weight", "tangent"),
    "grad_rotation": ("cot", "x", "offset", "rotation", "weight"),
    "jvp_offset": ("x", "offset", "rotation", "weight", "tangent"),
    "grad_offset": ("cot", "x", "offset", "rotation", "weight"),
}


def _roles(mode: str, deformable: bool) -> tuple[str, ...]:
    return tuple(r for r in DK_ROLES[mode] if deformable or r != "offset")


def _target(mode: str, deformable: bool) -> str:
    return f"dk_{'deform' if deformable else 'sample'}_{mode}"


def _new_primitive(name: str) -> Primitive:
    p = Primitive(name)
    p.def_impl(partial(xla.apply_primitive, p))
    return p


dk_p = {mode: _new_primitive(f"dk_{mode}") for mode in DK_ROLES}


def bind(mode: str, *, deformable: bool, geometry: tuple[int, ...], **operands):
    """Binds a depthwise-family primitive with operands given by role name."""
    params = {k: operands.pop(k) for k in ("image_shape", "weight_shape") if k in operands}
    args = [operands[r] for r in _roles(mode, deformable)]
    return dk_p[mode].bind(*args, deformable=deformable, geometry=tuple(geometry), **params)


def _named(mode, deformable, args):
    return dict(zip(_roles(mode, deformable), args, strict=True))


# --- abstract evaluation -------------------------------------------------------------------


def _out_aval(mode, args, deformable, geometry, image_shape=None, weight_shape=None):
    a = _named(mode, deformable, args)
    rot = a["rotation"]
    n, ho, wo = rot.shape[:3]
    dtype = rot.dtype
    if mode in ("forward", "jvp_rotation", "jvp_offset"):
        c = a["weight"].shape[-1]
        shape = (n, ho, wo, c)
    elif mode == "grad_image":
        shape = tuple(image_shape)
    elif mode == "grad_weight":
        shape = tuple(weight_shape)
    elif mode == "grad_rotation":
        shape = rot.shape
    else:  # grad_offset
        shape = a["offset"].shape
    return jax.core.ShapedArray(shape, dtype)


for _mode, _p in dk_p.items():
    _p.def_abstract_eval(partial(lambda m, *args, **params: _out_aval(m, args, **params), _mode))


# --- lowering ------------------------------------------------------------------------------


def _dk_lowering(mode, ctx, *args, deformable, geometry, **_):
    rule = jax.ffi.ffi_lowering(_target(mode, deformable))
    return rule(ctx, *args, geometry=np.asarray(geometry, dtype=np.int64))


def _register_lowerings(prims, lowering):
    for platform in _ffi.lowering_platforms():
        for mode, p in prims.items():
            mlir.register_lowering(p, partial(lowering, mode), platform=platform)


_register_lowerings(dk_p, _dk_lowering)


# --- JVP -----------------------------------------------------------------------------------
# Each primitive is multilinear in some roles (the JVP in such a role is the same primitive
# with the tangent in its place); forward is nonlinear in rotation and offset, which have their
# own JVP primitives. Other second-order terms (e.g. the Hessian in rotation) are not provided.

DK_LINEAR = {
    "forward": ("x", "weight"),
    "grad_image": ("cot", "weight"),
    "grad_weight": ("cot", "x"),
    "jvp_rotation": ("x", "weight", "tangent"),
    "grad_rotation": ("cot", "x", "weight"),
    "jvp_offset": ("x", "weight", "tangent"),
    "grad_offset": ("cot", "x", "weight"),
}


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


def _dk_jvp(mode, primals, tangents, *, deformable, geometry, **params):
    p = dk_p[mode]
    named = _named(mode, deformable, primals)
    dnamed = _named(mode, deformable, tangents)
    out = p.bind(*primals, deformable=deformable, geometry=geometry, **params)
    terms = []
    for role, t in dnamed.items():
        if _is_zero(t):
            continue
        if role in DK_LINEAR[mode]:
            ops = dict(named, **{role: t})
            terms.append(bind(mode, deformable=deformable, geometry=geometry, **ops, **params))
        elif mode == "forward" and role == "rotation":
            terms.append(
                bind("jvp_rotation", deformable=deformable, geometry=geometry, **named, tangent=t)
            )
        elif mode == "forward" and role == "offset":
            terms.append(
                bind("jvp_offset", deformable=deformable, geometry=geometry, **named, tangent=t)
            )
        else:
            raise NotImplementedError(
                f"dk_jax: the derivative of dk_{mode} with respect to {role} is not implemented "
                "(second derivatives in rotation/offset)"
            )
    return out, _sum_tangents(out, terms)


for _mode, _p in dk_p.items():
    ad.primitive_jvps[_p] = partial(_dk_jvp, _mode)


# --- transpose -----------------------------------------------------------------------------
# (mode, linear role) -> (primitive computing the cotangent of that role, how its operands are
# formed from the known operands and the output cotangent `ct`).


def _transpose_rule(mode, role, named, ct, deformable, geometry, aval):
    kw = dict(deformable=deformable, geometry=geometry)
    g = {k: v for k, v in named.items() if k != role}
    if mode == "forward" and role == "x":
        return bind(
            "grad_image",
            **kw,
            cot=ct,
            **_pick(g, "offset", "rotation", "weight"),
            image_shape=aval.shape,
        )
    if mode == "forward" and role == "weight":
        return bind(
            "grad_weight",
            **kw,
            cot=ct,
            **_pick(g, "x", "offset", "rotation"),
            weight_shape=aval.shape,
        )
    if mode == "grad_image" and role == "cot":
        return bind("forward", **kw, x=ct, **_pick(g, "offset", "rotation", "weight"))
    if mode == "grad_image" and role == "weight":
        return bind(
            "grad_weight",
            **kw,
            x=ct,
            **_pick(g, "cot", "offset", "rotation"),
            weight_shape=aval.shape,
        )
    if mode == "grad_weight" and role == "cot":
        return bind("forward", **kw, weight=ct, **_pick(g, "x", "offset", "rotation"))
    if mode == "grad_weight" and role == "x":
        return bind(
            "grad_image",
            **kw,
            weight=ct,
            **_pick(g, "cot", "offset", "rotation"),
            image_shape=aval.shape,
        )
    if mode == "jvp_rotation" and role == "tangent":
        return bind("grad_rotation", **kw, cot=ct, **_pick(g, "x", "offset", "rotation", "weight"))
    if mode == "grad_rotation" and role == "cot":
        return bind(
            "jvp_rotation", **kw, tangent=ct, **_pick(g, "x", "offset", "rotation", "weight")
        )
    if mode == "jvp_offset" and role == "tangent":
        return bind("grad_offset", **kw, cot=ct, **_pick(g, "x", "offset", "rotation", "weight"))
    if mode == "grad_offset" and role == "cot":
        return bind("jvp_offset", **kw, tangent=ct, **_pick(g, "x", "offset", "rotation", "weight"))
    raise NotImplementedError(f"dk_jax: dk_{mode} cannot be transposed in {role}")


def _pick(d, *keys):
    return {k: d[k] for k in keys if k in d}


def _dk_transpose(mode, ct, *args, deformable, geometry, **params):
    roles = _roles(mode, deformable)
    undefined = [r for r, a in zip(roles, args, strict=True) if ad.is_undefined_primal(a)]
    if len(undefined) != 1:
        raise NotImplementedError(f"dk_jax: dk_{mode} is transposable in one operand at a time")
    role = undefined[0]
    index = roles.index(role)
    aval = args[index].aval
    if _is_zero(ct):
        result = ad.Zero(aval)
    else:
        named = dict(zip(roles, args, strict=True))
        ct = jnp.asarray(ct)
        result = _transpose_rule(mode, role, named, ct, deformable, geometry, aval)
    return [result if i == index else None for i in range(len(roles))]


for _mode, _p in dk_p.items():
    ad.primitive_transposes[_p] = partial(_dk_transpose, _mode)


# --- batching ------------------------------------------------------------------------------
# A vmapped axis of size B is folded into the sample axis: every operand with a sample axis
# becomes (B*N, ...), a shared weight stays (1, ...) when unbatched and becomes one kernel per
# folded sample when batched. grad_weight then returns per-sample kernels, summed back per b.


def _fold(a, bdim, size):
    """(..., with batch dim bdim or not mapped) -> (size, *a.shape_without_batch)."""
    if bdim is None:
        return jnp.broadcast_to(a, (size, *a.shape))
    return jnp.moveaxis(a, bdim, 0)


def _dk_batch(mode, args, dims, *, deformable, geometry, **params):
    roles = _roles(mode, deformable)
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
    out = bind(mode, deformable=deformable, geometry=geometry, **named, **out_params)
    out = out.reshape(size, -1, *out.shape[1:])
    if mode == "grad_weight" and params["weight_shape"][0] == 1:
        out = out.sum(axis=1, keepdims=True)
    return out, 0


for _mode, _p in dk_p.items():
    batching.primitive_batchers[_p] = partial(_dk_batch, _mode)


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
    return nd_p[mode].bind(*[operands[r] for r in ND_ROLES[mode]], **params)


def _nd_out_aval(mode, *args, data_shape=None):
    a = dict(zip(ND_ROLES[mode], args, strict=True))
    coord = a["coord"]
    if mode == "forward" or mode == "jvp_coord":
        shape = (*coord.shape[:2], a["data"].shape[-1])
    elif mode == "grad_data":
        shape = tuple(data_shape)
    else:
        shape = coord.shape
    return jax.core.ShapedArray(shape, coord.dtype)


def _nd_lowering(mode, ctx, *args, **_):
    return jax.ffi.ffi_lowering(f"dk_nd_{mode}")(ctx, *args)


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
    return [result if i == index else None for i in range(len(roles))]


def _nd_batch(mode, args, dims, **params):
    roles = ND_ROLES[mode]
    size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
    named = {r: _fold(a, d, size) for r, a, d in zip(roles, args, dims, strict=True)}
    nb = named["coord"].shape[1]
    named = {r: a.reshape(size * nb, *a.shape[2:]) for r, a in named.items()}
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
