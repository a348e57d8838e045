"""A short tour of the three operators: ffi against the jax.numpy reference, with timings.

Run with `make demo` (until the training demo replaces it) or `python scripts/demo_ops.py`.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

import dk_jax


def timed(f, *args, repeats=5):
    jax.block_until_ready(f(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(f(*args))
    return (time.perf_counter() - start) / repeats * 1e3


def main():
    rng = np.random.default_rng(0)
    n, h, w, c, k, s = 8, 56, 56, 128, 3, 4
    x = jnp.asarray(rng.normal(size=(n, h, w, c)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(s, s, c)), jnp.float32)
    rotation = jnp.asarray(rng.normal(size=(n, h, w, k * k * 2)) * 0.5, jnp.float32)
    offset = jnp.asarray(rng.normal(size=(n, h, w, k * k * 2)) * 0.5, jnp.float32)
    geo = dict(kernel_size=k, padding=1)
    print(f"ffi library for cpu: {dk_jax.ffi_available('cpu')}; devices: {jax.devices()}")
    print(f"x {x.shape}, weight (scope) {weight.shape}, rotation {rotation.shape}")

    for name, op, args in [
        ("sample_depthwise", dk_jax.sample_depthwise, (x, rotation, weight)),
        ("deform_sample_depthwise", dk_jax.deform_sample_depthwise, (x, offset, rotation, weight)),
    ]:
        f = {
            impl: jax.jit(lambda *a, impl=impl, op=op: op(*a, **geo, implementation=impl))
            for impl in ("ffi", "xla")
        }
        y_ffi, y_xla = f["ffi"](*args), f["xla"](*args)
        err = float(jnp.abs(y_ffi - y_xla).max() / jnp.abs(y_xla).max())
        g = jax.jit(jax.grad(lambda *a, op=op: jnp.sum(op(*a, **geo) ** 2), argnums=(0, 1)))
        print(
            f"{name:24s} ffi {timed(f['ffi'], *args):7.1f} ms  xla {timed(f['xla'], *args):7.1f} ms"
            f"  fwd+bwd(ffi) {timed(g, *args, repeats=2):7.1f} ms  rel. difference {err:.1e}"
        )

    data = weight
    coord = jnp.asarray(rng.uniform(-0.5, s - 0.5, size=(k * k, 2)), jnp.float32)
    out = dk_jax.nd_linear_sample(data, coord)
    ref = dk_jax.nd_linear_sample(data, coord, implementation="xla")
    print(
        f"nd_linear_sample         {tuple(data.shape)} at {tuple(coord.shape)} -> "
        f"{tuple(out.shape)}, max |ffi - xla| = {float(jnp.abs(out - ref).max()):.1e}"
    )


if __name__ == "__main__":
    main()
