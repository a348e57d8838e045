"""Temporary memory (and time) of second-order products in rotation, ffi against the reference.

    python -m benchmarks.second_order [--json benchmarks/results/second_order_cpu.json] [--time]

For `sample_depthwise` on the standard shape (N=8, H=W=56, C=128, K=3, scope 4, stride 1,
pad 1): the Hessian-vector product in rotation, jvp(grad(loss, rotation)), and the
reverse-over-reverse gradient of a gradient penalty in (x, rotation, weight), with
loss = sum(sin(y)). Memory is XLA's `compile().memory_analysis().temp_size_in_bytes`; with
--time, also the median of three calls after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import dk_jax

GEO = dict(kernel_size=3, padding=1)


def products(impl):
    def loss(x, rotation, weight):
        y = dk_jax.sample_depthwise(x, rotation, weight, **GEO, implementation=impl)
        return jnp.sum(jnp.sin(y))

    def hvp(x, rotation, weight):
        g = lambda r: jax.grad(loss, 1)(x, r, weight)  # noqa: E731
        return jax.jvp(g, (rotation,), (jnp.ones_like(rotation),))[1]

    def penalty(x, rotation, weight):
        grads = jax.grad(loss, (0, 1, 2))(x, rotation, weight)
        return sum(jnp.sum(g**2) for g in grads)

    return {"hvp_rotation": hvp, "grad_of_gradient_penalty": jax.grad(penalty, (0, 1, 2))}


def measure(fn, args, repeats):
    compiled = jax.jit(fn).lower(*args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    if not repeats:
        return temp, None
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t)
    return temp, statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--time", action="store_true", help="also time three calls per row")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    n, h, c = 8, 56, 128
    x = jnp.asarray(rng.normal(size=(n, h, h, c)), jnp.float32)
    rotation = jnp.asarray(rng.normal(size=(n, h, h, 18)) * 0.5, jnp.float32)
    weight = jnp.asarray(rng.normal(size=(4, 4, c)), jnp.float32)
    rows = []
    for impl in ("ffi", "xla"):
        for name, fn in products(impl).items():
            temp, seconds = measure(fn, (x, rotation, weight), 3 if args.time else 0)
            ms = None if seconds is None else seconds * 1e3
            row = dict(product=name, implementation=impl, temp_mb=temp / 2**20, ms=ms)
            rows.append(row)
            print(f"{name:26s} {impl:4s} temp {row['temp_mb']:9.1f} MiB  ms {ms}")
    result = dict(
        shape="N=8, H=W=56, C=128, K=3, scope 4, stride 1, pad 1, rotation groups 1",
        env=dict(machine=platform.machine(), jax=jax.__version__, devices=jax.device_count()),
        rows=rows,
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
