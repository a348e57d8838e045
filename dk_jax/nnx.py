"""The layers as `flax.nnx` modules: `dk_jax.nnx.DeformKernel2d(in_features, scope_size,
kernel_size, ..., rngs=nnx.Rngs(0))`. Same fields, parameter names and shapes, and numerics as
the linen modules `dk_jax.<Layer>`; see `dk_jax.modules` for the list."""

from dk_jax.modules._fields import LAYERS
from dk_jax.modules.nnx import *  # noqa: F403  (the NNX layers, listed in LAYERS)

__all__ = list(LAYERS)
