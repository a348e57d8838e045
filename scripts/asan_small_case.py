"""Every CPU handler (depthwise, columns, nd) on a small case with offsets that leave the image
and the scope, +-inf and NaN, in float32, bfloat16 and float64, first and second order: the
workload for scripts/asan_check.sh.

Loads the CPU library named by DK_JAX_CPU_LIBRARY (the AddressSanitizer build) in place of
the installed one."""

import importlib.util
import os
import sys

spec = importlib.util.spec_from_file_location("dk_jax._dk_cpu", os.environ["DK_JAX_CPU_LIBRARY"])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.modules["dk_jax._dk_cpu"] = module

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import dk_jax  # noqa: E402

assert dk_jax._ffi.available("cpu")
rng = np.random.default_rng(0)
for dtype in (jnp.float32, jnp.bfloat16, jnp.float64):
    with jax.enable_x64(dtype == jnp.float64):
        x = jnp.asarray(rng.normal(size=(2, 7, 6, 6)), dtype)
        w = jnp.asarray(rng.normal(size=(5, 4, 6)), dtype)
        rot = jnp.asarray(rng.normal(size=(2, 7, 6, 36)) * 6, dtype)
        rot = (
            rot.at[0, 0, 0, :4]
            .set(jnp.inf)
            .at[0, 1, 0, 4:6]
            .set(-jnp.inf)
            .at[1, 0, 0, 0]
            .set(jnp.nan)
        )
        off = jnp.asarray(rng.normal(size=(2, 7, 6, 18)) * 6, dtype)
        off = (
            off.at[1, 2, 3, :2]
            .set(-jnp.inf)
            .at[0, 3, 3, 2]
            .set(jnp.inf)
            .at[0, 4, 4, 0]
            .set(jnp.nan)
        )
        geo = dict(kernel_size=3, padding=1, dilation=1, rotation_groups=2)

        def f(x, o, r, w):
            return dk_jax.deform_sample_depthwise(x, o, r, w, **geo, implementation="ffi")

        def g(x, r, w):
            return dk_jax.sample_depthwise(x, r, w, **geo, implementation="ffi")

        outs = [f(x, off, rot, w), g(x, rot, w)]
        outs += jax.grad(lambda *a: f(*a).astype(jnp.float32).sum(), (0, 1, 2, 3))(x, off, rot, w)
        outs += jax.grad(lambda *a: g(*a).astype(jnp.float32).sum(), (0, 1, 2))(x, rot, w)
        outs += jax.jvp(f, (x, off, rot, w), (x, off, rot, w))
        outs += jax.jvp(g, (x, rot, w), (x, rot, w))

        # Scope-space im2col: forward, image / rotation / offset gradients and both JVPs.
        def cols(x, o, r):
            return dk_jax.deform_scope_im2col(
                x, o, r, scope_size=(5, 4), **geo, implementation="ffi"
            )

        def cols_rigid(x, r):
            return dk_jax.scope_im2col(x, r, scope_size=(5, 4), **geo, implementation="ffi")

        outs += [cols(x, off, rot), cols_rigid(x, rot)]
        outs += jax.grad(lambda *a: cols(*a).astype(jnp.float32).sum(), (0, 1, 2))(x, off, rot)
        outs += jax.grad(lambda *a: cols_rigid(*a).astype(jnp.float32).sum(), (0, 1))(x, rot)
        outs += jax.jvp(cols, (x, off, rot), (x, off, rot))
        outs += jax.jvp(cols_rigid, (x, rot), (x, rot))
        coord = (
            jnp.asarray(rng.uniform(-3, 7, (9, 2)), dtype)
            .at[0, 0]
            .set(jnp.nan)
            .at[1, 1]
            .set(jnp.inf)
        )
        for data, c in [(w, coord), (x, jnp.concatenate([coord, coord[:, :1]], 1))]:
            h = lambda d, c: dk_jax.nd_linear_sample(d, c, implementation="ffi")  # noqa: E731
            outs += [
                h(data, c),
                *jax.grad(lambda d, c: h(d, c).astype(jnp.float32).sum(), (0, 1))(data, c),
            ]
            outs += jax.jvp(h, (data, c), (data, c))

        # Second order: an HVP in rotation and the gradient of a gradient norm (the
        # second-order rotation handlers), depthwise and columns.
        def penalty(fn, *a):
            grads = jax.grad(
                lambda *b: fn(*b).astype(jnp.float32).sum() ** 2, tuple(range(len(a)))
            )(*a)
            return sum(jnp.sum(q.astype(jnp.float32) ** 2) for q in grads)

        outs += jax.grad(lambda *a: penalty(g, *a), (0, 1, 2))(x, rot, w)
        outs += jax.grad(
            lambda x, r, w: penalty(lambda *b: f(b[0], off, *b[1:]), x, r, w), (0, 1, 2)
        )(x, rot, w)
        outs += jax.grad(lambda *a: penalty(cols_rigid, *a), (0, 1))(x, rot)
        outs += jax.grad(lambda x, r: penalty(lambda *b: cols(b[0], off, b[1]), x, r), (0, 1))(
            x, rot
        )
        jax.block_until_ready(outs)
        print(jnp.dtype(dtype).name, "ran", len(outs), "outputs")
