"""Lowering of the primitives, per platform: the custom call where dk_jax has a kernel for the
platform (marked batch-partitionable, so a batch split over devices stays split), and the mode
on the jax.numpy reference on every other platform (the default rule), run one sample at a time
so that it splits along the batch the same way."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.mlir import ir
from jax.extend.mlir.dialects import sdy
from jax.interpreters import mlir
from jax.sharding import PartitionSpec as P

from dk_jax import _ffi
from dk_jax._modes import DK, FAMILIES, Family
from dk_jax._rules import PRIMITIVES, reference_primitive


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


def _sum_samples(g):
    """Per-sample results summed over the leading axis (kept, of size 1) in float32 (float64
    for float64): a shared weight's or table's gradient."""
    total = jnp.sum(g, axis=0, keepdims=True, dtype=jnp.promote_types(g.dtype, jnp.float32))
    return total.astype(g.dtype)


def _with_rows(params, n, rows):
    """The shape params with a leading axis n given `rows` instead (others kept)."""
    return {
        k: (rows if v[0] == n else v[0], *v[1:]) for k, v in params.items() if k.endswith("_shape")
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
        result = _lower_jnp(_sum_samples, ctx, full, out, result)
    return [result]


def _kernel_lowering(family: Family, mode: str, ctx, *args, **params):
    deformable = params.get("deformable", False)  # the nd family has no offset
    batch = ctx.avals_in[family.roles(mode, deformable).index(family.batch)]
    attributes = {}
    if "geometry" in params:  # one int64 attribute per field (dk::Geometry)
        attributes = {k: np.int64(v) for k, v in params["geometry"]._asdict().items()}
    return _batch_partitioned_call(
        ctx,
        family.target(mode, deformable) + _ffi.target_suffix(),
        args,
        batch.shape[0],
        shares=family is DK,  # the depthwise targets take a shared (1, Sh, Sw, C) weight
        **attributes,
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
    n = max(a.shape[0] for a in ctx.avals_in)
    shared = ctx.avals_out[0].shape[0] != n  # a shared weight's or table's gradient
    fun = partial(_per_sample, reference, shared, params)
    mesh, batch_axes = _explicit_batch_axes(ctx.avals_in, n)
    if batch_axes:
        fun = _on_each_device(
            reference, shared, ctx.avals_in, ctx.avals_out[0], mesh, batch_axes, params
        )
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


def _on_each_device(reference, shared, avals_in, aval_out, mesh, batch_axes, params):
    """`_per_sample(reference, shared)` run on each device's samples of a batch split over
    Explicit mesh axes (shard_map, manual over those axes), as the batch-partitioned custom call
    is; a shared result (a weight's gradient) is summed over them. Any other split of an operand
    (a sharded weight, a spatial axis) is gathered first."""
    n = max(a.shape[0] for a in avals_in)
    devices = int(np.prod([mesh.shape[a] for a in batch_axes]))
    local = dict(params, **_with_rows(params, n, n // devices))
    split = P(batch_axes)
    specs = tuple(split if a.shape[0] == n else P() for a in avals_in)

    def body(*operands):
        out = _per_sample(reference, shared, local, *operands)
        return jax.lax.psum(out, batch_axes) if shared else out

    # No derivative is taken through this shard_map: it is the lowering of one mode, whose
    # derivatives are other primitives (checked exact under shard_map(check_vma=True) in
    # tests/test_sharding.py); the reference's own constants are not typed as varying.
    per_device = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=specs,
        out_specs=P() if shared else split,
        axis_names=set(batch_axes),
        check_vma=False,
    )

    def run(*operands):
        operands = [jax.sharding.reshard(o, s) for o, s in zip(operands, specs, strict=True)]
        return jax.sharding.reshard(per_device(*operands), aval_out.sharding.spec)

    return run


def _per_sample(reference, shared, params, *args):
    """reference(*args, **params) computed one sample at a time (vmapped over the leading axis
    n, shared operands of leading axis 1 unmapped), as the kernels are: its gathers then carry
    the batch as a batching dimension, so XLA splits them along a sharded batch instead of
    gathering the operands. A `shared` result (leading axis 1: a weight's or table's gradient)
    is the per-sample results' sum."""
    n = max(a.shape[0] for a in args)
    if n == 1:
        return reference(*args, **params)
    one = dict(params, **_with_rows(params, n, 1))

    def sample(*operands):
        return reference(*operands, **one)[0]

    mapped = [a.shape[0] == n for a in args]
    out = jax.vmap(sample, in_axes=[0 if m else None for m in mapped])(
        *[a[:, None] if m else a for a, m in zip(args, mapped, strict=True)]
    )
    return _sum_samples(out) if shared else out


_REFERENCE_LOWERINGS: dict = {}  # primitive -> its reference lowering rule


def _register(family: Family) -> None:
    """Each primitive lowers to its custom call on every platform with a kernel library, and to
    its jax.numpy reference on every other platform (the default rule): a program exported for
    several platforms holds one branch per platform."""
    for mode, p in PRIMITIVES[family.name].items():
        reference = partial(reference_primitive, family, mode)
        _REFERENCE_LOWERINGS[p] = partial(_reference_lowering, p.name, reference)
        mlir.register_lowering(p, _REFERENCE_LOWERINGS[p])
        for platform in _ffi.lowering_platforms():
            mlir.register_lowering(p, partial(_kernel_lowering, family, mode), platform=platform)


def lower_to_reference_on(platform: str) -> None:
    """Makes `platform` lower every primitive as a platform without a kernel does (for tests:
    the branch TPU gets, run on CPU). For the rest of the process."""
    for p, rule in _REFERENCE_LOWERINGS.items():
        mlir.register_lowering(p, rule, platform=platform)


for _family in FAMILIES:
    _register(_family)
