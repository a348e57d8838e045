"""Claims about derivatives beyond the first and about dtypes: every op differentiates to second
order in every argument, forward and reverse (checked against finite differences in float64),
its Hessian equals the reference's, Hessian-vector products through the modules equal the
reference path's, a gradient-penalty train step learns, float64 runs in float64 and NumPy inputs
are canonicalised as jax.numpy does.

Tests needing float64 enable it in a `jax.enable_x64` context, so the rest of the suite keeps
the default."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import rel_err
from jax.test_util import check_grads

import dk_jax

pytestmark = pytest.mark.skipif(not dk_jax.ffi_available("cpu"), reason="CPU library not built")

GEO = dict(kernel_size=(2, 2), padding=(1, 0), rotation_groups=1)


def off_integer(rng, shape, low=-1):
    """Positions in cells [low, low + 1) shifted by a fraction in [0.2, 0.8]: away from the
    integers where the bilinear read has kinks, so finite differences see a smooth function."""
    whole = rng.integers(low, low + 2, size=shape)
    return whole + rng.uniform(0.2, 0.8, size=shape)


def depthwise_case(rng, dtype, *, n=1, h=4, w=3, c=2, scope=(3, 3)):
    """Operands for a (2, 2) kernel on a scope of `scope`, kernel positions inside the scope."""
    ho, wo = h + 2 - 1, w - 1
    x = rng.normal(size=(n, h, w, c))
    weight = rng.normal(size=(*scope, c))
    # Kernel position a + r + (S - K)/2 = a + r + 0.5: r in [-0.3, 0.3] keeps its fraction in
    # [0.2, 0.8].
    rotation = rng.uniform(-0.3, 0.3, size=(n, ho, wo, 8))
    offset = off_integer(rng, (n, ho, wo, 8))
    return {
        k: jnp.asarray(v, dtype)
        for k, v in dict(x=x, offset=offset, rotation=rotation, weight=weight).items()
    }


def nd_case(rng, dtype):
    data = rng.normal(size=(3, 4, 2, 2))
    coord = np.stack([off_integer(rng, (5,), 0) + 0.5 * d for d in range(3)], axis=1)
    coord = np.clip(coord, 0.2, [1.8, 2.8, 0.8])
    return jnp.asarray(data, dtype), jnp.asarray(coord, dtype)


# Each op as a function of all its array arguments, with the names it takes them in.
OPS = {
    "sample_depthwise": (
        ("x", "rotation", "weight"),
        lambda x, r, w: dk_jax.sample_depthwise(x, r, w, **GEO, implementation="ffi"),
    ),
    "deform_sample_depthwise": (
        ("x", "offset", "rotation", "weight"),
        lambda x, o, r, w: dk_jax.deform_sample_depthwise(x, o, r, w, **GEO, implementation="ffi"),
    ),
    "scope_im2col": (
        ("x", "rotation"),
        lambda x, r: dk_jax.scope_im2col(x, r, scope_size=3, **GEO, implementation="ffi"),
    ),
    "deform_scope_im2col": (
        ("x", "offset", "rotation"),
        lambda x, o, r: dk_jax.deform_scope_im2col(
            x, o, r, scope_size=3, **GEO, implementation="ffi"
        ),
    ),
    "sample_conv": (
        ("x", "rotation", "kernel"),
        lambda x, r, k: dk_jax.sample_conv(x, r, k, **GEO, implementation="ffi"),
    ),
    "deform_sample_conv": (
        ("x", "offset", "rotation", "kernel"),
        lambda x, o, r, k: dk_jax.deform_sample_conv(x, o, r, k, **GEO, implementation="ffi"),
    ),
}


def op_args(rng, name, dtype):
    names, _ = OPS[name]
    case = depthwise_case(rng, dtype)
    # A full convolution's kernel: (Sh, Sw, C, F) with F = 3.
    case["kernel"] = jnp.asarray(rng.normal(size=(3, 3, 2, 3)), dtype)
    return tuple(case[k] for k in names)


RIGID = ["sample_depthwise", "scope_im2col", "sample_conv"]
DEFORM = ["deform_sample_depthwise", "deform_scope_im2col", "deform_sample_conv"]


@pytest.mark.parametrize("name", RIGID)
def test_check_grads_second_order_every_argument(rng, name):
    """Second order, forward and reverse, in every argument at once, at default tolerances."""
    _, f = OPS[name]
    with jax.enable_x64(True):
        check_grads(f, op_args(rng, name, jnp.float64), order=2, modes=["fwd", "rev"])


@pytest.mark.parametrize("name", DEFORM)
def test_check_grads_second_order_deformable_offset_fixed(rng, name):
    """The deformable ops to second order in x, rotation and the kernel (the custom-call
    part); every argument including offset is the slow test below."""
    names, f = OPS[name]
    with jax.enable_x64(True):
        args = op_args(rng, name, jnp.float64)
        k = names.index("offset")
        g = lambda *a: f(*a[:k], args[k], *a[k:])  # noqa: E731
        check_grads(g, args[:k] + args[k + 1 :], order=2, modes=["fwd", "rev"])


@pytest.mark.slow
@pytest.mark.parametrize("name", DEFORM)
def test_check_grads_second_order_deformable_every_argument(rng, name):
    _, f = OPS[name]
    with jax.enable_x64(True):
        check_grads(jax.jit(f), op_args(rng, name, jnp.float64), order=2, modes=["fwd", "rev"])


@pytest.mark.slow
def test_check_grads_second_order_nd_linear_sample(rng):
    f = jax.jit(functools.partial(dk_jax.nd_linear_sample, implementation="ffi"))
    with jax.enable_x64(True):
        data, coord = nd_case(rng, jnp.float64)
        check_grads(f, (data, coord), order=2, modes=["fwd", "rev"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sample_depthwise", "sample_conv"])
def test_check_grads_third_order(rng, name):
    """Third order: the second-order rotation modes differentiate again (to zero in rotation
    within a cell, to themselves in x and the kernel). DK + DCN to third order in every argument
    passes too but takes about 10 minutes on a loaded 2-core machine, so it is not here."""
    _, f = OPS[name]
    with jax.enable_x64(True):
        check_grads(jax.jit(f), op_args(rng, name, jnp.float64), order=3, modes=["fwd", "rev"])


def scalar_loss(impl):
    def loss(x, offset, rotation, weight):
        y = dk_jax.deform_sample_depthwise(x, offset, rotation, weight, **GEO, implementation=impl)
        return jnp.sum(jnp.sin(y) * y)

    return loss


@pytest.mark.slow
@pytest.mark.parametrize("dtype, tol", [(jnp.float64, 1e-6), (jnp.float32, 1e-3)])
def test_hessian_matches_reference(rng, dtype, tol):
    """jax.hessian (forward over reverse, batched) in all four arguments, block by block."""
    argnums = (0, 1, 2, 3)
    with jax.enable_x64(dtype == jnp.float64):
        a = depthwise_case(rng, dtype, h=3, w=3, c=2)
        args = (a["x"], a["offset"], a["rotation"], a["weight"])
        got = jax.jit(jax.hessian(scalar_loss("ffi"), argnums))(*args)
        want = jax.jit(jax.hessian(scalar_loss("xla"), argnums))(*args)
        for i in argnums:
            for j in argnums:
                assert got[i][j].dtype == dtype
                assert rel_err(got[i][j], want[i][j]) <= tol, (i, j)


@pytest.mark.parametrize("dtype, tol", [(jnp.float64, 1e-6), (jnp.float32, 1e-3)])
def test_hessian_in_x_rotation_weight_matches_reference(rng, dtype, tol):
    """The default-suite Hessian: `sample_depthwise` in (x, rotation, weight), all custom calls
    on the ffi side (the four-argument deformable one above is slow-marked)."""

    def loss(impl):
        def f(x, rotation, weight):
            y = dk_jax.sample_depthwise(x, rotation, weight, **GEO, implementation=impl)
            return jnp.sum(jnp.sin(y) * y)

        return f

    with jax.enable_x64(dtype == jnp.float64):
        a = depthwise_case(rng, dtype, h=3, w=3, c=2)
        args = (a["x"], a["rotation"], a["weight"])
        got = jax.jit(jax.hessian(loss("ffi"), (0, 1, 2)))(*args)
        want = jax.jit(jax.hessian(loss("xla"), (0, 1, 2)))(*args)
        for i in range(3):
            for j in range(3):
                assert got[i][j].dtype == dtype
                assert rel_err(got[i][j], want[i][j]) <= tol, (i, j)
        # The rotation block is not just the Gauss-Newton part: the cross terms are in it.
        assert float(jnp.abs(got[1][1]).max()) > 1e-2


# --- through the modules -------------------------------------------------------------------


def module_pair(cls, **kw):
    return cls(**kw, implementation="ffi"), cls(**kw, implementation="xla")


@pytest.mark.parametrize(
    "cls",
    [dk_jax.DeformKernel2d, pytest.param(dk_jax.DeformKernelConv2d, marks=pytest.mark.slow)],
)
def test_hvp_through_module_matches_reference(rng, cls):
    """Rotation (and offset) predicted from x: the HVP in x and in the parameters."""
    ffi, xla = module_pair(cls, scope_size=4, kernel_size=3)
    x = jnp.asarray(rng.normal(size=(2, 5, 5, 3)), jnp.float32)
    params = ffi.init(jax.random.key(0), x)
    # Non-zero prediction weights, so rotation and offset depend on x.
    params = jax.tree.map(
        lambda p: p + 0.3 * jnp.asarray(rng.normal(size=p.shape), p.dtype), params
    )

    def loss(module):
        return lambda p, x: jnp.sum(jnp.tanh(module.apply(p, x)) ** 2)

    def hvp(module):
        grad = jax.grad(loss(module), argnums=(0, 1))
        tangent = jax.tree.map(jnp.ones_like, (params, x))
        return jax.jit(lambda p, x: jax.jvp(grad, (p, x), tangent)[1])(params, x)

    got, want = hvp(ffi), hvp(xla)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert rel_err(g, w) <= 1e-3


def test_gradient_penalty_train_step_learns(rng):
    """WGAN-GP critic: loss = D(fake) - D(real) + 10 (|grad_x D(interp)| - 1)^2, jitted."""

    import flax.linen as nn

    class Critic(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = dk_jax.DeformKernel2d(4, 3, implementation="ffi", name="dk")(x)
            x = nn.Conv(4, (1, 1))(jnp.tanh(x))
            return jnp.mean(x, axis=(1, 2, 3))

    critic = Critic()
    real = jnp.asarray(rng.normal(size=(4, 6, 6, 2)) + 1.0, jnp.float32)
    fake = jnp.asarray(rng.normal(size=(4, 6, 6, 2)) * 0.5, jnp.float32)
    params = critic.init(jax.random.key(1), real)
    opt = optax.adam(1e-2)
    state = opt.init(params)

    def loss_fn(p):
        eps = jnp.linspace(0.1, 0.9, real.shape[0])[:, None, None, None]
        mixed = eps * real + (1 - eps) * fake
        grad_x = jax.grad(lambda x: critic.apply(p, x).sum())(mixed)
        norm = jnp.sqrt(jnp.sum(grad_x**2, axis=(1, 2, 3)) + 1e-12)
        penalty = jnp.mean((norm - 1.0) ** 2)
        return jnp.mean(critic.apply(p, fake)) - jnp.mean(critic.apply(p, real)) + 10 * penalty

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    losses = []
    for _ in range(20):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.5, losses
    # The rotation predictor received gradient through the second-order path.
    rot = params["params"]["dk"]["rotation_conv"]["kernel"]
    assert float(jnp.abs(rot).max()) > 0


# --- dtypes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["sample_depthwise", "deform_sample_depthwise", "deform_sample_conv"]
)
def test_float64_and_float32_agree(rng, name):
    """Value and gradient of the same case in both precisions; float64 stays float64."""
    _, f = OPS[name]
    args32 = op_args(rng, name, jnp.float32)
    loss = lambda *a: jnp.sum(jnp.sin(f(*a)))  # noqa: E731
    grad = jax.grad(loss, argnums=tuple(range(len(args32))))
    y32, g32 = f(*args32), grad(*args32)
    with jax.enable_x64(True):
        args64 = tuple(jnp.asarray(np.asarray(a), jnp.float64) for a in args32)
        y64, g64 = f(*args64), grad(*args64)
        assert y64.dtype == jnp.float64 and all(g.dtype == jnp.float64 for g in g64)
    assert rel_err(y32, y64) <= 1e-5
    for a, b in zip(g32, g64, strict=True):
        assert rel_err(a, b) <= 1e-5


def test_float64_matches_reference_beyond_float32_precision(rng):
    with jax.enable_x64(True):
        a = depthwise_case(rng, jnp.float64, h=6, w=5, c=4)
        args = (a["x"], a["offset"], a["rotation"], a["weight"])
        got = dk_jax.deform_sample_depthwise(*args, **GEO, implementation="ffi")
        want = dk_jax.deform_sample_depthwise(*args, **GEO, implementation="xla")
        assert got.dtype == jnp.float64
        assert rel_err(got, want) <= 1e-12


def test_numpy_float64_and_integer_inputs_become_float32(rng):
    x = np.ones((1, 5, 5, 2))  # float64
    rotation = np.zeros((1, 3, 3, 18), np.int64)
    weight = rng.normal(size=(4, 4, 2))
    y = dk_jax.sample_depthwise(x, rotation, weight, kernel_size=3, implementation="ffi")
    assert y.dtype == jnp.float32
    want = dk_jax.sample_depthwise(
        jnp.asarray(x, jnp.float32),
        jnp.zeros((1, 3, 3, 18), jnp.float32),
        jnp.asarray(weight, jnp.float32),
        kernel_size=3,
        implementation="xla",
    )
    assert rel_err(y, want) <= 1e-6
    # All-integer inputs take the default float dtype, as jnp.sin does.
    z = dk_jax.nd_linear_sample(np.arange(6).reshape(3, 2), np.array([[1], [0]]))
    assert z.dtype == jnp.sin(np.arange(3)).dtype == jnp.float32
    np.testing.assert_allclose(z, [[2.0, 3.0], [0.0, 1.0]])
    # Mixed float32 / bfloat16 is still refused.
    with pytest.raises(TypeError, match="share one dtype"):
        dk_jax.sample_depthwise(
            jnp.asarray(x, jnp.float32),
            jnp.zeros((1, 3, 3, 18), jnp.bfloat16),
            jnp.asarray(weight, jnp.float32),
            kernel_size=3,
        )


# --- what the second-order rules lower to ----------------------------------------------------


@pytest.mark.parametrize("name", ["sample_depthwise", "deform_sample_depthwise", "sample_conv"])
def test_second_order_in_rotation_lowers_to_custom_calls_only(rng, name):
    """An HVP in rotation and the reverse-over-reverse gradient of a gradient norm in
    (x, rotation, weight) hold dk_jax custom calls and no gather, scatter or floor: no per-tap
    tensors are formed outside the handlers."""
    names, f = OPS[name]
    args = op_args(rng, name, jnp.float32)
    r = names.index("rotation")

    def loss(*a):
        return jnp.sum(jnp.sin(f(*a)))

    def hvp(*a):
        g = lambda rot: jax.grad(loss, r)(*a[:r], rot, *a[r + 1 :])  # noqa: E731
        return jax.jvp(g, (a[r],), (jnp.ones_like(a[r]),))[1]

    # Differentiable in x, rotation and the kernel; the offset (if any) held fixed.
    free = tuple(i for i, k in enumerate(names) if k != "offset")

    def penalty(*a):
        grads = jax.grad(loss, free)(*a)
        return sum(jnp.sum(g**2) for g in grads)

    for fn in (hvp, jax.grad(penalty, free)):
        hlo = jax.jit(fn).lower(*args).as_text()
        assert "hvp_rotation" in hlo or "grad_cross_rotation" in hlo
        for op_name in ("gather", "scatter", "floor"):
            assert f"stablehlo.{op_name}" not in hlo, op_name
