"""Argument checking for the public ops (docs/OPERATORS.md, "Special values and empty input").

Everything here runs on shapes and dtypes only, before any tracing, and raises ValueError or
TypeError naming the argument, what was expected and what came.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.float64, jnp.float32, jnp.bfloat16, jnp.float16)


def pair(value: Any, name: str, *, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= minimum, as a pair."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        items = (int(value), int(value))
    elif (
        isinstance(value, Sequence)
        and len(value) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)
    ):
        items = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(items) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return items


def positive_int(value: Any, name: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def float_arrays(**arrays: Any) -> tuple:
    """Canonicalises the arrays' dtypes as `jax.numpy` does and checks they share one float
    dtype; returns the arrays, in the order given.

    float64 becomes float32 unless x64 is enabled; integer and bool arrays take the float dtype
    of the others (the default float dtype when all are integer). float64, float32, bfloat16 and
    float16 are accepted; mixing two of them (after canonicalisation) is a TypeError.
    """
    dtypes = {}
    for name, a in arrays.items():
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(a).__name__}")
        dtype = jnp.dtype(a.dtype)
        if jnp.issubdtype(dtype, jnp.integer) or dtype == jnp.bool_:
            continue
        dtype = jnp.dtype(jax.dtypes.canonicalize_dtype(dtype))
        if dtype not in [jnp.dtype(d) for d in FLOAT_DTYPES]:
            raise TypeError(f"{name} must be a real floating-point (or integer) array, got {dtype}")
        dtypes[name] = dtype
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{k}={v}" for k, v in dtypes.items())
        raise TypeError(f"all arguments must share one dtype, got {listed}")
    common = next(iter(dtypes.values()), jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64)))
    return tuple(
        a if jnp.dtype(a.dtype) == common else jnp.asarray(a).astype(common)
        for a in arrays.values()
    )


def rank(a: Any, name: str, expected: int, layout: str) -> None:
    if a.ndim != expected:
        raise ValueError(f"{name} must have rank {expected} {layout}, got shape {tuple(a.shape)}")


def output_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def implementation(value: Any) -> None:
    if value not in (None, "ffi", "xla"):
        raise ValueError(f'implementation must be None, "ffi" or "xla", got {value!r}')
