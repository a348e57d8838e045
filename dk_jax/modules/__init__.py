"""Flax layers for Deformable Kernels and their rivals, channels last (NHWC).

Every layer exists for both Flax APIs with the same fields, parameter names and shapes, and
numerics: `dk_jax.modules.<Layer>` (also `dk_jax.<Layer>`) is the `flax.linen` module, and
`dk_jax.nnx.<Layer>` the `flax.nnx` one, which takes `in_features` first and `rngs`.

    SampleDepthwise, DeformableSampleDepthwise,  the sampling layers: the rotation (and image
    SampleConv                                   offset) arrive as inputs       (sampling.py)
    GlobalDeformKernel2d                         one resampled kernel per sample
    LocalDeformKernel2d (= DeformKernel2d)       one resampled kernel per output location
    DeformKernelConv2d                           kernel offsets and image offsets (DK + DCN)
                                                                                (deformable.py)
    DeformConv2d, CondConv2d                     the rivals: depthwise DCN, mixture of experts
                                                                                (rivals.py)

The maths of a layer is written once, in its body (a dataclass holding the layer's fields:
`param_specs` names the parameters, `forward` computes from them); `linen.py` and `nnx.py`
only create the parameters and run the body. Shared pieces (geometry, padding, checks,
clipping, the offset-predicting conv) are in `_maths.py`, the shared fields in `_fields.py`.

Every offset-predicting conv or dense layer is zero-initialised, so at init a DK layer is a
depthwise convolution with the centre of its scope kernel. Adaptive layers sow what they
predict ("rotation", "offset", "coords", "routing"). Data flows modules -> ops: these files call
only the public ops of `dk_jax.ops` and Flax/lax. The operators' exact maths: docs/OPERATORS.md.
"""

from dk_jax.modules._fields import LAYERS
from dk_jax.modules.linen import *  # noqa: F403  (the linen layers, listed in LAYERS)

__all__ = list(LAYERS)
