"""dk-jax: Deformable Kernels (Gao et al., ICLR 2020) for JAX and Flax.

Operators (`sample_depthwise`, `deform_sample_depthwise`, `nd_linear_sample`, and the
scope-space columns behind `sample_conv`) are JAX primitives backed by XLA FFI custom calls (C++
on CPU, CUDA on GPU), with a pure-jax.numpy reference path; their exact maths is in
docs/OPERATORS.md. The Flax layers built on them are `dk_jax.<Layer>` (flax.linen, from
`dk_jax.modules`) and `dk_jax.nnx.<Layer>` (flax.nnx).
"""

from dk_jax import modules, nnx
from dk_jax._ffi import available as ffi_available
from dk_jax._ffi import cpu_isa, cpu_isas, export_safety_checks
from dk_jax.analysis import effective_receptive_field, erf_radius, theoretical_receptive_field
from dk_jax.modules import *  # noqa: F403  (the linen layers, listed in modules.__all__)
from dk_jax.ops import (
    deform_sample_conv,
    deform_sample_depthwise,
    deform_scope_im2col,
    nd_linear_sample,
    sample_conv,
    sample_depthwise,
    scope_im2col,
)

__all__ = [
    *modules.__all__,
    "cpu_isa",
    "cpu_isas",
    "deform_sample_conv",
    "deform_sample_depthwise",
    "deform_scope_im2col",
    "effective_receptive_field",
    "erf_radius",
    "export_safety_checks",
    "ffi_available",
    "nd_linear_sample",
    "nnx",
    "sample_conv",
    "sample_depthwise",
    "scope_im2col",
    "theoretical_receptive_field",
]
__version__ = "0.1.0"
