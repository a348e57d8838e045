"""Claims about the derivatives and the sown values of the Flax layers: every layer's gradient
in every parameter and in its input equals the same layer's on the jax.numpy reference path
(`implementation="xla"`), and what the adaptive layers sow (offsets, rotations, coordinates,
routing) equals an independent computation from their parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from test_modules import CASES, conv, geometry, normal, pair, ref_any, ref_clip, setup

import dk_jax


@pytest.mark.parametrize("name", CASES)
def test_gradients_equal_the_reference_path(rng, name):
    m, v, x, extra = setup(name, rng)
    weights = normal(rng, m.apply(v, x, *extra).shape)

    def grads(module):
        def loss(v, x, *extra):
            return jnp.sum(jnp.sin(module.apply(v, x, *extra)) * weights)

        return jax.jit(jax.grad(loss, argnums=tuple(range(2 + len(extra)))))(v, x, *extra)

    got = grads(m)
    if hasattr(m, "implementation"):
        want = grads(m.clone(implementation="xla"))
    else:
        # CondConv2d calls no dk op: its reference is the hand-written composition.
        want = jax.jit(
            jax.grad(lambda v, x: jnp.sum(jnp.sin(ref_any(m, v["params"], x)) * weights), (0, 1))
        )(v, x)
    leaves = jax.tree_util.tree_leaves_with_path(got)
    assert len(leaves) == len(jax.tree.leaves(v)) + 1 + len(extra)
    for (path, g), w in zip(leaves, jax.tree.leaves(want), strict=True):
        assert rel_err(g, w) <= 1e-5, jax.tree_util.keystr(path)


def sown(m, v, x):
    _, state = m.apply(v, x, mutable=["intermediates"])
    return {k: val[0] for k, val in state["intermediates"].items()}


def predicted(m, p, x, key):
    """The offsets a layer's own conv predicts, clipped as configured (written out here)."""
    k, s, d, pads = geometry(m, x)
    if key == "rotation":
        rc = p["rotation_conv"]
        value = conv(x, rc["kernel"], s, pads, d) + rc["bias"]
        return ref_clip(value, m.rotation_clip, pair(m.scope_size), k, m.rotation_groups)
    oc = p["offset_conv"]
    value = ref_clip(conv(x, oc["kernel"], s, pads, d) + oc["bias"], m.offset_clip)
    # Image offsets are in units of the dilation: rows times dh, columns times dw.
    return value * jnp.asarray(list(d) * (k[0] * k[1]), jnp.float32)


@pytest.mark.parametrize(
    "name",
    [
        "local",
        "local-scope-clip",
        "local-pair-clip",
        "dk-conv",
        "dk-conv-clips",
        "deform-conv",
        "deform-conv-clip",
        "local-grouped",
        "dk-conv-grouped",
    ],
)
def test_sown_offsets_equal_the_predicting_conv(rng, name):
    m, v, x, _ = setup(name, rng)
    # Large offsets, so the clips are active where they are configured.
    v = jax.tree.map(lambda a: a * 8.0, v)
    state = sown(m, v, x)
    assert state and set(state) <= {"rotation", "offset"}
    for key, value in state.items():
        assert rel_err(value, predicted(m, v["params"], x, key)) <= 1e-6, key


@pytest.mark.parametrize("name", ["global", "global-depthwise"])
def test_sown_coordinates_are_the_dense_shift_plus_the_grid(rng, name):
    m, v, x, _ = setup(name, rng)
    v = jax.tree.map(lambda a: a * 8.0, v)  # some coordinates leave the scope and are clamped
    (kh, kw), (sh, sw) = pair(m.kernel_size), pair(m.scope_size)
    fc = v["params"]["fc"]
    shift = np.asarray(x.mean((1, 2)) @ fc["kernel"] + fc["bias"]).reshape(-1, kh, kw, 2)
    grid = np.stack(np.meshgrid(np.arange(kh), np.arange(kw), indexing="ij"), -1).astype(float)
    start = np.asarray([(sh - kh) / 2, (sw - kw) / 2])
    want = np.clip(shift + grid + start, 0, np.asarray([sh - 1, sw - 1]))
    got = sown(m, v, x)["coords"]
    assert (np.asarray(got) == 0).any() or (np.asarray(got) == sh - 1).any()
    assert rel_err(got, want) <= 1e-6


@pytest.mark.parametrize("name", ["condconv", "condconv-strided"])
def test_sown_routing_is_the_sigmoid_of_the_pooled_dense(rng, name):
    m, v, x, _ = setup(name, rng)
    fc = v["params"]["fc"]
    logits = np.asarray(x, np.float64).mean((1, 2)) @ np.asarray(fc["kernel"], np.float64)
    want = 1 / (1 + np.exp(-(logits + np.asarray(fc["bias"], np.float64))))
    assert rel_err(sown(m, v, x)["routing"], want) <= 1e-6


def test_every_layer_is_covered():
    covered = {type(m) for m in CASES.values()}
    assert covered == {
        dk_jax.SampleDepthwise,
        dk_jax.DeformableSampleDepthwise,
        dk_jax.SampleConv,
        dk_jax.GlobalDeformKernel2d,
        dk_jax.LocalDeformKernel2d,
        dk_jax.DeformKernelConv2d,
        dk_jax.DeformConv2d,
        dk_jax.CondConv2d,
    }
