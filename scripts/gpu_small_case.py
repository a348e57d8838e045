"""A small case touching every CUDA handler once (forward, every gradient, JVPs, second order,
nd ops; float32, bfloat16, float64), with offsets that leave the image and the scope: the
workload for compute-sanitizer. Run it with DK_JAX_CUDA_KERNELS=v2 for the second-generation
kernels: the last block adds their vector channel path (C = 16), four rotation groups, stride 2
and the 64-bit index path."""

import os

import jax
import jax.numpy as jnp
import numpy as np

import dk_jax

rng = np.random.default_rng(0)
for dtype in (jnp.float32, jnp.bfloat16, jnp.float64):
    with jax.enable_x64(dtype == jnp.float64):
        x = jnp.asarray(rng.normal(size=(2, 7, 6, 6)), dtype)
        w = jnp.asarray(rng.normal(size=(5, 4, 6)), dtype)
        rot = (
            jnp.asarray(rng.normal(size=(2, 7, 6, 2 * 18)) * 4, dtype).at[0, 0, 0, :4].set(jnp.inf)
        )
        off = jnp.asarray(rng.normal(size=(2, 7, 6, 18)) * 4, dtype).at[1, 2, 3, :2].set(-jnp.inf)
        geo = dict(kernel_size=3, padding=1, rotation_groups=2)
        f = lambda x, o, r, w: dk_jax.deform_sample_depthwise(x, o, r, w, **geo)  # noqa: E731
        g = lambda x, r, w: dk_jax.sample_depthwise(x, r, w, **geo)  # noqa: E731
        outs = [f(x, off, rot, w), g(x, rot, w)]
        outs += jax.grad(lambda *a: f(*a).astype(jnp.float32).sum() ** 2, (0, 1, 2, 3))(
            x, off, rot, w
        )
        outs += jax.grad(lambda *a: g(*a).astype(jnp.float32).sum() ** 2, (0, 1, 2))(x, rot, w)
        outs += jax.jvp(f, (x, off, rot, w), (x, off, rot, w))
        coord = jnp.asarray(rng.uniform(-2, 6, (9, 2)), dtype)
        h = lambda d, c: dk_jax.nd_linear_sample(d, c).astype(jnp.float32).sum() ** 2  # noqa: E731
        outs += [dk_jax.nd_linear_sample(w, coord), *jax.grad(h, (0, 1))(w, coord)]
        outs += jax.jvp(lambda d, c: dk_jax.nd_linear_sample(d, c), (w, coord), (w, coord))

        # Second order: the gradient of a gradient norm (the second-order rotation handlers).
        def penalty(fn, *a):
            grads = jax.grad(
                lambda *b: fn(*b).astype(jnp.float32).sum() ** 2, tuple(range(len(a)))
            )(*a)
            return sum(jnp.sum(q.astype(jnp.float32) ** 2) for q in grads)

        outs += jax.grad(lambda *a: penalty(g, *a), (0, 1, 2))(x, rot, w)
        cols = lambda x, r: dk_jax.scope_im2col(x, r, scope_size=(5, 4), **geo)  # noqa: E731
        outs += jax.grad(lambda *a: penalty(cols, *a), (0, 1))(x, rot)
        jax.block_until_ready(outs)
        print(dtype.__name__, "ok", [o.shape for o in outs])

# Vector channel rows (C = 16: four float32 or eight bf16 per 16-byte load), G = 4, stride 2;
# then again with the 64-bit index path forced.
for limit in (None, "64"):
    if limit:
        os.environ["DK_JAX_CUDA_INDEX32_LIMIT"] = limit
    for dtype in (jnp.float32, jnp.bfloat16):
        x = jnp.asarray(rng.normal(size=(2, 9, 8, 16)), dtype)
        w = jnp.asarray(rng.normal(size=(4, 4, 16)), dtype)
        rot = jnp.asarray(rng.normal(size=(2, 5, 4, 4 * 18)) * 3, dtype)
        off = jnp.asarray(rng.normal(size=(2, 5, 4, 18)) * 3, dtype)
        geo = dict(kernel_size=3, padding=1, stride=2, rotation_groups=4)
        ys = [
            dk_jax.deform_sample_depthwise(x, off, rot, w, **geo),
            dk_jax.sample_depthwise(x, rot, w, **geo),
        ]

        def loss(x, rot=rot, w=w, geo=geo):
            return dk_jax.sample_depthwise(x, rot, w, **geo).astype(jnp.float32).sum()

        def loss_deform(x, off=off, rot=rot, w=w, geo=geo):
            y = dk_jax.deform_sample_depthwise(x, off, rot, w, **geo)
            return y.astype(jnp.float32).sum()

        ys += [jax.grad(loss)(x), jax.grad(loss_deform)(x)]
        jax.block_until_ready(ys)
        print(dtype.__name__, "C=16 G=4 stride 2", "index64" if limit else "index32", "ok")
