"""Checks of every op and layer on 4 CPU devices, run by tests/test_sharding.py in a subprocess
(XLA_FLAGS=--xla_force_host_platform_device_count=4) and printed as one JSON line.

For each case: the gradient of every argument (or parameter) of a scalar loss
sum(sin(y) * t) computed (a) under `jax.shard_map(check_vma=True)` with the batch split over
"data", (b) under `jax.jit` with batch-sharded inputs on an Explicit and on an Auto mesh,
against the same gradient on one device; plus, for (b), the all-gathers and the output
sharding of the compiled `jit(value_and_grad)`.
"""

from __future__ import annotations

import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from dk_jax import (
    DeformConv2d,
    DeformKernel2d,
    DeformKernelConv2d,
    GlobalDeformKernel2d,
    LocalDeformKernel2d,
    ops,
)

AXIS = "data"
N, H, W, C = 8, 12, 12, 4
DEVICES = jax.devices()
ONE = DEVICES[0]


def rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


def tree_err(actual, expected) -> float:
    """The largest per-leaf normwise relative error."""
    leaves = zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True)
    return max(rel_err(a, b) for a, b in leaves)


GATHER = re.compile(r"= \w+\[([\d,]*)\]\S* all-gather\(")


def gathered_sizes(hlo: str) -> list[int]:
    """Element counts of the results of every all-gather in compiled HLO text."""
    return [int(np.prod([int(d) for d in m.split(",") if d])) for m in GATHER.findall(hlo)]


def spec_of(a) -> list:
    return [None if s is None else str(s) for s in a.sharding.spec]


def batch_spec(a) -> P:
    """Arrays with the batch axis N first are split over "data"; everything else replicated."""
    return P(AXIS) if a.ndim and a.shape[0] == N else P()


rng = np.random.default_rng(0)


def normal(*shape, scale=1.0):
    return (rng.normal(size=shape) * scale).astype(np.float32)


x = normal(N, H, W, C)
rot = normal(N, H, W, 18, scale=0.6)  # padding 1: Ho = H
off = normal(N, H, W, 18, scale=0.8)
geo = dict(kernel_size=3, padding=1)
OPS = {
    "sample_depthwise": (
        lambda x, r, w: ops.sample_depthwise(x, r, w, **geo),
        (x, rot, normal(4, 4, C)),
    ),
    "deform_sample_depthwise": (
        lambda x, o, r, w: ops.deform_sample_depthwise(x, o, r, w, **geo),
        (x, off, rot, normal(4, 4, C)),
    ),
    "scope_im2col": (
        lambda x, r: ops.scope_im2col(x, r, scope_size=4, **geo),
        (x, rot),
    ),
    "deform_scope_im2col": (
        lambda x, o, r: ops.deform_scope_im2col(x, o, r, scope_size=4, **geo),
        (x, off, rot),
    ),
    "sample_conv": (
        lambda x, r, k: ops.sample_conv(x, r, k, **geo),
        (x, rot, normal(4, 4, C, 6, scale=0.3)),
    ),
    "sample_conv_grouped": (
        lambda x, r, k: ops.sample_conv(x, r, k, feature_group_count=2, **geo),
        (x, rot, normal(4, 4, C // 2, 6, scale=0.3)),
    ),
    "deform_sample_conv": (
        lambda x, o, r, k: ops.deform_sample_conv(x, o, r, k, **geo),
        (x, off, rot, normal(4, 4, C, 6, scale=0.3)),
    ),
    # nd_linear_sample's batch is a vmapped axis: per-sample tables, or one shared table.
    "nd_linear_sample": (
        jax.vmap(ops.nd_linear_sample),
        (normal(N, 6, 7, C), normal(N, 20, 2, scale=3.0) + 2.5),
    ),
    "nd_linear_sample_shared_data": (
        jax.vmap(ops.nd_linear_sample, in_axes=(None, 0)),
        (normal(6, 7, C), normal(N, 20, 2, scale=3.0) + 2.5),
    ),
}


def _params_noise(variables):
    """Moves every parameter off its initial value (zero-initialised offset convs would leave
    the rotation and offset paths untested)."""
    keys = iter(jax.random.split(jax.random.PRNGKey(1), len(jax.tree.leaves(variables))))
    return jax.tree.map(
        lambda p: p + 0.2 * jax.random.normal(next(keys), p.shape, p.dtype), variables
    )


LAYERS = {
    "DeformKernel2d": DeformKernel2d(4, 3),
    "LocalDeformKernel2d_features": LocalDeformKernel2d(4, 3, features=6, feature_group_count=1),
    "DeformKernelConv2d": DeformKernelConv2d(4, 3),
    "GlobalDeformKernel2d": GlobalDeformKernel2d(6, 4, 3),
    "DeformConv2d": DeformConv2d(3),
}


def layer_case(module):
    variables = _params_noise(module.init(jax.random.PRNGKey(0), x[:1]))
    return (lambda v, x: module.apply(v, x)), (variables, x)


def make_loss(fun, args):
    """loss(*args, t) = sum(sin(fun(*args)) * t), with t a fixed random cotangent."""
    out = jax.eval_shape(fun, *args)
    t = normal(*out.shape)

    def loss(*a):
        *a, t_ = a
        y = fun(*a)
        return jnp.sum(jnp.sin(y) * t_), y

    return loss, t


def one_device(loss, args):
    args = jax.device_put(args, ONE)
    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args) - 1)), has_aux=True))(
        *args
    )


def specs_of(args):
    return jax.tree.map(batch_spec, args)


def under_shard_map(loss, args, mesh):
    """The gradient of psum(local loss) with the batch split over "data", check_vma=True."""
    specs = specs_of(args)

    def total(*a):
        body = lambda *b: jax.lax.psum(loss(*b)[0], AXIS)  # noqa: E731
        return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=True)(*a)

    placed = jax.device_put(args, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    return jax.jit(jax.grad(total, argnums=tuple(range(len(args) - 1))))(*placed)


def under_jit(loss, args, mesh):
    """jit(value_and_grad) with batch-sharded inputs: (value, y, grads, hlo)."""
    with jax.set_mesh(mesh):
        placed = jax.device_put(
            args, jax.tree.map(lambda s: NamedSharding(mesh, s), specs_of(args))
        )
        f = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args) - 1)), has_aux=True))
        compiled = f.lower(*placed).compile()
        (value, y), grads = compiled(*placed)
    return value, y, grads, compiled.as_text()


def check(name, fun, args, meshes, activation_size):
    loss, t = make_loss(fun, args)
    args = (*args, t)
    (value1, y1), grads1 = one_device(loss, args)
    out = {}
    try:
        out["shard_map_grad_err"] = tree_err(under_shard_map(loss, args, meshes["auto"]), grads1)
    except Exception as e:  # noqa: BLE001 - reported, and the test fails on it
        out["shard_map_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    for kind in ("explicit", "auto"):
        try:
            value, y, grads, hlo = under_jit(loss, args, meshes[kind])
        except Exception as e:  # noqa: BLE001
            out[f"{kind}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            continue
        sizes = gathered_sizes(hlo)
        out[kind] = {
            "grad_err": tree_err(grads, grads1),
            "value_err": rel_err(value, value1),
            "y_err": rel_err(y, y1),
            "y_spec": spec_of(y),
            "all_gathers": sizes,
            "large_all_gathers": [s for s in sizes if s >= activation_size],
            "all_reduces": len(re.findall(r" all-reduce\(", hlo)),
            "dk_custom_calls": len(re.findall(r'custom_call_target="dk_', hlo)),
        }
    return out


def check_vmap_in_shard_map(mesh):
    """vmap over an inner axis inside shard_map: shared and per-element weights."""
    xs, rs = normal(N, 2, H, W, C), normal(N, 2, H, W, 18, scale=0.6)
    out = {}
    for kind, w, w_axis in (
        ("shared", normal(4, 4, C), None),
        ("per_element", normal(2, 4, 4, C), 0),
    ):

        def fun(x, r, w, w_axis=w_axis):
            inner = lambda x, r, w: ops.sample_depthwise(x, r, w, **geo)  # noqa: E731
            return jax.vmap(inner, in_axes=(1, 1, w_axis), out_axes=1)(x, r, w)

        loss, t = make_loss(fun, (xs, rs, w))
        args = (xs, rs, w, t)
        _, grads1 = one_device(loss, args)
        out[kind] = tree_err(under_shard_map(loss, args, mesh), grads1)
    return out


def check_hvp(mesh):
    """Hessian-vector product in x, H v = d/de grad_x loss(x + e v), three ways."""
    out = {}
    for name in ("sample_depthwise", "deform_sample_depthwise", "sample_conv"):
        fun, args = OPS[name]
        loss, t = make_loss(fun, args)
        rest = (*args[1:], t)
        v = normal(*x.shape)

        def hvp(grad_fn, x, v, *rest):
            return jax.jvp(lambda x: grad_fn(x, *rest), (x,), (v,))[1]

        def grad_one(x, *rest):
            return jax.grad(lambda x: loss(x, *rest)[0])(x)

        specs = specs_of((x, *rest))

        def grad_sm(x, *rest):
            def total(x):
                body = lambda *b: jax.lax.psum(loss(*b)[0], AXIS)  # noqa: E731
                return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P())(x, *rest)

            return jax.grad(total)(x)

        expected = jax.jit(partial_hvp(hvp, grad_one))(*jax.device_put((x, v, *rest), ONE))
        out[f"{name}_norm"] = float(np.abs(np.asarray(expected)).max())
        placed = jax.device_put(
            (x, v, *rest),
            jax.tree.map(lambda s: NamedSharding(mesh, s), (specs[0], specs[0], *specs[1:])),
        )
        out[f"{name}_shard_map"] = rel_err(jax.jit(partial_hvp(hvp, grad_sm))(*placed), expected)
        out[f"{name}_jit"] = rel_err(jax.jit(partial_hvp(hvp, grad_one))(*placed), expected)
    return out


def partial_hvp(hvp, grad_fn):
    return lambda x, v, *rest: hvp(grad_fn, x, v, *rest)


def check_bad_input(mesh):
    """What a user sees for a batch the mesh axis does not divide, or a missing axis."""
    out = {}
    attempts = {
        "device_put_indivisible": lambda: jax.device_put(x[:6], NamedSharding(mesh, P(AXIS))),
        "shard_map_indivisible": lambda: jax.jit(
            jax.shard_map(
                lambda x, r, w: ops.sample_depthwise(x, r, w, **geo),
                mesh=mesh,
                in_specs=(P(AXIS), P(AXIS), P()),
                out_specs=P(AXIS),
            )
        ).lower(x[:6], rot[:6], OPS["sample_depthwise"][1][2]),
        "missing_axis": lambda: jax.device_put(x, NamedSharding(mesh, P("batch"))),
        "shard_map_missing_axis": lambda: jax.shard_map(
            lambda x: x, mesh=mesh, in_specs=P("batch"), out_specs=P("batch")
        )(x),
    }
    for name, attempt in attempts.items():
        try:
            attempt()
            out[name] = None
        except Exception as e:  # noqa: BLE001
            out[name] = [isinstance(e, ValueError), str(e).splitlines()[0][:300]]
    return out


def check_train_steps():
    """One compiled train/ step of the small ResNet on 4 devices vs 1 device."""
    from train import models
    from train import train as tr
    from train.config import load_config

    out = {}
    batch = {
        "image": rng.integers(0, 256, (16, 16, 16, 1), dtype=np.uint8),
        "label": rng.integers(0, 3, (16,)).astype(np.int32),
        "mask": np.ones(16, np.float32),
    }
    for conv in ("local_dk", "dk_dcn"):
        config = load_config(
            "digits_deformed",
            [
                f"model.conv={conv}",
                "model.width=8",
                "model.stage_sizes=(1,1,1)",
                "model.stem_stride=1",
                "data.image_size=16",
                "data.channels=1",
                "optim.batch_size=16",
                "optim.warmup_epochs=0.0",
            ],
        )
        model = models.create_model(config.model, 3)
        lr = tr.create_learning_rate_fn(config.optim, 3, 20)
        tx = tr.create_optimizer(config.optim, lr)
        state0 = jax.device_get(
            tr.create_train_state(
                jax.random.PRNGKey(0), model, (16, 16, 1), tx, tr.create_mesh(DEVICES[:1])
            )
        )
        # Residual branches start as identities (zero BatchNorm scale), which would leave the
        # dk layers without a gradient: move every parameter off its initial value first.
        state0 = state0.replace(params=jax.device_get(_params_noise(state0.params)))
        params = {}
        for n in (4, 1):
            mesh = tr.create_mesh(DEVICES[:n])
            state = jax.device_put(state0, NamedSharding(mesh, P()))
            placed = jax.device_put(batch, NamedSharding(mesh, P(AXIS)))
            p_train, _ = tr.compile_steps(mesh, lr, config)
            compiled = p_train.lower(state, placed).compile()
            if n == 4:
                hlo = compiled.as_text()
            state, _ = compiled(state, placed)
            params[n] = jax.device_get(state.params)
        moved = max(
            float(np.abs(a - b).max())
            for a, b in zip(jax.tree.leaves(params[1]), jax.tree.leaves(state0.params), strict=True)
        )
        calls = re.findall(
            r"= \w+\[(\d+),[\d,]*\]\S* custom-call\(.*?custom_call_target=\"(dk_\w+)\"", hlo
        )
        out[conv] = {
            "param_err": tree_err(params[4], params[1]),
            "param_change": moved,
            "all_gathers": gathered_sizes(hlo),
            "all_reduces": len(re.findall(r" all-reduce\(", hlo)),
            "custom_call_batches": sorted({int(b) for b, t in calls if "grad_weight" not in t}),
            "custom_calls": len(calls),
        }
    return out


REFERENCE_OPS = ("deform_sample_depthwise", "deform_sample_conv", "nd_linear_sample_shared_data")
REFERENCE_LAYERS = ("DeformConv2d",)


def main(parts):
    assert len(DEVICES) == 4, DEVICES
    ops_cases, layer_cases = OPS, LAYERS
    if "reference_lowering" in parts:
        # The branch a platform without a kernel gets (TPU, ROCm), here on CPU, on one op of
        # each family (the reference compiles slowly) and the layer with a replicated operand.
        from dk_jax import primitives

        primitives._lower_to_reference_on("cpu")
        ops_cases = {k: OPS[k] for k in REFERENCE_OPS}
        layer_cases = {k: LAYERS[k] for k in REFERENCE_LAYERS}
    meshes = {
        kind: jax.make_mesh((4,), (AXIS,), axis_types=(axis_type,))
        for kind, axis_type in (("explicit", AxisType.Explicit), ("auto", AxisType.Auto))
    }
    result = {}
    activation = H * W * C  # one sample of x: anything this large is activation-sized
    if "ops" in parts:
        result["ops"] = {
            name: check(name, fun, args, meshes, activation)
            for name, (fun, args) in ops_cases.items()
        }
        result["vmap_in_shard_map"] = check_vmap_in_shard_map(meshes["auto"])
        result["hvp"] = check_hvp(meshes["auto"])
        result["bad_input"] = check_bad_input(meshes["auto"])
    if "layers" in parts:
        result["layers"] = {
            name: check(name, *layer_case(m), meshes, activation) for name, m in layer_cases.items()
        }
    if "train" in parts:
        result["train"] = check_train_steps()
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:] or ["ops", "layers", "train"])  # and "reference_lowering"
