"""dk-jax: Deformable Kernels (Gao et al., ICLR 2020) for JAX and Flax.

Operators (`sample_depthwise`, `deform_sample_depthwise`, `nd_linear_sample`) are JAX primitives
backed by XLA FFI custom calls (C++ on CPU, CUDA on GPU), with a pure-jax.numpy reference path.
"""

from dk_jax._ffi import available as ffi_available
from dk_jax.ops import deform_sample_depthwise, nd_linear_sample, sample_depthwise

__all__ = [
    "deform_sample_depthwise",
    "ffi_available",
    "nd_linear_sample",
    "sample_depthwise",
]
__version__ = "0.1.0"
