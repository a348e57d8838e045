"""The `flax.nnx` API of the layers: `Layer(in_features, *fields, rngs=...)` keeps its layer
body as `layer.config`, creates the body's parameters as `nnx.Param`s with the same names and
shapes as the linen modules (`layer.kernel`, `layer.rotation_conv.kernel`, ...), and runs the
same forward. What an adaptive layer predicts is sown as `nnx.Intermediate` when the call runs
under `nnx.capture(model, nnx.Intermediate)`, which returns it; plain calls keep no state."""

import inspect
from typing import ClassVar

from flax import nnx
from flax.typing import Array

from dk_jax import _checks
from dk_jax.modules import _maths as m
from dk_jax.modules import deformable, rivals, sampling
from dk_jax.modules._fields import LAYERS, compose_doc

__all__ = list(LAYERS)


class Params(nnx.Module):
    """A named group of parameters (`rotation_conv`, `fc`, `inner_conv`, ...)."""

    def __init__(self, specs: dict, *, rngs: nnx.Rngs):
        for name, spec in specs.items():
            if isinstance(spec, dict):
                value = Params(spec, rngs=rngs)
            else:
                value = nnx.Param(spec.init(rngs.params(), spec.shape, spec.dtype))
            setattr(self, name, value)


class Layer(Params):
    """Runs a layer body as an NNX module: C is `in_features`, fixed at construction."""

    body: ClassVar[type]

    def __init__(self, in_features: int, *args, rngs: nnx.Rngs, **kwargs):
        self.in_features = _checks.positive_int(in_features, "in_features")
        self.config = self.body(*args, **kwargs)
        super().__init__(
            self.config.param_specs(self.in_features, f"in_features={self.in_features}"),
            rngs=rngs,
        )

    def __call__(self, x: Array, *inputs: Array | None, **named: Array | None) -> Array:
        m.check_rank(self.config, x)
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__}: x has shape {tuple(x.shape)} (C={x.shape[-1]}), but "
                f"the layer was built with in_features={self.in_features}"
            )
        params = nnx.to_pure_dict(nnx.state(self, nnx.Param))
        return self.config.forward(params, x, *inputs, sow=self._sow, **named)

    def _sow(self, name: str, value: Array) -> None:
        # Only under `nnx.capture` (which sets `__captures__`), as linen sows only into a mutable
        # "intermediates": outside it `sow` would keep appending to the layer's state at every
        # call, growing it (and retracing `nnx.jit`) step after step of a training loop.
        if hasattr(self, "__captures__"):
            self.sow(nnx.Intermediate, name, value)


def _signature(body: type) -> inspect.Signature:
    """in_features, the body's fields, rngs: what `Layer.__init__` accepts for this body."""
    fields = list(inspect.signature(body).parameters.values())
    first = inspect.Parameter("in_features", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    rngs = inspect.Parameter("rngs", inspect.Parameter.KEYWORD_ONLY, annotation=nnx.Rngs)
    positional = [p for p in fields if p.kind is not p.KEYWORD_ONLY]
    keyword = [p for p in fields if p.kind is p.KEYWORD_ONLY]
    return inspect.Signature([first, *positional, *keyword, rngs])


def _nnx(body: type) -> type:
    """The NNX layer of a layer body, named and documented like it."""
    name = body.__name__.removesuffix("Body")
    doc = compose_doc(
        body,
        "Args",
        first=[("in_features", "C, the input channels.")],
        last=[("rngs", "`nnx.Rngs` with a `params` stream for the initializers.")],
    )
    namespace = {"__doc__": doc, "__module__": __name__, "body": body}
    cls = type(name, (Layer,), namespace)
    cls.__signature__ = _signature(body)
    return cls


SampleDepthwise = _nnx(sampling.SampleDepthwiseBody)
DeformableSampleDepthwise = _nnx(sampling.DeformableSampleDepthwiseBody)
SampleConv = _nnx(sampling.SampleConvBody)
GlobalDeformKernel2d = _nnx(deformable.GlobalDeformKernel2dBody)
LocalDeformKernel2d = _nnx(deformable.LocalDeformKernel2dBody)
DeformKernel2d = LocalDeformKernel2d  # the default deformable kernel is the local one
DeformKernelConv2d = _nnx(deformable.DeformKernelConv2dBody)
DeformConv2d = _nnx(rivals.DeformConv2dBody)
CondConv2d = _nnx(rivals.CondConv2dBody)
