"""The layers' fields, declared once, and the attribute lists of their docstrings.

A layer body is a dataclass built from these field groups plus its own leading positional
fields (`features`, `scope_size`, `kernel_size`, ...). Every optional field is keyword-only, so
the linen modules and the NNX layers built on one body take the same arguments.
"""

import dataclasses
import textwrap
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any, ClassVar

import jax.numpy as jnp
from flax.typing import Dtype, Initializer, PaddingLike, PrecisionLike
from jax.nn.initializers import zeros

IntOrPair = int | Sequence[int]
Clip = tuple[float, float] | None

LAYERS = (
    "CondConv2d",
    "DeformConv2d",
    "DeformKernel2d",
    "DeformKernelConv2d",
    "DeformableSampleDepthwise",
    "GlobalDeformKernel2d",
    "LocalDeformKernel2d",
    "SampleConv",
    "SampleDepthwise",
)
"""The layers, as `dk_jax.<Layer>` (linen) and `dk_jax.nnx.<Layer>` (NNX) name them."""

# Bodies compare and hash by identity (an NNX layer keeps its body as static metadata) and
# leave repr to the Flax API that wraps them.
body = dataclass(eq=False, repr=False)


@body
class ConvFields:
    """The fields every layer shares with `nn.Conv`."""

    _: KW_ONLY
    strides: IntOrPair = 1
    padding: PaddingLike = "SAME"
    kernel_dilation: IntOrPair = 1
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer | None = None
    bias_init: Initializer = zeros

    # Per-layer wording of a field's line in the docstring, where it differs from FIELD_DOCS.
    FIELD_NOTES: ClassVar[dict[str, str]] = {}

    def __repr__(self) -> str:
        """The layer's name and its fields, keyword fields only where they are not the default
        (what an NNX layer shows as its `config`; linen modules keep Flax's repr)."""
        shown = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if f.name not in ("parent", "name")
            and (not f.kw_only or getattr(self, f.name) is not f.default)
        ]
        return f"{type(self).__name__.removesuffix('Body')}({', '.join(shown)})"


@body
class OpsFields(ConvFields):
    """Layers that call the dk_jax operators."""

    _: KW_ONLY
    implementation: str | None = None


@body
class PrecisionFields(ConvFields):
    """Layers with an offset-predicting conv, a dense layer or a per-sample convolution."""

    _: KW_ONLY
    precision: PrecisionLike = None


@body
class RotationFields(ConvFields):
    """Layers whose kernel taps move by a kernel-space rotation."""

    _: KW_ONLY
    rotation_groups: int = 1


FIELD_DOCS = {
    "features": "number of output channels.",
    "num_experts": "E, the number of expert kernels.",
    "scope_size": "(Sh, Sw) of the stored kernel, >= kernel_size; an int or a pair.",
    "kernel_size": "(Kh, Kw) taps of the convolution; an int or a pair.",
    "strides": "an int or a pair (default 1).",
    "padding": '"SAME" (default), "VALID", an int, a pair, or a pair of (low, high) pairs.',
    "kernel_dilation": "dilation of the image taps; an int or a pair (default 1).",
    "rotation_groups": "G; channel c uses the rotation of group c % G; C % G == 0.",
    "rotation_clip": 'None, a (min, max) pair, or "scope" (clamp each sampled kernel position '
    "a + r + (S-K)/2 into [0, S-1]).",
    "offset_clip": "None or a (min, max) pair, applied before the dilation factor.",
    "feature_group_count": "groups of the convolution; divides C and features (C = depthwise).",
    "use_bias": "whether to add a bias (default True).",
    "dtype": "computation dtype (default: inferred from input and params).",
    "param_dtype": "dtype of the parameters (default float32).",
    "precision": "precision of the offset-predicting layers and of per-sample convolutions "
    "(see `jax.lax.Precision`).",
    "kernel_init": "initializer of the scope kernel (default uniform +-1/sqrt(Kh*Kw*C/groups)).",
    "bias_init": "initializer of the bias (default zeros).",
    "implementation": '"ffi", "xla" or None (the ops\' choice).',
}

DEPTHWISE_FEATURES = "optional; if given it must equal C (the layer is depthwise)."


def attribute_lines(cls: type) -> str:
    """One `name: text` line per dataclass field of `cls`, indented as a docstring's."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]
    names.sort(key=list(FIELD_DOCS).index)
    return "".join(_line(n, cls.FIELD_NOTES.get(n, FIELD_DOCS[n])) for n in names)


def _line(name: str, text: str) -> str:
    return (
        textwrap.fill(f"{name}: {text}", 96, initial_indent=" " * 6, subsequent_indent=" " * 8)
        + "\n"
    )


def compose_doc(body_cls: type, heading: str, first: Any = (), last: Any = ()) -> str:
    """The body's docstring followed by `heading` and every field's line (with extra
    `(name, text)` lines before and after, for an API's own arguments)."""
    extra = lambda items: "".join(_line(n, t) for n, t in items)  # noqa: E731
    return (
        f"{body_cls.__doc__.rstrip()}\n\n    {heading}:\n"
        f"{extra(first)}{attribute_lines(body_cls)}{extra(last)}    "
    )
