"""Claims about the derivatives of every op on the ffi path, over the whole geometry matrix of
the forward tests: reverse mode (VJP) and forward mode (JVP) in every differentiable argument
agree with the independent jax.numpy reference; directional derivatives agree with central
differences of the reference in float64; per-example gradients batch; the transposes that
second-order derivatives use are the right primitives; low-precision inputs accumulate in
float32."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from test_ops import CASES, case_id, make_case, smooth_case

import dk_jax
from dk_jax import reference

pytestmark = pytest.mark.skipif(not dk_jax.ffi_available("cpu"), reason="CPU library not built")

# op name -> (public op, its array arguments in order, whether the op takes a scope_size)
OPS = {
    "sample_depthwise": (dk_jax.sample_depthwise, ("x", "rotation", "weight"), False),
    "deform_sample_depthwise": (
        dk_jax.deform_sample_depthwise,
        ("x", "offset", "rotation", "weight"),
        False,
    ),
    "scope_im2col": (dk_jax.scope_im2col, ("x", "rotation"), True),
    "deform_scope_im2col": (dk_jax.deform_scope_im2col, ("x", "offset", "rotation"), True),
}
DEPTHWISE = ("sample_depthwise", "deform_sample_depthwise")
COLUMNS = ("scope_im2col", "deform_scope_im2col")


def bound(name, a, geo, implementation):
    """The op `name` as a function of its array arguments only."""
    op, _, takes_scope = OPS[name]
    extra = dict(scope_size=a["weight"].shape[:2]) if takes_scope else {}
    return lambda *args: op(*args, **geo, **extra, implementation=implementation)


# The reference's derivatives are large unrolled graphs whose compilation dominates these
# tests; LLVM's optimisations do not change their values, only the time it takes to compile.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def derivatives(f, args, cot, tangents):
    """(the VJP of cot in every argument, the JVP of all the tangents together), compiled as
    one function so each implementation compiles once per case."""

    def run(args, cot, tangents):
        _, vjp = jax.vjp(f, *args)
        return vjp(cot), jax.jvp(f, args, tangents)[1]

    compiled = jax.jit(run).lower(args, cot, tangents).compile(compiler_options=FAST_COMPILE)
    return compiled(args, cot, tangents)


def assert_derivatives_match(rng, name, a, geo):
    _, names, _ = OPS[name]
    args = tuple(a[k] for k in names)
    ffi, xla = bound(name, a, geo, "ffi"), bound(name, a, geo, "xla")
    out = jax.eval_shape(ffi, *args)
    cot = jnp.asarray(rng.normal(size=out.shape), jnp.float32)
    tangents = tuple(jnp.asarray(rng.normal(size=v.shape), jnp.float32) for v in args)
    got_vjp, got_jvp = derivatives(ffi, args, cot, tangents)
    want_vjp, want_jvp = derivatives(xla, args, cot, tangents)
    for k, g, w in zip(names, got_vjp, want_vjp, strict=True):
        assert rel_err(g, w) <= 1e-5, f"VJP in {k}: {rel_err(g, w):.2e}"
    assert rel_err(got_jvp, want_jvp) <= 1e-5, f"JVP: {rel_err(got_jvp, want_jvp):.2e}"


# --- the whole matrix ----------------------------------------------------------------------
# The reference's derivatives take seconds to compile per case, so `make test` runs a subset
# of the matrix that still holds every axis of variation (stride, dilation, asymmetric kernel
# and scope, one and several rotation groups, 83 channels, far and integer positions); the
# rest runs under `make test-slow`.
DEFAULT_CASES = (4, 6, 8, 10, 12, 15, 17)


def matrix(cases, default):
    return [
        pytest.param(c, id=case_id(c), marks=() if i in default else pytest.mark.slow)
        for i, c in enumerate(cases)
    ]


@pytest.mark.parametrize("name", DEPTHWISE)
@pytest.mark.parametrize("case", matrix(CASES, DEFAULT_CASES))
def test_depthwise_derivatives_match_reference(rng, case, name):
    a, geo = make_case(rng, **case)
    assert_derivatives_match(rng, name, a, geo)


# The columns ops carry a scope-sized plane per channel, so their matrix is a subset.
COLUMN_CASES = [c for c in CASES if c.get("c", 6) <= 13 and c.get("n", 2) <= 2 and c["s"] != (1, 1)]


@pytest.mark.parametrize("name", COLUMNS)
@pytest.mark.parametrize("case", matrix(COLUMN_CASES, (7, 9, 11)))
def test_columns_derivatives_match_reference(rng, case, name):
    a, geo = make_case(rng, **case)
    assert_derivatives_match(rng, name, a, geo)


@pytest.mark.parametrize("name", DEPTHWISE + COLUMNS)
@pytest.mark.parametrize("bad", [np.inf, -np.inf])
def test_derivatives_at_infinite_positions_match_reference(rng, name, bad):
    # An infinite rotation or offset reads outside: its derivatives are exactly zero, and the
    # finite taps around it still differentiate as usual.
    a, geo = make_case(rng, groups=2, stride=(2, 1), dil=(1, 2), pad=(2, 2))
    for key in ("rotation", "offset"):
        mask = rng.random(a[key].shape) < 0.3
        a[key] = jnp.where(mask, bad, a[key])
    assert_derivatives_match(rng, name, a, geo)


# --- nd_linear_sample in every supported dimension -------------------------------------------


def nd_case(rng, dims):
    shape = (5, 4, 3, 3, 2, 2)[:dims]
    data = jnp.asarray(rng.normal(size=(*shape, 3)), jnp.float32)
    spread = rng.normal(size=(23, dims)) * 1.5 + (np.asarray(shape) - 1) / 2
    # Some exact integers and some points far outside, as in the depthwise matrix.
    spread[:3] = np.round(spread[:3])
    spread[3:5] += 40.0
    return data, jnp.asarray(spread, jnp.float32)


@pytest.mark.parametrize(
    "dims", [1, 2, 3, 4, *(pytest.param(d, marks=pytest.mark.slow) for d in (5, 6))]
)
def test_nd_derivatives_match_reference(rng, dims):
    data, coord = nd_case(rng, dims)
    f = {
        impl: lambda d, c, impl=impl: dk_jax.nd_linear_sample(d, c, implementation=impl)
        for impl in ("ffi", "xla")
    }
    assert rel_err(f["ffi"](data, coord), f["xla"](data, coord)) <= 1e-5
    cot = jnp.asarray(rng.normal(size=(coord.shape[0], data.shape[-1])), jnp.float32)
    tangents = (
        jnp.asarray(rng.normal(size=data.shape), jnp.float32),
        jnp.asarray(rng.normal(size=coord.shape), jnp.float32),
    )
    got_vjp, got_jvp = derivatives(f["ffi"], (data, coord), cot, tangents)
    want_vjp, want_jvp = derivatives(f["xla"], (data, coord), cot, tangents)
    got, want = (*got_vjp, got_jvp), (*want_vjp, want_jvp)
    for k, g, w in zip(("data", "coord", "jvp"), got, want, strict=True):
        assert rel_err(g, w) <= 1e-5, k


# --- central differences of the reference in float64 ------------------------------------------


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("name", DEPTHWISE + COLUMNS)
def test_directional_derivatives_match_float64_central_differences(rng, name, groups):
    # Away from integer positions every read is bilinear, so along a line the loss is a
    # quadratic and the central difference is exact up to float64 rounding: the ffi gradient
    # must match it to float32 accuracy, not to the percent that check_grads' float32
    # tolerances allow.
    a, geo = smooth_case(rng, deform=True, groups=groups)
    geo = dict(geo, stride=(2, 1), dilation=(1, 2), padding=(2, 1))
    n, h, w = a["x"].shape[:3]
    ho = (h + 4 - 2 * 1 - 1) // 2 + 1
    wo = (w + 2 - 2 * (2 - 1) - 1) // 1 + 1
    for key, per_tap in (("rotation", groups * 6 * 2), ("offset", 6 * 2)):
        shape = (n, ho, wo, per_tap)
        a[key] = jnp.asarray(rng.uniform(0.2, 0.8, shape) * rng.choice([-1, 1], shape), jnp.float32)
    _, names, _ = OPS[name]
    args = [a[k] for k in names]
    f = bound(name, a, geo, "ffi")
    cot = jnp.asarray(rng.normal(size=jax.eval_shape(f, *args).shape), jnp.float32)
    grads = jax.grad(lambda *z: jnp.vdot(cot, f(*z)), argnums=tuple(range(len(args))))(*args)
    op_ref = {
        "sample_depthwise": reference.sample_depthwise,
        "deform_sample_depthwise": reference.deform_sample_depthwise,
        "scope_im2col": reference.scope_im2col,
        "deform_scope_im2col": reference.deform_scope_im2col,
    }[name]
    extra = dict(scope_size=tuple(a["weight"].shape[:2])) if name in COLUMNS else {}
    eps = 1e-3  # every position stays at least 0.2 - eps from an integer
    with jax.enable_x64(True):
        args64 = [jnp.asarray(np.asarray(v), jnp.float64) for v in args]
        cot64 = jnp.asarray(np.asarray(cot), jnp.float64)

        def loss(*z):
            return float(jnp.vdot(cot64, op_ref(*z, **geo, **extra)))

        for i, k in enumerate(names):
            v = rng.normal(size=args[i].shape)
            plus, minus = list(args64), list(args64)
            plus[i] = args64[i] + eps * v
            minus[i] = args64[i] - eps * v
            fd = (loss(*plus) - loss(*minus)) / (2 * eps)
            ad = float(np.vdot(np.asarray(grads[i], np.float64), v))
            assert abs(ad - fd) <= 2e-5 * max(abs(fd), 1.0), (k, ad, fd)


# --- batching of the derivatives -----------------------------------------------------------


@pytest.mark.parametrize("name", DEPTHWISE)
def test_per_example_gradients_with_shared_and_batched_weight(rng, name):
    # Three distinct examples of two samples each: a per-example weight gradient summed over
    # the wrong samples, or over other examples, differs from the loop.
    a, geo = make_case(rng, n=2, h=7, w=6, c=5, s=(5, 4), stride=(2, 1), groups=1)
    _, names, _ = OPS[name]
    f = bound(name, a, geo, "ffi")
    batch = 3
    examples = {k: jnp.asarray(rng.normal(size=(batch, *a[k].shape)), jnp.float32) for k in names}
    cots = jnp.asarray(rng.normal(size=(batch, *jax.eval_shape(f, *[a[k] for k in names]).shape)))

    def loss(*args_and_cot):
        *args, cot = args_and_cot
        return jnp.vdot(cot, f(*args))

    grad = jax.grad(loss, argnums=tuple(range(len(names))))
    for weight_batched in (False, True):
        args = [examples[k] if (k != "weight" or weight_batched) else a[k] for k in names]
        axes = [0 if (k != "weight" or weight_batched) else None for k in names]
        got = jax.jit(jax.vmap(grad, in_axes=(*axes, 0)))(*args, cots)
        for b in range(batch):
            one = [v[b] if ax == 0 else v for v, ax in zip(args, axes, strict=True)]
            want = grad(*one, cots[b])
            for k, g, w in zip(names, got, want, strict=True):
                if k == "weight" and not weight_batched:
                    continue  # a shared weight's gradient is per example all the same
                assert rel_err(g[b], w) <= 1e-5, (k, b, weight_batched)
        if not weight_batched:
            # vmap of grad with an unbatched weight still returns one gradient per example
            w_index = names.index("weight")
            for b in range(batch):
                one = [v[b] if ax == 0 else v for v, ax in zip(args, axes, strict=True)]
                assert rel_err(got[w_index][b], grad(*one, cots[b])[w_index]) <= 1e-5


@pytest.mark.parametrize("name", DEPTHWISE + COLUMNS)
def test_vmap_of_gradients_over_every_argument_subset(rng, name):
    a, geo = make_case(rng, n=2, h=6, w=5, c=4, s=(4, 4), groups=2)
    _, names, _ = OPS[name]
    f = bound(name, a, geo, "ffi")
    cot = jnp.asarray(rng.normal(size=jax.eval_shape(f, *[a[k] for k in names]).shape))
    grad = jax.grad(lambda *z: jnp.vdot(cot, f(*z)), argnums=tuple(range(len(names))))
    batch = 3
    batched = {k: jnp.asarray(rng.normal(size=(batch, *a[k].shape)), jnp.float32) for k in names}
    for mask in itertools.product([False, True], repeat=len(names)):
        if not any(mask):
            continue
        args = [batched[k] if m else a[k] for k, m in zip(names, mask, strict=True)]
        got = jax.jit(jax.vmap(grad, in_axes=[0 if m else None for m in mask]))(*args)
        for b in range(batch):
            want = grad(*[v[b] if m else v for v, m in zip(args, mask, strict=True)])
            for k, g, w in zip(names, got, want, strict=True):
                assert rel_err(g[b], w) <= 1e-5, (k, mask, b)


def test_vmap_of_nd_gradients(rng):
    data, coord = nd_case(rng, 3)
    cot = jnp.asarray(rng.normal(size=(coord.shape[0], data.shape[-1])), jnp.float32)
    f = lambda d, c: jnp.vdot(cot, dk_jax.nd_linear_sample(d, c, implementation="ffi"))  # noqa: E731
    grad = jax.grad(f, argnums=(0, 1))
    batched = (
        jnp.asarray(rng.normal(size=(3, *data.shape)), jnp.float32),
        coord[None] + jnp.asarray(rng.normal(size=(3, *coord.shape)), jnp.float32),
    )
    for mask in [(True, False), (False, True), (True, True)]:
        args = [b if m else v for b, v, m in zip(batched, (data, coord), mask, strict=True)]
        got = jax.jit(jax.vmap(grad, in_axes=[0 if m else None for m in mask]))(*args)
        for b in range(3):
            want = grad(*[v[b] if m else v for v, m in zip(args, mask, strict=True)])
            for g, w in zip(got, want, strict=True):
                assert rel_err(g[b], w) <= 1e-5, mask


# --- second-order paths through the transposes ------------------------------------------------


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("name", DEPTHWISE + COLUMNS)
def test_transposed_vjp_is_the_jvp(rng, name, groups):
    # The VJP is linear in the cotangent; its transpose maps a tangent to the JVP. This is
    # the path of forward-over-reverse products, and it runs through the transposes of the
    # gradient primitives.
    a, geo = make_case(rng, k=(3, 2), s=(4, 4), groups=groups, stride=(1, 2))
    _, names, _ = OPS[name]
    args = tuple(a[k] for k in names)
    y, vjp = jax.vjp(bound(name, a, geo, "ffi"), *args)
    ct = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    tangents = tuple(jnp.asarray(rng.normal(size=v.shape), jnp.float32) for v in args)
    # The transpose of ct -> (VJP in every argument) maps the tangents to the JVP of all.
    (got,) = jax.linear_transpose(vjp, ct)(tangents)
    _, want = derivatives(bound(name, a, geo, "xla"), args, ct, tangents)
    assert rel_err(got, want) <= 1e-5


def fast(fn, *args):
    """fn(*args), compiled as one function with the fast compile options."""
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


@pytest.mark.parametrize("name", DEPTHWISE)
def test_mixed_second_derivatives_in_x_and_weight(rng, name):
    # A gradient penalty on the input gradient, differentiated in the weight and in x, and a
    # forward-over-reverse product: grad_image and grad_weight transposed into each other.
    a, geo = make_case(rng, groups=2, stride=(2, 1), dil=(1, 2), pad=(2, 1))
    _, names, _ = OPS[name]
    ix, iw = names.index("x"), names.index("weight")
    args = tuple(a[k] for k in names)
    cot = jnp.asarray(rng.normal(size=jax.eval_shape(bound(name, a, geo, "ffi"), *args).shape))

    def penalty(impl):
        f = bound(name, a, geo, impl)
        gx = jax.grad(lambda *z: jnp.vdot(cot, jnp.sin(f(*z))), argnums=ix)
        return lambda *z: jnp.sum(gx(*z) ** 2)

    got = fast(jax.grad(penalty("ffi"), argnums=(ix, iw)), *args)
    want = fast(jax.grad(penalty("xla"), argnums=(ix, iw)), *args)
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) <= 1e-5
    tw = jnp.asarray(rng.normal(size=a["weight"].shape), jnp.float32)

    def hvp(impl):
        f = bound(name, a, geo, impl)
        gx = jax.grad(lambda *z: jnp.vdot(cot, f(*z) ** 2), argnums=ix)
        return lambda w: jax.jvp(lambda w: gx(*args[:iw], w, *args[iw + 1 :]), (w,), (tw,))[1]

    assert rel_err(fast(hvp("ffi"), args[iw]), fast(hvp("xla"), args[iw])) <= 1e-5


# --- low precision: float32 accumulation -------------------------------------------------------


def rounded(rng, shape, dtype, low=0.5, high=1.5):
    """Positive values exactly representable in dtype, as (low-precision, float32) arrays."""
    v = jnp.asarray(rng.uniform(low, high, shape), dtype)
    return v, v.astype(jnp.float32)


@pytest.mark.parametrize("dtype, bits", [(jnp.bfloat16, 8), (jnp.float16, 11)])
def test_low_precision_accumulates_in_float32(rng, dtype, bits):
    """Long sums of positive terms: with float32 accumulation the result is the float32 sum of
    the rounded inputs' products rounded once, so |low - ref| <= (u + 2 n 2^-24) |ref| element by
    element (u = 2^-bits the unit roundoff, n the length of the sum, the factor 2 for the float32
    reference's own rounding). An accumulator in the low precision loses about u per term and
    breaks the bound on most elements."""
    u = 2.0**-bits

    def check(low, ref, n, what):
        low = np.asarray(low.astype(jnp.float32), np.float64)
        ref = np.asarray(ref, np.float64)
        excess = np.abs(low - ref) - (u + 2 * n * 2.0**-24) * np.abs(ref)
        assert (excess <= 0).all(), f"{what}: {int((excess > 0).sum())} of {ref.size} over"

    # Forward: 7x7 taps, rotation inside the scope so every kernel read is a positive blend.
    k, s, n, h, c = 7, 9, 1, 12, 20
    x, x32 = rounded(rng, (n, h, h, c), dtype)
    w, w32 = rounded(rng, (s, s, c), dtype)
    rot, rot32 = rounded(rng, (n, h, h, k * k * 2), dtype, -0.4, 0.4)
    geo = dict(kernel_size=k, padding=3)
    y = dk_jax.sample_depthwise(x, rot, w, **geo, implementation="ffi")
    y32 = dk_jax.sample_depthwise(x32, rot32, w32, **geo, implementation="ffi")
    check(y, y32, k * k * 4, "forward")

    # Weight gradient: a sum over all N*Ho*Wo locations.
    k, s, n, h, c = 3, 4, 2, 20, 24
    x, x32 = rounded(rng, (n, h, h, c), dtype)
    w, w32 = rounded(rng, (s, s, c), dtype)
    rot, rot32 = rounded(rng, (n, h, h, k * k * 2), dtype, -0.4, 0.4)
    ct, ct32 = rounded(rng, (n, h, h, c), dtype)
    geo = dict(kernel_size=k, padding=1)

    def weight_grad(x, rot, w, ct):
        f = lambda w: dk_jax.sample_depthwise(x, rot, w, **geo, implementation="ffi")  # noqa: E731
        return jax.vjp(f, w)[1](ct)[0]

    check(
        weight_grad(x, rot, w, ct),
        weight_grad(x32, rot32, w32, ct32),
        n * h * h * k * k,
        "grad_weight",
    )

    # Rotation gradient: a sum over the channels of a group. The scope kernel grows along both
    # axes, so the kernel read's derivative is positive inside the scope.
    c = 384
    x, x32 = rounded(rng, (1, 6, 6, c), dtype)
    ramp = np.arange(s)[:, None, None] + np.arange(s)[None, :, None] + 1.0
    w = jnp.asarray(ramp + rng.uniform(0.0, 0.3, (s, s, c)), dtype)
    w32 = w.astype(jnp.float32)
    rot, rot32 = rounded(rng, (1, 6, 6, k * k * 2), dtype, -0.4, 0.4)
    ct, ct32 = rounded(rng, (1, 6, 6, c), dtype)

    def rotation_grad(x, rot, w, ct):
        f = lambda r: dk_jax.sample_depthwise(x, r, w, **geo, implementation="ffi")  # noqa: E731
        return jax.vjp(f, rot)[1](ct)[0]

    check(
        rotation_grad(x, rot, w, ct), rotation_grad(x32, rot32, w32, ct32), c * 4, "grad_rotation"
    )
