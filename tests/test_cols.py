"""Claims about scope-space im2col and the grouped / full local deformable convolutions built
on it: the ffi columns agree with the reference columns, the grouped and full convolutions
agree with a naive reference that resamples the whole kernel at every location, and the columns
primitive differentiates, transposes and batches."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from jax.test_util import check_grads
from test_ops import make_case, smooth_case

import dk_jax
from dk_jax import reference

pytestmark = pytest.mark.skipif(not dk_jax.ffi_available("cpu"), reason="CPU library not built")

COL_CASES = [
    dict(k=(3, 3), s=(4, 4)),
    dict(k=(3, 3), s=(5, 4), groups=2, stride=(2, 2)),
    dict(k=(3, 2), s=(4, 4), pad=(0, 1), dil=(2, 1), h=10),
    dict(k=(1, 1), s=(3, 3), pad=(0, 0)),
    dict(k=(3, 3), s=(3, 3), groups=6, n=1, spread=4.0),
]


def case_id(case):
    return "-".join(f"{k}{v}" for k, v in case.items()).replace(" ", "")


def cols(deform, a, geo, scope, implementation):
    if deform:
        return dk_jax.deform_scope_im2col(
            a["x"],
            a["offset"],
            a["rotation"],
            scope_size=scope,
            **geo,
            implementation=implementation,
        )
    return dk_jax.scope_im2col(
        a["x"], a["rotation"], scope_size=scope, **geo, implementation=implementation
    )


@pytest.mark.parametrize("deform", [False, True])
@pytest.mark.parametrize("case", COL_CASES, ids=case_id)
def test_columns_match_reference(rng, case, deform):
    a, geo = make_case(rng, **case)
    got = cols(deform, a, geo, case["s"], "ffi")
    want = cols(deform, a, geo, case["s"], "xla")
    n, ho, wo = a["rotation"].shape[:3]
    assert got.shape == (n, ho, wo, *case["s"], a["x"].shape[-1])
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("deform", [False, True])
def test_columns_contracted_with_a_depthwise_kernel_are_the_depthwise_op(rng, deform):
    # sum_s cols[..., s, c] * weight[s, c] is sample_depthwise, by definition of the columns.
    a, geo = make_case(rng, groups=2)
    c = cols(deform, a, geo, (4, 4), "ffi")
    y = jnp.einsum("nijstc,stc->nijc", c, a["weight"])
    if deform:
        want = dk_jax.deform_sample_depthwise(
            a["x"], a["offset"], a["rotation"], a["weight"], **geo, implementation="ffi"
        )
    else:
        want = dk_jax.sample_depthwise(
            a["x"], a["rotation"], a["weight"], **geo, implementation="ffi"
        )
    assert rel_err(y, want) <= 1e-5


def conv_case(rng, *, c=8, features=8, groups=1, scope=(4, 4), rotation_groups=2, **kw):
    a, geo = make_case(rng, c=c, s=scope, groups=rotation_groups, **kw)
    kernel = jnp.asarray(rng.normal(size=(*scope, c // groups, features)), jnp.float32)
    return a, geo, kernel


def naive(a, geo, kernel, groups, deform):
    pair = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
    return reference.naive_sample_conv(
        a["x"],
        a["rotation"],
        kernel,
        a["offset"] if deform else None,
        kernel_size=pair(geo["kernel_size"]),
        stride=pair(geo["stride"]),
        padding=pair(geo["padding"]),
        dilation=pair(geo["dilation"]),
        rotation_groups=geo["rotation_groups"],
        feature_group_count=groups,
    )


def conv(a, geo, kernel, groups, deform, implementation="ffi"):
    if deform:
        return dk_jax.deform_sample_conv(
            a["x"],
            a["offset"],
            a["rotation"],
            kernel,
            **geo,
            feature_group_count=groups,
            implementation=implementation,
        )
    return dk_jax.sample_conv(
        a["x"],
        a["rotation"],
        kernel,
        **geo,
        feature_group_count=groups,
        implementation=implementation,
    )


@pytest.mark.parametrize("deform", [False, True])
@pytest.mark.parametrize(
    "groups, features, extra",
    [
        (1, 6, {}),  # full convolution
        (2, 4, dict(stride=(2, 2))),
        (4, 8, dict(scope=(5, 4), dil=(2, 2), pad=(2, 2))),
        (8, 8, {}),  # depthwise: the direct kernel
        (8, 16, dict(rotation_groups=4)),  # depthwise with a channel multiplier of 2
    ],
)
def test_grouped_and_full_match_naive_per_location_reference(rng, groups, features, extra, deform):
    a, geo, kernel = conv_case(rng, groups=groups, features=features, **extra)
    got = conv(a, geo, kernel, groups, deform)
    want = naive(a, geo, kernel, groups, deform)
    assert got.shape == want.shape == (*a["rotation"].shape[:3], features)
    assert rel_err(got, want) <= 1e-5
    # The xla path (reference columns + the same matmul) agrees too.
    assert rel_err(conv(a, geo, kernel, groups, deform, "xla"), want) <= 1e-5


@pytest.mark.parametrize("deform", [False, True])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_grouped_gradients_match_naive_reference(rng, groups, deform):
    a, geo, kernel = conv_case(rng, n=1, h=6, w=5, groups=groups, features=4)
    names = ("x", "offset", "rotation") if deform else ("x", "rotation")

    def loss(fn, *args):
        named = dict(zip(names, args[:-1], strict=True))
        return jnp.sum(jnp.sin(fn(named, args[-1])))

    ffi = lambda named, k: conv(named, geo, k, groups, deform)  # noqa: E731
    ref = lambda named, k: naive(named, geo, k, groups, deform)  # noqa: E731
    args = [a[k] for k in names] + [kernel]
    argnums = tuple(range(1, len(args) + 1))
    got = jax.grad(loss, argnums=argnums)(ffi, *args)
    want = jax.grad(loss, argnums=argnums)(ref, *args)
    for name, g, w in zip((*names, "kernel"), got, want, strict=True):
        assert rel_err(g, w) <= 1e-5, name


@pytest.mark.parametrize("deform", [False, True])
def test_check_grads_columns(rng, deform):
    # smooth_case keeps every read away from the kinks of the bilinear weights.
    a, geo = smooth_case(rng, deform)
    names = ("x", "offset", "rotation") if deform else ("x", "rotation")
    op = dk_jax.deform_scope_im2col if deform else dk_jax.scope_im2col
    scope = a["weight"].shape[:2]
    args = [a[k] for k in names]
    for i, _ in enumerate(names):

        def f(arg, i=i):
            full = list(args)
            full[i] = arg
            return op(*full, scope_size=scope, **geo, implementation="ffi")

        check_grads(f, (args[i],), order=1, modes=("fwd", "rev"), eps=1e-3, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("deform", [False, True])
def test_columns_jvp_and_vjp_match_reference(rng, deform):
    a, geo = make_case(rng, groups=2)
    names = ("x", "offset", "rotation") if deform else ("x", "rotation")
    op = dk_jax.deform_scope_im2col if deform else dk_jax.scope_im2col

    def f(impl):
        return lambda *args: op(*args, scope_size=4, **geo, implementation=impl)

    args = [a[k] for k in names]
    tangents = [jnp.asarray(rng.normal(size=v.shape), jnp.float32) for v in args]
    _, t_ffi = jax.jvp(f("ffi"), args, tangents)
    _, t_xla = jax.jvp(f("xla"), args, tangents)
    assert rel_err(t_ffi, t_xla) <= 1e-5
    y, vjp_ffi = jax.vjp(f("ffi"), *args)
    _, vjp_xla = jax.vjp(f("xla"), *args)
    ct = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    for name, g, w in zip(names, vjp_ffi(ct), vjp_xla(ct), strict=True):
        assert rel_err(g, w) <= 1e-5, name


def test_linear_transpose_in_x(rng):
    a, geo = make_case(rng, groups=2)
    f = lambda x: dk_jax.scope_im2col(  # noqa: E731
        x, a["rotation"], scope_size=4, **geo, implementation="ffi"
    )
    y = f(a["x"])
    ct = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    (tx,) = jax.linear_transpose(f, a["x"])(ct)
    # The adjoint identity <f(x), ct> = <x, f^T(ct)>.
    assert np.isclose(jnp.vdot(y, ct), jnp.vdot(a["x"], tx), rtol=1e-4)
    (rx,) = jax.linear_transpose(
        lambda x: dk_jax.scope_im2col(x, a["rotation"], scope_size=4, **geo, implementation="xla"),
        a["x"],
    )(ct)
    assert rel_err(tx, rx) <= 1e-5


@pytest.mark.parametrize("deform", [False, True])
def test_vmap_every_combination_matches_loop(rng, deform):
    a, geo = make_case(rng, n=2, h=6, w=5, c=4, groups=2)
    names = ("x", "offset", "rotation") if deform else ("x", "rotation")
    op = dk_jax.deform_scope_im2col if deform else dk_jax.scope_im2col
    f = lambda *args: op(*args, scope_size=(4, 4), **geo, implementation="ffi")  # noqa: E731
    batch = 3
    batched = {k: jnp.asarray(rng.normal(size=(batch, *a[k].shape)), jnp.float32) for k in names}
    for mask in itertools.product([False, True], repeat=len(names)):
        if not any(mask):
            continue
        args = [batched[k] if m else a[k] for k, m in zip(names, mask, strict=True)]
        got = jax.vmap(f, in_axes=[0 if m else None for m in mask])(*args)
        want = jnp.stack(
            [f(*[v[b] if m else v for v, m in zip(args, mask, strict=True)]) for b in range(batch)]
        )
        assert rel_err(got, want) <= 1e-6, mask


def test_vmap_of_grad_of_full_conv(rng):
    a, geo, kernel = conv_case(rng, n=1, h=6, w=5, c=4, features=3, groups=1)
    xs = jnp.asarray(rng.normal(size=(2, *a["x"].shape)), jnp.float32)

    def loss(x, k):
        return jnp.sum(dk_jax.sample_conv(x, a["rotation"], k, **geo) ** 2)

    got = jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(0, None))(xs, kernel)
    for b in range(2):
        want = jax.grad(loss, argnums=(0, 1))(xs[b], kernel)
        for g, w in zip(got, want, strict=True):
            assert rel_err(g[b], w) <= 1e-5


def test_low_precision_columns_agree_with_float32(rng):
    a, geo = make_case(rng, c=19, groups=1, dtype=jnp.bfloat16)
    up = {k: v.astype(jnp.float32) for k, v in a.items()}
    low = dk_jax.scope_im2col(a["x"], a["rotation"], scope_size=4, **geo, implementation="ffi")
    ref = dk_jax.scope_im2col(up["x"], up["rotation"], scope_size=4, **geo, implementation="xla")
    assert low.dtype == jnp.bfloat16
    assert rel_err(low.astype(jnp.float32), ref) <= 2e-2


def test_grad_of_full_conv_lowers_to_custom_calls_and_one_matmul_each_way(rng):
    a, geo, kernel = conv_case(rng, groups=1, features=5)
    loss = lambda x, r, k: jnp.sin(dk_jax.sample_conv(x, r, k, **geo)).sum()  # noqa: E731
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(a["x"], a["rotation"], kernel).as_text()
    for target in (
        "dk_sample_cols_forward",
        "dk_sample_cols_grad_image",
        "dk_sample_cols_grad_rotation",
    ):
        assert f"@{target}_v2(" in hlo, target
    for op_name in ("gather", "scatter", "convolution"):
        assert f"stablehlo.{op_name}" not in hlo, op_name


def test_depthwise_kernel_uses_the_direct_op(rng):
    a, geo, kernel = conv_case(rng, groups=8, features=8)
    hlo = (
        jax.jit(lambda x, r, k: dk_jax.sample_conv(x, r, k, **geo, feature_group_count=8))
        .lower(a["x"], a["rotation"], kernel)
        .as_text()
    )
    assert "@dk_sample_forward_v2(" in hlo and "cols" not in hlo


BAD = [
    (
        lambda a, k: dk_jax.scope_im2col(a["x"], a["rotation"], kernel_size=3, scope_size=2),
        ValueError,
        "scope_size",
    ),
    (
        lambda a, k: dk_jax.scope_im2col(a["x"], a["rotation"], kernel_size=3, scope_size="4"),
        TypeError,
        "scope_size",
    ),
    (
        lambda a, k: dk_jax.scope_im2col(a["x"][0], a["rotation"], kernel_size=3, scope_size=4),
        ValueError,
        "x",
    ),
    (
        lambda a, k: dk_jax.scope_im2col(
            a["x"], a["rotation"][..., :4], kernel_size=3, scope_size=4, padding=1
        ),
        ValueError,
        "rotation",
    ),
    (
        lambda a, k: dk_jax.sample_conv(
            a["x"], a["rotation"], k, kernel_size=3, padding=1, feature_group_count=3
        ),
        ValueError,
        "feature_group_count",
    ),
    (
        lambda a, k: dk_jax.sample_conv(
            a["x"], a["rotation"], k[:, :, :3], kernel_size=3, padding=1
        ),
        ValueError,
        "kernel",
    ),
    (
        lambda a, k: dk_jax.sample_conv(a["x"], a["rotation"], k[0], kernel_size=3, padding=1),
        ValueError,
        "kernel",
    ),
    (
        lambda a, k: dk_jax.sample_conv(
            a["x"], a["rotation"], k.astype(jnp.float16), kernel_size=3, padding=1
        ),
        TypeError,
        "kernel",
    ),
]


@pytest.mark.parametrize("index", range(len(BAD)))
def test_bad_input_raises_clear_error(rng, index):
    a, _, kernel = conv_case(rng, rotation_groups=1)
    fn, error, name = BAD[index]
    with pytest.raises(error, match=name):
        fn(a, kernel)
    with pytest.raises(error, match=name):
        jax.jit(lambda x, r, k: fn(dict(a, x=x, rotation=r), k))(a["x"], a["rotation"], kernel)
