"""Claims about the flax.nnx layers (`dk_jax.nnx`): every layer has the linen layer's
parameter names and shapes, and with the same parameter values the same outputs, intermediates
and gradients (parameters, input and offsets); an NNX model with a deformable kernel trains
under `nnx.jit` with `nnx.Optimizer`; split/merge and an orbax checkpoint round-trip; the
constructor checks its arguments."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import rel_err
from flax import nnx

import dk_jax

C = 4
X_SHAPE = (2, 8, 7, C)

# (layer, positional fields, keyword fields, shapes of the call's extra inputs)
CASES = {
    "sample": ("SampleDepthwise", (4, 3), dict(rotation_groups=2), [(2, 8, 7, 36)]),
    "deform-sample": (
        "DeformableSampleDepthwise",
        ((5, 4), 3),
        dict(kernel_dilation=2, rotation_groups=4),
        [(2, 8, 7, 18), (2, 8, 7, 72)],
    ),
    "sample-conv": (
        "SampleConv",
        (6, 4, 3),
        dict(rotation_groups=2, feature_group_count=2),
        [(2, 8, 7, 36), (2, 8, 7, 18)],
    ),
    "global": ("GlobalDeformKernel2d", (6, 4, 3), dict(feature_group_count=2), []),
    "local": (
        "LocalDeformKernel2d",
        ((5, 4), 3),
        dict(strides=2, rotation_groups=2, rotation_clip="scope"),
        [],
    ),
    "local-grouped": (
        "DeformKernel2d",
        (4, 3),
        dict(features=6, feature_group_count=2, rotation_clip=(-0.4, 0.3)),
        [],
    ),
    "dk-conv": (
        "DeformKernelConv2d",
        (4, 3),
        dict(kernel_dilation=(2, 1), rotation_groups=2, offset_clip=(-1.0, 0.5)),
        [],
    ),
    "deform-conv": ("DeformConv2d", (3,), dict(strides=2, padding=1), []),
    "condconv": ("CondConv2d", (6, 3, 3), dict(feature_group_count=2, strides=(1, 2)), []),
}


def normal(rng, shape, scale=1.0):
    return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)


def build(name, rng):
    """The linen layer, the NNX layer holding the same random parameters, x and the inputs."""
    cls, args, kwargs, extra = CASES[name]
    linen = getattr(dk_jax, cls)(*args, **kwargs)
    layer = getattr(dk_jax.nnx, cls)(C, *args, **kwargs, rngs=nnx.Rngs(1))
    x = normal(rng, X_SHAPE)
    inputs = [normal(rng, s, 0.7) for s in extra]
    shapes = jax.eval_shape(linen.init, jax.random.key(0), x, *inputs)["params"]
    params = jax.tree.map(lambda s: normal(rng, s.shape, 0.3), shapes)
    state = nnx.state(layer, nnx.Param)
    assert jax.tree.map(jnp.shape, nnx.to_pure_dict(state)) == jax.tree.map(jnp.shape, params)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(layer, state)
    return linen, layer, params, x, inputs


@pytest.mark.parametrize("name", CASES)
def test_nnx_layer_equals_linen_layer(rng, name):
    linen, layer, params, x, inputs = build(name, rng)

    def linen_loss(params, x, *inputs):
        y, state = linen.apply({"params": params}, x, *inputs, mutable=["intermediates"])
        return jnp.sum(jnp.sin(y)), (y, dict(state.get("intermediates", {})))

    def nnx_loss(layer, x, *inputs):
        y, sown = nnx.capture(layer, nnx.Intermediate)(x, *inputs)
        return jnp.sum(jnp.sin(y)), (y, nnx.to_pure_dict(sown))

    argnums = tuple(range(2 + len(inputs)))
    (_, (y_linen, sown_linen)), g_linen = jax.value_and_grad(linen_loss, argnums, has_aux=True)(
        params, x, *inputs
    )
    (_, (y_nnx, sown_nnx)), g_nnx = nnx.value_and_grad(nnx_loss, argnums=argnums, has_aux=True)(
        layer, x, *inputs
    )

    assert y_nnx.shape == y_linen.shape
    assert rel_err(y_nnx, y_linen) <= 1e-6
    assert jax.tree.structure(sown_nnx) == jax.tree.structure(sown_linen)
    for a, b in zip(jax.tree.leaves(sown_nnx), jax.tree.leaves(sown_linen), strict=True):
        assert rel_err(a, b) <= 1e-6
    grads_nnx = [nnx.to_pure_dict(g_nnx[0]), *g_nnx[1:]]
    paths = jax.tree_util.tree_leaves_with_path(g_linen)
    for (path, expected), actual in zip(paths, jax.tree.leaves(grads_nnx), strict=True):
        assert np.abs(expected).max() > 0, path  # every gradient is exercised
        assert rel_err(actual, expected) <= 1e-6, jax.tree_util.keystr(path)


def test_plain_calls_keep_no_intermediates(rng):
    _, layer, _, x, _ = build("local", rng)
    layer(x)
    assert not nnx.state(layer, nnx.Intermediate)
    _, sown = nnx.capture(layer, nnx.Intermediate)(x)
    assert sown["rotation"][0].shape == (2, 4, 4, 36)


class Net(nnx.Module):
    """stem conv -> local deformable kernel -> global pool -> linear."""

    def __init__(self, rngs: nnx.Rngs):
        self.stem = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.dk = dk_jax.nnx.DeformKernel2d(8, 4, 3, rotation_groups=2, rngs=rngs)
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.stem(x))
        x = nnx.relu(self.dk(x))
        return self.head(jnp.mean(x, axis=(1, 2)))


def bars(rng, n=32, size=12):
    """Images of one horizontal (label 0) or vertical (label 1) bar, plus noise."""
    labels = rng.integers(0, 2, n)
    images = rng.normal(size=(n, size, size, 1)) * 0.1
    for image, label, at in zip(images, labels, rng.integers(2, size - 2, n), strict=True):
        if label:
            image[:, at] += 1.0
        else:
            image[at, :] += 1.0
    return jnp.asarray(images, jnp.float32), jnp.asarray(labels)


def test_nnx_model_with_deform_kernel_trains(rng):
    model = Net(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    images, labels = bars(rng)

    @nnx.jit
    def step(model, optimizer, images, labels):
        def loss_fn(model):
            logits = model(images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, images, labels)) for _ in range(20)]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses
    # The offset-predicting conv starts at zero; training moved it: the kernel deforms.
    assert np.abs(model.dk.rotation_conv.kernel[...]).max() > 1e-3


def test_split_merge_and_orbax_round_trip(rng, tmp_path):
    _, layer, _, x, _ = build("dk-conv", rng)
    expected = layer(x)
    graphdef, state = nnx.split(layer)
    assert rel_err(nnx.merge(graphdef, state)(x), expected) == 0

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "layer", nnx.state(layer))
    checkpointer.wait_until_finished()
    # Restore into a layer built with other random parameters.
    _, args, kwargs, _ = CASES["dk-conv"]
    abstract = nnx.eval_shape(
        lambda: dk_jax.nnx.DeformKernelConv2d(C, *args, **kwargs, rngs=nnx.Rngs(7))
    )
    graphdef, abstract_state = nnx.split(abstract)
    restored = checkpointer.restore(tmp_path / "layer", abstract_state)
    assert rel_err(nnx.merge(graphdef, restored)(x), expected) == 0


def test_signature_and_docstring_name_every_argument():
    for name in dk_jax.nnx.__all__:
        cls = getattr(dk_jax.nnx, name)
        parameters = list(inspect.signature(cls).parameters)
        assert parameters[0] == "in_features" and parameters[-1] == "rngs", name
        args = cls.__doc__.split("Args:")[1]
        for p in parameters:
            assert f"\n      {p}: " in args, f"{name}.{p}"


BAD = [
    ("SampleDepthwise", (4, 4, 3), dict(features=5), r"in_features=4 \(C=4\)"),
    ("DeformKernel2d", (4, 4, 3), dict(rotation_groups=3), "rotation_groups=3"),
    ("DeformKernel2d", (4, 2, 3), {}, "smaller than kernel_size"),
    ("DeformConv2d", (4, 3), dict(padding="CIRCULAR"), "padding"),
    ("CondConv2d", (4, 5, 2, 3), dict(feature_group_count=2), "feature_group_count=2"),
    ("DeformKernelConv2d", (0, 4, 3), {}, "in_features"),
]


@pytest.mark.parametrize("cls, args, kwargs, message", BAD)
def test_bad_configuration_raises_at_construction(cls, args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        getattr(dk_jax.nnx, cls)(*args, **kwargs, rngs=nnx.Rngs(0))


def test_input_channels_must_match_in_features(rng):
    layer = dk_jax.nnx.DeformKernel2d(4, 4, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"C=6.*in_features=4"):
        layer(normal(rng, (2, 8, 7, 6)))
    with pytest.raises(ValueError, match=r"rank 4"):
        layer(normal(rng, (8, 7, 4)))
