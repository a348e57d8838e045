"""Claims about the operators (docs/OPERATORS.md) on the ffi path: it agrees with the
independent jax.numpy reference, differentiates, transposes and batches, and handles bad and
non-finite input without crashing."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from jax.test_util import check_grads

import dk_jax
from dk_jax import reference

pytestmark = pytest.mark.skipif(not dk_jax.ffi_available("cpu"), reason="CPU library not built")


def out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def positions(rng, shape, spread):
    """Offsets mixing smooth values, exact integers, half-integers and far-outside values."""
    smooth = rng.normal(size=shape) * spread
    integer = rng.integers(-int(spread) - 3, int(spread) + 4, size=shape).astype(np.float64)
    half = integer + 0.5
    far = rng.choice([-1.0, 1.0], size=shape) * (spread + rng.uniform(3, 50, size=shape))
    pick = rng.choice(4, size=shape, p=[0.55, 0.2, 0.1, 0.15])
    return np.choose(pick, [smooth, integer, half, far])


def make_case(
    rng,
    *,
    n=2,
    h=9,
    w=8,
    c=6,
    k=(3, 3),
    s=(4, 4),
    stride=(1, 1),
    pad=(1, 1),
    dil=(1, 1),
    groups=1,
    spread=1.5,
    dtype=np.float32,
):
    ho, wo = (
        out_size(h, k[0], stride[0], pad[0], dil[0]),
        out_size(w, k[1], stride[1], pad[1], dil[1]),
    )
    x = rng.normal(size=(n, h, w, c))
    weight = rng.normal(size=(*s, c))
    rotation = positions(rng, (n, ho, wo, groups * k[0] * k[1] * 2), spread)
    offset = positions(rng, (n, ho, wo, k[0] * k[1] * 2), spread)
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    geometry = dict(kernel_size=k, stride=stride, padding=pad, dilation=dil, rotation_groups=groups)
    return dict(
        x=cast(x), weight=cast(weight), rotation=cast(rotation), offset=cast(offset)
    ), geometry


# A randomised matrix of geometries: every value of each axis of variation appears.
CASES = [
    dict(k=(1, 1), s=(1, 1), pad=(0, 0)),
    dict(k=(1, 1), s=(3, 3), pad=(0, 0)),
    dict(k=(3, 3), s=(3, 3)),
    dict(k=(3, 3), s=(4, 4)),
    dict(k=(3, 3), s=(5, 5), stride=(2, 2)),
    dict(k=(5, 5), s=(5, 5), pad=(2, 2)),
    dict(k=(5, 5), s=(8, 7), pad=(2, 2), dil=(2, 2), h=13, w=12),
    dict(k=(3, 2), s=(4, 4), pad=(0, 1)),
    dict(k=(2, 3), s=(3, 5), stride=(2, 1), pad=(2, 0)),
    dict(k=(3, 3), s=(4, 4), dil=(2, 2), pad=(2, 2)),
    dict(k=(3, 3), s=(4, 4), stride=(2, 2), pad=(0, 0), dil=(2, 1)),
    dict(k=(3, 3), s=(4, 4), groups=2),
    dict(k=(3, 3), s=(5, 4), groups=6),
    dict(k=(3, 3), s=(4, 4), groups=3, c=9, n=1),
    dict(k=(3, 3), s=(4, 4), n=1, c=13, spread=4.0),
    dict(k=(3, 3), s=(6, 6), n=3, c=11, spread=6.0, stride=(2, 2), pad=(2, 2)),
    dict(k=(4, 4), s=(4, 4), pad=(1, 2)),
    # 83 = 64 + 16 + 3 channels: every channel block of the one-group CPU forward.
    dict(k=(3, 3), s=(4, 4), c=83, n=1, h=5, w=6),
    # 37 = 16 + 16 + 5 output columns: every run of the CPU forward's footprint table.
    dict(k=(3, 3), s=(4, 4), c=5, n=1, h=3, w=37),
    dict(k=(3, 3), s=(5, 4), c=10, n=1, h=4, w=40, stride=(1, 2), dil=(1, 2), pad=(1, 2)),
]


def case_id(case):
    return "-".join(f"{k}{v}" for k, v in case.items()).replace(" ", "")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_sample_depthwise_matches_reference(rng, case):
    a, geo = make_case(rng, **case)
    ffi = dk_jax.sample_depthwise(a["x"], a["rotation"], a["weight"], **geo, implementation="ffi")
    xla = dk_jax.sample_depthwise(a["x"], a["rotation"], a["weight"], **geo, implementation="xla")
    assert ffi.shape == xla.shape and ffi.dtype == jnp.float32
    assert rel_err(ffi, xla) <= 1e-5


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_deform_sample_depthwise_matches_reference(rng, case):
    a, geo = make_case(rng, **case)
    args = (a["x"], a["offset"], a["rotation"], a["weight"])
    ffi = dk_jax.deform_sample_depthwise(*args, **geo, implementation="ffi")
    xla = dk_jax.deform_sample_depthwise(*args, **geo, implementation="xla")
    assert rel_err(ffi, xla) <= 1e-5


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_nd_linear_sample_matches_reference(rng, dims):
    shape = (5, 4, 3)[:dims]
    data = jnp.asarray(rng.normal(size=(*shape, 7)), jnp.float32)
    coord = jnp.asarray(positions(rng, (40, dims), 2.5) + 1.5, jnp.float32)
    ffi = dk_jax.nd_linear_sample(data, coord, implementation="ffi")
    xla = dk_jax.nd_linear_sample(data, coord, implementation="xla")
    assert rel_err(ffi, xla) <= 1e-5


@pytest.mark.parametrize("groups, c", [(2, 6), (1, 83)])
@pytest.mark.parametrize("dtype, tol", [(jnp.bfloat16, 2e-2), (jnp.float16, 2e-3)])
def test_low_precision_agrees_with_float32(rng, dtype, tol, groups, c):
    # Inputs are rounded to the low precision first, so the only differences are in the
    # output rounding (accumulation is float32 on both sides).
    a, geo = make_case(rng, k=(3, 3), s=(4, 4), groups=groups, c=c, spread=1.0, dtype=dtype)
    up = {k: v.astype(jnp.float32) for k, v in a.items()}
    args = ("x", "offset", "rotation", "weight")
    low = dk_jax.deform_sample_depthwise(*[a[k] for k in args], **geo, implementation="ffi")
    ref = dk_jax.deform_sample_depthwise(*[up[k] for k in args], **geo, implementation="ffi")
    assert low.dtype == dtype
    assert rel_err(low.astype(jnp.float32), ref) <= tol
    low = dk_jax.sample_depthwise(a["x"], a["rotation"], a["weight"], **geo, implementation="ffi")
    ref = dk_jax.sample_depthwise(
        up["x"], up["rotation"], up["weight"], **geo, implementation="xla"
    )
    assert rel_err(low.astype(jnp.float32), ref) <= tol
    data, coord = a["x"][0], jnp.abs(a["rotation"][0, 0, :, :2]) * 2
    low = dk_jax.nd_linear_sample(data, coord, implementation="ffi")
    ref = dk_jax.nd_linear_sample(
        data.astype(jnp.float32), coord.astype(jnp.float32), implementation="xla"
    )
    assert low.dtype == dtype and rel_err(low.astype(jnp.float32), ref) <= tol


# --- gradients ---------------------------------------------------------------------------


def smooth_case(rng, deform, groups=2):
    """A small case whose sample positions stay away from integers (finite differences): the
    scope exceeds the kernel by an even amount, so positions are integer + rotation."""
    a, geo = make_case(rng, n=2, h=5, w=4, c=4, k=(3, 2), s=(5, 4), groups=groups, pad=(1, 1))
    shape_r, shape_o = a["rotation"].shape, a["offset"].shape
    a["rotation"] = jnp.asarray(
        rng.uniform(0.2, 0.8, shape_r) * rng.choice([-1, 1], shape_r), jnp.float32
    )
    a["offset"] = jnp.asarray(
        rng.uniform(0.2, 0.8, shape_o) * rng.choice([-1, 1], shape_o), jnp.float32
    )
    return a, geo


@pytest.mark.parametrize("deform", [False, True])
def test_check_grads_every_argument(rng, deform):
    a, geo = smooth_case(rng, deform)
    if deform:
        names = ("x", "offset", "rotation", "weight")
        op = dk_jax.deform_sample_depthwise
    else:
        names = ("x", "rotation", "weight")
        op = dk_jax.sample_depthwise
    args = [a[k] for k in names]
    for i, _ in enumerate(names):

        def f(arg, i=i):
            full = list(args)
            full[i] = arg
            return op(*full, **geo, implementation="ffi")

        check_grads(f, (args[i],), order=1, modes=("fwd", "rev"), eps=1e-3, atol=2e-2, rtol=2e-2)


def test_check_grads_nd_linear_sample(rng):
    data = jnp.asarray(rng.normal(size=(4, 3, 5, 2)), jnp.float32)
    coord = jnp.asarray(rng.uniform(0.1, 0.9, (6, 3)) + rng.integers(-1, 4, (6, 3)), jnp.float32)
    f_data = lambda d: dk_jax.nd_linear_sample(d, coord, implementation="ffi")  # noqa: E731
    f_coord = lambda c: dk_jax.nd_linear_sample(data, c, implementation="ffi")  # noqa: E731
    check_grads(f_data, (data,), order=1, modes=("fwd", "rev"), eps=1e-3, atol=2e-2, rtol=2e-2)
    check_grads(f_coord, (coord,), order=1, modes=("fwd", "rev"), eps=1e-3, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("deform", [False, True])
def test_gradients_match_reference(rng, deform):
    a, geo = make_case(rng, k=(3, 3), s=(5, 4), groups=2, spread=2.0)
    names = ("x", "offset", "rotation", "weight") if deform else ("x", "rotation", "weight")
    op = dk_jax.deform_sample_depthwise if deform else dk_jax.sample_depthwise
    cot = jnp.asarray(rng.normal(size=op(*[a[k] for k in names], **geo).shape), jnp.float32)

    def loss(impl):
        return lambda *args: jnp.vdot(cot, op(*args, **geo, implementation=impl))

    args = [a[k] for k in names]
    g_ffi = jax.grad(loss("ffi"), argnums=tuple(range(len(args))))(*args)
    g_xla = jax.grad(loss("xla"), argnums=tuple(range(len(args))))(*args)
    for name, p, q in zip(names, g_ffi, g_xla, strict=True):
        assert rel_err(p, q) <= 1e-5, name
    # Forward mode through the JVP primitives, too.
    tangents = [jnp.asarray(rng.normal(size=t.shape), jnp.float32) for t in args]
    _, t_ffi = jax.jvp(lambda *z: op(*z, **geo, implementation="ffi"), args, tangents)
    _, t_xla = jax.jvp(lambda *z: op(*z, **geo, implementation="xla"), args, tangents)
    assert rel_err(t_ffi, t_xla) <= 1e-5


def test_nd_gradients_match_reference(rng):
    data = jnp.asarray(rng.normal(size=(5, 4, 3)), jnp.float32)
    coord = jnp.asarray(positions(rng, (30, 2), 2.0) + 1.5, jnp.float32)
    cot = jnp.asarray(rng.normal(size=(30, 3)), jnp.float32)
    g = lambda impl: jax.grad(  # noqa: E731
        lambda d, c: jnp.vdot(cot, dk_jax.nd_linear_sample(d, c, implementation=impl)), (0, 1)
    )(data, coord)
    for p, q in zip(g("ffi"), g("xla"), strict=True):
        assert rel_err(p, q) <= 1e-5


def test_linear_transpose_in_x_and_weight(rng):
    a, geo = make_case(rng, groups=2)
    x, off, rot, w = a["x"], a["offset"], a["rotation"], a["weight"]
    op = lambda x, w: dk_jax.deform_sample_depthwise(x, off, rot, w, **geo, implementation="ffi")  # noqa: E731
    ref = lambda x, w: dk_jax.deform_sample_depthwise(x, off, rot, w, **geo, implementation="xla")  # noqa: E731
    ct = jnp.asarray(rng.normal(size=op(x, w).shape), jnp.float32)
    (tx,) = jax.linear_transpose(lambda x: op(x, w), x)(ct)
    (rx,) = jax.linear_transpose(lambda x: ref(x, w), x)(ct)
    assert rel_err(tx, rx) <= 1e-5
    (tw,) = jax.linear_transpose(lambda w: op(x, w), w)(ct)
    (rw,) = jax.linear_transpose(lambda w: ref(x, w), w)(ct)
    assert rel_err(tw, rw) <= 1e-5
    # The adjoint identity <A x, ct> = <x, A^T ct>, independent of the reference.
    assert np.isclose(jnp.vdot(op(x, w), ct), jnp.vdot(x, tx), rtol=1e-4)
    (td,) = jax.linear_transpose(
        lambda d: dk_jax.nd_linear_sample(d, rot[0, 0, :, :2] + 1.0, implementation="ffi"), w
    )(ct[0, 0, :, :])
    (rd,) = jax.linear_transpose(
        lambda d: dk_jax.nd_linear_sample(d, rot[0, 0, :, :2] + 1.0, implementation="xla"), w
    )(ct[0, 0, :, :])
    assert rel_err(td, rd) <= 1e-5


@pytest.mark.parametrize("deform", [False, True])
def test_grad_lowers_to_custom_calls_only(rng, deform):
    a, geo = make_case(rng)
    names = ("x", "offset", "rotation", "weight") if deform else ("x", "rotation", "weight")
    op = dk_jax.deform_sample_depthwise if deform else dk_jax.sample_depthwise
    loss = lambda *args: jnp.sin(op(*args, **geo, implementation="ffi")).sum()  # noqa: E731
    hlo = (
        jax.jit(jax.grad(loss, argnums=tuple(range(len(names)))))
        .lower(*[a[k] for k in names])
        .as_text()
    )
    kind = "deform" if deform else "sample"
    expected = {
        f"dk_{kind}_forward_v2",
        f"dk_{kind}_grad_image_v2",
        f"dk_{kind}_grad_weight_v2",
        f"dk_{kind}_grad_rotation_v2",
    } | ({"dk_deform_grad_offset_v2"} if deform else set())
    found = set(t for t in expected if f"custom_call @{t}(" in hlo or f"@{t}(" in hlo)
    assert found == expected
    # No gathers, scatters, convolutions or dots: the op's work is all in the custom calls.
    for op_name in ("gather", "scatter", "convolution", "dot_general", "floor"):
        assert f"stablehlo.{op_name}" not in hlo, op_name


# --- batching ----------------------------------------------------------------------------


@pytest.mark.parametrize("deform", [False, True])
def test_vmap_every_combination_matches_loop(rng, deform):
    a, geo = make_case(rng, n=2, h=6, w=5, c=4, groups=2)
    names = ("x", "offset", "rotation", "weight") if deform else ("x", "rotation", "weight")
    op = dk_jax.deform_sample_depthwise if deform else dk_jax.sample_depthwise
    f = lambda *args: op(*args, **geo, implementation="ffi")  # noqa: E731
    batch = 3
    batched = {k: jnp.asarray(rng.normal(size=(batch, *a[k].shape)), jnp.float32) for k in names}
    for mask in itertools.product([False, True], repeat=len(names)):
        if not any(mask):
            continue
        args = [batched[k] if m else a[k] for k, m in zip(names, mask, strict=True)]
        axes = [0 if m else None for m in mask]
        got = jax.vmap(f, in_axes=axes)(*args)
        want = jnp.stack(
            [
                f(*[arg[b] if m else arg for arg, m in zip(args, mask, strict=True)])
                for b in range(batch)
            ]
        )
        assert rel_err(got, want) <= 1e-6, mask


def test_vmap_gradients_and_nested(rng):
    a, geo = make_case(rng, n=1, h=6, w=5, c=4, groups=2)
    f = lambda x, r, w: dk_jax.sample_depthwise(x, r, w, **geo, implementation="ffi")  # noqa: E731
    xs = jnp.asarray(rng.normal(size=(2, 3, *a["x"].shape)), jnp.float32)
    ws = jnp.asarray(rng.normal(size=(3, *a["weight"].shape)), jnp.float32)
    # Nested vmap, the inner over x and weight, the outer over x only.
    got = jax.vmap(jax.vmap(f, in_axes=(0, None, 0)), in_axes=(0, None, None))(
        xs, a["rotation"], ws
    )
    want = jnp.stack(
        [jnp.stack([f(xs[i, j], a["rotation"], ws[j]) for j in range(3)]) for i in range(2)]
    )
    assert rel_err(got, want) <= 1e-6
    # Per-example gradients (vmap of grad): the batched backward primitives.
    g = jax.vmap(jax.grad(lambda x, r, w: f(x, r, w).sum(), argnums=(1, 2)), in_axes=(0, None, 0))
    gr, gw = g(xs[0], a["rotation"], ws)
    for j in range(3):
        wr, ww = jax.grad(lambda x, r, w: f(x, r, w).sum(), argnums=(1, 2))(
            xs[0, j], a["rotation"], ws[j]
        )
        assert rel_err(gr[j], wr) <= 1e-6 and rel_err(gw[j], ww) <= 1e-6


def test_vmap_nd_linear_sample(rng):
    data = jnp.asarray(rng.normal(size=(3, 5, 4, 2)), jnp.float32)
    coord = jnp.asarray(rng.uniform(-1, 5, (3, 6, 2)), jnp.float32)
    f = lambda d, c: dk_jax.nd_linear_sample(d, c, implementation="ffi")  # noqa: E731
    for axes in [(0, None), (None, 0), (0, 0)]:
        args = [data if axes[0] == 0 else data[0], coord if axes[1] == 0 else coord[0]]
        got = jax.vmap(f, in_axes=axes)(*args)
        want = jnp.stack(
            [
                f(args[0][b] if axes[0] == 0 else args[0], args[1][b] if axes[1] == 0 else args[1])
                for b in range(3)
            ]
        )
        assert rel_err(got, want) <= 1e-6
    got = jax.vmap(jax.vmap(f))(data[None].repeat(2, 0), coord[None].repeat(2, 0))
    assert rel_err(got[1], jax.vmap(f)(data, coord)) <= 1e-6


def test_jit_and_default_implementation_use_ffi(rng):
    a, geo = make_case(rng)
    f = jax.jit(lambda x, r, w: dk_jax.sample_depthwise(x, r, w, **geo))
    assert "dk_sample_forward" in f.lower(a["x"], a["rotation"], a["weight"]).as_text()
    ref = reference.sample_depthwise(
        a["x"],
        a["rotation"],
        a["weight"],
        **{
            "kernel_size": geo["kernel_size"],
            "stride": geo["stride"],
            "padding": geo["padding"],
            "dilation": geo["dilation"],
            "rotation_groups": geo["rotation_groups"],
        },
    )
    assert rel_err(f(a["x"], a["rotation"], a["weight"]), ref) <= 1e-5


# --- bad and non-finite input --------------------------------------------------------------


def test_empty_batch(rng):
    a, geo = make_case(rng, n=0)
    y = dk_jax.deform_sample_depthwise(
        a["x"], a["offset"], a["rotation"], a["weight"], **geo, implementation="ffi"
    )
    assert y.shape == (0, 9, 8, 6)
    gw = jax.grad(lambda w: dk_jax.sample_depthwise(a["x"], a["rotation"], w, **geo).sum())(
        a["weight"]
    )
    assert gw.shape == a["weight"].shape and not np.asarray(gw).any()


def test_inf_offsets_read_zero_and_nan_poisons(rng):
    a, geo = make_case(rng, groups=1, pad=(1, 1))
    for bad in (np.inf, -np.inf):
        rot = jnp.full_like(a["rotation"], bad)
        y = dk_jax.sample_depthwise(a["x"], rot, a["weight"], **geo, implementation="ffi")
        assert np.array_equal(np.asarray(y), np.zeros(y.shape))
        off = jnp.full_like(a["offset"], bad)
        y = dk_jax.deform_sample_depthwise(
            a["x"], off, a["rotation"], a["weight"], **geo, implementation="ffi"
        )
        assert np.array_equal(np.asarray(y), np.zeros(y.shape))
        grads = jax.grad(
            lambda o, r: dk_jax.deform_sample_depthwise(
                a["x"], o, r, a["weight"], **geo, implementation="ffi"
            ).sum(),
            (0, 1),
        )(off, rot)
        assert all(np.array_equal(np.asarray(g), np.zeros(g.shape)) for g in grads)
    rot = a["rotation"].at[0, 2, 3, 4].set(jnp.nan)  # tap (0, 2) of location (0, 2, 3)
    y = np.asarray(dk_jax.sample_depthwise(a["x"], rot, a["weight"], **geo, implementation="ffi"))
    assert (
        np.isnan(y[0, 2, 3]).all() and np.isfinite(np.delete(y.reshape(-1, 6), 2 * 8 + 3, 0)).all()
    )
    coord = jnp.array([[np.nan, 1.0], [np.inf, 1.0], [-np.inf, 0.0], [1.0, 1.0]], jnp.float32)
    out = np.asarray(dk_jax.nd_linear_sample(a["weight"], coord, implementation="ffi"))
    assert np.isnan(out[0]).all() and not out[1:3].any() and np.isfinite(out[3]).all()


def bad_calls(a, geo):
    x, off, rot, w = a["x"], a["offset"], a["rotation"], a["weight"]
    sd = dk_jax.sample_depthwise
    return [
        ("x must have rank 4", ValueError, lambda: sd(x[0], rot, w, **geo)),
        ("weight must have rank 3", ValueError, lambda: sd(x, rot, w[None], **geo)),
        ("rotation must have shape", ValueError, lambda: sd(x, rot[:1], w, **geo)),
        ("rotation must have shape", ValueError, lambda: sd(x, rot[:, :-1], w, **geo)),
        ("weight has 5 channels", ValueError, lambda: sd(x, rot, w[..., :5], **geo)),
        (
            "divisible by rotation_groups",
            ValueError,
            lambda: sd(x, rot, w, **dict(geo, rotation_groups=4)),
        ),
        ("smaller than kernel_size", ValueError, lambda: sd(x, rot, w, **dict(geo, kernel_size=5))),
        ("stride must be >= 1", ValueError, lambda: sd(x, rot, w, **dict(geo, stride=0))),
        ("stride must be >= 1", ValueError, lambda: sd(x, rot, w, **dict(geo, stride=(1, -1)))),
        ("dilation must be >= 1", ValueError, lambda: sd(x, rot, w, **dict(geo, dilation=0))),
        ("padding must be >= 0", ValueError, lambda: sd(x, rot, w, **dict(geo, padding=-1))),
        (
            "kernel_size must be an int or a pair",
            TypeError,
            lambda: sd(x, rot, w, **dict(geo, kernel_size=(3, 3, 3))),
        ),
        ("share one dtype", TypeError, lambda: sd(x, rot.astype(jnp.bfloat16), w, **geo)),
        (
            "x must be a real floating-point",
            TypeError,
            lambda: sd(x.astype(jnp.complex64), rot, w, **geo),
        ),
        ("implementation must be", ValueError, lambda: sd(x, rot, w, **geo, implementation="cuda")),
        (
            "offset must have shape",
            ValueError,
            lambda: dk_jax.deform_sample_depthwise(x, off[..., :4], rot, w, **geo),
        ),
        (
            "offset must have rank 4",
            ValueError,
            lambda: dk_jax.deform_sample_depthwise(x, off[0], rot, w, **geo),
        ),
        (
            "coord must have shape",
            ValueError,
            lambda: dk_jax.nd_linear_sample(w, jnp.zeros((3, 3), jnp.float32)),
        ),
        (
            "coord must be a real floating-point",
            TypeError,
            lambda: dk_jax.nd_linear_sample(w, jnp.zeros((3, 2), jnp.complex64)),
        ),
        ("output would be empty", ValueError, lambda: sd(x[:, :2], rot, w, **dict(geo, padding=0))),
    ]


@pytest.mark.parametrize("index", range(20))
def test_bad_input_raises_clear_error(rng, index):
    a, geo = make_case(rng, groups=2)
    message, error, call = bad_calls(a, geo)[index]
    with pytest.raises(error, match=message):
        call()
    # The same error is raised under jit, before anything reaches the kernels.
    with pytest.raises(error, match=message):
        jax.jit(call)()


def test_nan_positions_read_and_write_nothing(rng):
    """A NaN offset, rotation or coordinate poisons the outputs that read through it and the
    gradients, as the reference does, but sends nothing back into the planes it would have read
    through that position: no NaN lands on element 0 of the x, weight or nd data gradients."""
    a, geo = make_case(rng, groups=1, pad=(1, 1))
    rot = a["rotation"].at[0, 2, 3, 4].set(jnp.nan)
    off = a["offset"].at[1, 4, 5, 7].set(jnp.nan)
    ct = jnp.asarray(rng.normal(size=(2, 9, 8, 6)), jnp.float32)

    def grads(implementation):
        def loss(x, o, r, w):
            y = dk_jax.deform_sample_depthwise(x, o, r, w, **geo, implementation=implementation)
            return jnp.vdot(ct, y)

        return jax.grad(loss, (0, 1, 2, 3))(a["x"], off, rot, a["weight"])

    # The forward: NaN exactly where the reference has it (the CPU forward builds its
    # footprints branch-free, apart from the gradients' footprints).
    for args, op in (
        ((a["x"], off, rot, a["weight"]), dk_jax.deform_sample_depthwise),
        ((a["x"], rot, a["weight"]), dk_jax.sample_depthwise),
    ):
        got = np.asarray(op(*args, **geo, implementation="ffi"))
        want = np.asarray(op(*args, **geo, implementation="xla"))
        assert np.isnan(want).any()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)

    names = ("x", "offset", "rotation", "weight")
    for name, got, want in zip(names, grads("ffi"), grads("xla"), strict=True):
        got, want = np.asarray(got), np.asarray(want)
        if name in ("x", "weight"):
            np.testing.assert_allclose(
                got, want, rtol=1e-4, atol=1e-4, equal_nan=True, err_msg=name
            )
        else:
            assert_position_gradient(got, want, poisoned=4, err_msg=name)

    data = jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32)
    coord = jnp.array([[np.nan, 1.0], [0.5, 2.5], [1.0, np.nan]], jnp.float32)
    gout = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)

    def nd_grads(implementation):
        def loss(d, c):
            return jnp.vdot(gout, dk_jax.nd_linear_sample(d, c, implementation=implementation))

        return jax.grad(loss, (0, 1))(data, coord)

    got, want = ([np.asarray(g) for g in grads] for grads in (nd_grads("ffi"), nd_grads("xla")))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5, equal_nan=True)
    assert_position_gradient(got[1], want[1], poisoned=4, err_msg="coord")


def assert_position_gradient(got, want, poisoned, err_msg):
    """Which components of a NaN position's own gradient the reference leaves finite depends
    on how JAX orders 0 * NaN in its product rule; the ffi makes all of them NaN. Both agree
    wherever both are numbers, and only the `poisoned` components are NaN."""
    assert np.isnan(got[np.isnan(want)]).all(), err_msg
    finite = ~np.isnan(got)
    assert finite.sum() == got.size - poisoned, err_msg
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-4, atol=1e-4, err_msg=err_msg)


@pytest.mark.parametrize("shape", [(0, 4, 3), (3, 0, 3)])
@pytest.mark.parametrize("implementation", ["ffi", "xla"])
def test_nd_empty_spatial_dimension_reads_zero(shape, implementation):
    """Data with an empty spatial dimension has nothing to read: zeros, NaN coordinates
    included, and zero gradients of the right shapes (docs/OPERATORS.md, section 4)."""
    data = jnp.ones(shape, jnp.float32)
    coord = jnp.array([[0.5, 1.0], [np.nan, 0.0], [-0.5, -0.5]], jnp.float32)

    def f(d, c):
        return dk_jax.nd_linear_sample(d, c, implementation=implementation)

    out = np.asarray(f(data, coord))
    assert out.shape == (3, 3) and np.array_equal(out, np.zeros((3, 3)))
    gd, gc = jax.grad(lambda d, c: f(d, c).sum(), (0, 1))(data, coord)
    assert gd.shape == shape and np.array_equal(np.asarray(gc), np.zeros((3, 2)))
    # The primitive itself (as the layers call it) on the ffi path reads nothing either.
    if implementation == "ffi":
        from dk_jax import primitives as prims

        direct = prims.nd_bind("forward", data=data[None], coord=coord[None])[0]
        assert np.array_equal(np.asarray(direct), np.zeros((3, 3)))
