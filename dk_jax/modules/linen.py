"""The `flax.linen` API of the layers: each module is its layer body (fields and maths) plus
`Layer.__call__`, which declares the body's parameters with `self.param` and runs its forward,
sowing what it predicts into the "intermediates" collection."""

from functools import partial
from typing import Any

from flax import linen as nn
from flax.typing import Array

from dk_jax.modules import _maths as m
from dk_jax.modules import deformable, rivals, sampling
from dk_jax.modules._fields import LAYERS, compose_doc

__all__ = list(LAYERS)


def _declare(module: nn.Module, specs: dict) -> dict:
    """The parameters `specs` describes, created in `module`; nested dicts become submodules."""
    return {
        name: _Params(spec, name=name)()
        if isinstance(spec, dict)
        else module.param(name, spec.init, spec.shape, spec.dtype)
        for name, spec in specs.items()
    }


class _Params(nn.Module):
    """A named group of parameters (`rotation_conv`, `fc`, `inner_conv`, ...)."""

    specs: Any

    @nn.compact
    def __call__(self) -> dict:
        return _declare(self, self.specs)


class Layer(nn.Module):
    """Runs a layer body as a linen module: C is read from the input."""

    @nn.compact
    def __call__(self, x: Array, *inputs: Array | None, **named: Array | None) -> Array:
        m.check_rank(self, x)
        params = _declare(self, self.param_specs(x.shape[-1], f"x has shape {tuple(x.shape)}"))
        return self.forward(params, x, *inputs, sow=partial(self.sow, "intermediates"), **named)


def _linen(body: type) -> type:
    """The linen module of a layer body, named and documented like it."""
    name = body.__name__.removesuffix("Body")
    doc = compose_doc(body, "Attributes")
    # Flax's tree-like repr, not the body's one-line one.
    namespace = {"__doc__": doc, "__module__": __name__, "__repr__": nn.Module.__repr__}
    return type(name, (body, Layer), namespace)


SampleDepthwise = _linen(sampling.SampleDepthwiseBody)
DeformableSampleDepthwise = _linen(sampling.DeformableSampleDepthwiseBody)
SampleConv = _linen(sampling.SampleConvBody)
GlobalDeformKernel2d = _linen(deformable.GlobalDeformKernel2dBody)
LocalDeformKernel2d = _linen(deformable.LocalDeformKernel2dBody)
DeformKernel2d = LocalDeformKernel2d  # the default deformable kernel is the local one
DeformKernelConv2d = _linen(deformable.DeformKernelConv2dBody)
DeformConv2d = _linen(rivals.DeformConv2dBody)
CondConv2d = _linen(rivals.CondConv2dBody)
