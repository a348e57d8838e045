"""Sharding helpers shared by the operators and the layers."""

from __future__ import annotations

import jax


def batch_spec(a):
    """The mesh axes a's leading (batch) axis is split over on an Explicit mesh, else None."""
    spec = jax.typeof(a).sharding.spec
    return spec[0] if len(spec) else None
