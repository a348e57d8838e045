"""Cross-checks against peers nobody here wrote: torchvision's deform_conv2d, torch's
grid_sample and XLA's own depthwise convolution. The torch tests need the `peers` extra
(`make test-peers`); the lax one always runs."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from jax import lax

import dk_jax


def test_sample_depthwise_equals_lax_depthwise_conv(rng):
    for k, stride, pad, dil in [(3, 1, 1, 1), (5, 2, 2, 1), (3, 1, 2, 2), (1, 1, 0, 1)]:
        x = jnp.asarray(rng.normal(size=(2, 11, 9, 12)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(k, k, 12)), jnp.float32)
        ho = (11 + 2 * pad - dil * (k - 1) - 1) // stride + 1
        wo = (9 + 2 * pad - dil * (k - 1) - 1) // stride + 1
        rot = jnp.zeros((2, ho, wo, k * k * 2), jnp.float32)
        got = dk_jax.sample_depthwise(
            x, rot, w, kernel_size=k, stride=stride, padding=pad, dilation=dil, implementation="ffi"
        )
        want = lax.conv_general_dilated(
            x,
            w[:, :, None, :],
            (stride, stride),
            [(pad, pad)] * 2,
            rhs_dilation=(dil, dil),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=12,
            precision=lax.Precision.HIGHEST,
        )
        assert rel_err(got, want) <= 1e-5


@pytest.mark.peers
def test_deform_sample_depthwise_equals_torchvision_deform_conv2d(rng):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    for k, stride, pad, dil in [(3, 1, 1, 1), (3, 2, 1, 1), (5, 1, 2, 2), (2, 1, 0, 1)]:
        n, h, w, c = 2, 10, 9, 6
        ho = (h + 2 * pad - dil * (k - 1) - 1) // stride + 1
        wo = (w + 2 * pad - dil * (k - 1) - 1) // stride + 1
        x = rng.normal(size=(n, h, w, c)).astype(np.float32)
        weight = rng.normal(size=(k, k, c)).astype(np.float32)
        # Offsets that reach outside the input, including exact integers.
        offset = (rng.normal(size=(n, ho, wo, k * k * 2)) * 3).astype(np.float32)
        offset[0, 0, 0, :4] = [2.0, -1.0, 7.0, -9.0]
        got = dk_jax.deform_sample_depthwise(
            jnp.asarray(x),
            jnp.asarray(offset),
            jnp.zeros((n, ho, wo, k * k * 2), jnp.float32),
            jnp.asarray(weight),
            kernel_size=k,
            stride=stride,
            padding=pad,
            dilation=dil,
            implementation="ffi",
        )
        want = (
            torchvision.ops.deform_conv2d(
                torch.from_numpy(x).permute(0, 3, 1, 2),
                torch.from_numpy(offset).permute(0, 3, 1, 2),
                torch.from_numpy(weight).permute(2, 0, 1)[:, None],
                stride=stride,
                padding=pad,
                dilation=dil,
            )
            .permute(0, 2, 3, 1)
            .numpy()
        )
        assert rel_err(got, want) <= 1e-5


@pytest.mark.peers
def test_nd_linear_sample_equals_torch_grid_sample(rng):
    torch = pytest.importorskip("torch")
    h, w, c = 7, 9, 5
    data = rng.normal(size=(h, w, c)).astype(np.float32)
    coord = rng.uniform(-2.0, 10.0, size=(40, 2)).astype(np.float32)  # (row, col), index units
    coord[:4] = [[0, 0], [6, 8], [-1, 3], [3.5, 9]]
    got = dk_jax.nd_linear_sample(jnp.asarray(data), jnp.asarray(coord), implementation="ffi")
    # grid_sample takes (x, y) = (col, row) normalised to [-1, 1] with align_corners=True.
    grid = np.stack([coord[:, 1] / (w - 1) * 2 - 1, coord[:, 0] / (h - 1) * 2 - 1], -1)
    want = torch.nn.functional.grid_sample(
        torch.from_numpy(data).permute(2, 0, 1)[None],
        torch.from_numpy(grid.astype(np.float32))[None, None],
        mode="bilinear",
        padding_mode="zeros",
        align_corners=True,
    )[0, :, 0].T.numpy()
    assert rel_err(got, want) <= 1e-5
