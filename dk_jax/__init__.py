"""dk-jax: Deformable Kernels (Gao et al., ICLR 2020) for JAX and Flax.

Operators (`sample_depthwise`, `deform_sample_depthwise`, `nd_linear_sample`) are JAX primitives
backed by XLA FFI custom calls (C++ on CPU, CUDA on GPU), with a pure-jax.numpy reference path;
the Flax linen modules in `dk_jax.modules` build every deformable-kernel variant on them.
"""

from dk_jax._ffi import available as ffi_available
from dk_jax._ffi import export_safety_checks
from dk_jax.analysis import effective_receptive_field, erf_radius, theoretical_receptive_field
from dk_jax.modules import (
    CondConv2d,
    DeformableSampleDepthwise,
    DeformConv2d,
    DeformKernel2d,
    DeformKernelConv2d,
    GlobalDeformKernel2d,
    LocalDeformKernel2d,
    SampleConv,
    SampleDepthwise,
)
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
    "CondConv2d",
    "DeformConv2d",
    "DeformKernel2d",
    "DeformKernelConv2d",
    "DeformableSampleDepthwise",
    "GlobalDeformKernel2d",
    "LocalDeformKernel2d",
    "SampleConv",
    "SampleDepthwise",
    "deform_sample_conv",
    "deform_sample_depthwise",
    "deform_scope_im2col",
    "effective_receptive_field",
    "erf_radius",
    "export_safety_checks",
    "ffi_available",
    "nd_linear_sample",
    "sample_conv",
    "sample_depthwise",
    "scope_im2col",
    "theoretical_receptive_field",
]
__version__ = "0.1.0"
