"""Claims about the flax.linen layers: at init each layer is the plain convolution it
generalises; with random parameters each equals a hand-written composition of
jax.numpy and the xla ops; each jits, differentiates, vmaps and computes in bfloat16; "scope"
clipping holds for huge offsets; docstrings list the parameters; bad configurations raise."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from jax import lax

import dk_jax
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
from dk_jax.reference import naive_sample_conv

ALL_MODULES = [
    SampleDepthwise,
    DeformableSampleDepthwise,
    GlobalDeformKernel2d,
    LocalDeformKernel2d,
    DeformKernelConv2d,
    DeformConv2d,
    CondConv2d,
]
# rbg keys: initialisers compile much faster than with threefry, which keeps the file quick.
KEY = jax.random.key(0, impl="rbg")


def normal(rng, shape, scale=1.0):
    return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)


def perturb(variables, rng, scale=0.15):
    """Adds noise to every parameter, so zero-initialised offset convs predict offsets."""
    return jax.tree.map(lambda p: p + normal(rng, p.shape, scale), variables)


def random_variables(m, x, *extra, rng, scale=0.15):
    """Random non-zero values for every parameter of m (shapes from an abstract init)."""
    shapes = jax.eval_shape(m.init, KEY, x, *extra)
    return jax.tree.map(lambda s: normal(rng, s.shape, scale), shapes)


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def explicit_pads(padding, hw, kernel, strides, dilation):
    """nn.Conv's reading of `padding`, written out (TF "SAME": the extra pixel goes after)."""
    if padding == "VALID":
        return ((0, 0), (0, 0))
    if padding == "SAME":
        pads = []
        for size, k, s, d in zip(hw, kernel, strides, dilation, strict=True):
            out = -(-size // s)
            total = max((out - 1) * s + d * (k - 1) + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)
    return tuple((p, p) for p in pair(padding))


def geometry(m, x):
    """kernel, strides, dilation and explicit pads of module m for input x."""
    k, s, d = pair(m.kernel_size), pair(m.strides), pair(m.kernel_dilation)
    return k, s, d, explicit_pads(m.padding, x.shape[1:3], k, s, d)


def conv(x, kernel, strides, pads, dilation, groups=1):
    return lax.conv_general_dilated(
        x,
        kernel,
        strides,
        pads,
        rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


def centre(kernel, k):
    """The scope kernel read bilinearly at a + (S-K)/2, axis by axis: a slice when S-K is even,
    the mean of two neighbouring slices when it is odd."""
    kernel = np.asarray(kernel)
    for axis, (s, kk) in enumerate(zip(kernel.shape[:2], k, strict=True)):
        o = (s - kk) // 2
        low = np.take(kernel, range(o, o + kk), axis=axis)
        if (s - kk) % 2:
            low = (low + np.take(kernel, range(o + 1, o + 1 + kk), axis=axis)) / 2
        kernel = low
    return kernel


def depthwise_conv(m, x, kernel, bias):
    """nn.Conv(feature_group_count=C) with the given (Kh, Kw, C) kernel and (C,) bias."""
    c = x.shape[-1]
    ref = nn.Conv(
        c,
        kernel.shape[:2],
        strides=m.strides,
        padding=m.padding,
        kernel_dilation=m.kernel_dilation,
        feature_group_count=c,
    )
    return ref.apply({"params": {"kernel": jnp.asarray(kernel)[:, :, None, :], "bias": bias}}, x)


# --- 1. at init: the plain convolution ------------------------------------------------------

# Parameters do not depend on strides, padding or dilation: one init serves every geometry.
GEOMETRIES = [
    dict(),
    dict(strides=2),  # "SAME" on an even input: asymmetric (0, 1) pads
    dict(kernel_dilation=(2, 1), padding=1),
    dict(strides=(1, 2), padding="VALID"),
]


@pytest.mark.parametrize(
    "kernel, scope", [(3, 3), (3, 4), ((3, 2), (5, 3))], ids=["S=K", "S=K+1", "S=K+(2,1)"]
)
def test_local_dk_at_init_is_depthwise_conv_with_scope_centre(rng, kernel, scope):
    x = normal(rng, (2, 8, 7, 4))
    m = DeformKernel2d(scope_size=scope, kernel_size=kernel, rotation_groups=2)
    v = m.init(KEY, x)
    v["params"]["inner_conv"]["bias"] = normal(rng, (4,))
    inner = v["params"]["inner_conv"]
    for geo in GEOMETRIES:
        m = m.clone(**geo)
        expected = depthwise_conv(m, x, centre(inner["kernel"], pair(kernel)), inner["bias"])
        assert rel_err(m.apply(v, x), expected) <= 1e-5, geo


@pytest.mark.parametrize("groups", [1, 4])
def test_global_dk_at_init_is_conv_with_scope_centre(rng, groups):
    x = normal(rng, (2, 8, 7, 4))
    m = GlobalDeformKernel2d(
        features=4, scope_size=(4, 5), kernel_size=(3, 2), feature_group_count=groups
    )
    v = m.init(KEY, x)
    v["params"]["bias"] = normal(rng, (4,))
    kernel = jnp.asarray(centre(v["params"]["kernel"], (3, 2)))
    for geo in GEOMETRIES:
        m = m.clone(**geo)
        ref = nn.Conv(
            4,
            (3, 2),
            strides=m.strides,
            padding=m.padding,
            kernel_dilation=m.kernel_dilation,
            feature_group_count=groups,
        )
        expected = ref.apply({"params": {"kernel": kernel, "bias": v["params"]["bias"]}}, x)
        assert rel_err(m.apply(v, x), expected) <= 1e-5, geo


@pytest.mark.parametrize("module", [DeformKernel2d, DeformKernelConv2d])
@pytest.mark.parametrize("groups, features", [(1, 6), (2, 6), (4, 8)])
def test_grouped_dk_at_init_is_grouped_conv_with_scope_centre(rng, module, groups, features):
    x = normal(rng, (2, 8, 7, 4))
    m = module(scope_size=(4, 5), kernel_size=(3, 2), features=features, feature_group_count=groups)
    v = m.init(KEY, x)
    inner = v["params"]["inner_conv"]
    assert inner["kernel"].shape == (4, 5, 4 // groups, features)
    inner["bias"] = normal(rng, (features,))
    kernel = jnp.asarray(centre(inner["kernel"], (3, 2)))
    for geo in GEOMETRIES:
        m = m.clone(**geo)
        ref = nn.Conv(
            features,
            (3, 2),
            strides=m.strides,
            padding=m.padding,
            kernel_dilation=m.kernel_dilation,
            feature_group_count=groups,
        )
        expected = ref.apply({"params": {"kernel": kernel, "bias": inner["bias"]}}, x)
        assert rel_err(m.apply(v, x), expected) <= 1e-5, geo


def test_groups_equal_to_channels_keep_the_depthwise_kernel(rng):
    x = normal(rng, (2, 8, 7, 4))
    v = DeformKernel2d(4, 3, feature_group_count=4).init(KEY, x)
    assert v["params"]["inner_conv"]["kernel"].shape == (4, 4, 4)
    hlo = jax.jit(DeformKernel2d(4, 3, feature_group_count=4).apply).lower(v, x).as_text()
    assert "@dk_sample_forward_v2(" in hlo and "cols" not in hlo


def test_deform_conv_at_init_is_depthwise_conv(rng):
    x = normal(rng, (2, 8, 7, 4))
    m = DeformConv2d(3)
    v = m.init(KEY, x)
    inner = v["params"]["inner_conv"]
    for geo in GEOMETRIES:
        m = m.clone(**geo)
        expected = depthwise_conv(m, x, inner["kernel"], inner["bias"])
        assert rel_err(m.apply(v, x), expected) <= 1e-5, geo


def test_dk_conv_at_init_is_depthwise_conv_with_scope_centre(rng):
    x = normal(rng, (2, 8, 7, 4))
    m = DeformKernelConv2d(scope_size=4, kernel_size=3)
    v = m.init(KEY, x)
    inner = v["params"]["inner_conv"]
    for geo in GEOMETRIES[:2]:
        m = m.clone(**geo)
        expected = depthwise_conv(m, x, centre(inner["kernel"], (3, 3)), inner["bias"])
        assert rel_err(m.apply(v, x), expected) <= 1e-5, geo


def test_condconv_at_init_weighs_every_expert_one_half(rng):
    x = normal(rng, (2, 8, 7, 4))
    m = CondConv2d(features=6, num_experts=3, kernel_size=3, feature_group_count=2)
    v = m.init(KEY, x)
    kernel = 0.5 * v["params"]["kernel"].sum(0)
    expected = conv(x, kernel, (1, 1), ((1, 1), (1, 1)), (1, 1), groups=2)
    assert rel_err(m.apply(v, x), expected) <= 1e-5


# --- 2. random parameters: a hand-written composition of jnp and the xla ops ----------------


def ref_clip(value, clip, scope=None, kernel=None, groups=1):
    """rotation_clip / offset_clip; "scope" written out tap by tap."""
    if clip is None:
        return value
    if clip != "scope":
        return jnp.clip(value, *clip)
    (kh, kw), (sh, sw) = kernel, scope
    low, high = np.zeros(groups * kh * kw * 2), np.zeros(groups * kh * kw * 2)
    for g in range(groups):
        for a in range(kh):
            for b in range(kw):
                for t, (index, s, k) in enumerate(((a, sh, kh), (b, sw, kw))):
                    position = index + (s - k) / 2  # the sampled position at zero rotation
                    low[((g * kh + a) * kw + b) * 2 + t] = -position
                    high[((g * kh + a) * kw + b) * 2 + t] = s - 1 - position
    return jnp.clip(value, low, high)


def padded(x, pads):
    return jnp.pad(x, ((0, 0), *pads, (0, 0)))


def ref_grouped(m, p, x, rotation, offset=None):
    """A grouped / full inner conv: the naive reference that resamples the whole kernel."""
    k, s, d, pads = geometry(m, x)
    y = naive_sample_conv(
        padded(x, pads),
        rotation,
        p["kernel"],
        offset,
        kernel_size=k,
        stride=s,
        padding=(0, 0),
        dilation=d,
        rotation_groups=m.rotation_groups,
        feature_group_count=m.feature_group_count,
    )
    return y + p["bias"]


def ref_sample(m, p, x, rotation):
    if p["kernel"].ndim == 4:
        return ref_grouped(m, p, x, rotation)
    k, s, d, pads = geometry(m, x)
    y = dk_jax.sample_depthwise(
        padded(x, pads),
        rotation,
        p["kernel"],
        kernel_size=k,
        stride=s,
        dilation=d,
        rotation_groups=m.rotation_groups,
        implementation="xla",
    )
    return y + p["bias"]


def ref_deform_sample(m, p, x, offset, rotation):
    if p["kernel"].ndim == 4:
        return ref_grouped(m, p, x, rotation, offset)
    k, s, d, pads = geometry(m, x)
    y = dk_jax.deform_sample_depthwise(
        padded(x, pads),
        offset,
        rotation,
        p["kernel"],
        kernel_size=k,
        stride=s,
        dilation=d,
        rotation_groups=getattr(m, "rotation_groups", 1),
        implementation="xla",
    )
    return y + p["bias"]


def ref_local(m, p, x):
    k, s, d, pads = geometry(m, x)
    rc = p["rotation_conv"]
    rotation = conv(x, rc["kernel"], s, pads, d) + rc["bias"]
    rotation = ref_clip(rotation, m.rotation_clip, pair(m.scope_size), k, m.rotation_groups)
    return ref_sample(m, p["inner_conv"], x, rotation)


def ref_dk_conv(m, p, x):
    k, s, d, pads = geometry(m, x)
    oc, rc = p["offset_conv"], p["rotation_conv"]
    offset = ref_clip(conv(x, oc["kernel"], s, pads, d) + oc["bias"], m.offset_clip)
    offset = offset * jnp.asarray(d * (k[0] * k[1]), jnp.float32)  # (dh, dw) per tap
    rotation = conv(x, rc["kernel"], s, pads, d) + rc["bias"]
    rotation = ref_clip(rotation, m.rotation_clip, pair(m.scope_size), k, m.rotation_groups)
    return ref_deform_sample(m, p["inner_conv"], x, offset, rotation)


def ref_deform_conv(m, p, x):
    k, s, d, pads = geometry(m, x)
    oc = p["offset_conv"]
    offset = ref_clip(conv(x, oc["kernel"], s, pads, d) + oc["bias"], m.offset_clip)
    offset = offset * jnp.asarray(d * (k[0] * k[1]), jnp.float32)
    rotation = jnp.zeros(offset.shape, jnp.float32)
    return ref_deform_sample(m, p["inner_conv"], x, offset, rotation)


def ref_global(m, p, x):
    k, s, d, pads = geometry(m, x)
    (kh, kw), (sh, sw) = k, pair(m.scope_size)
    cin = x.shape[-1] // m.feature_group_count
    shift = x.mean((1, 2)) @ p["fc"]["kernel"] + p["fc"]["bias"]  # (N, Kh*Kw*2)
    grid = [
        ((sh - (kh - 1) - 1) / 2 + a, (sw - (kw - 1) - 1) / 2 + b)
        for a in range(kh)
        for b in range(kw)
    ]
    coords = shift.reshape(-1, kh * kw, 2) + jnp.asarray(grid, jnp.float32)
    coords = jnp.clip(coords, 0, jnp.asarray([sh - 1, sw - 1], jnp.float32))
    outs = []
    for n in range(x.shape[0]):
        kernel = dk_jax.nd_linear_sample(
            p["kernel"].reshape(sh, sw, -1), coords[n], implementation="xla"
        )
        kernel = kernel.reshape(kh, kw, cin, m.features)
        outs.append(conv(x[n : n + 1], kernel, s, pads, d, m.feature_group_count))
    return jnp.concatenate(outs) + p["bias"]


def ref_condconv(m, p, x):
    k, s, d, pads = geometry(m, x)
    routing = jax.nn.sigmoid(x.mean((1, 2)) @ p["fc"]["kernel"] + p["fc"]["bias"])
    outs = []
    for n in range(x.shape[0]):
        kernel = sum(routing[n, e] * p["kernel"][e] for e in range(m.num_experts))
        outs.append(conv(x[n : n + 1], kernel, s, pads, d, m.feature_group_count))
    return jnp.concatenate(outs) + p["bias"]


def out_hw(m, x):
    k, s, d, pads = geometry(m, x)
    return tuple(
        (size + lo + hi - dd * (kk - 1) - 1) // ss + 1
        for size, (lo, hi), kk, ss, dd in zip(x.shape[1:3], pads, k, s, d, strict=True)
    )


def extra_inputs(m, x, rng):
    """The offsets an inner layer takes as inputs (none for the adaptive layers)."""
    if not isinstance(m, SampleDepthwise | DeformableSampleDepthwise | SampleConv):
        return ()
    k = pair(m.kernel_size)
    shape = (x.shape[0], *out_hw(m, x), k[0] * k[1] * 2)
    rotation = normal(rng, (*shape[:3], m.rotation_groups * shape[3]), 0.7)
    if isinstance(m, SampleDepthwise | SampleConv):
        return (rotation,)
    return (normal(rng, shape, 0.7), rotation)


def ref_any(m, p, x, *extra):
    if isinstance(m, SampleDepthwise | SampleConv):
        return ref_sample(m, p, x, *extra)
    if isinstance(m, DeformableSampleDepthwise):
        return ref_deform_sample(m, p, x, *extra)
    return {
        GlobalDeformKernel2d: ref_global,
        LocalDeformKernel2d: ref_local,
        DeformKernelConv2d: ref_dk_conv,
        DeformConv2d: ref_deform_conv,
        CondConv2d: ref_condconv,
    }[type(m)](m, p, x)


CASES = {
    "sample": SampleDepthwise(4, 3, rotation_groups=2),
    "sample-stride-same": SampleDepthwise((5, 4), (3, 2), strides=2),
    "deform-sample": DeformableSampleDepthwise(4, 3, kernel_dilation=2, rotation_groups=4),
    "global": GlobalDeformKernel2d(6, 4, 3, feature_group_count=2),
    "global-depthwise": GlobalDeformKernel2d(
        4, (5, 4), (3, 2), strides=2, padding=1, feature_group_count=4
    ),
    "local": LocalDeformKernel2d(4, 3, rotation_groups=2),
    "local-scope-clip": LocalDeformKernel2d(
        (5, 4), 3, strides=2, kernel_dilation=(1, 2), rotation_clip="scope"
    ),
    "local-pair-clip": LocalDeformKernel2d(3, 3, padding="VALID", rotation_clip=(-0.4, 0.3)),
    "dk-conv": DeformKernelConv2d(4, 3, kernel_dilation=(2, 1), rotation_groups=2),
    "dk-conv-clips": DeformKernelConv2d(
        (4, 5), 3, strides=2, offset_clip=(-0.5, 0.5), rotation_clip="scope"
    ),
    "deform-conv": DeformConv2d(3, kernel_dilation=(1, 2), padding=2),
    "deform-conv-clip": DeformConv2d((3, 2), strides=2, offset_clip=(-1.0, 0.2)),
    "sample-conv": SampleConv(6, 4, 3, rotation_groups=2, feature_group_count=2),
    "local-full": LocalDeformKernel2d(4, 3, features=6, feature_group_count=1, rotation_groups=2),
    "local-grouped": LocalDeformKernel2d(
        (5, 4), 3, strides=2, features=8, feature_group_count=2, rotation_clip="scope"
    ),
    "dk-conv-full": DeformKernelConv2d(
        4, 3, features=5, feature_group_count=1, kernel_dilation=(2, 1)
    ),
    "dk-conv-grouped": DeformKernelConv2d(
        (4, 5), 3, features=8, feature_group_count=4, rotation_groups=2, offset_clip=(-0.5, 0.5)
    ),
    "condconv": CondConv2d(6, 3, 3, feature_group_count=2),
    "condconv-strided": CondConv2d(4, 2, (3, 2), strides=2, kernel_dilation=2),
}


def setup(name, rng, batch=2):
    """A module, random non-zero variables, an input and the inner layers' offset inputs."""
    m = CASES[name]
    x = normal(rng, (batch, 8, 7, 4))
    extra = extra_inputs(m, x, rng)
    return m, random_variables(m, x, *extra, rng=rng), x, extra


@pytest.mark.parametrize("name", CASES)
def test_random_params_match_hand_written_composition(rng, name):
    m, v, x, extra = setup(name, rng)
    y = m.apply(v, x, *extra)
    # jitted only to compile the reference once instead of op by op
    expected = jax.jit(lambda p, x, *extra: ref_any(m, p, x, *extra))(v["params"], x, *extra)
    assert y.shape == expected.shape
    assert rel_err(y, expected) <= 1e-5


def test_inner_layers_default_to_zero_offsets(rng):
    m, v, x, (rotation,) = setup("sample", rng)
    assert rel_err(m.apply(v, x), m.apply(v, x, jnp.zeros_like(rotation))) == 0
    m, v, x, (offset, rotation) = setup("deform-sample", rng)
    zeros = jnp.zeros_like(offset)
    assert rel_err(m.apply(v, x, offset), m.apply(v, x, offset, jnp.zeros_like(rotation))) == 0
    assert rel_err(m.apply(v, x, None, rotation), m.apply(v, x, zeros, rotation)) == 0


# --- 3. jit, grad, vmap, bfloat16 -----------------------------------------------------------

TRANSFORM_CASES = [
    "sample",
    "deform-sample",
    "global",
    "local",
    "dk-conv",
    "deform-conv",
    "condconv",
    "local-full",
    "dk-conv-grouped",
]


@pytest.mark.parametrize("name", TRANSFORM_CASES)
def test_jit_matches_eager(rng, name):
    m, v, x, extra = setup(name, rng)
    assert rel_err(jax.jit(m.apply)(v, x, *extra), m.apply(v, x, *extra)) <= 1e-6


@pytest.mark.parametrize("name", TRANSFORM_CASES)
def test_grad_reaches_every_parameter(rng, name):
    m, v, x, extra = setup(name, rng)
    w = normal(rng, m.apply(v, x, *extra).shape)
    grads, gx = jax.jit(jax.grad(lambda v, x: jnp.sum(m.apply(v, x, *extra) * w), argnums=(0, 1)))(
        v, x
    )
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        g = np.asarray(g)
        assert np.isfinite(g).all(), jax.tree_util.keystr(path)
        assert np.abs(g).max() > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"
    assert np.isfinite(np.asarray(gx)).all() and np.abs(np.asarray(gx)).max() > 0


@pytest.mark.parametrize("name", TRANSFORM_CASES)
def test_vmap_matches_loop(rng, name):
    m, v, x, extra = setup(name, rng, batch=1)
    xs = normal(rng, (3, *x.shape))
    ys = jax.jit(jax.vmap(lambda x: m.apply(v, x, *extra)))(xs)
    apply = jax.jit(m.apply)
    for i in range(3):
        assert rel_err(ys[i], apply(v, xs[i], *extra)) <= 1e-5


def test_vmap_over_parameters(rng):
    m, v, x, _ = setup("dk-conv", rng)
    vs = jax.tree.map(lambda *p: jnp.stack(p), v, perturb(v, rng), perturb(v, rng))
    ys = jax.jit(jax.vmap(m.apply, in_axes=(0, None)))(vs, x)
    apply = jax.jit(m.apply)
    for i in range(3):
        assert rel_err(ys[i], apply(jax.tree.map(lambda p, i=i: p[i], vs), x)) <= 1e-5


@pytest.mark.parametrize("name", TRANSFORM_CASES)
def test_bfloat16_compute_with_float32_params(rng, name):
    m, v, x, extra = setup(name, rng)
    low = m.clone(dtype=jnp.bfloat16)
    shapes = jax.eval_shape(low.init, KEY, x, *extra)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes))
    y = jax.jit(low.apply)(v, x, *extra)
    assert y.dtype == jnp.bfloat16
    assert rel_err(y.astype(jnp.float32), m.apply(v, x, *extra)) <= 5e-2
    loss = jax.jit(jax.grad(lambda v: jnp.sum(low.apply(v, x, *extra).astype(jnp.float32))))
    grads = loss(v)
    assert all(
        g.dtype == jnp.float32 and np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads)
    )


# --- 4. "scope" clipping --------------------------------------------------------------------


@pytest.mark.parametrize(
    "module",
    [
        LocalDeformKernel2d((5, 4), (3, 2), rotation_groups=2, rotation_clip="scope"),
        DeformKernelConv2d((4, 6), 3, strides=2, rotation_clip="scope"),
    ],
)
def test_scope_clip_keeps_huge_rotations_inside_the_scope(rng, module):
    x = normal(rng, (2, 8, 7, 4))
    v = random_variables(module, x, rng=rng)
    rc = v["params"]["rotation_conv"]
    rc["bias"] = jnp.asarray(rng.choice([-1e6, 1e6], rc["bias"].shape), jnp.float32)
    rc["kernel"] = normal(rng, rc["kernel"].shape, 1e4)
    y, state = module.apply(v, x, mutable=["intermediates"])
    (rotation,) = state["intermediates"]["rotation"]
    (kh, kw), (sh, sw) = pair(module.kernel_size), pair(module.scope_size)
    r = np.asarray(rotation).reshape(*rotation.shape[:3], -1, kh, kw, 2)
    rows = np.arange(kh)[:, None] + r[..., 0] + (sh - kh) / 2
    cols = np.arange(kw)[None, :] + r[..., 1] + (sw - kw) / 2
    assert rows.min() == 0 and rows.max() == sh - 1  # clamped at both ends, never beyond
    assert cols.min() == 0 and cols.max() == sw - 1
    assert np.isfinite(np.asarray(y)).all()
    expected = jax.jit(lambda p, x: ref_any(module, p, x))(v["params"], x)
    assert rel_err(y, expected) <= 1e-5


def test_pair_clips_bound_the_sown_offsets(rng):
    m = DeformKernelConv2d(
        4, 3, kernel_dilation=(2, 1), offset_clip=(-1.0, 0.5), rotation_clip=(-0.25, 0.75)
    )
    x = normal(rng, (1, 6, 6, 4))
    v = random_variables(m, x, rng=rng, scale=100.0)
    _, state = m.apply(v, x, mutable=["intermediates"])
    offset = np.asarray(state["intermediates"]["offset"][0]).reshape(1, 6, 6, 9, 2)
    rotation = np.asarray(state["intermediates"]["rotation"][0])
    # the dilation multiplies the clipped image offsets, row by 2, column by 1
    assert offset[..., 0].min() == -2.0 and offset[..., 0].max() == 1.0
    assert offset[..., 1].min() == -1.0 and offset[..., 1].max() == 0.5
    assert rotation.min() == -0.25 and rotation.max() == 0.75


def test_every_adaptive_layer_sows_what_it_predicts(rng):
    x = normal(rng, (2, 8, 7, 4))
    sown = {
        GlobalDeformKernel2d(4, 4, 3): {"coords": (2, 3, 3, 2)},
        LocalDeformKernel2d(4, 3, rotation_groups=2): {"rotation": (2, 8, 7, 36)},
        DeformKernelConv2d(4, 3): {"offset": (2, 8, 7, 18), "rotation": (2, 8, 7, 18)},
        DeformConv2d(3, strides=2): {"offset": (2, 4, 4, 18)},
        CondConv2d(4, 5, 3): {"routing": (2, 5)},
    }
    for m, expected in sown.items():
        _, state = jax.eval_shape(
            lambda m=m: m.init_with_output(KEY, x, mutable=["params", "intermediates"])
        )
        shapes = {k: v[0].shape for k, v in state["intermediates"].items()}
        assert shapes == expected, type(m).__name__


# --- 5. docstrings --------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL_MODULES, ids=lambda c: c.__name__)
def test_docstring_lists_every_attribute_and_parameter(rng, cls):
    doc = cls.__doc__
    attributes = doc.split("Attributes:")[1]
    for field in dataclasses.fields(cls):
        if field.name not in ("parent", "name"):
            assert f"\n      {field.name}: " in attributes, f"{cls.__name__}.{field.name}"
    module = next(m for m in CASES.values() if type(m) is cls)
    x = normal(rng, (2, 8, 7, 4))
    params = jax.eval_shape(module.init, KEY, x, *extra_inputs(module, x, rng))["params"]
    parameters = doc.split("Parameters::")[1].split("\n\n")[1]
    for path, _ in jax.tree_util.tree_leaves_with_path(params):
        name = "/".join(p.key for p in path)
        assert f" {name} " in parameters, f"{cls.__name__} does not document {name}"
    assert DeformKernel2d is LocalDeformKernel2d


# --- 6. bad configuration -------------------------------------------------------------------


BAD = [
    (SampleDepthwise(4, 3, features=5), r"features=5 .*\(2, 8, 7, 4\) \(C=4\)"),
    (DeformableSampleDepthwise(3, 3, features=8), "features=8"),
    (LocalDeformKernel2d(4, 3, features=3), r"features=3 .*\(2, 8, 7, 4\)"),
    (DeformKernelConv2d(4, 3, features=2), "features=2"),
    (DeformConv2d(3, features=16), "features=16"),
    (SampleDepthwise(2, 3), r"scope_size \(2, 2\) is smaller than kernel_size \(3, 3\)"),
    (LocalDeformKernel2d((3, 2), 3), r"scope_size \(3, 2\) is smaller"),
    (DeformKernelConv2d(4, 5), "smaller than kernel_size"),
    (GlobalDeformKernel2d(4, 2, 3), "smaller than kernel_size"),
    (LocalDeformKernel2d(4, 3, rotation_groups=3), r"C=4 .*rotation_groups=3"),
    (SampleDepthwise(4, 3, rotation_groups=8), "rotation_groups=8"),
    (DeformKernelConv2d(4, 3, rotation_groups=0), "rotation_groups"),
    (LocalDeformKernel2d(4, 3, rotation_clip="kernel"), "rotation_clip"),
    (LocalDeformKernel2d(4, 3, rotation_clip=(1.0, -1.0)), "min <= max"),
    (DeformConv2d(3, offset_clip="scope"), "offset_clip"),
    (DeformConv2d(3, padding="CIRCULAR"), "padding"),
    (SampleDepthwise(4, 3, padding=-1), "padding"),
    (GlobalDeformKernel2d(6, 4, 3, feature_group_count=3), "feature_group_count=3"),
    (CondConv2d(5, 2, 3, feature_group_count=2), "feature_group_count=2"),
    (CondConv2d(4, 0, 3), "num_experts"),
    (LocalDeformKernel2d(4, 3, features=6, feature_group_count=4), "feature_group_count=4"),
    (DeformKernelConv2d(4, 3, features=6, feature_group_count=3), "feature_group_count=3"),
    (SampleConv(6, 4, 3, rotation_groups=3), "rotation_groups=3"),
    (SampleConv(6, 2, 3), "smaller than kernel_size"),
    (DeformConv2d(9, padding="VALID"), "output would be empty"),
]


@pytest.mark.parametrize("module, message", BAD)
def test_bad_configuration_raises_at_init(rng, module, message):
    x = normal(rng, (2, 8, 7, 4))
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(module.init, KEY, x, *extra_inputs(module, x, rng))


def test_rank_is_checked(rng):
    with pytest.raises(ValueError, match=r"rank 4 \(N, H, W, C\), got shape \(8, 7, 4\)"):
        jax.eval_shape(LocalDeformKernel2d(4, 3).init, KEY, normal(rng, (8, 7, 4)))


# --- empty inputs ---------------------------------------------------------------------------


def test_global_deformable_kernel_on_an_empty_batch_is_empty():
    model = GlobalDeformKernel2d(features=3, scope_size=4, kernel_size=3, padding=1)
    x = jnp.ones((2, 6, 5, 4), jnp.float32)
    params = model.init(jax.random.key(0), x)
    assert model.apply(params, x[:0]).shape == (0, 6, 5, 3)
    grads = jax.grad(lambda p: model.apply(p, x[:0]).sum())(params)
    assert all(float(jnp.abs(g).max(initial=0.0)) == 0.0 for g in jax.tree.leaves(grads))


def test_condconv_without_input_channels_names_them():
    model = dk_jax.CondConv2d(features=4, kernel_size=3, num_experts=2)
    with pytest.raises(ValueError, match=r"CondConv2d.*input channels.*C=0"):
        model.init(jax.random.key(0), jnp.ones((1, 5, 5, 0), jnp.float32))
