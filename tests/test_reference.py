"""Claims about the pure-jax.numpy reference (the oracle), checked against closed forms.

Nothing here compares the reference with the ffi kernels: these tests establish that the
oracle itself computes the formulas of docs/OPERATORS.md, so that other tests may trust it.
"""

import functools
import importlib.util
import itertools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

try:
    from dk_jax import reference
except Exception:  # the package __init__ may be mid-edit; the reference stands alone
    _path = pathlib.Path(__file__).resolve().parents[1] / "dk_jax" / "reference.py"
    _spec = importlib.util.spec_from_file_location("dk_jax_reference", _path)
    reference = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(reference)


def _random(seed, shape, low=-1.0, high=1.0, dtype=np.float32):
    return np.random.default_rng(seed).uniform(low, high, shape).astype(dtype)


def _depthwise_conv(x, kernel, stride, padding, dilation):
    """Rigid depthwise convolution with XLA: x (N, H, W, C), kernel (Kh, Kw, C)."""
    kh, kw, c = kernel.shape
    return jax.lax.conv_general_dilated(
        x,
        kernel.reshape(kh, kw, 1, c),
        window_strides=stride,
        padding=[(padding[0], padding[0]), (padding[1], padding[1])],
        rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=c,
        precision=jax.lax.Precision.HIGHEST,
    )


def _out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _sample(x, rotation, weight, k, s=(1, 1), p=(0, 0), d=(1, 1), g=1):
    return reference.sample_depthwise(
        x, rotation, weight, kernel_size=k, stride=s, padding=p, dilation=d, rotation_groups=g
    )


def _deform(x, offset, rotation, weight, k, s=(1, 1), p=(0, 0), d=(1, 1), g=1):
    return reference.deform_sample_depthwise(
        x,
        offset,
        rotation,
        weight,
        kernel_size=k,
        stride=s,
        padding=p,
        dilation=d,
        rotation_groups=g,
    )


GEOMETRIES = [
    # kernel, stride, padding, dilation, rotation groups
    ((3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((3, 3), (2, 2), (0, 0), (1, 1), 2),
    ((3, 2), (2, 1), (2, 0), (2, 3), 4),
    ((1, 1), (1, 1), (0, 0), (1, 1), 1),
    ((5, 5), (3, 2), (2, 3), (1, 2), 2),
]


@pytest.mark.parametrize("kernel, stride, padding, dilation, groups", GEOMETRIES)
def test_zero_rotation_with_scope_equal_kernel_is_depthwise_conv(
    kernel, stride, padding, dilation, groups
):
    n, h, w, c = 2, 9, 8, 4
    ho = _out_size(h, kernel[0], stride[0], padding[0], dilation[0])
    wo = _out_size(w, kernel[1], stride[1], padding[1], dilation[1])
    x = _random(0, (n, h, w, c))
    weight = _random(1, (*kernel, c))
    rotation = np.zeros((n, ho, wo, groups * kernel[0] * kernel[1] * 2), np.float32)
    y = _sample(x, rotation, weight, kernel, stride, padding, dilation, groups)
    expected = _depthwise_conv(x, weight, stride, padding, dilation)
    assert y.shape == expected.shape == (n, ho, wo, c)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def _constant_rotation(n, ho, wo, kernel, per_group):
    """A rotation equal to per_group[g] = (r_y, r_x) on every tap and location."""
    kh, kw = kernel
    tap = np.asarray(per_group, np.float32)[:, None, None, :]  # (G, 1, 1, 2)
    tap = np.broadcast_to(tap, (len(per_group), kh, kw, 2)).reshape(-1)
    return np.broadcast_to(tap, (n, ho, wo, tap.size)).copy()


@pytest.mark.parametrize(
    "shift, rows, cols",
    [
        # scope 5, kernel 3: tap a reads weight row a + r + (5 - 3)/2 = a + r + 1.
        ((1, 1), slice(2, 5), slice(2, 5)),
        ((-1, -1), slice(0, 3), slice(0, 3)),
        ((1, -1), slice(2, 5), slice(0, 3)),
        ((0, 0), slice(1, 4), slice(1, 4)),
    ],
)
def test_integer_rotation_reads_a_shifted_window_of_the_scope(shift, rows, cols):
    n, h, w, c = 2, 7, 6, 3
    x = _random(2, (n, h, w, c))
    weight = _random(3, (5, 5, c))
    rotation = _constant_rotation(n, h - 2, w - 2, (3, 3), [shift])
    y = _sample(x, rotation, weight, (3, 3))
    expected = _depthwise_conv(x, weight[rows, cols], (1, 1), (0, 0), (1, 1))
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_rotation_groups_are_interleaved_over_channels():
    n, h, w, c = 1, 6, 6, 4
    x = _random(4, (n, h, w, c))
    weight = _random(5, (5, 5, c))
    # group 0 (channels 0, 2) shifts by +1, group 1 (channels 1, 3) by -1.
    rotation = _constant_rotation(n, h - 2, w - 2, (3, 3), [(1, 1), (-1, -1)])
    y = _sample(x, rotation, weight, (3, 3), g=2)
    plus = _depthwise_conv(x, weight[2:5, 2:5], (1, 1), (0, 0), (1, 1))
    minus = _depthwise_conv(x, weight[0:3, 0:3], (1, 1), (0, 0), (1, 1))
    np.testing.assert_allclose(y[..., 0::2], plus[..., 0::2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y[..., 1::2], minus[..., 1::2], rtol=1e-5, atol=1e-6)


def test_even_scope_centres_the_kernel_between_weights():
    # scope 4, kernel 3, zero rotation: tap a reads position a + 0.5, the mean of 2x2 weights.
    n, h, w, c = 2, 6, 5, 3
    x = _random(6, (n, h, w, c))
    weight = _random(7, (4, 4, c))
    rotation = np.zeros((n, h - 2, w - 2, 3 * 3 * 2), np.float32)
    y = _sample(x, rotation, weight, (3, 3))
    averaged = (weight[:3, :3] + weight[1:, :3] + weight[:3, 1:] + weight[1:, 1:]) / 4
    expected = _depthwise_conv(x, averaged, (1, 1), (0, 0), (1, 1))
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_rotation_outside_the_scope_reads_zero():
    n, h, w, c = 1, 5, 5, 2
    x = _random(8, (n, h, w, c))
    weight = _random(9, (3, 3, c))
    # r = 3 puts every tap at a + 3 >= 3 = Sh; r = -1 puts tap 0 at -1 (zero) and tap a at a-1.
    far = _constant_rotation(n, 3, 3, (3, 3), [(3.0, 0.0)])
    np.testing.assert_array_equal(_sample(x, far, weight, (3, 3)), 0)
    up = _constant_rotation(n, 3, 3, (3, 3), [(-1.0, 0.0)])
    shifted = np.concatenate([np.zeros_like(weight[:1]), weight[:2]], axis=0)
    expected = _depthwise_conv(x, shifted, (1, 1), (0, 0), (1, 1))
    np.testing.assert_allclose(_sample(x, up, weight, (3, 3)), expected, rtol=1e-5, atol=1e-6)


def _naive_bilinear(plane, u, v):
    rows, cols = plane.shape
    if u <= -1 or v <= -1 or u >= rows or v >= cols:
        return 0.0
    u0, v0 = int(np.floor(u)), int(np.floor(v))
    total = 0.0
    for i, j in itertools.product((u0, u0 + 1), (v0, v0 + 1)):
        if 0 <= i < rows and 0 <= j < cols:
            total += plane[i, j] * (1 - abs(u - i)) * (1 - abs(v - j))
    return total


def test_deform_matches_a_loop_over_the_documented_formula():
    n, h, w, c, g = 1, 5, 4, 4, 2
    kernel, stride, padding, dilation, scope = (2, 3), (2, 1), (1, 1), (2, 1), (4, 4)
    ho = _out_size(h, kernel[0], stride[0], padding[0], dilation[0])
    wo = _out_size(w, kernel[1], stride[1], padding[1], dilation[1])
    x = _random(10, (n, h, w, c)).astype(np.float64)
    weight = _random(11, (*scope, c)).astype(np.float64)
    offset = _random(12, (n, ho, wo, kernel[0] * kernel[1] * 2), -2, 2).astype(np.float64)
    rotation = _random(13, (n, ho, wo, g * kernel[0] * kernel[1] * 2), -2, 2).astype(np.float64)
    y = _deform(x, offset, rotation, weight, kernel, stride, padding, dilation, g)
    expected = np.zeros((n, ho, wo, c))
    for b_, i, j, ch, a, b in itertools.product(
        range(n), range(ho), range(wo), range(c), range(kernel[0]), range(kernel[1])
    ):
        o_y, o_x = offset[b_, i, j, (a * kernel[1] + b) * 2 : (a * kernel[1] + b) * 2 + 2]
        r = ((ch % g * kernel[0] + a) * kernel[1] + b) * 2
        r_y, r_x = rotation[b_, i, j, r : r + 2]
        image = _naive_bilinear(
            x[b_, :, :, ch],
            i * stride[0] - padding[0] + a * dilation[0] + o_y,
            j * stride[1] - padding[1] + b * dilation[1] + o_x,
        )
        kern = _naive_bilinear(
            weight[:, :, ch],
            a + r_y + (scope[0] - kernel[0]) / 2,
            b + r_x + (scope[1] - kernel[1]) / 2,
        )
        expected[b_, i, j, ch] += image * kern
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_deform_with_zero_offset_is_sample_depthwise():
    kernel, stride, padding, dilation, g = (3, 2), (2, 1), (2, 0), (2, 3), 4
    n, h, w, c = 2, 8, 7, 4
    ho = _out_size(h, kernel[0], stride[0], padding[0], dilation[0])
    wo = _out_size(w, kernel[1], stride[1], padding[1], dilation[1])
    x = _random(14, (n, h, w, c))
    weight = _random(15, (kernel[0] + 1, kernel[1] + 2, c))
    rotation = _random(16, (n, ho, wo, g * kernel[0] * kernel[1] * 2), -1.5, 1.5)
    offset = np.zeros((n, ho, wo, kernel[0] * kernel[1] * 2), np.float32)
    y = _deform(x, offset, rotation, weight, kernel, stride, padding, dilation, g)
    expected = _sample(x, rotation, weight, kernel, stride, padding, dilation, g)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_deform_with_integer_offset_reads_a_shifted_input():
    n, h, w, c = 2, 7, 8, 3
    x = _random(17, (n, h, w, c))
    weight = _random(18, (3, 3, c))
    rotation = np.zeros((n, h, w, 3 * 3 * 2), np.float32)
    offset = np.tile(np.float32([1, -2]), (n, h, w, 3 * 3))  # o_y = +1, o_x = -2
    y = _deform(x, offset, rotation, weight, (3, 3), p=(1, 1))
    # The offset moves the read inside the padded image too: shift the padded input,
    # shifted[n, p, q] = padded[n, p + 1, q - 2], zero where that is outside.
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    shifted = np.pad(padded, ((0, 0), (0, 1), (2, 0), (0, 0)))[:, 1 : h + 3, : w + 2]
    expected = _depthwise_conv(shifted, weight, (1, 1), (0, 0), (1, 1))
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spatial", [(5,), (4, 3), (3, 4, 2)])
def test_nd_linear_sample_at_integers_indexes_and_at_half_integers_averages(spatial):
    c = 3
    data = _random(19, (*spatial, c))
    rng = np.random.default_rng(20)
    coord = np.stack([rng.integers(0, s, 16) for s in spatial], axis=1)
    out = reference.nd_linear_sample(data, coord.astype(np.float32))
    np.testing.assert_allclose(out, data[tuple(coord.T)], rtol=1e-6)

    # Half a step along the last axis, from a point with a neighbour there.
    coord[:, -1] = np.minimum(coord[:, -1], spatial[-1] - 2)
    half = coord.astype(np.float32)
    half[:, -1] += 0.5
    step = coord.copy()
    step[:, -1] += 1
    mean = (data[tuple(coord.T)] + data[tuple(step.T)]) / 2
    np.testing.assert_allclose(reference.nd_linear_sample(data, half), mean, rtol=1e-6)


@pytest.mark.parametrize("spatial", [(5,), (4, 3), (3, 4, 2)])
def test_nd_linear_sample_is_zero_outside_and_fades_at_the_border(spatial):
    c = 2
    data = _random(21, (*spatial, c))
    d = len(spatial)
    origin = np.zeros((1, d), np.float32)
    for axis in range(d):
        for value in (-1.0, -1.5, float(spatial[axis]), spatial[axis] + 0.25, 1e30, -1e30):
            coord = origin.copy()
            coord[0, axis] = value
            np.testing.assert_array_equal(reference.nd_linear_sample(data, coord), 0)
        # Half a step before the first row: half of the corner value.
        coord = origin.copy()
        coord[0, axis] = -0.5
        np.testing.assert_allclose(
            reference.nd_linear_sample(data, coord)[0], data[(0,) * d] / 2, rtol=1e-6
        )


def test_nd_linear_sample_infinity_reads_zero_and_nan_reads_nan():
    data = _random(22, (4, 5, 2))
    coord = np.float32(
        [[np.inf, 1.0], [1.0, -np.inf], [-np.inf, np.inf], [np.nan, 1.0], [1.0, np.nan], [1.5, 2.5]]
    )
    out = np.asarray(reference.nd_linear_sample(data, coord))
    np.testing.assert_array_equal(out[:3], 0)
    assert np.isnan(out[3:5]).all()
    assert np.isfinite(out[5]).all()


def test_sample_depthwise_infinity_reads_zero_and_nan_reads_nan():
    n, h, w, c = 1, 4, 4, 2
    x = _random(23, (n, h, w, c))
    weight = _random(24, (3, 3, c))
    rotation = np.zeros((n, 2, 2, 3 * 3 * 2), np.float32)
    rotation[0, 0, 0, :] = np.inf
    rotation[0, 0, 1, :] = -np.inf
    rotation[0, 1, 0, 0] = np.nan
    y = np.asarray(_sample(x, rotation, weight, (3, 3)))
    np.testing.assert_array_equal(y[0, 0, :], 0)
    assert np.isnan(y[0, 1, 0]).all()
    assert np.isfinite(y[0, 1, 1]).all()


# One tiny case for every gradient claim, so that they share compiled programs.
GRAD_GEOMETRY = dict(
    kernel_size=(2, 2), stride=(1, 2), padding=(1, 0), dilation=(1, 1), rotation_groups=2
)
GRAD_OUT = (1, 5, 2)  # N, Ho, Wo for x of shape (1, 4, 4, 2)


def _off_integer(seed, shape, low, high):
    """float32 values with fractional part in [0.3, 0.7], far from the kinks of linear reads."""
    rng = np.random.default_rng(seed)
    return (rng.integers(low, high, shape) + rng.uniform(0.3, 0.7, shape)).astype(np.float32)


def _grad_case():
    x = _random(30, (1, 4, 4, 2))
    weight = _random(31, (3, 3, 2))  # (S - K)/2 = 0.5, so rotation r reads a + r + 0.5
    offset = _off_integer(32, (*GRAD_OUT, 2 * 2 * 2), -2, 2)
    rotation = _off_integer(33, (*GRAD_OUT, 2 * 2 * 2 * 2), -2, 1) - 0.5
    return x, offset, rotation, weight


def test_gradients_match_finite_differences():
    # float32 with a large step: away from integer positions the ops are smooth polynomials,
    # so central differences are accurate to O(eps^2), and roundoff stays small.
    x, offset, rotation, weight = _grad_case()
    deform = functools.partial(reference.deform_sample_depthwise, **GRAD_GEOMETRY)
    sample = functools.partial(reference.sample_depthwise, **GRAD_GEOMETRY)
    tolerance = dict(eps=1e-2, atol=1e-3, rtol=1e-3)
    check_grads(deform, (x, offset, rotation, weight), order=1, modes=("fwd", "rev"), **tolerance)
    # Reverse mode is JAX's transpose of the same linearisation, checked above on deform.
    check_grads(sample, (x, rotation, weight), order=1, modes=("fwd",), **tolerance)

    data = _random(34, (3, 4, 2))
    coord = _off_integer(35, (6, 2), -1, 4)
    check_grads(
        reference.nd_linear_sample, (data, coord), order=1, modes=("fwd", "rev"), **tolerance
    )


def test_infinite_positions_read_zero_with_zero_gradients_and_nan_reads_nan():
    x, offset, rotation, weight = _grad_case()
    offset[0, 0, 0, :] = np.inf
    offset[0, 1, 1, ::2] = -np.inf
    rotation[0, 2, 1, :] = np.inf
    deform = functools.partial(reference.deform_sample_depthwise, **GRAD_GEOMETRY)
    y, vjp = jax.vjp(deform, x, offset, rotation, weight)
    assert np.isfinite(np.asarray(y)).all()
    grads = vjp(jnp.ones_like(y))
    for grad in grads:
        assert np.isfinite(np.asarray(grad)).all()
    np.testing.assert_array_equal(grads[1][0, 0, 0], 0)
    np.testing.assert_array_equal(grads[1][0, 1, 1], 0)
    np.testing.assert_array_equal(grads[2][0, 2, 1], 0)

    # A NaN image offset poisons its output location and no other.
    offset[0, 3, 0, 1] = np.nan
    y = np.asarray(deform(x, offset, rotation, weight))
    assert np.isnan(y[0, 3, 0]).all()
    assert np.isfinite(np.delete(y.reshape(-1, 2), 3 * 2 + 0, axis=0)).all()

    data = _random(36, (3, 4, 2))
    coord = np.float32(
        [[np.inf, 1.2], [-np.inf, np.inf], [0.3, 1.7], [1.5, 2.5], [0.5, 0.5], [2.5, -np.inf]]
    )
    out, vjp = jax.vjp(reference.nd_linear_sample, data, coord)
    grad_data, grad_coord = vjp(jnp.ones_like(out))
    np.testing.assert_array_equal(grad_coord[:2], 0)
    np.testing.assert_array_equal(grad_coord[5], 0)
    assert np.isfinite(np.asarray(grad_coord)).all() and np.isfinite(np.asarray(grad_data)).all()


def test_right_derivative_at_integer_positions():
    # d/du B at u = 1 on [0, 10, 30] is 30 - 10 (the segment to the right), not 10 - 0.
    data = np.float32([[0.0], [10.0], [30.0]])
    grad = jax.grad(lambda q: reference.nd_linear_sample(data, q)[0, 0])(np.float32([[1.0]]))
    np.testing.assert_allclose(grad, [[20.0]])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_return_their_dtype(dtype):
    n, h, w, c = 1, 5, 5, 2
    x = jnp.asarray(_random(36, (n, h, w, c)), dtype)
    weight = jnp.asarray(_random(37, (3, 3, c)), dtype)
    rotation = jnp.zeros((n, 3, 3, 18), dtype)
    y = _deform(x, jnp.zeros((n, 3, 3, 18), dtype), rotation, weight, (3, 3))
    assert y.dtype == dtype
    # Accumulated in float32 from exact inputs: off by at most the final rounding to `dtype`.
    expected = _depthwise_conv(
        x.astype(np.float32), weight.astype(np.float32), (1, 1), (0, 0), (1, 1)
    )
    ulp = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(y.astype(np.float32), expected, rtol=ulp, atol=ulp)
    out = reference.nd_linear_sample(weight, jnp.asarray([[0.5, 1.0]], dtype))
    assert out.dtype == dtype


def test_jit_vmap_and_empty_batch():
    n, h, w, c = 3, 5, 5, 2
    x = _random(38, (n, h, w, c))
    weights = _random(39, (n, 4, 4, c))
    offset = _random(40, (n, 3, 3, 18))
    rotation = _random(41, (n, 3, 3, 18))
    deform = functools.partial(_deform, k=(3, 3))
    # Per-sample kernels: vmap over every argument, inside jit, against one call per sample.
    batched = jax.jit(jax.vmap(lambda *a: deform(*(t[None] for t in a[:3]), a[3])[0]))
    one_by_one = [
        deform(x[i : i + 1], offset[i : i + 1], rotation[i : i + 1], weights[i]) for i in range(n)
    ]
    np.testing.assert_allclose(
        batched(x, offset, rotation, weights), np.concatenate(one_by_one), rtol=1e-5, atol=1e-6
    )

    data = _random(42, (4, 3, 2))
    coords = _random(43, (5, 7, 2), -1, 4)
    batched = jax.vmap(reference.nd_linear_sample, in_axes=(None, 0))(data, coords)
    np.testing.assert_allclose(batched[2], reference.nd_linear_sample(data, coords[2]), rtol=1e-6)

    empty = deform(x[:0], offset[:0], rotation[:0], weights[0])
    assert empty.shape == (0, 3, 3, c)
    assert reference.nd_linear_sample(data, coords[0, :0]).shape == (0, 2)
