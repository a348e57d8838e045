"""Claims about dk_jax.analysis: the ERF of a linear conv stack is its composite kernel, the
theoretical receptive field follows the usual recursion, erf_radius finds the disc holding a
given mass, the sampled-position helpers follow the operators' index layout, and bad input raises
errors that name the argument."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dk_jax import analysis
from tests.conftest import rel_err


def conv(x, kernel, dilation=1):
    """Cross-correlation of (N, H, W, C) with (Kh, Kw, C, F), 'SAME'-style symmetric padding."""
    kh, kw = kernel.shape[:2]
    ph, pw = (kh - 1) // 2 * dilation, (kw - 1) // 2 * dilation
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(1, 1),
        padding=((ph, ph), (pw, pw)),
        rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )


def dilate(k: np.ndarray, d: int) -> np.ndarray:
    out = np.zeros(((k.shape[0] - 1) * d + 1, (k.shape[1] - 1) * d + 1), k.dtype)
    out[::d, ::d] = k
    return out


def full_convolution(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """2-D full convolution by explicit loops: the composite cross-correlation kernel of
    correlating with `a` and then with `b`."""
    out = np.zeros((a.shape[0] + b.shape[0] - 1, a.shape[1] + b.shape[1] - 1))
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            out[i : i + b.shape[0], j : j + b.shape[1]] += a[i, j] * b
    return out


def test_erf_of_linear_stack_is_the_composite_kernel(rng):
    # Three single-channel cross-correlations (3x3, 5x3, 3x3 dilated 2) compose into one
    # correlation whose kernel K is their full convolution, centred on the output unit. The
    # gradient of out[i0, j0] with respect to x[u, v] is K[u - i0 + c_r, v - j0 + c_c]: the
    # composite kernel (the flip of the composite *convolution* kernel), placed at the unit.
    kernels = [rng.normal(size=s) for s in ((3, 3), (5, 3), (3, 3))]
    dilations = [1, 1, 2]

    def fn(x):
        for k, d in zip(kernels, dilations, strict=True):
            x = conv(x, jnp.asarray(k[:, :, None, None], jnp.float32), d)
        return x

    composite = np.ones((1, 1))
    for k, d in zip(kernels, dilations, strict=True):
        composite = full_convolution(composite, dilate(k, d))
    ch, cw = (composite.shape[0] - 1) // 2, (composite.shape[1] - 1) // 2
    x = jnp.asarray(rng.normal(size=(2, 24, 20, 1)), jnp.float32)
    positions = np.array([[11, 9], [12, 6]])
    erf = analysis.effective_receptive_field(jax.jit(fn), x, positions)
    assert erf.shape == (2, 2, 24, 20)
    for p, (i0, j0) in enumerate(positions):
        expected = np.zeros((24, 20))
        expected[i0 - ch : i0 + ch + 1, j0 - cw : j0 + cw + 1] = np.abs(composite)
        for n in range(2):  # linear: the ERF does not depend on the sample
            assert rel_err(erf[p, n], expected) < 1e-6
    single = analysis.effective_receptive_field(fn, x, (11, 9))
    np.testing.assert_allclose(single, erf[0], rtol=1e-6)


def test_erf_sums_channels_as_documented(rng):
    # One C -> F conv: d out[i0, j0, f] / d x[u, v, c] = W[u - i0 + 1, v - j0 + 1, c, f].
    w = rng.normal(size=(3, 3, 2, 4)).astype(np.float32)
    x = jnp.asarray(rng.normal(size=(1, 9, 9, 2)), jnp.float32)

    def fn(x):
        return conv(x, jnp.asarray(w))

    for channel, fs in ((None, [0, 1, 2, 3]), (2, [2]), ([0, 3], [0, 3])):
        erf = analysis.effective_receptive_field(fn, x, (4, 5), channel=channel)
        expected = np.zeros((9, 9))
        expected[3:6, 4:7] = np.abs(w[:, :, :, fs].sum(-1)).sum(-1)
        assert rel_err(erf[0], expected) < 1e-6
    # The spatial mean of a channel: every unit's kernel, averaged over the 81 units.
    mean_erf = analysis.effective_receptive_field(fn, x, None, channel=1)
    assert mean_erf.shape == (1, 9, 9)
    assert float(mean_erf[0, 4, 4]) == pytest.approx(np.abs(w[:, :, :, 1].sum((0, 1))).sum() / 81)


def test_erf_is_per_sample_and_jittable(rng):
    # fn mixes the batch (multiplies by the batch sum), yet each sample is differentiated on
    # its own: alone, the sample's unit is x**2, whose gradient is 2x at that pixel only.
    def fn(x):
        return x * jnp.sum(x, axis=0, keepdims=True)

    x = jnp.asarray(rng.normal(size=(3, 5, 5, 1)), jnp.float32)
    erf = jax.jit(lambda x: analysis.effective_receptive_field(fn, x, (2, 3)))(x)
    expected = np.zeros((3, 5, 5), np.float32)
    expected[:, 2, 3] = 2 * np.abs(x[:, 2, 3, 0])
    np.testing.assert_allclose(erf, expected, rtol=1e-6)


def test_theoretical_receptive_field():
    # Two 3x3 stride-2 convs (padding 1), then a 3x3 dilated 2: sizes 3, 3 + 2*2 = 7,
    # 7 + 2*2*4 = 23; jumps 2, 4, 4; unit 0's centre at 0 throughout (symmetric padding).
    rows, cols = analysis.theoretical_receptive_field([(3, 2), (3, 2), (3, 1, 2)])
    assert rows == cols == analysis.ReceptiveField(23, 4, 0.0)
    # VALID 3x3 then 2x2 stride-2 pool, non-square: rows (3, 1, 1, 0) then (2, 2, 1, 0).
    rows, cols = analysis.theoretical_receptive_field([((3, 5), 1, 1, 0), (2, 2, 1, 0)])
    assert rows == analysis.ReceptiveField(4, 2, 1.5)
    assert cols == analysis.ReceptiveField(6, 2, 2.5)
    box = analysis.receptive_field_box((rows, cols), (3, 0), (16, 16))
    assert box == (6, 0, 9, 5)


def test_theoretical_receptive_field_bounds_the_erf(rng):
    layers = [(3, 2), (3, 1), (3, 2)]
    kernels = [rng.normal(size=(3, 3, 1, 1)).astype(np.float32) for _ in layers]

    def fn(x):
        for k, (_, s) in zip(kernels, layers, strict=True):
            x = jax.lax.conv_general_dilated(
                x, k, (s, s), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        return x

    x = jnp.asarray(rng.normal(size=(1, 32, 32, 1)), jnp.float32)
    erf = np.asarray(analysis.effective_receptive_field(fn, x, (4, 3))[0])
    top, left, bottom, right = analysis.receptive_field_box(
        analysis.theoretical_receptive_field(layers), (4, 3), (32, 32)
    )
    rows, cols = np.nonzero(erf)
    assert (rows.min(), cols.min(), rows.max(), cols.max()) == (top, left, bottom, right)


def test_erf_radius_on_known_maps():
    # A ring of mass 1 at radius 3 and a point of mass 1 at the centre: half the mass lies
    # within radius 0 (the centre pixel alone), all of it within 3.
    h = w = 15
    rr, cc = np.mgrid[0:h, 0:w]
    dist = np.hypot(rr - 7, cc - 7)
    ring = (np.abs(dist - 3) < 0.5).astype(np.float32)
    erf = ring / ring.sum()
    erf[7, 7] = 1.0
    assert float(analysis.erf_radius(erf, (7, 7), mass=0.5)) == pytest.approx(0.0, abs=1e-6)
    assert float(analysis.erf_radius(erf, (7, 7), mass=1.0)) <= 3.5
    # Uniform disc of radius R: the radius holding mass m is about R * sqrt(m).
    big = np.mgrid[0:101, 0:101]
    disc = (np.hypot(big[0] - 50, big[1] - 50) <= 40).astype(np.float32)
    r = analysis.erf_radius(jnp.stack([disc, 3 * disc]), (50.0, 50.0), mass=0.25)
    np.testing.assert_allclose(r, [20.0, 20.0], atol=0.5)
    # Batched centres, and a zero map gives NaN.
    radii = analysis.erf_radius(
        np.stack([erf, np.zeros_like(erf)]), np.array([[7.0, 7.0], [7.0, 7.0]])
    )
    assert float(radii[0]) == pytest.approx(0.0, abs=1e-6) and np.isnan(float(radii[1]))


def test_kernel_sample_positions_by_hand():
    # G=2, K=(2, 3), S=(4, 4): tap (a, b) of group g reads (a + r_y + 1, b + r_x + 0.5).
    kh, kw, g = 2, 3, 2
    rotation = np.zeros((1, 3, 4, g * kh * kw * 2), np.float32)
    # rotation index ((g*Kh + a)*Kw + b)*2 + t: group 1, tap (1, 2) at output (2, 3).
    base = ((1 * kh + 1) * kw + 2) * 2
    rotation[0, 2, 3, base] = 0.25
    rotation[0, 2, 3, base + 1] = -0.75
    pos = analysis.kernel_sample_positions(
        rotation, (2, 3), kernel_size=(2, 3), scope_size=4, rotation_groups=2
    )
    assert pos.shape == (1, 2, 2, 3, 2)
    np.testing.assert_allclose(pos[0, 1, 1, 2], [1 + 0.25 + 1, 2 - 0.75 + 0.5])
    np.testing.assert_allclose(pos[0, 0, 1, 2], [1 + 1, 2 + 0.5])
    np.testing.assert_allclose(pos[0, 1, 0, 0], [0 + 1, 0 + 0.5])
    many = analysis.kernel_sample_positions(
        rotation, np.array([[0, 0], [2, 3]]), kernel_size=(2, 3), scope_size=4, rotation_groups=2
    )
    assert many.shape == (1, 2, 2, 2, 3, 2)
    np.testing.assert_allclose(many[:, 1], pos)


def test_image_sample_positions_by_hand():
    # K=3, stride 2, padding 1, dilation 2; offset index (a*Kw + b)*2 + t.
    offset = np.zeros((2, 4, 4, 18), np.float32)
    offset[1, 3, 1, (2 * 3 + 0) * 2 + 1] = 0.5
    pos = analysis.image_sample_positions(
        offset, (3, 1), kernel_size=3, stride=2, padding=1, dilation=2
    )
    assert pos.shape == (2, 3, 3, 2)
    np.testing.assert_allclose(pos[0, 2, 0], [3 * 2 - 1 + 4, 1 * 2 - 1 + 0])
    np.testing.assert_allclose(pos[1, 2, 0], [9, 1.5])
    rigid = analysis.image_sample_positions(
        None, (0, 0), kernel_size=3, padding=1, output_shape=(4, 4)
    )
    np.testing.assert_allclose(rigid[0, :, :, 0], [[-1] * 3, [0] * 3, [1] * 3])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda fn, x: analysis.effective_receptive_field(fn, x[0], (1, 1)), "x must be"),
        (lambda fn, x: analysis.effective_receptive_field(fn, x, (1, 9)), "position"),
        (lambda fn, x: analysis.effective_receptive_field(fn, x, [[1, 2, 3]]), "position"),
        (lambda fn, x: analysis.effective_receptive_field(fn, x, (1, 1), channel=5), "channel"),
        (lambda fn, x: analysis.effective_receptive_field(lambda v: v[..., 0], x, (1, 1)), "fn"),
        (lambda fn, x: analysis.erf_radius(np.ones(4), (0, 0)), "erf"),
        (lambda fn, x: analysis.erf_radius(np.ones((4, 4)), (0, 0), mass=0), "mass"),
        (lambda fn, x: analysis.erf_radius(np.ones((4, 4)), (0, 0, 0)), "center"),
        (lambda fn, x: analysis.theoretical_receptive_field([(3, 0)]), "layers\\[0\\]"),
        (lambda fn, x: analysis.theoretical_receptive_field([(3, 1, 1, 1, 1)]), "layers\\[0\\]"),
        (
            lambda fn, x: analysis.kernel_sample_positions(
                np.zeros((1, 2, 2, 18)), (0, 0), kernel_size=3, scope_size=4, rotation_groups=2
            ),
            "rotation",
        ),
        (
            lambda fn, x: analysis.kernel_sample_positions(
                np.zeros((1, 2, 2, 18)), (0, 0), kernel_size=3, scope_size=2
            ),
            "scope_size",
        ),
        (
            lambda fn, x: analysis.kernel_sample_positions(
                np.zeros((1, 2, 2, 18)), (2, 0), kernel_size=3, scope_size=4
            ),
            "position",
        ),
        (
            lambda fn, x: analysis.image_sample_positions(None, (0, 0), kernel_size=3),
            "output_shape",
        ),
    ],
)
def test_bad_input_names_the_argument(call, match):
    x = jnp.zeros((1, 4, 4, 2))
    with pytest.raises(ValueError, match=match):
        call(lambda v: v, x)


def test_non_integer_position_is_a_type_error():
    with pytest.raises(TypeError, match="position"):
        analysis.effective_receptive_field(lambda v: v, jnp.zeros((1, 4, 4, 1)), (1.5, 2.0))
